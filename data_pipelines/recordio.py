"""insightface / MXNet RecordIO (faces_emore `train.rec`, `train.idx`, `property`) without MXNet.

File layout (DESIGN.md §3). Each record is
    uint32 magic 0xced7230a | uint32 lrecord (upper 3 bits: cflag, lower 29 bits: length) |
    `length` payload bytes | zero padding to a multiple of 4.
A payload larger than one part is never needed, but dmlc's writer splits a payload wherever the magic
word occurs at a 4-byte aligned position (the magic is dropped and re-inserted by the reader):
cflag 0 = whole record, 1 = first part, 2 = middle part, 3 = last part.

Payload = IRHeader `<IfQQ` (flag, label, id, id2); when flag > 0, `flag` float32 labels follow and the
label is the first of them; the rest is the encoded image.

insightface's faces_emore puts a header at key 0 (flag 2, no image) whose labels are
(end of image keys, end of identity keys): images are keys [1, label[0]), followed by one identity record
per class whose labels are that class's [start, end) image keys. Files without that header are read
with every key of `train.idx` as an image.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from typing import BinaryIO, Iterable, Optional, Sequence

import numpy as np
from absl import logging

from data_pipelines.images import CorruptImageError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<II")
_IRHEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# Labels are stored as float32: integers are exact up to 2**24.
_MAX_LABEL = 1 << 24

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
LABELS_CACHE_NAME = "train.labels.npy"


class CorruptRecordError(CorruptImageError):
    """A RecordIO record (or the index pointing at it) is malformed; names the file and record key."""


# ----------------------------------------------------------------------------------------------------
# Writing.


def pack_image_record(label: float, image_bytes: bytes, label_vector: Optional[Sequence[float]] = None,
                      record_id: int = 0) -> bytes:
    """Builds a record payload: IRHeader, optional float32 label vector, then the image bytes.

    Args:
        label: the scalar label (ignored, stored as 0, when `label_vector` is given, as MXNet does).
        image_bytes: the encoded image (may be empty, as in header records).
        label_vector: optional labels; stored with flag = len(label_vector).
        record_id: the IRHeader id field (insightface stores the record key).

    Returns:
        The payload bytes, ready for `write_record`.
    """
    if label_vector is not None:
        vec = np.asarray(label_vector, dtype="<f4").reshape(-1)
        if vec.size == 0:
            raise ValueError("pack_image_record: label_vector must not be empty")
        return _IRHEADER.pack(vec.size, 0.0, record_id, 0) + vec.tobytes() + bytes(image_bytes)
    return _IRHEADER.pack(0, float(label), record_id, 0) + bytes(image_bytes)


def write_record(fh: BinaryIO, payload: bytes) -> int:
    """Writes one record (splitting it like dmlc's writer where the magic word occurs aligned).

    Args:
        fh: a binary file opened for writing.
        payload: the record payload.

    Returns:
        The number of bytes written.
    """
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"write_record: payload of {len(payload)} bytes exceeds the 2**29-1 limit")
    pad = -len(payload) % 4
    if _MAGIC_BYTES not in payload:
        fh.write(_HEADER.pack(MAGIC, len(payload)) + payload + b"\0" * pad)
        return 8 + len(payload) + pad
    words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    written = 0
    start = 0
    for cut in cuts:
        part = payload[start:cut]
        fh.write(_HEADER.pack(MAGIC, ((1 if start == 0 else 2) << 29) | len(part)))
        fh.write(part)
        written += 8 + len(part)
        start = cut + 4
    part = payload[start:]
    fh.write(_HEADER.pack(MAGIC, ((3 if cuts else 0) << 29) | len(part)))
    fh.write(part)
    fh.write(b"\0" * pad)
    return written + 8 + len(part) + pad


def write_recordio(folder: str, items: Iterable[tuple[bytes, int]], num_classes: int,
                   image_size: tuple[int, int] = (112, 112), header: bool = True) -> int:
    """Writes `train.rec`, `train.idx` and `property` in the insightface faces_emore layout.

    Args:
        folder: output folder (created if missing).
        items: (encoded image bytes, label) pairs, streamed.
        num_classes: the number of identities; labels must lie in [0, num_classes).
        image_size: (height, width) written to `property`.
        header: write the key-0 header record. When the labels come sorted, one identity record per
            class follows the images, as insightface's tools write them.

    Returns:
        The number of image records written.
    """
    if num_classes <= 0:
        raise ValueError(f"write_recordio: num_classes must be positive, got {num_classes}")
    os.makedirs(folder, exist_ok=True)
    rec_path = os.path.join(folder, REC_NAME)
    offsets: list[tuple[int, int]] = []
    labels: list[int] = []
    header_len = len(pack_image_record(0, b"", label_vector=(0, 0)))
    with open(rec_path, "wb") as fh:
        pos = 0
        if header:
            # Placeholder of the same size; rewritten once the number of images is known.
            offsets.append((0, 0))
            pos += write_record(fh, b"\0" * header_len)
        for i, (image, label) in enumerate(items):
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f"write_recordio: item {i} has label {label}, expected [0, {num_classes})")
            key = i + 1 if header else i
            offsets.append((key, pos))
            pos += write_record(fh, pack_image_record(label, image, record_id=key))
            labels.append(label)
        n = len(labels)
        if header:
            first_id_key = n + 1
            if n and np.all(np.diff(labels) >= 0):
                starts = np.searchsorted(labels, np.arange(num_classes + 1)) + 1
                for c in range(num_classes):
                    key = first_id_key + c
                    offsets.append((key, pos))
                    pos += write_record(fh, pack_image_record(
                        0, b"", label_vector=(starts[c], starts[c + 1]), record_id=key))
                end_key = first_id_key + num_classes
            else:
                logging.info("write_recordio: labels are not sorted; writing no identity records")
                end_key = first_id_key
            fh.seek(0)
            write_record(fh, pack_image_record(0, b"", label_vector=(first_id_key, end_key)))
    with open(os.path.join(folder, IDX_NAME), "w") as fh:
        fh.writelines(f"{key}\t{off}\n" for key, off in offsets)
    with open(os.path.join(folder, PROPERTY_NAME), "w") as fh:
        fh.write(f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return n


# ----------------------------------------------------------------------------------------------------
# Reading.


def read_property(path: str) -> tuple[int, tuple[int, int]]:
    """Parses a `property` file "num_classes,height,width" -> (num_classes, (height, width))."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing RecordIO 'property' file (expected \"num_classes,112,112\")")
    with open(path) as fh:
        text = fh.read().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: malformed property {text!r}, expected \"num_classes,height,width\" "
                         "e.g. \"85742,112,112\"") from None
    if num_classes <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"{path}: property {text!r} must hold positive integers")
    return num_classes, (height, width)


def read_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parses `train.idx` ("key\\toffset" lines) -> (keys int64 [R], offsets int64 [R]) sorted by key."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing RecordIO index file")
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.splitlines()
    try:
        with warnings.catch_warnings():
            # numpy warns (and will raise) on text it cannot parse; either means "malformed".
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(data, dtype=np.int64, sep=" ") if data.strip() else np.zeros(0, np.int64)
    except (ValueError, DeprecationWarning):
        values = None
    if values is None or values.size != 2 * sum(1 for ln in lines if ln.strip()):
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if line.strip() and (len(fields) != 2 or not all(f.isdigit() for f in fields)):
                raise ValueError(f"{path} line {lineno}: malformed index line {line[:80]!r}, "
                                 "expected \"key<TAB>offset\"")
        raise ValueError(f"{path}: malformed index")
    keys, offsets = values[0::2], values[1::2]
    if keys.size == 0:
        raise ValueError(f"{path}: empty index (no records)")
    order = np.argsort(keys, kind="stable")
    keys, offsets = keys[order], offsets[order]
    dup = np.flatnonzero(np.diff(keys) == 0)
    if dup.size:
        raise ValueError(f"{path}: key {keys[dup[0]]} appears more than once")
    return keys, offsets


class RecordIOSource:
    """Random-access source over an insightface RecordIO folder.

    The file is opened lazily (memory mapped) in each process on first access, so the source pickles
    cheaply to Grain workers: only the paths and the parsed index travel.

    Items are `{"image": bytes (encoded), "label": int}` for the i-th image record.
    """

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"{self.folder}: RecordIO folder not found")
        self.rec_path = os.path.join(self.folder, REC_NAME)
        self.idx_path = os.path.join(self.folder, IDX_NAME)
        if not os.path.exists(self.rec_path):
            raise FileNotFoundError(f"{self.rec_path}: missing RecordIO data file")
        self.num_classes, self.image_size = read_property(os.path.join(self.folder, PROPERTY_NAME))
        keys, offsets = read_index(self.idx_path)
        self._size = os.path.getsize(self.rec_path)
        past = np.flatnonzero(offsets + 8 > self._size)
        if past.size:
            k = past[0]
            raise CorruptRecordError(
                f"{self.rec_path} record {keys[k]}",
                f"{self.idx_path} gives offset {offsets[k]}, past the end of the {self._size}-byte "
                f"file ({past.size} such records)")
        self._mm: Optional[mmap.mmap] = None
        self._labels: Optional[np.ndarray] = None
        self._keys, self._offsets = self._image_records(keys, offsets)

    def _image_records(self, keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if keys[0] != 0:
            return keys, offsets
        flag, _, vec, image = self._parse(0, int(offsets[0]))
        if flag < 2 or image:
            return keys, offsets
        end = int(vec[0])
        want = np.arange(1, end, dtype=np.int64)
        sel = (keys >= 1) & (keys < end)
        if sel.sum() != want.size:
            missing = np.setdiff1d(want, keys[sel])
            raise CorruptRecordError(
                f"{self.rec_path} record 0",
                f"header says image records are keys [1, {end}) but {self.idx_path} lacks "
                f"{missing.size} of them (first: key {missing[0]})")
        return keys[sel], offsets[sel]

    # -- pickling: the memory map stays behind and is reopened on first access.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.rec_path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def _read(self, key: int, offset: int) -> bytes:
        """Returns the payload of the record at `offset` (joining continuation parts)."""
        mm = self._map()
        parts = []
        pos = offset
        while True:
            if pos + 8 > self._size:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"truncated: record header at byte {pos} is past the end of the "
                                         f"{self._size}-byte file")
            magic, lrec = _HEADER.unpack_from(mm, pos)
            if magic != MAGIC:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"bad magic 0x{magic:08x} at byte {pos}, expected 0x{MAGIC:08x}")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if pos + 8 + length > self._size:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"truncated: {length}-byte payload at byte {pos + 8} runs past the "
                                         f"end of the {self._size}-byte file")
            expected = (0, 1) if not parts else (2, 3)
            if cflag not in expected:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"unexpected continuation flag {cflag} at byte {pos} "
                                         f"(expected one of {expected})")
            parts.append(mm[pos + 8:pos + 8 + length])
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            pos += 8 + length + (-length % 4)

    def _parse(self, key: int, offset: int) -> tuple[int, float, Optional[np.ndarray], bytes]:
        """Returns (flag, label, label vector or None, image bytes) of one record."""
        payload = self._read(key, offset)
        if len(payload) < _IRHEADER.size:
            raise CorruptRecordError(f"{self.rec_path} record {key}",
                                     f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
        flag, label, _, _ = _IRHEADER.unpack_from(payload)
        start = _IRHEADER.size
        vec = None
        if flag > 0:
            end = start + 4 * flag
            if end > len(payload):
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"IRHeader flag {flag} needs {4 * flag} label bytes but the payload "
                                         f"has {len(payload) - start}")
            vec = np.frombuffer(payload, dtype="<f4", count=flag, offset=start)
            label, start = float(vec[0]), end
        return flag, label, vec, payload[start:]

    def __len__(self) -> int:
        return int(self._keys.size)

    def where(self, i: int) -> str:
        """"<train.rec path> record <key>" of the i-th image record."""
        return f"{self.rec_path} record {self._keys[i]}"

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.rec_path}: image index {i} out of range [0, {n})")
        return i % n

    def __getitem__(self, i: int) -> dict:
        i = self._index(int(i))
        key = int(self._keys[i])
        _, label, _, image = self._parse(key, int(self._offsets[i]))
        if not image:
            raise CorruptRecordError(f"{self.rec_path} record {key}", "image record holds no image bytes")
        return {"image": image, "label": int(label)}

    def labels(self) -> np.ndarray:
        """Labels of every image record, int64 `[len]`, read from the record headers only.

        Cached in memory and in `train.labels.npy` beside the files when that folder is writable.
        """
        if self._labels is None:
            self._labels = self._load_cached_labels()
        if self._labels is None:
            self._labels = self._scan_labels()
            self._save_cached_labels(self._labels)
        return self._labels

    def _cache_path(self) -> str:
        return os.path.join(self.folder, LABELS_CACHE_NAME)

    def _load_cached_labels(self) -> Optional[np.ndarray]:
        path = self._cache_path()
        try:
            if os.path.getmtime(path) < max(os.path.getmtime(self.rec_path), os.path.getmtime(self.idx_path)):
                return None
            labels = np.load(path)
        except (OSError, ValueError):
            return None
        if labels.shape != (len(self),) or labels.dtype != np.int64:
            return None
        return labels

    def _save_cached_labels(self, labels: np.ndarray) -> None:
        path = self._cache_path()
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        try:
            np.save(tmp, labels)
            os.replace(tmp, path)
        except OSError as e:
            logging.info("Not caching labels to %s (%s); keeping them in memory.", path, e)
            if os.path.exists(tmp):
                os.remove(tmp)

    def _scan_labels(self, chunk: int = 1 << 18) -> np.ndarray:
        data = np.frombuffer(self._map(), dtype=np.uint8)
        labels = np.empty(len(self), dtype=np.int64)
        # Per record: magic, lrecord, flag, label (16 bytes), then the first vector label at +32.
        take = np.concatenate([np.arange(16), np.arange(32, 36)])
        for lo in range(0, len(self), chunk):
            offs = self._offsets[lo:lo + chunk]
            safe = offs + 36 <= self._size
            rows = data[np.minimum(offs[:, None] + take, self._size - 1)]
            words = rows.view("<u4")
            magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
            scalar = rows[:, 12:16].copy().view("<f4")[:, 0]
            first = rows[:, 16:20].copy().view("<f4")[:, 0]
            # Short, split, malformed records take the slow, fully checked path.
            length = (lrec & _LENGTH_MASK).astype(np.int64)
            simple = (safe & (magic == MAGIC) & (lrec >> 29 == 0) & (length >= 24 + 4 * flag.astype(np.int64))
                      & (offs + 8 + length <= self._size))
            out = np.where(flag > 0, first, scalar).astype(np.int64)
            for j in np.flatnonzero(~simple):
                out[j] = self[lo + j]["label"]
            labels[lo:lo + chunk] = out
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            raise CorruptRecordError(self.where(int(bad[0])),
                                     f"label {labels[bad[0]]} outside [0, {self.num_classes}) given by "
                                     f"{os.path.join(self.folder, PROPERTY_NAME)}")
        return labels
