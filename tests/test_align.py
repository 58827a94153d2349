"""Tests for oaml_jax.align: Umeyama similarity, 5-point alignment, detection on real photographs."""

import os
import sys

import cv2
import matplotlib.cbook as cbook
import numpy as np
import pytest
from PIL import Image

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


# ---------------------------------------------------------------------------------------------------------
# Detection on real photographs: Grace Hopper's portrait ships with matplotlib (a requirement); the
# astronaut Eileen Collins (NASA, public domain) is a 256x256 crop of scikit-image's `astronaut` in
# tests/data (see tests/data/README.md).

_DATA = os.path.join(os.path.dirname(__file__), "data")


def _rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def hopper():
    return _rgb(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def astronaut():
    return _rgb(os.path.join(_DATA, "astronaut_head.jpg"))


def _residual_to_template(landmarks):
    """Distance (px) of each landmark, mapped by its own alignment, from its template point."""
    matrix = align.estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    return np.linalg.norm(_apply(matrix, landmarks) - ARCFACE_TEMPLATE, axis=1)


@pytest.mark.parametrize("photo,tolerance", [("hopper", 3.0), ("astronaut", 7.5)])
def test_one_face_on_a_portrait_lands_on_the_template(photo, tolerance, request):
    image = request.getfixturevalue(photo)
    faces = align.detect_and_align(image, mode="all")
    assert len(faces) == 1
    face = faces[0]
    assert face.face.shape == (112, 112, 3) and face.face.dtype == np.uint8
    assert face.box.shape == (4,) and face.landmarks.shape == (5, 2) and 0.9 <= face.score <= 1.0
    x1, y1, x2, y2 = face.box
    assert np.all((face.landmarks >= [x1, y1]) & (face.landmarks <= [x2, y2]))
    # Template order: image-left eye, image-right eye, nose tip, image-left and image-right mouth corners.
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    assert lex < nx < rex and lmx < nx < rmx and max(ley, rey) < ny < min(lmy, rmy)
    # The 5 points of a real face are not a similarity of the template: the smiling astronaut's wide mouth
    # leaves up to 7 px, Hopper's neutral face under 3 px.
    assert _residual_to_template(face.landmarks).max() < tolerance
    np.testing.assert_array_equal(face.face, align.align_face(image, face.landmarks))


def test_a_face_detected_again_in_its_aligned_crop_sits_on_the_template(hopper):
    face = align.detect_and_align(hopper)[0]
    canvas = np.zeros((224, 224, 3), np.uint8)
    canvas[56:168, 56:168] = face.face
    _, landmarks, _ = align.detect_faces(canvas)
    assert len(landmarks) == 1
    assert np.linalg.norm(landmarks[0] - 56 - ARCFACE_TEMPLATE, axis=1).max() < 4.0


def test_mirrored_photo_gives_mirrored_landmarks_in_template_order(hopper):
    _, landmarks, _ = align.detect_faces(hopper)
    _, mirrored, _ = align.detect_faces(np.ascontiguousarray(hopper[:, ::-1]))
    width = hopper.shape[1]
    # Mirroring swaps which eye (and mouth corner) is on the image's left.
    back = np.stack([width - 1 - mirrored[0, :, 0], mirrored[0, :, 1]], axis=-1)[[1, 0, 2, 4, 3]]
    assert np.linalg.norm(back - landmarks[0], axis=1).max() < 3.0


@pytest.mark.parametrize("min_face_size", [40.0, 80.0])
def test_min_face_size_other_than_twenty_still_finds_the_face(hopper, min_face_size):
    # mtcnn 1.0.0 run directly with min_face_size=40 finds no face on this photo (its pyramid goes below
    # PNet's input size); detect_faces resizes the photo instead and must find the same face.
    _, reference, _ = align.detect_faces(hopper)
    boxes, landmarks, _ = align.detect_faces(hopper, min_face_size=min_face_size)
    assert len(boxes) == 1
    assert np.linalg.norm(landmarks[0] - reference[0], axis=1).max() < 3.0


@pytest.fixture(scope="module")
def group(hopper, astronaut):
    """A 480x900 photo: Hopper (face box about 140 px) left, the astronaut (about 50 px) right."""
    canvas = np.full((480, 900, 3), 96, np.uint8)
    big = cv2.resize(hopper, (410, 480), interpolation=cv2.INTER_AREA)
    small = cv2.resize(astronaut, (154, 154), interpolation=cv2.INTER_AREA)
    canvas[:, 20:430] = big
    canvas[200:354, 600:754] = small
    return canvas


def test_all_faces_largest_first_and_largest_mode(group):
    faces = align.detect_and_align(group, mode="all")
    assert len(faces) == 2
    hopper_face, astronaut_face = faces
    assert 20 <= hopper_face.box[0] and hopper_face.box[2] <= 430
    assert 600 <= astronaut_face.box[0] and astronaut_face.box[2] <= 754
    assert 200 <= astronaut_face.box[1] and astronaut_face.box[3] <= 354
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas[0] > areas[1]
    largest = align.detect_and_align(group, mode="largest")
    assert len(largest) == 1
    np.testing.assert_array_equal(largest[0].face, hopper_face.face)
    np.testing.assert_array_equal(largest[0].landmarks, hopper_face.landmarks)


def test_min_face_size_and_min_score_filter(group):
    boxes, _, _ = align.detect_faces(group)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    between = float((sides[0] + sides[1]) / 2)
    kept = align.detect_and_align(group, mode="all", min_face_size=between)
    assert len(kept) == 1 and np.min(kept[0].box[2:] - kept[0].box[:2]) >= between
    # With no score threshold MTCNN also reports a weak candidate on the uniform (score about 0.13).
    _, _, scores = align.detect_faces(group, min_score=0.0)
    assert len(scores) > 2 and scores.min() < 0.5
    threshold = float(np.sort(scores)[:2].mean())  # between the weakest score and the next
    faces = align.detect_and_align(group, mode="all", min_score=threshold)
    assert len(faces) == len(scores) - 1 and min(f.score for f in faces) >= threshold


def test_photos_without_a_face_give_an_empty_list(hopper):
    uniform_and_medals = np.ascontiguousarray(hopper[400:])  # below the chin: uniform, ribbons, flag
    assert align.detect_and_align(uniform_and_medals, mode="all") == []
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (0, 0), 3)
    assert align.detect_and_align(texture, mode="all") == []
    assert align.detect_and_align(np.zeros((8, 8, 3), np.uint8)) == []


def test_detector_is_built_once(monkeypatch, hopper):
    import mtcnn  # pylint: disable=g-import-not-at-top

    built = []

    class CountingMTCNN(mtcnn.MTCNN):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mtcnn, "MTCNN", CountingMTCNN)
    align._detector.cache_clear()
    try:
        small = np.ascontiguousarray(hopper[::2, ::2])
        align.detect_faces(small)
        align.detect_and_align(small, mode="all")
        assert len(built) == 1
    finally:
        align._detector.cache_clear()


def test_detection_errors(monkeypatch, hopper):
    with pytest.raises(ValueError, match=r"mode: expected one of \('largest', 'all'\), got 'first'"):
        align.detect_and_align(hopper, mode="first")
    with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\] RGB, got float32"):
        align.detect_faces(hopper.astype(np.float32))
    with pytest.raises(ValueError, match=r"image: expected uint8 \[H, W, 3\] RGB, got uint8 \(600, 512, 4\)"):
        align.detect_faces(np.concatenate([hopper, hopper[..., :1]], axis=-1))
    with pytest.raises(ValueError, match="min_face_size: expected a positive number of pixels, got 0"):
        align.detect_faces(hopper, min_face_size=0)
    with pytest.raises(ValueError, match=r"min_score: expected a probability in \[0, 1\], got 1.5"):
        align.detect_and_align(hopper, min_score=1.5)
    with pytest.raises(ValueError, match="size: expected a multiple of 112 or 128, got 100"):
        align.detect_and_align(hopper, size=100)
    monkeypatch.setitem(sys.modules, "mtcnn", None)
    align._detector.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"needs the mtcnn package .* pip install -r requirements\.txt"):
            align.detect_faces(hopper)
    finally:
        align._detector.cache_clear()


def test_detection_runs_on_a_bounded_copy_and_maps_back_to_photo_pixels(monkeypatch):
    """Known answer with a stand-in detector: a 3200x2400 photo is detected at 1600x1200 (factor 1/2), so a
    point x seen there is `(x + 0.5) * 2 - 0.5` in the photo (pixel centres, as OpenCV resizes)."""
    seen = []

    class Recorder:
        def detect_faces(self, image, **kwargs):
            seen.append(image.shape)
            # image index, box x1 y1 x2 y2, score, 5 x, 5 y (in the copy's pixels)
            return np.array([[0, 100, 120, 300, 360, 0.99, 150, 250, 200, 160, 240, 200, 200, 260, 310, 310]])

    monkeypatch.setattr(align, "_detector", lambda: Recorder())
    boxes, landmarks, scores = align.detect_faces(np.zeros((2400, 3200, 3), np.uint8))
    assert seen == [(1200, 1600, 3)] and max(seen[0]) == align.DETECTION_MAX_SIDE
    np.testing.assert_allclose(boxes[0], [200.5, 240.5, 600.5, 720.5])
    np.testing.assert_allclose(landmarks[0], [[300.5, 400.5], [500.5, 400.5], [400.5, 520.5], [320.5, 620.5],
                                              [480.5, 620.5]])
    assert scores.tolist() == [pytest.approx(0.99)]
    # A photo within the bound is seen at its own size (min_face_size 20), a larger minimum shrinks it further.
    seen.clear()
    align.detect_faces(np.zeros((900, 1600, 3), np.uint8))
    align.detect_faces(np.zeros((900, 1600, 3), np.uint8), min_face_size=40)
    assert seen == [(900, 1600, 3), (450, 800, 3)]


def test_a_large_photo_gives_the_same_face_from_its_original_pixels(hopper):
    """Hopper enlarged 4x (2048x2400 > the bound): the landmarks are the portrait's, scaled, and the aligned
    crop (warped from the large original, not from the detection copy) matches the portrait's."""
    large = cv2.resize(hopper, (hopper.shape[1] * 4, hopper.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    small, big = align.detect_and_align(hopper)[0], align.detect_and_align(large)[0]
    expected = (small.landmarks + 0.5) * 4 - 0.5
    eye_distance = np.linalg.norm(expected[1] - expected[0])
    assert np.linalg.norm(big.landmarks - expected, axis=1).max() < 0.06 * eye_distance
    # Same face, same place: the crops differ only in detail (sub-pixel landmark shifts, 4x the pixels).
    blur = lambda face: cv2.GaussianBlur(face, (0, 0), 2).astype(int)
    assert np.abs(blur(big.face) - blur(small.face)).mean() < 3
    np.testing.assert_array_equal(big.face, align.align_face(large, big.landmarks))
