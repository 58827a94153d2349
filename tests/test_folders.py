"""Tests for data_pipelines.folders."""

import pickle

import numpy as np
import pytest

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
