"""Tests for data_pipelines.augment."""

import cv2
import ml_collections
import numpy as np
import pytest

from data_pipelines import augment

OFF = {"flip_prob": 0.0, "crop_prob": 0.0, "crop_scale": (0.6, 1.0), "lowres_prob": 0.0,
       "photometric_prob": 0.0}
DEFAULTS = {"flip_prob": 0.5, "crop_prob": 0.2, "crop_scale": (0.6, 1.0), "lowres_prob": 0.2,
            "photometric_prob": 0.2}


def _face(seed: int = 0, low: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, (112, 112, 3), dtype=np.uint8)


def _cfg(**overrides) -> dict:
    return {**OFF, **overrides}


def _apply(image: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    return augment.Augmentation.from_config(cfg)(image, rng)


def test_all_probabilities_zero_is_identity():
    image = _face()
    for seed in range(5):
        out = _apply(image, np.random.default_rng(seed), OFF)
        np.testing.assert_array_equal(out, image)


def test_flip_prob_one_mirrors():
    image = _face()
    out = _apply(image, np.random.default_rng(0), _cfg(flip_prob=1.0))
    np.testing.assert_array_equal(out, image[:, ::-1])
    assert out.flags.c_contiguous


def test_crop_keeps_size_and_zero_pads_outside_window():
    image = _face(low=1)  # no zero pixels, so zeros mark the padding exactly
    padded = 0
    for seed in range(20):
        out = _apply(image, np.random.default_rng(seed),
                              _cfg(crop_prob=1.0, crop_scale=(0.3, 0.6)))
        assert out.shape == (112, 112, 3) and out.dtype == np.uint8
        kept = out.any(axis=-1)
        rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        # The kept part is one rectangle left in place, everything else is zero.
        assert kept[top:bottom, left:right].all()
        assert kept.sum() == (bottom - top) * (right - left)
        np.testing.assert_array_equal(out[top:bottom, left:right], image[top:bottom, left:right])
        area = kept.mean()
        assert 0.3 - 0.03 <= area <= 0.6 + 0.03
        padded += int(area < 1.0)
    assert padded == 20


def test_crop_window_falls_back_to_whole_image():
    class Impossible:
        def random(self, n):
            return np.zeros(n)  # aspect ratio 3/4 at full area never fits a square

    assert augment.crop_window(10, 10, Impossible(), (1.0, 1.0)) == (0, 0, 10, 10)


def test_lowres_and_photometric_keep_shape_and_dtype():
    image = _face()
    for key in ("lowres_prob", "photometric_prob"):
        for seed in range(5):
            out = _apply(image, np.random.default_rng(seed), _cfg(**{key: 1.0}))
            assert out.shape == image.shape and out.dtype == np.uint8
            assert not np.array_equal(out, image)


def test_lowres_keeps_a_constant_image():
    image = np.full((112, 112, 3), 77, np.uint8)
    for seed in range(10):
        out = augment.low_resolution(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, image)


def test_lowres_side_and_independent_interpolations():
    class Fixed:
        def __init__(self, draws):
            self.draws = np.array(draws)

        def random(self, n):
            return self.draws

    image = _face()
    # u = 0 -> side int(0.2 * 112) = 22, nearest both ways.
    np.testing.assert_array_equal(
        augment.low_resolution(image, Fixed([0.0, 0.0, 0.0])),
        cv2.resize(cv2.resize(image, (22, 22), interpolation=cv2.INTER_NEAREST), (112, 112),
                   interpolation=cv2.INTER_NEAREST))
    # u = 0.5 -> side int(0.6 * 112) = 67; down linear (0.3 * 5 -> 1), up Lanczos (0.9 * 5 -> 4).
    np.testing.assert_array_equal(
        augment.low_resolution(image, Fixed([0.5, 0.3, 0.9])),
        cv2.resize(cv2.resize(image, (67, 67), interpolation=cv2.INTER_LINEAR), (112, 112),
                   interpolation=cv2.INTER_LANCZOS4))


def test_photometric_on_gray_only_changes_brightness():
    # Contrast and saturation are identities on a constant gray image; brightness scales it
    # by a factor in [0.5, 1.5].
    image = np.full((8, 8, 3), 100, np.uint8)
    for seed in range(10):
        out = augment.photometric(image, np.random.default_rng(seed))
        assert np.unique(out).size == 1
        assert 50 <= int(out[0, 0, 0]) <= 150


def test_photometric_saturation_known_answer():
    class Fixed:
        """factors (brightness, contrast, saturation) = (1, 1, 0.5); saturation applied last."""

        def random(self, n):
            return np.array([0.5, 0.5, 0.0, 0.1, 0.2, 0.3])  # factors, then the order keys

    image = np.array([[[200, 100, 0]]], np.uint8)
    gray = 0.299 * 200 + 0.587 * 100
    out = augment.photometric(image, Fixed())
    expected = np.rint(0.5 * image[0, 0] + 0.5 * np.rint(gray))
    np.testing.assert_allclose(out[0, 0], expected, atol=1)


def test_defaults_shape_dtype_and_determinism():
    image = _face()
    cfg = ml_collections.ConfigDict(DEFAULTS)
    for seed in range(30):
        out = _apply(image, np.random.default_rng(seed), cfg)
        again = _apply(image, np.random.default_rng(seed), cfg)
        assert out.shape == (112, 112, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(image, _face())  # input untouched


def test_missing_key_names_it():
    cfg = dict(DEFAULTS)
    del cfg["crop_scale"]
    with pytest.raises(KeyError, match=r"data\.augment\.crop_scale"):
        _apply(_face(), np.random.default_rng(0), cfg)
    with pytest.raises(KeyError, match=r"data\.augment\.crop_scale"):
        augment.check_config(ml_collections.ConfigDict(cfg))


def test_check_config_rejects_bad_values():
    augment.check_config(DEFAULTS)
    with pytest.raises(ValueError, match=r"data\.augment\.flip_prob must be in \[0, 1\]"):
        augment.check_config({**DEFAULTS, "flip_prob": 1.5})
    with pytest.raises(ValueError, match=r"data\.augment\.crop_scale"):
        augment.check_config({**DEFAULTS, "crop_scale": (0.8, 0.5)})


def test_augment_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match=r"RGB uint8 image \[H, W, 3\]"):
        _apply(np.zeros((112, 112), np.uint8), np.random.default_rng(0), OFF)
    with pytest.raises(ValueError, match="float32"):
        _apply(np.zeros((112, 112, 3), np.float32), np.random.default_rng(0), OFF)
