"""oaml_jax/models/face_input.py: the one uint8 RGB -> model input mapping, and its grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax.models import face_input
from oaml_jax.models.face_input import InputContract


def test_preprocess_known_values_in_both_channel_orders():
    corner = np.array([[[[0, 255, 51]]]], np.uint8)
    rgb = np.asarray(InputContract(channel_order="RGB").preprocess(corner))
    np.testing.assert_allclose(rgb, [[[[-1.0, 1.0, 51 / 127.5 - 1.0]]]], atol=1e-7)
    bgr = np.asarray(jax.jit(InputContract(channel_order="BGR").preprocess)(corner))
    np.testing.assert_allclose(bgr, [[[[51 / 127.5 - 1.0, 1.0, -1.0]]]], atol=1e-7)
    assert bgr.dtype == np.float32


def test_preprocess_equals_the_insightface_formula_on_faces():
    images = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    out = np.asarray(InputContract().preprocess(jnp.asarray(images)))
    np.testing.assert_allclose(out, (images[..., ::-1] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_float_input_is_refused_rather_than_normalized_twice():
    with pytest.raises(TypeError, match=r"model input must be uint8 RGB pixels .* got float32"):
        InputContract().preprocess(jnp.zeros((1, 112, 112, 3), jnp.float32))


def test_grid_follows_the_feature_stage_and_bad_values_are_named():
    assert [face_input.grid_size(s) for s in (1, 2, 3, 4)] == [56, 28, 14, 7]
    with pytest.raises(ValueError, match=r"model\.feature_stage=5"):
        face_input.grid_size(5)
    with pytest.raises(ValueError, match=r"model\.input_channel_order='GBR'"):
        InputContract(channel_order="GBR")
    with pytest.raises(ValueError, match=r"grid=8: not the side of any backbone stage"):
        InputContract(grid=8)


def test_check_faces_names_what_was_expected():
    face_input.check_faces(np.zeros((2, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images: expected aligned faces, uint8 RGB \[N, 112, 112, 3\], got "
                                         r"uint8 \[2, 96, 96, 3\]"):
        face_input.check_faces(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        face_input.check_faces(np.zeros((0, 112, 112, 3), np.uint8))
