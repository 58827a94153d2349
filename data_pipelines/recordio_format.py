"""The insightface / MXNet RecordIO format (faces_emore `train.rec`, `train.idx`, `property`) without MXNet.

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

This module writes RecordIO folders (`write_recordio`) and parses `train.idx`, `property` and the header's end
of the image keys; the training source that reads the records is `data_pipelines.recordio.RecordIOSource`.
Paths are `etils.epath` paths.
"""

from __future__ import annotations

import os
import struct
import tempfile
import warnings
from typing import BinaryIO, Callable, Iterable, Optional, Sequence

import numpy as np
from absl import logging
from etils import epath

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
# Each record's (magic, lrecord) and the payload's IRHeader (flag, label, id, id2).
RECORD_HEADER = struct.Struct("<II")
IRHEADER = struct.Struct("<IfQQ")
LENGTH_MASK = (1 << 29) - 1
# Image keys beyond any real file (MS1M: 5.8M, glint360k: 17M); bounds the keys probed around the header.
_MAX_KEYS = 1 << 31

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"


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
        return IRHEADER.pack(vec.size, 0.0, record_id, 0) + vec.tobytes() + bytes(image_bytes)
    return IRHEADER.pack(0, float(label), record_id, 0) + bytes(image_bytes)


def write_record(fh: BinaryIO, payload: bytes) -> int:
    """Writes one record (splitting it like dmlc's writer where the magic word occurs aligned).

    Args:
        fh: a binary file opened for writing.
        payload: the record payload.

    Returns:
        The number of bytes written.
    """
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"write_record: payload of {len(payload)} bytes exceeds the 2**29-1 limit")
    pad = -len(payload) % 4
    if MAGIC_BYTES not in payload:
        fh.write(RECORD_HEADER.pack(MAGIC, len(payload)) + payload + b"\0" * pad)
        return 8 + len(payload) + pad
    words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    written = 0
    start = 0
    for cut in cuts:
        part = payload[start:cut]
        fh.write(RECORD_HEADER.pack(MAGIC, ((1 if start == 0 else 2) << 29) | len(part)))
        fh.write(part)
        written += 8 + len(part)
        start = cut + 4
    part = payload[start:]
    fh.write(RECORD_HEADER.pack(MAGIC, ((3 if cuts else 0) << 29) | len(part)))
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
    if not is_local(folder):
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
# Reading the index, the property file and the header.


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


def is_local(path: epath.Path) -> bool:
    """True for a local path, False for a URI (gs://, ...)."""
    return "://" not in os.fspath(path)
