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


def test_corrupt_image_error_pickles():
    import pickle
    err = pickle.loads(pickle.dumps(images.CorruptImageError("f.rec record 2", "bad")))
    assert err.where == "f.rec record 2" and str(err) == "f.rec record 2: bad"


def test_check_size():
    img = _face(100, 112)
    with pytest.raises(ValueError, match=r"lfw\.bin image 3: image is 100x112x3, expected 112x112x3"):
        images.check_size(img, (112, 112), "lfw.bin image 3")
    assert images.check_size(_face(), (112, 112)) is not None


def test_encode_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"encode_jpeg: expected a uint8 \[H, W, 3\]"):
        images.encode_jpeg(np.zeros((4, 4), np.uint8))
