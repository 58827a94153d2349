"""Face detection with 5 landmarks (MTCNN) and 5-point alignment onto the ArcFace 112x112 template.

    faces = detect_and_align(photo)                 # photo: uint8 [H, W, 3] RGB, any size
    faces[0].face                                   # uint8 [112, 112, 3] RGB, ready for FaceModel.embed

Alignment is numpy + OpenCV (no scikit-image). Detection uses the `mtcnn` package (MTCNN of Zhang et al.,
2016, on TensorFlow; its weights ship inside the wheel), imported on first use and built once per process.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import cv2
import numpy as np

from oaml_jax.models.face_input import ARCFACE_TEMPLATE, FACE_SIZE


def _as_points(points: np.ndarray, field: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"{field}: expected [N, 2] points with N >= 2, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{field}: points must be finite")
    return points


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping `src` onto `dst`.

    Umeyama (1991): with centred points and `cov = dst_c^T src_c / n = U S V^T`, the rotation is
    `U D V^T` where `D = diag(1, det(U) det(V))` (never a reflection), the scale is
    `trace(S D) / var(src)` and the translation `mean(dst) - scale * R mean(src)`.

    Args:
        src: `[N, 2]` source points (e.g. detected landmarks).
        dst: `[N, 2]` destination points (e.g. the template).

    Returns:
        `[2, 3]` float64 matrix M with `dst ~= M @ [x, y, 1]`, usable by `cv2.warpAffine`.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src {src.shape} and dst {dst.shape}: expected the same number of points")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = np.mean(np.sum(src_c ** 2, axis=1))
    if src_var == 0:
        raise ValueError("src: all points coincide; a similarity is undefined")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / src.shape[0])
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float(np.sum(s * d) / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template for a `size` x `size` crop.

    Multiples of 112 scale the template; multiples of 128 scale it by `size / 128` and shift it right by
    `8 * size / 128` (the 112 face centred in a 128 crop), as insightface does.

    Args:
        size: output side in pixels.

    Returns:
        `[5, 2]` float64 template.
    """
    if size > 0 and size % FACE_SIZE == 0:
        return ARCFACE_TEMPLATE * (size / FACE_SIZE)
    if size > 0 and size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise ValueError(f"size: expected a multiple of 112 or 128, got {size}")


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Warp a face so its 5 landmarks land on the ArcFace template.

    Args:
        image: uint8 `[H, W, 3]` image (channel order is kept).
        landmarks: `[5, 2]` (x, y) landmarks in `image` pixels, template order.
        size: output side (see `template_for_size`).

    Returns:
        uint8 `[size, size, 3]` aligned crop; pixels from outside `image` are black.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    landmarks = _as_points(landmarks, "landmarks")
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks: expected [5, 2], got {landmarks.shape}")
    matrix = estimate_similarity(landmarks, template_for_size(size))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


DETECTION_MODES = ("largest", "all")
# Defaults of AdaFace's MTCNN aligner (face_alignment/mtcnn.py): faces from 20 px, final (ONet) score 0.9.
DEFAULT_MIN_FACE_SIZE = 20.0
DEFAULT_MIN_SCORE = 0.9
# mtcnn 1.0.0 sizes its image pyramid as if it started at scale 1 while it starts at 12 / min_face_size, so
# any min_face_size other than 20 (or a scale factor other than 0.709) adds levels smaller than PNet's
# 12 px input; the failing convolution is then reported as "no face". It is therefore always run at 20 px
# and the image is resized by 20 / min_face_size instead, which gives the same pyramid.
_MTCNN_MIN_FACE_SIZE = 20.0
# Detection runs on a copy whose longest side is at most this many pixels (alignment uses the original):
# MTCNN's memory grows with the pixels it sees (a 48 MP photo took 7 GiB at full size). At this bound a
# face is found from `longest side / DETECTION_MAX_SIDE * 20` photo pixels on (100 px in an 8000 px photo),
# whatever `min_face_size` asks below that.
DETECTION_MAX_SIDE = 1600


class DetectedFace(NamedTuple):
    """One face found by `detect_and_align`.

    Attributes:
        face: uint8 `[size, size, 3]` aligned crop, RGB (the input's channel order).
        box: float32 `[4]` (x1, y1, x2, y2) box in input pixels, clipped to the image.
        landmarks: float32 `[5, 2]` (x, y) in input pixels, template order: image-left eye, image-right eye,
            nose tip, image-left mouth corner, image-right mouth corner (insightface's order).
        score: MTCNN's final (ONet) face probability in [0, 1].
    """

    face: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    score: float


@functools.cache
def _detector() -> Any:
    """The process's MTCNN (building it loads three networks; every call reuses this one)."""
    try:
        from mtcnn import MTCNN  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("face detection needs the mtcnn package (mtcnn, lz4, joblib and tensorflow-cpu, "
                          "pinned in requirements.txt): pip install -r requirements.txt") from e
    return MTCNN(stages="face_and_landmarks_detection", device="CPU:0")


def _check_photo(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    return image


def _check_thresholds(min_face_size: float, min_score: float) -> None:
    if not np.isfinite(min_face_size) or min_face_size <= 0:
        raise ValueError(f"min_face_size: expected a positive number of pixels, got {min_face_size}")
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score: expected a probability in [0, 1], got {min_score}")


def detect_faces(image: np.ndarray, *, min_face_size: float = DEFAULT_MIN_FACE_SIZE,
                 min_score: float = DEFAULT_MIN_SCORE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces and their 5 landmarks in a photo, largest box first.

    Runs MTCNN (P-, R- and O-Net cascade) on the image resized by `20 / min_face_size` (see
    `_MTCNN_MIN_FACE_SIZE`), or less so that its longest side is at most `DETECTION_MAX_SIDE`, and maps
    the results back to input pixels, where (0, 0) is the centre of the top-left pixel, as `align_face`
    (OpenCV) reads them.

    Args:
        image: uint8 `[H, W, 3]` RGB photo of any size.
        min_face_size: faces whose box is narrower or shorter than this many pixels are dropped.
        min_score: faces whose final MTCNN score is below this are dropped.

    Returns:
        (boxes float32 `[F, 4]` (x1, y1, x2, y2) clipped to the image, landmarks float32 `[F, 5, 2]` in the
        order of `ARCFACE_TEMPLATE`, scores float32 `[F]`), sorted by decreasing box area; F may be 0.

    Raises:
        ValueError: `image` is not uint8 `[H, W, 3]`, or a threshold is out of range.
        ImportError: the mtcnn package is not installed.
    """
    image = _check_photo(image)
    _check_thresholds(min_face_size, min_score)
    height, width = image.shape[:2]
    scale = min(_MTCNN_MIN_FACE_SIZE / float(min_face_size), DETECTION_MAX_SIDE / max(height, width))
    resized_width, resized_height = max(1, round(width * scale)), max(1, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (resized_width, resized_height), interpolation=interpolation)
    rows = _detector().detect_faces(image, fit_to_image=False, box_format="xyxy", output_type="numpy",
                                    min_face_size=_MTCNN_MIN_FACE_SIZE, threshold_onet=min_score)
    # Columns: image index, x1, y1, x2, y2, score, x of the 5 points, y of the 5 points.
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 16)
    factor = np.array([resized_width / width, resized_height / height])
    # OpenCV's resize maps pixel centres: x_input = (x_resized + 0.5) / factor - 0.5.
    boxes = (rows[:, 1:5].reshape(-1, 2, 2) + 0.5) / factor - 0.5
    boxes = np.clip(boxes, 0.0, [width - 1, height - 1]).reshape(-1, 4)
    landmarks = (np.stack([rows[:, 6:11], rows[:, 11:16]], axis=-1) + 0.5) / factor - 0.5
    scores = rows[:, 5]
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (scores >= min_score) & (sides >= min_face_size)
    boxes, landmarks, scores = boxes[keep], landmarks[keep], scores[keep]
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    return (boxes[order].astype(np.float32), landmarks[order].astype(np.float32),
            scores[order].astype(np.float32))


def detect_and_align(image: np.ndarray, *, mode: str = "largest",
                     min_face_size: float = DEFAULT_MIN_FACE_SIZE, min_score: float = DEFAULT_MIN_SCORE,
                     size: int = 112) -> list[DetectedFace]:
    """Detects the faces of a photo and aligns each onto the ArcFace template.

    Args:
        image: uint8 `[H, W, 3]` RGB photo of any size.
        mode: "largest" keeps the face with the largest box; "all" keeps every face, largest box first.
        min_face_size: smallest box side kept, in input pixels (see `detect_faces`).
        min_score: smallest MTCNN face probability kept.
        size: side of the aligned crops (see `template_for_size`).

    Returns:
        `DetectedFace`s: at most one in "largest" mode, none when no face passes the thresholds.

    Raises:
        ValueError: unknown `mode`, a bad `image`, threshold or `size`.
        ImportError: the mtcnn package is not installed.
    """
    if mode not in DETECTION_MODES:
        raise ValueError(f"mode: expected one of {DETECTION_MODES}, got {mode!r}")
    template_for_size(size)
    boxes, landmarks, scores = detect_faces(image, min_face_size=min_face_size, min_score=min_score)
    count = min(len(scores), 1) if mode == "largest" else len(scores)
    return [DetectedFace(align_face(image, landmarks[i], size), boxes[i], landmarks[i], float(scores[i]))
            for i in range(count)]
