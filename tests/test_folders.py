"""Tests for data_pipelines.folders."""

import os
import pickle

import numpy as np
import pytest
from etils import epath

from data_pipelines import folders


def _tree(root, layout):
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_labels_from_sorted_names_and_non_images_ignored(tmp_path):
    _tree(tmp_path, {
        "zoe/1.jpg": b"z1", "zoe/0.PNG": b"z0",
        "adam/a.jpeg": b"a", "adam/notes.txt": b"x", "adam/.hidden.jpg": b"h",
        "mia/m.BMP": b"m", "mia/m.gif": b"g",
        "empty/readme.md": b"r",
        "stray.jpg": b"s",
    })
    src = folders.ImageFolderSource(str(tmp_path))
    assert src.class_names == ["adam", "mia", "zoe"]
    assert src.num_classes == 3 and src.num_empty_identities == 1
    assert len(src) == 4
    np.testing.assert_array_equal(src.labels(), [0, 1, 2, 2])
    assert src.labels().dtype == np.int64
    assert [src[i] for i in range(4)] == [
        {"image": b"a", "label": 0}, {"image": b"m", "label": 1},
        {"image": b"z0", "label": 2}, {"image": b"z1", "label": 2}]
    assert src.where(1) == str(tmp_path / "mia" / "m.BMP")
    assert src.root == epath.Path(tmp_path)
    copy = pickle.loads(pickle.dumps(src))
    assert copy[3] == {"image": b"z1", "label": 2}


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing: image folder root not found"):
        folders.ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"no identity folders"):
        folders.ImageFolderSource(str(tmp_path))
    _tree(tmp_path, {"a/x.txt": b"", "b/y.gif": b""})
    with pytest.raises(ValueError, match=r"no images with extensions .* in any of the 2 identity folders"):
        folders.ImageFolderSource(str(tmp_path))
    _tree(tmp_path, {"a/x.jpg": b"1"})
    with pytest.raises(IndexError, match=r"image index 1 out of range \[0, 1\)"):
        folders.ImageFolderSource(str(tmp_path))[1]


_LITTER = {"a/2.jpg": b"2", "a/10.JPEG": b"10", "a/1.png": b"1", "a/._1.png": b"apple double",
           "a/.DS_Store": b"finder", "a/.hidden.jpg": b"h", "a/notes.txt": b"t", "a/x.gif": b"g",
           "a/sub.jpg/inner.jpg": b"nested", "b/c.bmp": b"c"}


def test_list_images_skips_hidden_appledouble_and_other_files(tmp_path):
    _tree(tmp_path, _LITTER)
    listed = folders.list_images(tmp_path / "a")
    assert all(isinstance(p, epath.Path) for p in listed)
    assert [p.name for p in listed] == ["1.png", "10.JPEG", "2.jpg"]  # sorted by name; sub.jpg is a folder
    assert listed[0] == epath.Path(tmp_path / "a" / "1.png")
    assert [folders.is_image_name(n) for n in ("x.Jpg", "._x.jpg", ".DS_Store", "x.webp", "x.TIFF", "x.gif")] == [
        True, False, False, True, True, False]
    with pytest.raises(FileNotFoundError, match=r"nope: image folder not found"):
        folders.list_images(tmp_path / "nope")


def test_scan_names_every_skipped_entry_subfolders_included(tmp_path, caplog):
    _tree(tmp_path, {**_LITTER, "a/photo.webp": b"w", "a/deeper/x.jpg": b"x"})
    listed, skipped = folders.scan_images(tmp_path / "a")
    assert [p.name for p in listed] == ["1.png", "10.JPEG", "2.jpg", "photo.webp"]
    assert skipped == [".DS_Store", "._1.png", ".hidden.jpg", "deeper/", "notes.txt", "sub.jpg/", "x.gif"]
    assert folders.name_skipped(skipped) == ".DS_Store, ._1.png, .hidden.jpg, deeper/, notes.txt and 2 more"
    assert folders.name_skipped(skipped[:2]) == ".DS_Store, ._1.png"
    caplog.set_level("WARNING")
    src = folders.ImageFolderSource(str(tmp_path))
    assert len(src) == 5 and src.class_names == ["a", "b"]
    assert ("7 entries of the identity folders are not readable images and were skipped (a/.DS_Store, a/._1.png, "
            "a/.hidden.jpg, a/deeper/, a/notes.txt and 2 more)") in caplog.text


def test_gcs_image_folder(gcs, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # On object stores names alone decide (see list_images), so no folder named like an image here.
    layout = {k: v for k, v in _LITTER.items() if "sub.jpg" not in k}
    _tree(epath.Path(gcs.url("faces")), {**layout, ".trash/x.jpg": b"x", "stray.jpg": b"s"})
    listed = folders.list_images(gcs.url("faces/a"))
    names = ("1.png", "10.JPEG", "2.jpg")
    assert [os.fspath(p) for p in listed] == [gcs.url("faces/a", n) for n in names]
    src = folders.ImageFolderSource(gcs.url("faces"))
    assert src.class_names == ["a", "b"]
    assert [src[i] for i in range(len(src))] == [
        {"image": b"1", "label": 0}, {"image": b"10", "label": 0}, {"image": b"2", "label": 0},
        {"image": b"c", "label": 1}]
    assert src.where(3) == gcs.url("faces/b/c.bmp")
    assert pickle.loads(pickle.dumps(src))[1] == {"image": b"10", "label": 0}
    # The images came from the bucket, and only they: nothing else listed was downloaded.
    assert sorted({name for name, _, _ in gcs.reads()}) == ["faces/a/1.png", "faces/a/10.JPEG", "faces/a/2.jpg",
                                                          "faces/b/c.bmp"]
    assert os.listdir(cwd) == []  # nothing named "gs:" in the working directory
