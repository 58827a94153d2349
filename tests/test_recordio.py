"""Tests for data_pipelines.recordio: round trips, header layout, pickling, clear errors."""

import os
import pickle
import struct

import numpy as np
import pytest

from data_pipelines import images, recordio


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    img = np.full((112, 112, 3), rng.integers(0, 256, 3), np.uint8)
    return images.encode_jpeg(img, quality=90)


LABELS = [0, 0, 1, 2, 2, 2]


@pytest.fixture
def rec_folder(tmp_path):
    items = [(_jpeg(i), lab) for i, lab in enumerate(LABELS)]
    assert recordio.write_recordio(str(tmp_path), items, num_classes=3) == len(LABELS)
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
    cache = folder / "train.labels.npy"
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
            recordio.write_record(fh, recordio.pack_image_record(0, img, label_vector=vec, record_id=i))
    (tmp_path / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate(offsets)))
    (tmp_path / "property").write_text("10,112,112")
    src = recordio.RecordIOSource(str(tmp_path))
    assert len(src) == 3  # key 0 holds an image, so it is no header.
    assert [src[i]["label"] for i in range(3)] == [4, 1, 3]
    assert [src[i]["image"] for i in range(3)] == images_
    np.testing.assert_array_equal(src.labels(), [4, 1, 3])


def test_unsorted_labels_and_no_header(tmp_path):
    items = [(_jpeg(i), lab) for i, lab in enumerate([2, 0, 1, 0])]
    recordio.write_recordio(str(tmp_path / "h"), items, num_classes=3)
    recordio.write_recordio(str(tmp_path / "n"), items, num_classes=3, header=False)
    for name in ("h", "n"):
        src = recordio.RecordIOSource(str(tmp_path / name))
        np.testing.assert_array_equal(src.labels(), [2, 0, 1, 0])
        assert [src[i]["image"] for i in range(4)] == [im for im, _ in items]
    assert [k for k, _ in _idx(tmp_path / "n")] == [0, 1, 2, 3]


def test_payload_containing_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", recordio.MAGIC)
    # IRHeader is 24 bytes, so magic at image offsets 0 and 8 is 4-byte aligned in the payload.
    image = magic + b"abcd" + magic + b"tail!"
    recordio.write_recordio(str(tmp_path), [(image, 1), (_jpeg(0), 0)], num_classes=2, header=False)
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
    with pytest.raises(images.CorruptImageError, match=r"record 3: bad magic"):
        src.labels()
    assert src[1]["label"] == 0


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
        recordio.write_recordio(str(tmp_path), [(b"x", 0), (b"y", 5)], num_classes=3)
