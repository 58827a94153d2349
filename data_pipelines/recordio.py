"""Random-access training source over an insightface / MXNet RecordIO folder (`RecordIOSource`).

The format (records, IRHeader, the key-0 header, `train.idx`, `property`) and the writer are in
`data_pipelines.recordio_format`. This module reads records, finds where the image records end, scans and
caches the labels, and applies the corrupt-record policy (`data.on_corrupt`).

Paths are `etils.epath` paths: local files are memory mapped, others (gs://, ...) read through epath.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from typing import BinaryIO, Optional

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.images import CorruptRecordError
from data_pipelines.recordio_format import (IDX_NAME, IRHEADER, LENGTH_MASK, MAGIC, MAGIC_BYTES, PROPERTY_NAME,
                                            REC_NAME, RECORD_HEADER, identity_boundary, is_local, read_index,
                                            read_property)

# Bytes per read when a non-local file is streamed for its record headers.
_SCAN_WINDOW = 64 << 20
# v2: -1 marks a record without a usable label (v1 caches truncated fractional labels).
LABELS_CACHE_NAME = "train.labels.v2.npy"


def _size_mtime(path: epath.Path) -> tuple[int, float]:
    if is_local(path):
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
        self._local = is_local(self.rec_path)
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
            magic, lrec = RECORD_HEADER.unpack(self._bytes(pos, 8))
            if magic != MAGIC:
                raise CorruptRecordError(f"{self.rec_path} record {key}",
                                         f"bad magic 0x{magic:08x} at byte {pos}, expected 0x{MAGIC:08x}")
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
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
                return MAGIC_BYTES.join(parts)
            pos += 8 + length + (-length % 4)

    def _parse(self, key: int, offset: int) -> tuple[int, float, Optional[np.ndarray], bytes]:
        """Returns (flag, label, label vector or None, image bytes) of one record."""
        payload = self._read(key, offset)
        if len(payload) < IRHEADER.size:
            raise CorruptRecordError(f"{self.rec_path} record {key}",
                                     f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
        flag, label, _, _ = IRHEADER.unpack_from(payload)
        start = IRHEADER.size
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
            length = (lrec & LENGTH_MASK).astype(np.int64)
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
