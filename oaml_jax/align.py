"""5-point face alignment onto the ArcFace 112x112 template (numpy + OpenCV, no scikit-image)."""

from __future__ import annotations

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
