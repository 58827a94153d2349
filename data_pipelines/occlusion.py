"""Synthetic occlusion with ground-truth visibility maps, and real occluded-face folders.

Every occlusion kind returns the occluded image and a pixel mask (`True` = visible). The
training target is the visibility map at feature-map resolution: each cell holds the visible
fraction of its image area (the area average of the pixel mask, not a bounding box), so a
16x16 cell half covered by a block gets 0.5.

Kinds (all take RGB uint8 `[H, W, 3]` and a `np.random.Generator`):
- `random_blocks`: 1..n rectangles of solid random colour or uniform noise;
- `medical_mask`: a procedural surgical mask over nose and mouth, placed from the standard
  112x112 five-point landmarks with random jitter, light colour, pleats and shading;
- `sunglasses`: dark lenses (or a dark band) over the eyes, placed from the eye landmarks;
- `rgba_overlay`: a user-supplied RGBA occluder warped onto the mask region; alpha > 0.5
  counts as occluded. The file is read once per process and cached.
"""

import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

# Standard five landmarks (left eye, right eye, nose tip, left and right mouth corners) of
# an aligned 112x112 face, (x, y) in pixels.
LANDMARKS_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], np.float32)

KINDS = ("blocks", "mask", "sunglasses", "rgba")
PROB_KEYS = ("prob_blocks", "prob_mask", "prob_sunglasses", "prob_rgba")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_REFERENCE_SIDE = 112.0
_LANDMARKS_HOMOGENEOUS = np.concatenate(
    [LANDMARKS_112.astype(np.float64), np.ones((5, 1))], axis=1)
_LANDMARK_CENTRE = tuple(LANDMARKS_112.mean(axis=0).tolist())
_LANDMARK_NOISE = 1.2  # px (at 112x112) of independent noise per landmark
_FACE_SHIFT = 3.0  # px of global translation
_FACE_SCALE = 0.07  # relative global scale jitter
_FACE_ROLL = math.radians(7.0)
_MASK_COLOURS = ((165.0, 200.0, 235.0), (236.0, 238.0, 240.0), (175.0, 222.0, 205.0),
                 (205.0, 208.0, 215.0), (238.0, 210.0, 215.0))


def _cfg_value(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    try:
        return cfg[key]
    except KeyError:
        raise KeyError(f"occlusion config is missing '{key}' (data.occlusion.{key})") from None


@functools.lru_cache(maxsize=32)
def _area_weights(size: int, grid: int) -> np.ndarray:
    """`[grid, size]` float32: share of each pixel's extent inside each cell, rows sum to 1."""
    edges = np.arange(grid + 1, dtype=np.float64) * (size / grid)
    pixels = np.arange(size, dtype=np.float64)
    overlap = (np.minimum(pixels[None, :] + 1.0, edges[1:, None])
               - np.maximum(pixels[None, :], edges[:-1, None]))
    weights = (np.clip(overlap, 0.0, None) / (size / grid)).astype(np.float32)
    weights.setflags(write=False)
    return weights


def visibility_map(pixel_mask: np.ndarray, grid: int = 7) -> np.ndarray:
    """Area-averages a pixel visibility mask onto a `grid x grid` map.

    Cells cover `H / grid` x `W / grid` pixels; when the side is not divisible by `grid` the
    boundary pixels are split between cells with exact area weights (the semantics of
    `cv2.resize(..., interpolation=cv2.INTER_AREA)`).

    Args:
      pixel_mask: `[H, W]` bool or float in [0, 1], 1 = visible.
      grid: output side (7 for the stage-4 feature map of a 112x112 input).

    Returns:
      `[grid, grid]` float32, each cell the visible fraction of its area.
    """
    mask = np.asarray(pixel_mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"pixel_mask must be [H, W], got shape {mask.shape}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    height, width = mask.shape
    if height % grid == 0 and width % grid == 0:
        # Whole-pixel cells: OpenCV's area resize is the exact box mean, and much cheaper than
        # the weight matmuls for a 112x112 mask.
        return cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_AREA)
    return _area_weights(height, grid) @ mask @ _area_weights(width, grid).T


def _jittered_landmarks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """`[5, 2]` float64 landmarks: random similarity (shift, zoom, roll) plus per-point noise."""
    shift_x, shift_y, zoom, roll = (2.0 * rng.random(4) - 1.0).tolist()
    noise = rng.standard_normal((5, 2))
    scale = 1.0 + _FACE_SCALE * zoom
    cos, sin = scale * math.cos(roll * _FACE_ROLL), scale * math.sin(roll * _FACE_ROLL)
    cx, cy = _LANDMARK_CENTRE
    kx, ky = width / _REFERENCE_SIDE, height / _REFERENCE_SIDE
    # Similarity about the landmarks' centre, then the shift, then the image-size scaling.
    similarity = np.array(
        [[kx * cos, -kx * sin, kx * (cx - cos * cx + sin * cy + _FACE_SHIFT * shift_x)],
         [ky * sin, ky * cos, ky * (cy - sin * cx - cos * cy + _FACE_SHIFT * shift_y)]])
    return _LANDMARKS_HOMOGENEOUS @ similarity.T + noise * (_LANDMARK_NOISE * np.array([kx, ky]))


def _face_frame(origin: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
    """`[2, 3]` affine map from face-frame (a, b, 1) to pixel (x, y).

    The frame has its origin at `origin`, `a` along the eye line and `b` pointing down, both in
    units of the inter-ocular distance.
    """
    ux, uy = (right_eye - left_eye).tolist()
    ox, oy = origin.tolist()
    return np.array([[ux, -uy, ox], [uy, ux, oy]])


def _to_image(frame: np.ndarray, coords: list[tuple[float, float]]) -> np.ndarray:
    """Maps face-frame coordinates (n pairs) to `[n, 2]` float64 pixel positions."""
    return np.asarray(coords, np.float64) @ frame[:, :2].T + frame[:, 2]


def _pixels(points: np.ndarray) -> np.ndarray:
    """Rounds `[n, 2]` float positions to int32 pixel positions for OpenCV drawing."""
    return np.rint(points).astype(np.int32)


def _point(points: np.ndarray, i: int) -> tuple[int, int]:
    return int(points[i, 0]), int(points[i, 1])


def _composite(image: np.ndarray, occluder: np.ndarray, layer_fn) -> None:
    """Copies `layer_fn(x0, y0, w, h) -> [h, w, 3] uint8` into `image` where `occluder` is set.

    Only the occluder's bounding box is rendered, which keeps textures cheap.
    """
    x0, y0, w, h = cv2.boundingRect(occluder)
    if w == 0 or h == 0:
        return
    # `region` is a view with row strides, which OpenCV writes through in place.
    region = image[y0:y0 + h, x0:x0 + w]
    cv2.copyTo(layer_fn(x0, y0, w, h), occluder[y0:y0 + h, x0:x0 + w], region)


def _colour_layer(shade: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """`[h, w, 3]` uint8 from a `[h, w]` float32 shade and an RGB colour (products in [0, 255])."""
    # cv2.merge of three planes is several times faster than numpy's broadcast with a
    # trailing axis of 3.
    return cv2.merge([(shade * np.float32(c)).astype(np.uint8) for c in colour])


def random_blocks(image: np.ndarray, rng: np.random.Generator,
                  count: tuple[int, int] = (1, 3),
                  size: tuple[float, float] = (0.1, 0.4)) -> tuple[np.ndarray, np.ndarray]:
    """Pastes random rectangles of a solid random colour or uniform noise.

    Args:
      image: `[H, W, 3]` uint8 RGB (not modified).
      rng: random generator.
      count: inclusive (lo, hi) number of blocks.
      size: (lo, hi) block height and width, each drawn independently as a fraction of the
        image side.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    height, width = image.shape[:2]
    out = image.copy()
    visible = np.ones((height, width), bool)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        frac_h, frac_w, u_top, u_left, noise = rng.random(5).tolist()
        block_h = max(1, int(round((size[0] + (size[1] - size[0]) * frac_h) * height)))
        block_w = max(1, int(round((size[0] + (size[1] - size[0]) * frac_w) * width)))
        top = int(u_top * (height - block_h + 1))
        left = int(u_left * (width - block_w + 1))
        if noise < 0.5:
            out[top:top + block_h, left:left + block_w] = rng.integers(
                0, 256, (block_h, block_w, 3), dtype=np.uint8)
        else:
            # cv2.rectangle fills in place, much faster than a numpy broadcast of 3 channels.
            colour = tuple(float(c) for c in rng.integers(0, 256, 3))
            cv2.rectangle(out, (left, top), (left + block_w - 1, top + block_h - 1), colour, -1)
        visible[top:top + block_h, left:left + block_w] = False
    return out, visible


def _mask_shape(rng: np.random.Generator) -> tuple[float, float, float]:
    """(top, bottom, half width) of a surgical mask in the nose-centred face frame."""
    top_u, bottom_u, width_u = rng.random(3).tolist()
    return -0.36 + 0.24 * top_u, 1.15 + 0.2 * bottom_u, 0.88 + 0.14 * width_u


def medical_mask(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws a procedural surgical mask over the nose and mouth.

    The outline is placed from jittered standard landmarks (nose tip as origin, eye distance
    as unit), filled with a light colour with horizontal pleats, soft folds and a darkening
    towards the sides, with ear loops running from the cheeks towards the ears.

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face (not modified).
      rng: random generator.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    frame = _face_frame(landmarks[2], landmarks[0], landmarks[1])
    top, bottom, half = _mask_shape(rng)
    colour_pick, tint_r, tint_g, tint_b, fold_phase = rng.random(5).tolist()
    base = _MASK_COLOURS[int(colour_pick * len(_MASK_COLOURS))]
    colour = tuple(min(255.0, max(0.0, c + 12.0 * (2.0 * t - 1.0)))
                   for c, t in zip(base, (tint_r, tint_g, tint_b)))
    period = (bottom - top) / 4.0
    right = [(0.0, top), (0.55 * half, top + 0.07), (half, 0.22), (0.92 * half, 0.72),
             (0.55 * half, bottom - 0.1), (0.0, bottom)]
    outline = right + [(-a, b) for a, b in right[-2:0:-1]]
    loops = [(half, 0.22), (half + 0.45, -0.2), (-half, 0.22), (-half - 0.45, -0.2)]
    pleats = [(side * 1.5 * half, top + (k + 0.5 + 0.5 * fold_phase) * period)
              for k in range(3) for side in (-1.0, 1.0)]
    points = _to_image(frame, outline + loops + pleats)
    n_outline, n_loops = len(outline), len(loops)
    occluder = np.zeros((height, width), np.uint8)
    cv2.fillPoly(occluder, [_pixels(points[:n_outline])], 1)
    out = image.copy()
    loop_pts = _pixels(points[n_outline:n_outline + n_loops])
    loop_colour = tuple(0.85 * c for c in colour)
    for i in (0, 2):
        cv2.line(out, _point(loop_pts, i), _point(loop_pts, i + 1), loop_colour, 1)
        cv2.line(occluder, _point(loop_pts, i), _point(loop_pts, i + 1), 1, 1)
    pleat_pts = points[n_outline + n_loops:]
    unit = math.hypot(frame[0, 0], frame[1, 0])
    centre_x, half_px = frame[0, 2], half * unit
    fold_y, fold_px = frame[1, 2] + top * unit, period * unit
    pleat_colour = tuple(0.8 * c for c in colour)

    def layer(x0, y0, w, h):
        # Shading runs along the image axes: the face roll is only a few degrees.
        cols = (np.arange(x0 + 0.5 - centre_x, x0 + w - centre_x, dtype=np.float32)
                / np.float32(half_px))
        rows = (np.arange(y0 + 0.5 - fold_y, y0 + h - fold_y, dtype=np.float32)
                * np.float32(2.0 * np.pi / fold_px))
        shade = np.outer(0.95 + 0.05 * np.cos(rows), 1.0 - 0.22 * np.minimum(cols * cols, 1.0))
        fill = _colour_layer(shade, colour)
        shifted = _pixels(pleat_pts - (x0, y0))
        for i in range(0, len(shifted), 2):
            cv2.line(fill, _point(shifted, i), _point(shifted, i + 1), pleat_colour, 1)
        return fill

    _composite(out, occluder, layer)
    return out, occluder == 0


def sunglasses(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws dark sunglasses (two lenses with bridge and arms, or one band) over the eyes.

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face (not modified).
      rng: random generator.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    frame = _face_frame((landmarks[0] + landmarks[1]) / 2.0, landmarks[0], landmarks[1])
    style, half_w, half_h, lift, dark, tint_r, tint_g, tint_b = rng.random(8).tolist()
    half_w = 0.34 + 0.1 * half_w
    half_h = 0.22 + 0.1 * half_h
    lift = -0.08 + 0.1 * lift
    edge = 0.5 + half_w + 0.1
    band = [(-edge, lift - half_h), (edge, lift - half_h), (edge, lift + half_h),
            (-edge, lift + half_h)]
    lenses = [(-0.5, lift), (0.5, lift)]
    rims = [(-0.5 + half_w, lift - 0.3 * half_h), (0.5 - half_w, lift - 0.3 * half_h),
            (-0.5 - half_w, lift - 0.5 * half_h), (-1.6, lift - 0.5 * half_h),
            (0.5 + half_w, lift - 0.5 * half_h), (1.6, lift - 0.5 * half_h)]
    points = _to_image(frame, band + lenses + rims)
    occluder = np.zeros((height, width), np.uint8)
    unit = math.hypot(frame[0, 0], frame[1, 0])
    if style < 0.3:
        cv2.fillPoly(occluder, [_pixels(points[:4])], 1)
    else:
        angle = math.degrees(math.atan2(frame[1, 0], frame[0, 0]))
        axes = (max(1, round(half_w * unit)), max(1, round(half_h * unit)))
        centres = _pixels(points[4:6])
        for i in (0, 1):
            cv2.ellipse(occluder, _point(centres, i), axes, angle, 0, 360, 1, -1)
    rim_pts = _pixels(points[6:])
    thickness = max(1, round(2 * width / _REFERENCE_SIDE))
    for i in (0, 2, 4):
        cv2.line(occluder, _point(rim_pts, i), _point(rim_pts, i + 1), 1, thickness)
    tone = 8.0 + 50.0 * dark
    colour = tuple(tone * (0.7 + 0.6 * t) for t in (tint_r, tint_g, tint_b))
    lens_top = frame[1, 2] + (lift - half_h) * unit
    lens_px = 2.0 * half_h * unit

    def layer(x0, y0, w, h):
        # Darker at the top of the lenses, like gradient-tinted glasses.
        rows = np.arange(y0 + 0.5 - lens_top, y0 + h - lens_top, dtype=np.float32) / lens_px
        shade = 1.3 - 0.6 * np.clip(rows, 0.0, 1.0)
        return _colour_layer(np.repeat(shade[:, None], w, axis=1), colour)

    out = image.copy()
    _composite(out, occluder, layer)
    return out, occluder == 0


@functools.lru_cache(maxsize=4)
def _load_rgba(path: str) -> np.ndarray:
    """Reads an RGBA occluder once per process: `[h, w, 4]` float32 premultiplied RGBA, 0..255."""
    if not path:
        raise ValueError(
            "prob_rgba > 0 needs an RGBA occluder image: data.occlusion.rgba_path is empty")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"RGBA occluder {path!r} (data.occlusion.rgba_path) does not exist")
    data = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"cannot decode RGBA occluder {path!r} (data.occlusion.rgba_path)")
    if data.ndim != 3 or data.shape[2] != 4:
        raise ValueError(
            f"RGBA occluder {path!r} (data.occlusion.rgba_path) must have 4 channels "
            f"(with alpha), got shape {data.shape}")
    if data.dtype == np.uint16:
        data = (data >> 8).astype(np.uint8)
    rgba = cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA).astype(np.float32)
    # Premultiplied alpha, so that interpolation while warping does not bleed the colour of
    # transparent pixels into the occluder's edges.
    rgba[..., :3] *= rgba[..., 3:] / 255.0
    rgba.setflags(write=False)
    return rgba


def rgba_overlay(image: np.ndarray, rng: np.random.Generator,
                 rgba_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-blends a user-supplied RGBA occluder onto the (jittered) mask region.

    The occluder's full extent is mapped onto the nose-to-chin, cheek-to-cheek region of
    the face (following its roll); pixels with alpha > 0.5 count as occluded.

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face (not modified).
      rng: random generator.
      rgba_path: PNG (or other format with alpha) read once per process.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    rgba = _load_rgba(str(rgba_path))
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    frame = _face_frame(landmarks[2], landmarks[0], landmarks[1])
    top, bottom, half = _mask_shape(rng)
    corners = _to_image(frame, [(-half, top), (half, top), (-half, bottom)])
    src_h, src_w = rgba.shape[:2]
    source = np.array([[0, 0], [src_w, 0], [0, src_h]], np.float32)
    warp = cv2.getAffineTransform(source, corners.astype(np.float32))
    warped = cv2.warpAffine(rgba, warp, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = warped[..., 3:] * np.float32(1.0 / 255.0)
    blended = image.astype(np.float32) * (1.0 - alpha) + warped[..., :3]
    out = np.clip(np.rint(blended), 0.0, 255.0).astype(np.uint8)
    return out, alpha[..., 0] <= 0.5


def check_config(cfg: Mapping[str, Any] | Any) -> None:
    """Validates an occlusion config (`config.data.occlusion`) before any data is read.

    Args:
      cfg: mapping or ConfigDict with the keys `occlude` reads.

    Raises:
      KeyError: a key is missing (the message names it).
      ValueError: a probability outside [0, 1], probabilities summing over 1, a bad block
        range, or `prob_rgba > 0` without `rgba_path` (each message names the fields).
      FileNotFoundError: `rgba_path` does not exist (when `prob_rgba > 0`).
    """
    probs = _probabilities(cfg)
    if probs[3] > 0.0:
        _load_rgba(str(_rgba_path(cfg)))
    lo, hi = (int(v) for v in _cfg_value(cfg, "blocks_count"))
    if not 0 <= lo <= hi:
        raise ValueError(f"data.occlusion.blocks_count must satisfy 0 <= lo <= hi, got {(lo, hi)}")
    lo, hi = (float(v) for v in _cfg_value(cfg, "blocks_size"))
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"data.occlusion.blocks_size must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")


def _probabilities(cfg: Mapping[str, Any] | Any) -> tuple[float, float, float, float]:
    probs = tuple(float(_cfg_value(cfg, key)) for key in PROB_KEYS)
    for key, value in zip(PROB_KEYS, probs):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.occlusion.{key} must be in [0, 1], got {value}")
    total = sum(probs)
    if total > 1.0 + 1e-9:
        raise ValueError(
            "data.occlusion.prob_blocks + prob_mask + prob_sunglasses + prob_rgba must be <= 1 "
            f"(at most one occlusion per image), got {' + '.join(map(str, probs))} = {total:g}")
    return probs


def _rgba_path(cfg: Mapping[str, Any] | Any) -> str:
    try:
        path = cfg["rgba_path"]
    except KeyError:
        path = ""
    if not path:
        raise ValueError(
            "data.occlusion.prob_rgba > 0 needs an RGBA occluder image: "
            "data.occlusion.rgba_path is empty or missing")
    return str(path)


def occlude(image: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any] | Any,
            grid: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Applies at most one synthetic occlusion, chosen by the configured probabilities.

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face.
      rng: random generator (Grain's `random_map` passes one per element).
      cfg: mapping or ConfigDict with `prob_blocks`, `prob_mask`, `prob_sunglasses`,
        `prob_rgba` (sum <= 1), `rgba_path` (needed when `prob_rgba > 0`), `blocks_count`
        (lo, hi) and `blocks_size` (lo, hi) fractions of the side.
      grid: visibility map side.

    Returns:
      (image `[H, W, 3]` uint8, visibility `[grid, grid]` float32 with 1 = visible). Without
      occlusion the input array itself and an all-ones map are returned.
    """
    probs = _probabilities(cfg)
    blocks_count = _cfg_value(cfg, "blocks_count")
    blocks_size = _cfg_value(cfg, "blocks_size")
    rgba_path = _rgba_path(cfg) if probs[3] > 0.0 else ""
    draw = rng.random()
    cumulative = 0.0
    for kind, prob in zip(KINDS, probs):
        cumulative += prob
        if draw < cumulative:
            break
    else:
        return image, np.ones((grid, grid), np.float32)
    if kind == "blocks":
        out, visible = random_blocks(image, rng, blocks_count, blocks_size)
    elif kind == "mask":
        out, visible = medical_mask(image, rng)
    elif kind == "sunglasses":
        out, visible = sunglasses(image, rng)
    else:
        out, visible = rgba_overlay(image, rng, rgba_path)
    return out, visibility_map(visible, grid)


def occlude_deterministic(image: np.ndarray, kind: str, seed: int, grid: int = 7, *,
                          rgba_path: str = "", blocks_count: tuple[int, int] = (1, 3),
                          blocks_size: tuple[float, float] = (0.1, 0.4)
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Occludes with one given kind, reproducibly (the evaluation's occluded protocol).

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face.
      kind: one of `KINDS` ("blocks", "mask", "sunglasses", "rgba").
      seed: the same (image, kind, seed) always gives the same output.
      grid: visibility map side.
      rgba_path: occluder image for kind "rgba".
      blocks_count: (lo, hi) number of blocks for kind "blocks".
      blocks_size: (lo, hi) block side fractions for kind "blocks".

    Returns:
      (image `[H, W, 3]` uint8, visibility `[grid, grid]` float32).
    """
    rng = np.random.default_rng(seed)
    if kind == "blocks":
        out, visible = random_blocks(image, rng, blocks_count, blocks_size)
    elif kind == "mask":
        out, visible = medical_mask(image, rng)
    elif kind == "sunglasses":
        out, visible = sunglasses(image, rng)
    elif kind == "rgba":
        if not rgba_path:
            raise ValueError("occlusion kind 'rgba' needs rgba_path (eval occluder image)")
        out, visible = rgba_overlay(image, rng, rgba_path)
    else:
        raise ValueError(f"unknown occlusion kind {kind!r}; expected one of {KINDS}")
    return out, visibility_map(visible, grid)


class OccludedFolderSource:
    """Random-access source of real occluded faces with ground-truth occlusion masks.

    Layout: `image_root/<identity>/<name>.<ext>` with `mask_root/<identity>/<name>.png`
    (same stem). Labels are the indices of the sorted identity folder names. A mask pixel
    counts as occluded when it is on the `occluded_value` side of 128 (white = occluded by
    default); masks may have any resolution, they are area-averaged to `grid x grid`.

    Items: `{"image": encoded image bytes, "label": int, "vis": float32 [grid, grid]}`.
    """

    def __init__(self, image_root: str, mask_root: str, grid: int = 7,
                 occluded_value: int = 255):
        if occluded_value not in (0, 255):
            raise ValueError(f"occluded_value must be 0 or 255, got {occluded_value}")
        for root in (image_root, mask_root):
            if not os.path.isdir(root):
                raise FileNotFoundError(f"occluded face folder {root!r} does not exist")
        self.image_root = str(image_root)
        self.mask_root = str(mask_root)
        self.grid = grid
        self.occluded_value = occluded_value
        identities = sorted(entry.name for entry in os.scandir(image_root) if entry.is_dir())
        if not identities:
            raise ValueError(f"{image_root!r} has no identity sub-folders")
        items = []
        for label, identity in enumerate(identities):
            for name in sorted(os.listdir(os.path.join(image_root, identity))):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                image_path = os.path.join(image_root, identity, name)
                mask_path = os.path.join(mask_root, identity, stem + ".png")
                if not os.path.isfile(mask_path):
                    raise FileNotFoundError(
                        f"occluded image {image_path!r} has no mask {mask_path!r}")
                items.append((image_path, mask_path, label))
        if not items:
            raise ValueError(f"{image_root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
        self._items = items
        self._labels = np.array([label for _, _, label in items], np.int64)
        self.num_classes = len(identities)
        self.identities = tuple(identities)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self._items):
            raise IndexError(f"index {index} out of range for {len(self._items)} occluded images")
        image_path, mask_path, label = self._items[index]
        with open(image_path, "rb") as f:
            data = f.read()
        with open(mask_path, "rb") as f:
            mask = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"cannot decode occlusion mask {mask_path!r} (for {image_path!r})")
        occluded = mask >= 128 if self.occluded_value == 255 else mask < 128
        return {"image": data, "label": label, "vis": visibility_map(~occluded, self.grid)}

    def labels(self) -> np.ndarray:
        """Label of every item, `[len]` int64."""
        return self._labels.copy()

    def __repr__(self) -> str:
        return (f"OccludedFolderSource(image_root={self.image_root!r}, "
                f"mask_root={self.mask_root!r}, "
                f"{len(self)} images, {self.num_classes} identities)")
