"""Tests for data_pipelines.images."""

import numpy as np
import pytest

from data_pipelines import images


def _face(h=112, w=112, seed=0):
    # Smooth content so JPEG round trips stay close to the original.
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=3)
    img = base + 60 * np.stack([np.sin(yy / 9), np.cos(xx / 7), np.sin((xx + yy) / 11)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_jpeg_round_trip_is_rgb_and_close():
    img = _face()
    out = images.decode_image(images.encode_jpeg(img, quality=95))
    assert out.dtype == np.uint8 and out.shape == (112, 112, 3)
    assert np.abs(out.astype(int) - img).mean() < 3


def test_channel_order_is_rgb():
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 255  # pure red
    for data in (images.encode_jpeg(img), images.encode_png(img)):
        out = images.decode_image(data)
        assert out[..., 0].min() > 240 and out[..., 1:].max() < 15


def test_png_round_trip_is_exact_and_accepts_array_and_bytearray():
    img = _face(20, 30)
    data = images.encode_png(img)
    np.testing.assert_array_equal(images.decode_image(data), img)
    np.testing.assert_array_equal(images.decode_image(bytearray(data)), img)
    np.testing.assert_array_equal(images.decode_image(np.frombuffer(data, np.uint8)), img)


def test_grayscale_becomes_three_channels():
    import cv2
    gray = _face()[..., 0]
    ok, buf = cv2.imencode(".png", gray)
    assert ok
    out = images.decode_image(buf.tobytes())
    assert out.shape == (112, 112, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_corrupt_jpeg_names_where():
    data = images.encode_jpeg(_face())
    with pytest.raises(images.CorruptImageError, match=r"/data/train\.rec record 17: corrupt JPEG"):
        images.decode_image(data[: len(data) // 2], where="/data/train.rec record 17")
    with pytest.raises(images.CorruptImageError, match=r"x\.rec record 3: undecodable image data"):
        images.decode_image(b"not an image at all", where="x.rec record 3")
    with pytest.raises(images.CorruptImageError, match=r"r 1: empty image data"):
        images.decode_image(b"", where="r 1")
    assert issubclass(images.CorruptImageError, ValueError)


def damage_scan(data: bytes, size: int = 64) -> bytes:
    """Overwrites `size` bytes in the middle of the entropy-coded scan data.

    The damaged run starts with a stray marker (0xFF 0xD3), as random damage often does, so libjpeg
    always hits it before the scan ends. (Damage after which the Huffman codes resynchronize decodes
    without any warning: no decoder can see it, JPEG having no checksum.)
    """
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    at = scan + (len(data) - 2 - scan - size) // 2
    assert at > scan, "the damage must stay inside the scan data"
    return data[:at] + b"\xff\xd3" + b"\x55" * (size - 2) + data[at + size:]


def test_damaged_scan_data_is_refused_not_concealed():
    import cv2
    img = _face()
    damaged = damage_scan(images.encode_jpeg(img))
    # OpenCV's libjpeg conceals the damage and returns an image far from the original: the fault
    # this guards against.
    concealed = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR)
    assert concealed is not None and np.abs(concealed[..., ::-1].astype(int) - img).mean() > 20
    with pytest.raises(images.CorruptImageError,
                       match=r"x\.rec record 5: corrupt JPEG \(\d+ bytes\): Corrupt JPEG data"):
        images.decode_image(damaged, where="x.rec record 5")


def test_unsupported_jpeg_variant_is_refused_with_libjpegs_reason():
    data = images.encode_jpeg(_face())
    sof = data.index(b"\xff\xc0")
    assert data[sof + 4] == 8  # sample precision
    twelve_bit = data[:sof + 4] + bytes([12]) + data[sof + 5:]
    with pytest.raises(images.CorruptImageError,
                       match=r"r 2: corrupt JPEG .*Unsupported JPEG data precision 12"):
        images.decode_image(twelve_bit, where="r 2")


def test_cmyk_and_progressive_jpegs_decode():
    import io

    from PIL import Image
    img = _face()
    for mode, kwargs in (("CMYK", {}), ("RGB", {"progressive": True})):
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=95, **kwargs)
        out = images.decode_image(buf.getvalue())
        assert out.shape == (112, 112, 3) and np.abs(out.astype(int) - img).mean() < 3, mode


def test_damaged_png_is_refused():
    data = images.encode_png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    idat = data.index(b"IDAT")
    damaged = data[:idat + 100] + bytes(32) + data[idat + 132:]
    with pytest.raises(images.CorruptImageError, match=r"p\.png: undecodable image data"):
        images.decode_image(damaged, where="p.png")


def test_one_error_kind_for_a_bad_record_and_it_pickles():
    import pickle
    assert issubclass(images.CorruptImageError, images.CorruptRecordError)
    assert issubclass(images.CorruptRecordError, ValueError)
    for cls in (images.CorruptRecordError, images.CorruptImageError):
        err = pickle.loads(pickle.dumps(cls("f.rec record 2", "bad")))
        assert type(err) is cls and err.where == "f.rec record 2" and err.reason == "bad"
        assert str(err) == "f.rec record 2: bad"
    assert str(images.CorruptImageError("", "bad")) == "<image>: bad"


def test_check_size():
    img = _face(100, 112)
    with pytest.raises(images.CorruptImageError,
                       match=r"lfw\.bin image 3: image is 100x112x3, expected 112x112x3"):
        images.check_size(img, (112, 112), "lfw.bin image 3")
    assert images.check_size(_face(), (112, 112)) is not None


def test_encode_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"encode_jpeg: expected a uint8 \[H, W, 3\]"):
        images.encode_jpeg(np.zeros((4, 4), np.uint8))


def _pillow_bytes(img, fmt, orientation=None, **options):
    import io

    from PIL import Image
    out = io.BytesIO()
    pil = Image.fromarray(img)
    if orientation is not None:
        exif = pil.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif
    pil.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_decode_photo_shows_every_orientation_as_a_viewer_does(fmt):
    """Against Pillow's `ImageOps.exif_transpose` (what viewers do); `decode_image` keeps the stored pixels."""
    import io

    from PIL import Image, ImageOps
    stored = _face(24, 40)
    options = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    for orientation in range(1, 9):
        data = _pillow_bytes(stored, fmt, orientation, **options)
        assert images.exif_orientation(data) == orientation
        with Image.open(io.BytesIO(data)) as pil:
            raw = np.asarray(pil.convert("RGB"))
            shown = np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
        photo = images.decode_photo(data, where="p")
        assert photo.shape == shown.shape and photo.flags.c_contiguous, (fmt, orientation)
        tolerance = 2 if fmt == "JPEG" else 0
        assert np.abs(photo.astype(int) - shown).max() <= tolerance, (fmt, orientation)
        if fmt != "TIFF":  # OpenCV's TIFF reader applies the tag itself (decode_photo does not add it twice)
            assert np.abs(images.decode_image(data).astype(int) - raw).max() <= tolerance, (fmt, orientation)
    assert images.exif_orientation(images.encode_png(stored)) == 1
    assert images.exif_orientation(b"not an image") == 1


@pytest.mark.parametrize("ext", images.READABLE_EXTENSIONS)
def test_every_readable_extension_decodes(ext):
    """The one list of readable names: a file Pillow writes under each extension decodes to its pixels."""
    from PIL import Image
    img = _face(16, 24)
    fmt = Image.registered_extensions()[ext]
    data = _pillow_bytes(img, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else
                                      {"lossless": True} if fmt == "WEBP" else {}))
    tolerance = 4 if fmt == "JPEG" else 0  # quality 100, 4:4:4: rounding only
    assert np.abs(images.decode_photo(data, where=f"x{ext}").astype(int) - img).max() <= tolerance
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif"} <= set(images.READABLE_EXTENSIONS)
