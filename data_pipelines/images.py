"""Image decoding and encoding for face crops and photos, and the error a bad record raises.

JPEGs decode through libjpeg-turbo (simplejpeg) in strict mode, other formats through OpenCV; damaged
data is an error (`CorruptImageError`), never a decoded image. Two readings of the same bytes:
- `decode_image`: the pixels as stored. Dataset records (`.rec`, `.bin`, identity folders of aligned
  crops, IJB images whose landmarks files are in stored pixels) are read so: an aligned crop was aligned
  on its stored pixels, and a stale orientation tag copied into it would turn the face off the template.
- `decode_photo`: the pixels as a viewer shows them, the EXIF orientation tag applied (a phone stores a
  portrait sideways with a tag). Every photo a user gives a command (align, embed, verify) is read so.
`READABLE_EXTENSIONS` is the one list of file names these decoders read; every folder walk uses it.
"""

from __future__ import annotations

import io
from typing import Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image

ImageBytes = Union[bytes, bytearray, memoryview, np.ndarray]

_JPEG_SOI = b"\xff\xd8"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
# The formats `decode_image` reads (libjpeg-turbo for JPEG, OpenCV for the others), by Pillow's format
# names; their file extensions are Pillow's registered ones. Not listed: formats OpenCV does not read
# (AVIF, PSD, ...) or reads other than as 8-bit images (.pfm: float), and GIF (animations, not photos).
_DECODED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM")
READABLE_EXTENSIONS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                                   if fmt in _DECODED_FORMATS and ext != ".pfm"))
# EXIF orientation (tag 0x0112) -> the numpy view that shows the stored pixels as a viewer does
# (Pillow's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 counter-clockwise).
_ORIENTATION_TAG = 0x0112
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


class CorruptRecordError(ValueError):
    """One record of a dataset is bad: its bytes, its label or its image cannot be used.

    The single kind of "this record is bad" error: training's `data.on_corrupt="skip"` replaces such a
    record by another of the same identity and counts it; faults that are not about one record (a
    missing file, an unreadable index) raise other errors and always stop.

    Attributes:
        where: the location of the bad data, e.g. "/data/train.rec record 17".
        reason: what went wrong.
    """

    _UNNAMED = "<record>"

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where or self._UNNAMED}: {reason}")

    def __reduce__(self):
        # Grain workers send exceptions back to the main process by pickling them; the default
        # reduction would call __init__ with the formatted message only.
        return (type(self), (self.where, self.reason))


class CorruptImageError(CorruptRecordError):
    """A record's image cannot be decoded correctly, or decodes to the wrong size."""

    _UNNAMED = "<image>"


def _as_bytes(data: ImageBytes, where: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise CorruptImageError(
                where, f"expected encoded image bytes or a 1-D uint8 array, got array "
                f"{data.dtype}{list(data.shape)}")
        return data.tobytes()
    raise CorruptImageError(where, f"expected encoded image bytes, got {type(data).__name__}")


def decode_image(data: ImageBytes, where: str = "") -> np.ndarray:
    """Decodes an encoded image (JPEG, PNG, BMP, ...) to RGB, refusing damaged data.

    JPEGs (data starting with the SOI marker) are decoded by simplejpeg (libjpeg-turbo) in strict mode
    only: any libjpeg warning (damaged or truncated scan data, bad Huffman codes, missing markers) is an
    error. There is no OpenCV fallback for JPEGs: OpenCV's libjpeg conceals the same damage (it warns on
    stderr and fills grey), so an image it returns cannot be told apart from garbage. libjpeg-turbo
    reads every variant aligned face crops use (baseline and progressive, any chroma subsampling,
    grayscale, CMYK/YCCK); the rare variants its 8-bit interface refuses (12-bit precision, for one) are
    refused here too, with libjpeg's reason ("Unsupported JPEG data precision 12"), and must be
    re-encoded as 8-bit JPEG or PNG. JPEG carries no checksum: damage after which the Huffman codes
    happen to resynchronize decodes without any warning and cannot be seen by any decoder. Other formats
    go through cv2.imdecode: libpng checks every chunk's CRC, so damaged PNGs are refused; formats
    without checksums (BMP) cannot reveal damage to any decoder.

    Args:
        data: the encoded image: bytes, bytearray, memoryview or a 1-D uint8 array.
        where: where the data came from, named in the error message.

    Returns:
        uint8 `[H, W, 3]` RGB. Grayscale images are replicated to 3 channels; alpha is dropped.

    Raises:
        CorruptImageError: the data is empty, damaged, or not an image format we can decode.
    """
    buf = _as_bytes(data, where)
    if not buf:
        raise CorruptImageError(where, "empty image data (0 bytes)")
    if buf.startswith(_JPEG_SOI):
        try:
            return simplejpeg.decode_jpeg(buf, colorspace="RGB", strict=True)
        except ValueError as e:
            raise CorruptImageError(where, f"corrupt JPEG ({len(buf)} bytes): {e}") from None
    # Stored pixels: OpenCV would otherwise apply a PNG's or JPEG's orientation tag (not WebP's); its TIFF
    # reader applies the tag whatever the flag (`decode_photo` knows).
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise CorruptImageError(where, f"undecodable image data ({len(buf)} bytes, starts with {buf[:8]!r})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def exif_orientation(data: ImageBytes) -> int:
    """The EXIF orientation tag of an encoded image (1..8), 1 when it has none or it cannot be read.

    Only the headers are parsed (Pillow opens lazily), so a 48 MP photo costs no decoding here.
    """
    try:
        with Image.open(io.BytesIO(_as_bytes(data, ""))) as image:
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return orientation if orientation in _ORIENT else 1


def decode_photo(data: ImageBytes, where: str = "") -> np.ndarray:
    """Decodes a user's photo as a viewer shows it: `decode_image`, then its EXIF orientation applied.

    Args:
        data: the encoded image (see `decode_image`).
        where: where the data came from, named in the error message.

    Returns:
        uint8 `[H, W, 3]` RGB, C-contiguous; H and W are swapped from the stored image for orientations 5-8.

    Raises:
        CorruptImageError: as `decode_image`.
    """
    buf = _as_bytes(data, where)
    image = decode_image(buf, where)
    orientation = exif_orientation(buf)
    if orientation == 1 or buf.startswith(_TIFF_MAGIC):  # OpenCV has applied a TIFF's tag already.
        return image
    return np.ascontiguousarray(_ORIENT[orientation](image))


def _check_rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{what}: expected a uint8 [H, W, 3] RGB image, got {img.dtype}{list(img.shape)}")
    return np.ascontiguousarray(img)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Encodes uint8 `[H, W, 3]` RGB as JPEG (4:4:4 chroma, so faces keep colour detail)."""
    img = _check_rgb(img, "encode_jpeg")
    return simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB", colorsubsampling="444")


def encode_png(img: np.ndarray) -> bytes:
    """Encodes uint8 `[H, W, 3]` RGB as PNG (lossless)."""
    img = _check_rgb(img, "encode_png")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"encode_png: OpenCV could not encode an image of shape {list(img.shape)}")
    return buf.tobytes()


def check_size(img: np.ndarray, expected: tuple[int, int] = (112, 112), where: str = "") -> np.ndarray:
    """Checks that a decoded image is `[expected[0], expected[1], 3]`.

    Args:
        img: decoded image `[H, W, 3]`.
        expected: (height, width).
        where: where the image came from, named in the error message.

    Returns:
        `img` unchanged.

    Raises:
        CorruptImageError: the image has another size (aligned face crops are never resized silently);
            a per-record fault, so `data.on_corrupt="skip"` replaces the record.
    """
    h, w = expected
    if img.ndim != 3 or img.shape[:2] != (h, w) or img.shape[2] != 3:
        raise CorruptImageError(where, f"image is {'x'.join(map(str, img.shape))}, expected {h}x{w}x3 "
                                "(aligned face crops)")
    return img
