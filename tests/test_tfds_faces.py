"""Tests for data_pipelines.tfds_faces: RecordIO / folder -> ArrayRecord TFDS -> same bytes and labels."""

import os
import pickle

import numpy as np
import pytest

from data_pipelines import images, recordio, recordio_format, tfds_faces

LABELS = [1, 0, 2, 1, 0, 2, 2]


def _jpeg(i):
    yy, xx = np.mgrid[0:112, 0:112]
    img = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i) % 256, np.full_like(xx, 40 * i)], -1)
    return images.encode_jpeg(img.astype(np.uint8), quality=80)


def test_recordio_to_tfds_same_bytes_and_labels(tmp_path):
    rec = str(tmp_path / "rec")
    recordio_format.write_recordio(rec, [(_jpeg(i), lab) for i, lab in enumerate(LABELS)], num_classes=3)
    source = recordio.RecordIOSource(rec)
    builder = tfds_faces.build_tfds(rec, str(tmp_path / "tfds"), source="recordio")

    for src in (tfds_faces.TFDSSource(builder.data_dir),
                tfds_faces.TFDSSource("face_records", data_dir=str(tmp_path / "tfds")),
                tfds_faces.TFDSSource(str(tmp_path / "tfds"))):
        assert len(src) == len(source) and src.num_classes == 3 and src.image_size == (112, 112)
        for i in range(len(source)):
            assert src[i] == source[i]
            assert isinstance(src[i]["image"], bytes) and isinstance(src[i]["label"], int)
        np.testing.assert_array_equal(src.labels(), source.labels())

    copy = pickle.loads(pickle.dumps(tfds_faces.TFDSSource(builder.data_dir)))
    assert copy[6] == source[6]
    # Without the saved labels file, labels() scans the records.
    os.remove(os.path.join(builder.data_dir, tfds_faces.LABELS_FILE))
    scanned = tfds_faces.TFDSSource(builder.data_dir).labels()
    np.testing.assert_array_equal(scanned, LABELS)
    assert scanned.dtype == np.int64


def test_folder_to_tfds(tmp_path):
    root = tmp_path / "faces"
    for i, name in enumerate(["b", "a", "b"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{i}.jpg").write_bytes(_jpeg(i))
    builder = tfds_faces.build_tfds(str(root), str(tmp_path / "tfds"), source="folder")
    src = tfds_faces.TFDSSource(builder.data_dir)
    assert [src[i] for i in range(len(src))] == [
        {"image": _jpeg(1), "label": 0}, {"image": _jpeg(0), "label": 1}, {"image": _jpeg(2), "label": 1}]
    assert src.num_classes == 2


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'lmdb'"):
        tfds_faces.build_tfds(str(tmp_path), str(tmp_path / "tfds"), source="lmdb")
    with pytest.raises(FileNotFoundError, match=r"face_records: no prepared dataset under"):
        tfds_faces.TFDSSource("face_records", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a prepared TFDS dataset folder"):
        tfds_faces.TFDSSource(str(tmp_path / "nowhere"))


def test_gcs_dataset_folder_is_read_through_the_gcs_clients(gcs, tmp_path, monkeypatch):
    rec = str(tmp_path / "rec")
    items = [(_jpeg(i), lab) for i, lab in enumerate(LABELS)]
    recordio_format.write_recordio(rec, items, num_classes=3)
    # ArrayRecord writes local files only: the dataset is prepared here, then uploaded.
    tfds_faces.build_tfds(rec, str(tmp_path / "tfds"))
    dataset = "tfds/face_records/1.0.0"
    shards = [n for n in gcs.put_tree(str(tmp_path / "tfds"), "tfds") if ".array_record-" in n]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for src in (tfds_faces.TFDSSource(gcs.url("tfds")),
                tfds_faces.TFDSSource(gcs.url(dataset)),
                tfds_faces.TFDSSource("face_records", data_dir=gcs.url("tfds"))):
        assert src.builder_dir == gcs.url(dataset)
        assert len(src) == len(LABELS) and src.num_classes == 3
        np.testing.assert_array_equal(src.labels(), LABELS)  # labels.npy read through epath
    assert [src[i] for i in range(len(LABELS))] == [{"image": im, "label": lab} for im, lab in items]
    read = {name for name, _, _ in gcs.reads()}
    assert {f"{dataset}/labels.npy", f"{dataset}/dataset_info.json"} <= read and len(shards) == 1 and shards[0] in read
    assert os.listdir(cwd) == []  # nothing named "gs:" in the working directory
