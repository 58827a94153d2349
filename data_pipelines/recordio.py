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
per class whose labels are that class's [start, end) image keys. Those labels are float32, exact only up
to 2**24 keys, so the reader takes the end of the image keys from the records themselves
(`identity_boundary`). Files without that header are read with every key of `train.idx` as an image.

Paths are `etils.epath` paths: local files are memory mapped, others (gs://, ...) read through epath.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
import tempfile
import threading
import warnings
from typing import BinaryIO, Callable, Iterable, Optional, Sequence

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.images import CorruptRecordError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<II")
_IRHEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# Image keys beyond any real file (MS1M: 5.8M, glint360k: 17M); bounds the keys probed around the header.
_MAX_KEYS = 1 << 31
# Bytes per read when a non-local file is streamed for its record headers.
_SCAN_WINDOW = 64 << 20

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
# v2: -1 marks a record without a usable label (v1 caches truncated fractional labels).
LABELS_CACHE_NAME = "train.labels.v2.npy"


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


def write_recordio(folder: epath.PathLike, items: Iterable[tuple[bytes, int]], num_classes: int,
                   image_size: tuple[int, int] = (112, 112), header: bool = True) -> int:
    """Writes `train.rec`, `train.idx` and `property` in the insightface faces_emore layout.

    Args:
        folder: output folder (created if missing); any `etils.epath` path. The header record is
            rewritten in place once the image count is known, so a non-local folder gets files written
            in a local temporary folder first, then copied.
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
    folder = epath.Path(folder)
    if not _is_local(folder):
        with tempfile.TemporaryDirectory() as tmp:
            n = write_recordio(tmp, items, num_classes, image_size, header)
            folder.mkdir(parents=True, exist_ok=True)
            for name in (REC_NAME, IDX_NAME, PROPERTY_NAME):
                epath.Path(tmp, name).copy(folder / name, overwrite=True)
        return n
    folder.mkdir(parents=True, exist_ok=True)
    offsets: list[tuple[int, int]] = []
    labels: list[int] = []
    header_len = len(pack_image_record(0, b"", label_vector=(0, 0)))
    with open(folder / REC_NAME, "wb") as fh:
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
    (folder / IDX_NAME).write_text("".join(f"{key}\t{off}\n" for key, off in offsets))
    (folder / PROPERTY_NAME).write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return n


# ----------------------------------------------------------------------------------------------------
# Reading.


def read_property(path: epath.PathLike) -> tuple[int, tuple[int, int]]:
    """Parses a `property` file "num_classes,height,width" -> (num_classes, (height, width))."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing RecordIO 'property' file "
                                "(expected \"num_classes,112,112\")")
    text = path.read_text().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: malformed property {text!r}, expected \"num_classes,height,width\" "
                         "e.g. \"85742,112,112\"") from None
    if num_classes <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"{path}: property {text!r} must hold positive integers")
    return num_classes, (height, width)


def read_index(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parses `train.idx` ("key\\toffset" lines) -> (keys int64 [R], offsets int64 [R]) sorted by key."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing RecordIO index file")
    with path.open("rb") as fh:
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


def identity_boundary(images_end: float, holds_image: Callable[[int], Optional[bool]], where: str) -> int:
    """The first key after the image records of an insightface RecordIO, exact for any file size.

    The key-0 header stores the end of the image keys as a float32, exact only up to 2**24: a
    glint360k-sized file's value is off by up to half a float32 step (1 key above 2**24, 2 above 2**25,
    ...). The true end is the one key n among those that round to the stored value where record n - 1
    holds an image and record n does not (the first identity record, or no record at all when the file
    has none).

    Args:
        images_end: the header's first label, float32.
        holds_image: key -> True when that record holds an image, False when it holds none (an identity
            record), None when the index has no such key. A record that cannot be read counts as holding
            an image (it is not a readable identity record).
        where: the header record, named in the error message.

    Returns:
        n: image records are keys [1, n).

    Raises:
        ValueError: the stored value is not an integer in [1, 2**31], or the records around it do not
            show exactly one image/identity boundary (the message lists what each candidate key holds).
    """
    value = np.float32(images_end)
    if not np.isfinite(value) or value < 1 or value != np.floor(value) or value > _MAX_KEYS:
        raise ValueError(f"{where}: header gives {images_end:g} as the end of the image keys, expected an "
                         f"integer key in [1, {_MAX_KEYS}]")
    step = int(np.spacing(value))
    window = [n for n in range(max(1, int(value) - step), int(value) + step + 1) if np.float32(n) == value]
    kinds = {n: holds_image(n) for n in [window[0] - 1] + window if n >= 1}
    found = [n for n in window if (n == 1 or kinds[n - 1] is True) and kinds[n] is not True]
    if len(found) != 1:
        held = {True: "image", False: "no image", None: "absent"}
        shown = ", ".join(f"key {n}: {held[kinds[n]]}" for n in sorted(kinds))
        raise ValueError(f"{where}: header gives the end of the image keys as {int(value)} (float32, so any "
                         f"key in [{window[0]}, {window[-1]}]), but the records there show {len(found)} "
                         f"image/identity boundaries, expected 1 ({shown})")
    return found[0]


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _size_mtime(path: epath.Path) -> tuple[int, float]:
    if _is_local(path):
        st = os.stat(os.fspath(path))
        return st.st_size, st.st_mtime
    st = path.stat()
    return int(st.length), float(st.mtime)


class RecordIOSource:
    """Random-access source over an insightface RecordIO folder, local or on any `etils.epath` scheme.

    Local files are memory mapped; others (gs://, ...) are read through the epath file object, one
    ranged read (seek + read) per record, and a whole-file streaming pass when the labels are scanned.
    Files are opened lazily in each process (and, when not local, in each thread) on first access, so
    the source pickles cheaply to Grain workers: only the paths and the parsed index travel.

    Items are `{"image": bytes (encoded), "label": int}` for the i-th image record. A record that is
    malformed, holds no image, or whose label is not an integer class in [0, num_classes) raises
    `CorruptRecordError` naming the file and key.

    Args:
        folder: the folder holding train.rec, train.idx and property.
        on_corrupt: "raise" or "skip", as `data.on_corrupt`. It decides what `labels()` does with records
            whose label cannot be read: "raise" raises for the first; "skip" lends each the label of
            the nearest readable record before it (after it, for leading ones), so it stays in the epoch
            and, being unreadable, is replaced by an image of that identity each time it is drawn (the
            lent label only picks the identity of the stand-in). Their count is `num_unlabelled`.
    """

    def __init__(self, folder: epath.PathLike, on_corrupt: str = "raise"):
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.folder = epath.Path(folder)
        self.on_corrupt = on_corrupt
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: RecordIO folder not found")
        self.rec_path = self.folder / REC_NAME
        self.idx_path = self.folder / IDX_NAME
        if not self.rec_path.exists():
            raise FileNotFoundError(f"{self.rec_path}: missing RecordIO data file")
        self.num_classes, self.image_size = read_property(self.folder / PROPERTY_NAME)
        keys, offsets = read_index(self.idx_path)
        self._local = _is_local(self.rec_path)
        self._size, _ = _size_mtime(self.rec_path)
        past = np.flatnonzero(offsets + 8 > self._size)
        if past.size:
            k = past[0]
            raise CorruptRecordError(
                f"{self.rec_path} record {keys[k]}",
                f"{self.idx_path} gives offset {offsets[k]}, past the end of the {self._size}-byte "
                f"file ({past.size} such records)")
        self._mm: Optional[mmap.mmap] = None
        self._handles = threading.local()
        self._labels: Optional[np.ndarray] = None
        self.num_unlabelled = 0
        self._keys, self._offsets = self._image_records(keys, offsets)

    def _image_records(self, keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if keys[0] != 0:
            return keys, offsets
        flag, _, vec, image = self._parse(0, int(offsets[0]))
        if flag < 2 or image:
            return keys, offsets

        def holds_image(key: int) -> Optional[bool]:
            i = int(np.searchsorted(keys, key))
            if i == keys.size or keys[i] != key:
                return None
            try:
                return bool(self._parse(key, int(offsets[i]))[3])
            except CorruptRecordError:
                return True

        end = identity_boundary(float(vec[0]), holds_image, f"{self.rec_path} record 0")
        sel = (keys >= 1) & (keys < end)
        if sel.sum() != end - 1:
            missing = np.setdiff1d(np.arange(1, end, dtype=np.int64), keys[sel])
            raise CorruptRecordError(
                f"{self.rec_path} record 0",
                f"header says image records are keys [1, {end}) but {self.idx_path} lacks "
                f"{missing.size} of them (first: key {missing[0]})")
        return keys[sel], offsets[sel]

    # -- pickling: the memory map and file handles stay behind and are reopened on first access.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        del state["_handles"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles = threading.local()

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(os.fspath(self.rec_path), "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def _file(self) -> BinaryIO:
        fh = getattr(self._handles, "fh", None)
        if fh is None:
            # Entered, not just called: epath's TensorFlow backend (gs:// when TensorFlow is installed) opens
            # a file as a context manager only. The stack, kept per thread, holds the file open.
            self._handles.stack = contextlib.ExitStack()
            fh = self._handles.fh = self._handles.stack.enter_context(self.rec_path.open("rb"))
        return fh

    def _bytes(self, pos: int, n: int) -> bytes:
        """`n` bytes of the data file at byte `pos` (the caller checked they lie inside it)."""
        if self._local:
            return self._map()[pos:pos + n]
        fh = self._file()
        fh.seek(pos)
        return fh.read(n)

    def _read(self, key: int, offset: int) -> bytes:
        """Returns the payload of the record at `offset` (joining continuation parts)."""
        parts = []
        pos = offset
        while True:
            if pos + 8 > self._size:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"truncated: record header at byte {pos} is past the end of the "
                                         f"{self._size}-byte file")
            magic, lrec = _HEADER.unpack(self._bytes(pos, 8))
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
            parts.append(self._bytes(pos + 8, length))
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

    def _class(self, key: int, label: float) -> int:
        """The label as a class index; a fractional or out-of-range label is a bad record."""
        if not (math.isfinite(label) and label.is_integer() and 0 <= label < self.num_classes):
            raise CorruptRecordError(f"{self.rec_path} record {key}",
                                     f"label {label:g} is not a class in [0, {self.num_classes}) "
                                     f"(integers, as {self.folder / PROPERTY_NAME} gives)")
        return int(label)

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
        return {"image": image, "label": self._class(key, label)}

    def labels(self) -> np.ndarray:
        """Labels of every image record, int64 `[len]`, read from the record headers only.

        Cached in memory and in `train.labels.v2.npy` beside the files when that folder is writable (a
        failed write, on any file system, is logged and never stops the run). Records without a usable
        label are handled as `on_corrupt` says (see the class docstring).

        Raises:
            CorruptRecordError: under on_corrupt="raise", for the first record without a usable label
                (names the record and how many there are).
        """
        if self._labels is None:
            raw = self._load_cached_labels()
            if raw is None:
                raw = self._scan_labels()
                self._save_cached_labels(raw)
            self._labels = self._lend_labels(raw)
        return self._labels

    def _lend_labels(self, raw: np.ndarray) -> np.ndarray:
        """`raw` with its -1 entries (no usable label) handled as `on_corrupt` says."""
        bad = np.flatnonzero(raw < 0)
        if not bad.size:
            return raw
        try:
            self[int(bad[0])]
        except CorruptRecordError as e:
            first = e
        else:
            first = CorruptRecordError(self.where(int(bad[0])), f"no usable label in {self._cache_path()}")
        if self.on_corrupt == "raise":
            raise CorruptRecordError(first.where, f"{first.reason} ({bad.size} of {len(self)} records have "
                                     "no usable label; data.on_corrupt='skip' replaces them)")
        good = np.flatnonzero(raw >= 0)
        if not good.size:
            raise ValueError(f"{self.rec_path}: none of the {len(self)} image records has a usable label "
                             f"(first: {first})")
        before = np.maximum(np.searchsorted(good, bad) - 1, 0)
        labels = raw.copy()
        labels[bad] = raw[good[before]]
        self.num_unlabelled = int(bad.size)
        logging.warning("%s: %d records have no usable label (first: %s); under data.on_corrupt='skip' "
                        "each is replaced by an image of a neighbouring record's identity whenever drawn.",
                        self.rec_path, bad.size, first)
        return labels

    def _cache_path(self) -> epath.Path:
        return self.folder / LABELS_CACHE_NAME

    def _load_cached_labels(self) -> Optional[np.ndarray]:
        path = self._cache_path()
        try:
            if not path.exists():
                return None
            newest = max(_size_mtime(self.rec_path)[1], _size_mtime(self.idx_path)[1])
            if _size_mtime(path)[1] < newest:
                return None
            with path.open("rb") as fh:
                labels = np.load(fh, allow_pickle=False)
        except Exception as e:  # The cache is optional: no file-system error may stop the run.
            logging.warning("Not using the labels cache %s (%s: %s); scanning the records.", path,
                            type(e).__name__, e)
            return None
        if (labels.shape != (len(self),) or labels.dtype != np.int64 or not labels.size
                or labels.min() < -1 or labels.max() >= self.num_classes):
            return None
        return labels

    def _save_cached_labels(self, labels: np.ndarray) -> None:
        path = self._cache_path()
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        try:
            if self._local:
                np.save(tmp, labels)
                os.replace(tmp, path)
            else:
                # Object stores write an object whole when it is closed: no temporary file needed.
                with path.open("wb") as fh:
                    np.save(fh, labels)
        except Exception as e:  # The cache is optional: no file-system error may stop the run.
            logging.info("Not caching labels to %s (%s: %s); keeping them in memory.", path,
                         type(e).__name__, e)
            if self._local and os.path.exists(tmp):
                os.remove(tmp)

    def _gather(self, offsets: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """uint8 `[n, len(columns)]`: the bytes at `offset + columns` for each offset (junk past the end).

        Local files are indexed through the memory map. Other files are streamed once in ascending offset
        order, `_SCAN_WINDOW` bytes per read, so a scan costs a pass over the file, not a request per
        record.
        """
        if self._local:
            data = np.frombuffer(self._map(), dtype=np.uint8)
            return data[np.minimum(offsets[:, None] + columns, self._size - 1)]
        rows = np.zeros((offsets.size, columns.size), np.uint8)
        order = np.argsort(offsets, kind="stable")
        ordered = offsets[order]
        fh = self._file()
        lo = 0
        while lo < ordered.size:
            start = int(ordered[lo])
            hi = max(int(np.searchsorted(ordered, start + _SCAN_WINDOW)), lo + 1)
            stop = min(int(ordered[hi - 1]) + int(columns.max()) + 1, self._size)
            fh.seek(start)
            window = np.frombuffer(fh.read(stop - start), dtype=np.uint8)
            rows[order[lo:hi]] = window[np.minimum(ordered[lo:hi, None] - start + columns, window.size - 1)]
            lo = hi
        return rows

    def _scan_labels(self, chunk: int = 1 << 18) -> np.ndarray:
        """Labels from the record headers, int64 `[len]`, -1 where a record has no usable label."""
        labels = np.empty(len(self), dtype=np.int64)
        # Per record: magic, lrecord, flag, label (16 bytes), then the first vector label at +32.
        columns = np.concatenate([np.arange(16), np.arange(32, 36)])
        for lo in range(0, len(self), chunk):
            offs = self._offsets[lo:lo + chunk]
            rows = self._gather(offs, columns)
            words = rows[:, :12].copy().view("<u4")
            magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
            scalar = rows[:, 12:16].copy().view("<f4")[:, 0]
            first = rows[:, 16:20].copy().view("<f4")[:, 0]
            # Short, split, malformed records take the slow, fully checked path.
            length = (lrec & _LENGTH_MASK).astype(np.int64)
            simple = ((offs + 36 <= self._size) & (magic == MAGIC) & (lrec >> 29 == 0)
                      & (length >= 24 + 4 * flag.astype(np.int64)) & (offs + 8 + length <= self._size))
            value = np.where(flag > 0, first, scalar).astype(np.float64)
            usable = (np.isfinite(value) & (value == np.floor(value)) & (value >= 0)
                      & (value < self.num_classes))
            out = np.where(usable, value, -1).astype(np.int64)
            for j in np.flatnonzero(~simple):
                key = int(self._keys[lo + j])
                try:
                    _, label, _, _ = self._parse(key, int(offs[j]))
                    out[j] = self._class(key, label)
                except CorruptRecordError:
                    out[j] = -1
            labels[lo:lo + chunk] = out
        return labels
