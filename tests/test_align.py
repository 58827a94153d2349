"""Tests for oaml_jax.align: Umeyama similarity and 5-point alignment."""

import numpy as np
import pytest

from oaml_jax import align
from oaml_jax.models.face_input import ARCFACE_TEMPLATE


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_estimate_similarity_recovers_a_known_transform():
    truth = _similarity(1.7, 0.4, 31.0, -12.5)
    dst = _apply(truth, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(align.estimate_similarity(ARCFACE_TEMPLATE, dst), truth, atol=1e-9)


@pytest.mark.parametrize("scale,angle,tx,ty", [(2.3, 0.3, 140.0, 60.0), (0.8, -0.7, 10.0, 35.0),
                                               (1.0, np.pi, 200.0, 180.0)])
def test_landmarks_map_back_onto_the_template(scale, angle, tx, ty):
    landmarks = _apply(_similarity(scale, angle, tx, ty), ARCFACE_TEMPLATE)
    matrix = align.estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    assert np.abs(_apply(matrix, landmarks) - ARCFACE_TEMPLATE).max() < 1e-3


def test_estimate_similarity_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 2)) * 20
    dst = src * np.array([-1.0, 1.0])  # a mirror image: the best similarity cannot reproduce it
    matrix = align.estimate_similarity(src, dst)
    assert np.linalg.det(matrix[:, :2]) > 0
    residual = np.sum((_apply(matrix, src) - dst) ** 2)
    # Any small perturbation of the fitted parameters does not reduce the squared error.
    s, a = np.hypot(*matrix[:, 0]), np.arctan2(matrix[1, 0], matrix[0, 0])
    for _ in range(20):
        noisy = _similarity(s * (1 + rng.normal() * 1e-3), a + rng.normal() * 1e-3,
                            matrix[0, 2] + rng.normal() * 1e-2, matrix[1, 2] + rng.normal() * 1e-2)
        assert np.sum((_apply(noisy, src) - dst) ** 2) >= residual - 1e-9


def test_estimate_similarity_errors():
    with pytest.raises(ValueError, match="all points coincide"):
        align.estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match=r"src: expected \[N, 2\]"):
        align.estimate_similarity(np.ones((5, 3)), ARCFACE_TEMPLATE)


def test_align_face_puts_landmarks_on_the_template():
    # A 250x300 image with a Gaussian blob at each landmark of a face that is scaled by 1.6,
    # rotated by 0.35 rad and shifted.
    truth = _similarity(1.6, 0.35, 90.0, 40.0)
    landmarks = _apply(truth, ARCFACE_TEMPLATE)
    yy, xx = np.mgrid[0:250, 0:300].astype(np.float64)
    image = np.zeros((250, 300), np.float64)
    for x, y in landmarks:
        image += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0 ** 2))
    image = np.repeat(np.clip(image * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2)

    aligned = align.align_face(image, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    gray = aligned[..., 0].astype(np.float64)
    ay, ax = np.mgrid[0:112, 0:112]
    total = gray.sum()
    found = 0.0
    for x, y in ARCFACE_TEMPLATE:
        window = (np.abs(ax - x) <= 6) & (np.abs(ay - y) <= 6)
        weight = gray * window
        found += weight.sum()
        centroid = np.array([(weight * ax).sum(), (weight * ay).sum()]) / weight.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.3)
    assert found / total > 0.98  # nothing bright lands away from the template


def test_align_face_other_sizes_and_errors():
    image = np.zeros((200, 200, 3), np.uint8)
    landmarks = ARCFACE_TEMPLATE + 40
    assert align.align_face(image, landmarks, size=224).shape == (224, 224, 3)
    np.testing.assert_allclose(align.template_for_size(128), ARCFACE_TEMPLATE + [8.0, 0.0])
    with pytest.raises(ValueError, match="size: expected a multiple of 112 or 128, got 100"):
        align.align_face(image, landmarks, size=100)
    with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\]"):
        align.align_face(image.astype(np.float32), landmarks)
    with pytest.raises(ValueError, match=r"landmarks: expected \[5, 2\]"):
        align.align_face(image, landmarks[:4])
