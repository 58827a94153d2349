"""Tests for data_pipelines.recordio and recordio_format: round trips, header layout, pickling, clear errors."""

import os
import pickle
import re
import struct
from concurrent import futures

import numpy as np
import pytest
from absl import logging

from data_pipelines import images, recordio, recordio_format


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    img = np.full((112, 112, 3), rng.integers(0, 256, 3), np.uint8)
    return images.encode_jpeg(img, quality=90)


LABELS = [0, 0, 1, 2, 2, 2]


@pytest.fixture
def rec_folder(tmp_path):
    items = [(_jpeg(i), lab) for i, lab in enumerate(LABELS)]
    assert recordio_format.write_recordio(str(tmp_path), items, num_classes=3) == len(LABELS)
    return tmp_path, items


def _idx(folder):
    return [tuple(int(v) for v in ln.split("\t")) for ln in (folder / "train.idx").read_text().splitlines()]


def test_round_trip_with_header_and_identity_records(rec_folder):
    folder, items = rec_folder
    src = recordio.RecordIOSource(str(folder))
    assert len(src) == len(items)
    assert src.num_classes == 3 and src.image_size == (112, 112)
    for i, (image, label) in enumerate(items):
        assert src[i] == {"image": image, "label": label}
    np.testing.assert_array_equal(src.labels(), LABELS)
    assert src.labels().dtype == np.int64
    assert src.where(0) == f"{folder / 'train.rec'} record 1"
    # insightface layout: key 0 = header (image keys [1, 7), identity keys [7, 10)); identity records
    # give each class's [start, end) image keys.
    keys = [k for k, _ in _idx(folder)]
    assert keys == list(range(10))
    raw = recordio.RecordIOSource.__new__(recordio.RecordIOSource)
    raw.__dict__.update(src.__dict__)
    assert raw._parse(0, 0)[2].tolist() == [7, 10]
    offsets = dict(_idx(folder))
    assert [src._parse(k, offsets[k])[2].tolist() for k in (7, 8, 9)] == [[1, 3], [3, 4], [4, 7]]


def test_labels_cached_next_to_files(rec_folder):
    folder, _ = rec_folder
    recordio.RecordIOSource(str(folder)).labels()
    cache = folder / "train.labels.v2.npy"
    assert cache.exists()
    np.testing.assert_array_equal(np.load(cache), LABELS)
    # A stale cache (wrong length) is ignored and rewritten.
    np.save(cache, np.zeros(2, np.int64))
    os.utime(cache, (os.path.getmtime(folder / "train.rec") + 10,) * 2)
    np.testing.assert_array_equal(recordio.RecordIOSource(str(folder)).labels(), LABELS)


def test_pickled_copy_reads(rec_folder):
    folder, items = rec_folder
    src = recordio.RecordIOSource(str(folder))
    _ = src[0]  # opens the memory map, which must not travel.
    blob = pickle.dumps(src)
    assert len(blob) < 4096
    copy = pickle.loads(blob)
    assert copy[5] == {"image": items[5][0], "label": 2}
    np.testing.assert_array_equal(copy.labels(), LABELS)


def test_label_vector_records_without_header(tmp_path):
    images_ = [_jpeg(i) for i in range(3)]
    with open(tmp_path / "train.rec", "wb") as fh:
        offsets = []
        for i, (img, vec) in enumerate(zip(images_, ([4.0, 7.0], [1.0], [3.0, 0.5, 9.0]))):
            offsets.append(fh.tell())
            recordio_format.write_record(fh, recordio_format.pack_image_record(0, img, label_vector=vec, record_id=i))
    (tmp_path / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))
    (tmp_path / "property").write_text("10,112,112")
    src = recordio.RecordIOSource(str(tmp_path))
    assert len(src) == 3  # key 0 holds an image, so it is no header.
    assert [src[i]["label"] for i in range(3)] == [4, 1, 3]
    assert [src[i]["image"] for i in range(3)] == images_
    np.testing.assert_array_equal(src.labels(), [4, 1, 3])


def test_unsorted_labels_and_no_header(tmp_path):
    items = [(_jpeg(i), lab) for i, lab in enumerate([2, 0, 1, 0])]
    recordio_format.write_recordio(str(tmp_path / "h"), items, num_classes=3)
    recordio_format.write_recordio(str(tmp_path / "n"), items, num_classes=3, header=False)
    for name in ("h", "n"):
        src = recordio.RecordIOSource(str(tmp_path / name))
        np.testing.assert_array_equal(src.labels(), [2, 0, 1, 0])
        assert [src[i]["image"] for i in range(4)] == [im for im, _ in items]
    assert [k for k, _ in _idx(tmp_path / "n")] == [0, 1, 2, 3]


def test_payload_containing_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", recordio_format.MAGIC)
    # IRHeader is 24 bytes, so magic at image offsets 0 and 8 is 4-byte aligned in the payload.
    image = magic + b"abcd" + magic + b"tail!"
    recordio_format.write_recordio(str(tmp_path), [(image, 1), (_jpeg(0), 0)], num_classes=2, header=False)
    raw = (tmp_path / "train.rec").read_bytes()
    lrecs = [struct.unpack_from("<I", raw, 4)[0] >> 29]
    assert lrecs == [1]  # first part of a split record, as dmlc's writer does.
    src = recordio.RecordIOSource(str(tmp_path))
    assert src[0] == {"image": image, "label": 1}
    np.testing.assert_array_equal(src.labels(), [1, 0])


def _corrupt(folder, key, at, data):
    offsets = dict(_idx(folder))
    with open(folder / "train.rec", "r+b") as fh:
        fh.seek(offsets[key] + at)
        fh.write(data)


def test_corrupt_magic_names_file_and_record(rec_folder):
    folder, _ = rec_folder
    _corrupt(folder, 3, 0, b"\x00\x00\x00\x00")
    src = recordio.RecordIOSource(str(folder))
    rec = str(folder / "train.rec")
    with pytest.raises(recordio.CorruptRecordError, match=rf"{rec} record 3: bad magic 0x00000000"):
        src[2]
    with pytest.raises(images.CorruptRecordError,
                       match=r"record 3: bad magic .* \(1 of 6 records have no usable label; "
                             r"data\.on_corrupt='skip' replaces them\)"):
        src.labels()
    assert src[1]["label"] == 0
    assert recordio.CorruptRecordError is images.CorruptRecordError


def test_unlabelled_records_lend_a_neighbours_label_under_skip(rec_folder):
    folder, _ = rec_folder
    _corrupt(folder, 3, 0, b"\x00\x00\x00\x00")  # image 2 (label 1)
    _corrupt(folder, 1, 0, b"\x00\x00\x00\x00")  # image 0 (label 0): nothing before it
    src = recordio.RecordIOSource(str(folder), on_corrupt="skip")
    np.testing.assert_array_equal(src.labels(), [0, 0, 0, 2, 2, 2])
    assert src.num_unlabelled == 2
    for i in (0, 2):
        with pytest.raises(recordio.CorruptRecordError, match="bad magic"):
            src[i]
    # The cache keeps the records unlabelled, so a later strict run still refuses them.
    assert np.load(folder / recordio.LABELS_CACHE_NAME).tolist() == [-1, 0, -1, 2, 2, 2]
    with pytest.raises(recordio.CorruptRecordError, match=r"record 1: bad magic .* \(2 of 6 records"):
        recordio.RecordIOSource(str(folder)).labels()
    with pytest.raises(ValueError, match=r"on_corrupt must be 'raise' or 'skip', got 'ignore'"):
        recordio.RecordIOSource(str(folder), on_corrupt="ignore")


def _write_labels(folder, labels, split_at=None):
    """A header-less RecordIO whose records carry the given float labels (record `split_at` is split in
    two parts, so the label scan reads it on its slow path)."""
    magic = struct.pack("<I", recordio_format.MAGIC)
    with open(folder / "train.rec", "wb") as fh:
        offsets = []
        for i, label in enumerate(labels):
            offsets.append(fh.tell())
            image = (magic + b"abcd" if i == split_at else b"") + _jpeg(i)
            recordio_format.write_record(fh, recordio_format.pack_image_record(label, image, record_id=i))
    (folder / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))
    (folder / "property").write_text("30,112,112")


@pytest.mark.parametrize("split", [False, True])
def test_fractional_or_out_of_range_labels_are_refused(tmp_path, split):
    _write_labels(tmp_path, [3.0, 19.7, 4.0, 30.0, -1.0], split_at=1 if split else None)
    src = recordio.RecordIOSource(str(tmp_path))
    assert src[0]["label"] == 3 and src[2]["label"] == 4
    for i, shown in ((1, "19.7"), (3, "30"), (4, "-1")):
        with pytest.raises(recordio.CorruptRecordError,
                           match=rf"train\.rec record {i}: label {shown} is not a class in \[0, 30\)"):
            src[i]
    with pytest.raises(recordio.CorruptRecordError, match=r"record 1: label 19\.7 .*\(3 of 5 records"):
        src.labels()
    skip = recordio.RecordIOSource(str(tmp_path), on_corrupt="skip")
    np.testing.assert_array_equal(skip.labels(), [3, 3, 4, 4, 4])
    assert skip.num_unlabelled == 3


def test_identity_boundary_exact_past_float32_range():
    num_classes = 5

    def probe(first_identity):
        def holds_image(key):
            if 1 <= key < first_identity:
                return True
            return False if key < first_identity + num_classes else None
        return holds_image

    # 2**24 + 3 is stored as 2**24 + 4 (a float32 rounds to even): read naively, the first identity
    # record would be taken for an image, with label 1. Past 2**25 the error grows to 2 keys.
    for first in (2**24 + 3, 2**24 + 1, 2**24 + 2, 2**25 + 5, 2**25 + 6, 2**26 + 3, 17_091_658, 123, 1):
        stored = float(np.float32(first))
        assert recordio_format.identity_boundary(stored, probe(first), "h") == first
        if first in (2**24 + 3, 2**25 + 5, 2**26 + 3):
            assert int(stored) != first
    # No identity records at all: the end of the image keys is the end of the index.
    no_identities = lambda key: True if 1 <= key < 2**24 + 3 else None  # noqa: E731
    assert recordio_format.identity_boundary(float(np.float32(2**24 + 3)), no_identities, "h") == 2**24 + 3


def test_identity_boundary_refuses_what_it_cannot_pin():
    all_images = lambda key: True  # noqa: E731
    expected = (r"rec record 0: header gives the end of the image keys as 16777220 \(float32, so any key "
                r"in \[16777219, 16777221\]\), but the records there show 0 image/identity boundaries, "
                r"expected 1 \(key 16777218: image, .*key 16777221: image\)")
    with pytest.raises(ValueError, match=expected):
        recordio_format.identity_boundary(float(np.float32(2**24 + 3)), all_images, "rec record 0")
    for value in (7.5, 0.0, float("nan"), 3e38):
        with pytest.raises(ValueError, match=rf"h: header gives {re.escape(f'{value:g}')} as the end of the "
                                             r"image keys, expected an integer key in \[1, 2147483648\]"):
            recordio_format.identity_boundary(value, all_images, "h")


def test_header_disagreeing_with_the_records_is_refused(rec_folder):
    folder, _ = rec_folder
    # The header claims images are keys [1, 8), but key 7 is the first identity record.
    _corrupt(folder, 0, 8, recordio_format.pack_image_record(0, b"", label_vector=(8, 10)))
    expected = (r"train\.rec record 0: header gives the end of the image keys as 8 .*show 0 image/identity "
                r"boundaries, expected 1 \(key 7: no image, key 8: no image\)")
    with pytest.raises(ValueError, match=expected):
        recordio.RecordIOSource(str(folder))


def test_truncated_record(rec_folder):
    folder, _ = rec_folder
    offsets = dict(_idx(folder))
    rec = folder / "train.rec"
    os.truncate(rec, offsets[6] + 40)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in _idx(folder) if k <= 6))
    src = recordio.RecordIOSource(str(folder))
    with pytest.raises(recordio.CorruptRecordError, match=rf"{rec} record 6: truncated: .* runs past the end"):
        src[5]
    with pytest.raises(recordio.CorruptRecordError, match=r"record 6: truncated"):
        src.labels()


def test_idx_offset_past_end(rec_folder):
    folder, _ = rec_folder
    size = os.path.getsize(folder / "train.rec")
    lines = _idx(folder)
    lines[4] = (4, size + 100)
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in lines))
    with pytest.raises(recordio.CorruptRecordError,
                       match=rf"{folder / 'train.rec'} record 4: .*train\.idx gives offset {size + 100}, past "
                             rf"the end of the {size}-byte file"):
        recordio.RecordIOSource(str(folder))


def test_missing_or_malformed_files(rec_folder):
    folder, _ = rec_folder
    (folder / "property").write_text("lots,112")
    with pytest.raises(ValueError, match=rf"{folder / 'property'}: malformed property 'lots,112'"):
        recordio.RecordIOSource(str(folder))
    os.remove(folder / "property")
    with pytest.raises(FileNotFoundError, match=rf"{folder / 'property'}: missing RecordIO 'property'"):
        recordio.RecordIOSource(str(folder))
    (folder / "property").write_text("3,112,112\n")
    (folder / "train.idx").write_text("0\t0\n1\tforty\n")
    with pytest.raises(ValueError, match=r"train\.idx line 2: malformed index line"):
        recordio.RecordIOSource(str(folder))
    os.remove(folder / "train.idx")
    with pytest.raises(FileNotFoundError, match=r"train\.idx: missing RecordIO index"):
        recordio.RecordIOSource(str(folder))
    os.remove(folder / "train.rec")
    with pytest.raises(FileNotFoundError, match=r"train\.rec: missing RecordIO data file"):
        recordio.RecordIOSource(str(folder))


def test_continuation_flag_at_record_start_is_an_error(rec_folder):
    folder, _ = rec_folder
    offsets = dict(_idx(folder))
    raw = (folder / "train.rec").read_bytes()
    lrec = struct.unpack_from("<I", raw, offsets[2] + 4)[0]
    _corrupt(folder, 2, 4, struct.pack("<I", lrec | (2 << 29)))
    with pytest.raises(recordio.CorruptRecordError, match=r"record 2: unexpected continuation flag 2"):
        recordio.RecordIOSource(str(folder))[1]


def test_missing_image_keys_in_index(rec_folder):
    folder, _ = rec_folder
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in _idx(folder) if k != 4))
    with pytest.raises(recordio.CorruptRecordError, match=r"record 0: header says image records are keys "
                                                          r"\[1, 7\) but .* lacks 1 of them \(first: key 4\)"):
        recordio.RecordIOSource(str(folder))


def test_write_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match=r"item 1 has label 5, expected \[0, 3\)"):
        recordio_format.write_recordio(str(tmp_path), [(b"x", 0), (b"y", 5)], num_classes=3)


def test_gcs_folder_reads_through_epath(gcs, rec_folder, tmp_path, monkeypatch):
    folder, items = rec_folder
    local = recordio.RecordIOSource(str(folder))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert recordio_format.write_recordio(gcs.url("rec"), items, num_classes=3) == len(items)
    files = {name: (folder / name).stat().st_size for name in ("train.rec", "train.idx", "property")}
    assert gcs.objects() == {"rec/": 0, **{f"rec/{name}": size for name, size in files.items()}}
    src = recordio.RecordIOSource(gcs.url("rec"))
    assert [src[i] for i in range(len(items))] == [local[i] for i in range(len(items))]
    np.testing.assert_array_equal(src.labels(), LABELS)
    assert src.where(0) == gcs.url("rec/train.rec record 1")
    copy = pickle.loads(pickle.dumps(src))
    with futures.ThreadPoolExecutor(4) as pool:  # one file handle per thread
        got = list(pool.map(lambda i: copy[i % len(items)], range(60)))
    assert got == [local[i % len(items)] for i in range(60)]
    assert gcs.objects()[f"rec/{recordio.LABELS_CACHE_NAME}"] > 0
    reopened = recordio.RecordIOSource(gcs.url("rec"))
    reopened._scan_labels = lambda: pytest.fail("the labels cache written above was not used")
    np.testing.assert_array_equal(reopened.labels(), LABELS)
    assert src._mm is None and copy._mm is None  # never memory mapped
    # The data file is only ever read by byte ranges.
    rec_reads = [(status, byte_range) for name, status, byte_range in gcs.reads() if name == "rec/train.rec"]
    assert rec_reads and all(status == 206 and byte_range.startswith("bytes=") for status, byte_range in rec_reads)
    assert os.listdir(cwd) == []  # nothing named "gs:" in the working directory


def test_gcs_scan_streams_windows(gcs, rec_folder, monkeypatch):
    folder, _ = rec_folder
    gcs.put_tree(str(folder), "rec")
    monkeypatch.setattr(recordio, "_SCAN_WINDOW", 1000)  # several records per window, several windows
    src = recordio.RecordIOSource(gcs.url("rec"))
    columns = np.array([0, 1, 2, 3, 12, 13, 14, 15, 32, 35])
    rows = src._gather(src._offsets[::-1].copy(), columns)
    raw = (folder / "train.rec").read_bytes()
    expected = [[raw[o + c] for c in columns] for o in src._offsets[::-1]]
    assert rows.tolist() == expected


def test_unwritable_gcs_cache_never_stops_the_run(gcs, rec_folder, monkeypatch):
    folder, _ = rec_folder
    gcs.put_tree(str(folder), "rec")
    messages = []
    monkeypatch.setattr(logging, "info", lambda msg, *args: messages.append(msg % args))
    with gcs.read_only():
        src = recordio.RecordIOSource(gcs.url("rec"))
        np.testing.assert_array_equal(src.labels(), LABELS)
    assert [m for m in messages if "Not caching labels" in m and "PermissionDeniedError" in m
            and "storage.objects.create" in m]
    assert f"rec/{recordio.LABELS_CACHE_NAME}" not in gcs.objects()
