"""Procedurally rendered synthetic face identities: the renderer of the project's embedded dataset.

`render_face` draws one sample of an identity (`data_pipelines.synthetic_identity`) with per-sample nuisance
(head hair, in-plane pose, yaw-like compression, expression, blink, gaze, lighting, background clutter,
clothing, noise, blur, JPEG degradation) on the standard 112x112 five-landmark template (eyes ~ (38, 52) and
(74, 52), nose ~ (56, 72), mouth corners ~ (42, 92) and (71, 92)), so occlusion placed from those landmarks
covers the right parts. The face itself, with its head hair and expression, is drawn by
`data_pipelines.synthetic_face_parts`; this module adds the background, the pose and the photometric nuisance.

The per-channel mean colour of every rendered image is moved to a per-sample target drawn from one
distribution shared by all identities, so mean colour carries no identity information: identities must be
told apart from geometry, shapes and texture.

The dataset writer and its command line are `data_pipelines.synthetic`; a change here that gives other
images for the same arguments bumps its `GENERATOR_VERSION`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import simplejpeg

from data_pipelines.synthetic_face_parts import CENTRE, clamp, draw_face, ellipse, fill
from data_pipelines.synthetic_identity import IdentityParams
from oaml_jax.models.face_input import FACE_SIZE


# A fixed bank of Gaussian noise; each sample reads a random window of it (much cheaper than drawing
# 112*112*3 normals per image, and still deterministic).
_NOISE = np.random.default_rng(20240611).standard_normal((2 * FACE_SIZE, 2 * FACE_SIZE, 3)).astype(
    np.float32)
_CORNER_Y, _CORNER_X = np.mgrid[-1.0:1.0:2j, -1.0:1.0:2j]


def _ramp(corners: np.ndarray) -> np.ndarray:
    """Smooth field [112, 112, 3] float32 interpolated between 2x2 corner values [2, 2, 3]."""
    return cv2.resize(corners.astype(np.float32), (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)


def _linear_corners(rng: np.random.Generator, amplitude: np.ndarray) -> np.ndarray:
    """Corner values [2, 2, C] of a random-direction linear ramp with per-channel `amplitude` [C]."""
    angle = rng.uniform(0, 2 * np.pi)
    proj = math.cos(angle) * _CORNER_X + math.sin(angle) * _CORNER_Y
    return proj[..., None] * amplitude


def _draw_background(canvas: np.ndarray, rng: np.random.Generator) -> None:
    grey = rng.uniform(30, 225)
    base = grey + rng.normal(0, 35, 3)
    corners = np.clip(base + _linear_corners(rng, rng.normal(0, 40, 3)), 0, 255).astype(np.uint8)
    # Bilinear interpolation of in-range corners stays in range, so the ramp is built in uint8 directly.
    cv2.resize(corners, (FACE_SIZE, FACE_SIZE), dst=canvas, interpolation=cv2.INTER_LINEAR)
    for v in rng.random((int(rng.integers(0, 5)), 8)).tolist():
        colour = (255.0 * v[0], 255.0 * v[1], 255.0 * v[2])
        x, y = FACE_SIZE * v[3], FACE_SIZE * v[4]
        if v[5] < 0.5:
            ellipse(canvas, (x, y), (4.0 + 26.0 * v[6], 4.0 + 26.0 * v[7]), 360.0 * v[5], colour)
        else:
            w, h = 4.0 + 36.0 * v[6], 4.0 + 36.0 * v[7]
            fill(canvas, np.array([(x, y), (x + w, y), (x + w, y + h), (x, y + h)]), colour)


def _pose_matrix(rng: np.random.Generator, yaw: float) -> np.ndarray:
    """Affine [2, 3] taking the canonical frame to the sampled pose: rotation, scale, yaw squeeze, shift."""
    angle = math.radians(clamp(rng.normal(0.0, 5.0), -12.0, 12.0))
    scale = float(rng.uniform(0.93, 1.07))
    squeeze = 1.0 - 0.12 * abs(yaw)
    shift = np.clip(rng.normal(0.0, 1.5, 2), -4.0, 4.0)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[c * squeeze, -s], [s * squeeze, c]])
    centre = np.array(CENTRE)
    return np.concatenate([linear, (centre + shift - linear @ centre)[:, None]], axis=1)


def _mean_colour_target(rng: np.random.Generator) -> np.ndarray:
    """Per-sample target mean colour [3], from one distribution shared by every identity."""
    luminance = rng.uniform(85.0, 165.0)
    return (luminance + rng.normal(0.0, 14.0, 3)).astype(np.float32)


def _photometric(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting, noise, contrast, the mean-colour move, blur and JPEG: uint8 -> uint8 [112, 112, 3].

    Written as few whole-image passes: a render spends most of its time here.
    """
    z = rng.random(8)
    gain = 0.75 + 0.4 * z[0]  # contrast
    light = gain * (1.0 + _linear_corners(rng, np.full(3, 0.35 * z[1])))
    img = canvas.astype(np.float32)
    cv2.multiply(img, _ramp(light), dst=img)
    oy, ox = int(FACE_SIZE * z[2]), int(FACE_SIZE * z[3])
    cv2.scaleAdd(_NOISE[oy:oy + FACE_SIZE, ox:ox + FACE_SIZE], gain * 8.0 * z[4], img, dst=img)
    target = _mean_colour_target(rng)
    offset = np.rint(target - np.array(cv2.mean(img)[:3]))
    # cv2.add saturates to uint8 in one pass; it is several times faster with whole-number scalars, and
    # half a level of rounding does not matter here.
    out = cv2.add(img, (*offset.tolist(), 0.0), dtype=cv2.CV_8U)
    # Saturation moves the mean off the target; one more pass from the float image puts it back.
    residual = np.rint(target - np.array(cv2.mean(out)[:3]))
    if residual.any():
        out = cv2.add(img, (*(offset + residual).tolist(), 0.0), dtype=cv2.CV_8U)
    if z[5] < 0.3:
        out = cv2.GaussianBlur(out, (5, 5), 0.5 + 0.7 * z[6])
    if z[7] < 0.2:
        buf = simplejpeg.encode_jpeg(out, quality=int(rng.integers(30, 80)), colorspace="RGB",
                                     colorsubsampling="420")
        out = simplejpeg.decode_jpeg(buf, colorspace="RGB")
    return out


def render_face(params: IdentityParams, sample: int, seed: int) -> np.ndarray:
    """Renders one sample of an identity.

    Deterministic: the same `(params.identity, sample, seed)` always gives the same image.

    Args:
      params: the identity (from `identity_params`).
      sample: sample number; different samples differ in pose, expression, lighting and background.
      seed: dataset seed for the per-sample nuisance.

    Returns:
      uint8 [112, 112, 3] RGB image, roughly aligned to the standard 112x112 five-landmark template, with
      its per-channel mean moved to a per-sample target that carries no identity information.
    """
    if sample < 0:
        raise ValueError(f"render_face: sample must be >= 0, got {sample}")
    rng = np.random.default_rng([seed, params.identity, sample, 1])
    canvas = np.empty((FACE_SIZE, FACE_SIZE, 3), np.uint8)
    _draw_background(canvas, rng)
    yaw = draw_face(canvas, params, rng)
    canvas = cv2.warpAffine(canvas, _pose_matrix(rng, yaw), (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    return _photometric(canvas, rng)
