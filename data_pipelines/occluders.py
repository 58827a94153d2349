"""Synthetic occluders: each kind draws itself on an aligned face and returns the pixel mask.

Every kind takes RGB uint8 `[H, W, 3]` and a `np.random.Generator` and returns the occluded image and a
pixel mask (`True` = visible); `data_pipelines.occlusion` draws a kind per image and turns the mask into the
training target.
- `random_blocks`: 1..n rectangles of solid random colour or uniform noise;
- `medical_mask`: a procedural surgical mask over nose and mouth, placed from the five-point template
  (`oaml_jax.models.face_input.ARCFACE_TEMPLATE`) with random jitter, light colour, pleats and shading;
- `sunglasses`: dark lenses (or a dark band) over the eyes, placed from the eye landmarks;
- `rgba_overlay`: a user-supplied RGBA occluder warped onto the mask region; alpha > 0.5
  counts as occluded. The file (any path `etils.epath` opens, gs:// included) is read once per process and
  cached.
"""

import functools
import math
from typing import NamedTuple

import cv2
import numpy as np
from etils import epath

from oaml_jax.models.face_input import ARCFACE_TEMPLATE, FACE_SIZE

# The five landmarks of an aligned face (left eye, right eye, nose tip, mouth corners), (x, y) pixels,
# float32 as the occluders have always been placed.
_LANDMARKS = ARCFACE_TEMPLATE.astype(np.float32)

_LANDMARKS_LIST = tuple(map(tuple, _LANDMARKS.tolist()))
_LANDMARK_CENTRE = tuple(_LANDMARKS.mean(axis=0).tolist())
_LANDMARK_NOISE = 1.2  # px (at 112x112) of independent noise per landmark
_FACE_SHIFT = 3.0  # px of global translation
_FACE_SCALE = 0.07  # relative global scale jitter
_FACE_ROLL = math.radians(7.0)
# Pre-rendered mask and sunglasses variants: sprite pixels per face-frame unit (the inter-ocular
# distance, ~35 px at 112x112), variants per kind, the bank's seed and its transparent margin (units).
_SPRITE_SCALE = 40.0
_SPRITE_VARIANTS = 128
_SPRITE_SEED = 20240417
_SPRITE_MARGIN = 0.06
# Each bank's random stream after `_SPRITE_SEED`: the kind's place in `occlusion.KINDS` when the banks were
# first drawn, fixed here so that the banks never change.
_SPRITE_STREAMS = {"mask": 1, "sunglasses": 2}
_MASK_COLOURS = ((165.0, 200.0, 235.0), (236.0, 238.0, 240.0), (175.0, 222.0, 205.0),
                 (205.0, 208.0, 215.0), (238.0, 210.0, 215.0))


def _jittered_landmarks(rng: np.random.Generator, height: int,
                        width: int) -> list[tuple[float, float]]:
    """Five (x, y) landmarks: random similarity (shift, zoom, roll) plus per-point noise.

    Plain Python floats: for five points that is several times cheaper than small numpy ops.
    """
    shift_x, shift_y, zoom, roll = (2.0 * rng.random(4) - 1.0).tolist()
    noise = rng.standard_normal(10).tolist()
    scale = 1.0 + _FACE_SCALE * zoom
    cos, sin = scale * math.cos(roll * _FACE_ROLL), scale * math.sin(roll * _FACE_ROLL)
    cx, cy = _LANDMARK_CENTRE
    kx, ky = width / FACE_SIZE, height / FACE_SIZE
    # Similarity about the landmarks' centre, then the shift, then the image-size scaling.
    tx = cx - cos * cx + sin * cy + _FACE_SHIFT * shift_x
    ty = cy - sin * cx - cos * cy + _FACE_SHIFT * shift_y
    return [(kx * (cos * x - sin * y + tx + _LANDMARK_NOISE * noise[2 * i]),
             ky * (sin * x + cos * y + ty + _LANDMARK_NOISE * noise[2 * i + 1]))
            for i, (x, y) in enumerate(_LANDMARKS_LIST)]


class _FaceFrame(NamedTuple):
    """Affine map from face-frame (a, b) to pixel (x, y): `x = ux a - uy b + ox`, `y = uy a + ux b + oy`.

    The frame has its origin at (ox, oy), `a` along the eye line and `b` pointing down, both in units
    of the inter-ocular distance (ux, uy) = right eye - left eye.
    """

    ux: float
    uy: float
    ox: float
    oy: float

    @classmethod
    def at(cls, origin: tuple[float, float], left_eye: tuple[float, float],
           right_eye: tuple[float, float]) -> "_FaceFrame":
        return cls(right_eye[0] - left_eye[0], right_eye[1] - left_eye[1], origin[0], origin[1])

    @property
    def unit(self) -> float:
        """Pixels per face-frame unit (the inter-ocular distance)."""
        return math.hypot(self.ux, self.uy)

    def points(self, coords: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Face-frame (a, b) pairs -> pixel (x, y) pairs (plain floats: cheap for a few points)."""
        ux, uy, ox, oy = self
        return [(ux * a - uy * b + ox, uy * a + ux * b + oy) for a, b in coords]

    def pixels(self, coords: list[tuple[float, float]]) -> list[tuple[int, int]]:
        """Face-frame (a, b) pairs -> rounded integer pixel positions for OpenCV drawing."""
        return [(round(x), round(y)) for x, y in self.points(coords)]


class _Sprite(NamedTuple):
    """A pre-rendered occluder in the face frame (see `_place`).

    Attributes:
      rgba: `[h, w, 4]` uint8; the colour is defined on every pixel (so bilinear warping leaves no dark
        fringe), alpha is 255 on the occluder and 0 elsewhere.
      origin: face-frame (a, b) of sprite pixel (0, 0); a sprite pixel is `1 / _SPRITE_SCALE` units.
      half: the mask's half width (where its ear loops start); 0 for sunglasses.
      colour: the base RGB colour.
    """

    rgba: np.ndarray
    origin: tuple[float, float]
    half: float
    colour: tuple[float, float, float]


def _sprite_grid(a_range: tuple[float, float],
                 b_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Face-frame coordinates of the pixel columns (a) and rows (b) of a sprite covering the ranges."""
    a = a_range[0] + np.arange(math.ceil((a_range[1] - a_range[0]) * _SPRITE_SCALE) + 1) / _SPRITE_SCALE
    b = b_range[0] + np.arange(math.ceil((b_range[1] - b_range[0]) * _SPRITE_SCALE) + 1) / _SPRITE_SCALE
    return a.astype(np.float32), b.astype(np.float32)


def _sprite_pixels(a: np.ndarray, b: np.ndarray, coords: list[tuple[float, float]]) -> np.ndarray:
    """Face-frame (a, b) pairs -> int32 `[n, 2]` sprite pixel positions on the grid `(a, b)`."""
    return np.rint((np.asarray(coords) - (a[0], b[0])) * _SPRITE_SCALE).astype(np.int32)


def _shaded_layer(row_gain: np.ndarray, col_gain: np.ndarray,
                  colour: tuple[float, float, float]) -> np.ndarray:
    """`[h, w, 3]` uint8 `row_gain[y] * col_gain[x] * colour` (products in [0, 255])."""
    cols = (col_gain[:, None] * np.asarray(colour, np.float32)).reshape(-1)
    return np.outer(row_gain, cols).astype(np.uint8).reshape(row_gain.size, col_gain.size, 3)


def _sprite(a: np.ndarray, b: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, half: float,
            colour: tuple[float, float, float]) -> _Sprite:
    rgba = np.dstack([rgb, alpha])
    rgba.setflags(write=False)
    return _Sprite(rgba, (float(a[0]), float(b[0])), half, colour)


def _place(out: np.ndarray, occluder: np.ndarray, sprite: _Sprite, frame: _FaceFrame) -> None:
    """Warps `sprite` into `out` through `frame`; marks `occluder` (non-zero) where its alpha exceeds 1/2.

    Only the bounding box of the warped sprite is resampled (bilinear), so placing costs one small
    warpAffine whatever the variant.
    """
    height, width = occluder.shape
    scale = 1.0 / _SPRITE_SCALE
    ux, uy, ox, oy = frame
    a0, b0 = sprite.origin
    # Sprite pixel (u, v) -> face frame (a0 + u * scale, b0 + v * scale) -> image (x, y).
    m = [[ux * scale, -uy * scale, ux * a0 - uy * b0 + ox],
         [uy * scale, ux * scale, uy * a0 + ux * b0 + oy]]
    h, w = sprite.rgba.shape[:2]
    corners = ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))
    xs = [m[0][0] * u + m[0][1] * v + m[0][2] for u, v in corners]
    ys = [m[1][0] * u + m[1][1] * v + m[1][2] for u, v in corners]
    x0, x1 = max(0, math.floor(min(xs))), min(width, math.ceil(max(xs)) + 1)
    y0, y1 = max(0, math.floor(min(ys))), min(height, math.ceil(max(ys)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    m[0][2] -= x0
    m[1][2] -= y0
    warped = cv2.warpAffine(sprite.rgba, np.array(m), (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = cv2.threshold(cv2.extractChannel(warped, 3), 127, 255, cv2.THRESH_BINARY)[1]
    # `out[...]` is a view with row strides, which OpenCV writes through in place.
    cv2.copyTo(cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB), inside, out[y0:y1, x0:x1])
    region = occluder[y0:y1, x0:x1]
    np.bitwise_or(region, inside, out=region)


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
        frac_h, frac_w, u_top, u_left, noise, red, green, blue = rng.random(8).tolist()
        block_h = max(1, int(round((size[0] + (size[1] - size[0]) * frac_h) * height)))
        block_w = max(1, int(round((size[0] + (size[1] - size[0]) * frac_w) * width)))
        top = int(u_top * (height - block_h + 1))
        left = int(u_left * (width - block_w + 1))
        if noise < 0.5:
            out[top:top + block_h, left:left + block_w] = np.frombuffer(
                rng.bytes(block_h * block_w * 3), np.uint8).reshape(block_h, block_w, 3)
        else:
            # cv2.rectangle fills in place, much faster than a numpy broadcast of 3 channels.
            colour = (int(256 * red), int(256 * green), int(256 * blue))
            cv2.rectangle(out, (left, top), (left + block_w - 1, top + block_h - 1), colour, -1)
        visible[top:top + block_h, left:left + block_w] = False
    return out, visible


def _mask_shape(rng: np.random.Generator) -> tuple[float, float, float]:
    """(top, bottom, half width) of a surgical mask in the nose-centred face frame."""
    top_u, bottom_u, width_u = rng.random(3).tolist()
    return -0.36 + 0.24 * top_u, 1.15 + 0.2 * bottom_u, 0.88 + 0.14 * width_u


def _render_mask(rng: np.random.Generator) -> _Sprite:
    """One surgical mask: outline, light colour, horizontal pleats, soft folds, darker sides."""
    top, bottom, half = _mask_shape(rng)
    colour_pick, tint_r, tint_g, tint_b, fold_phase = rng.random(5).tolist()
    base = _MASK_COLOURS[int(colour_pick * len(_MASK_COLOURS))]
    colour = tuple(min(255.0, max(0.0, c + 12.0 * (2.0 * t - 1.0)))
                   for c, t in zip(base, (tint_r, tint_g, tint_b)))
    period = (bottom - top) / 4.0
    right = [(0.0, top), (0.55 * half, top + 0.07), (half, 0.22), (0.92 * half, 0.72),
             (0.55 * half, bottom - 0.1), (0.0, bottom)]
    outline = right + [(-x, y) for x, y in right[-2:0:-1]]
    pleats = [(side * 1.5 * half, top + (k + 0.5 + 0.5 * fold_phase) * period)
              for k in range(3) for side in (-1.0, 1.0)]
    a, b = _sprite_grid((-half - _SPRITE_MARGIN, half + _SPRITE_MARGIN),
                        (top - _SPRITE_MARGIN, bottom + _SPRITE_MARGIN))
    rgb = _shaded_layer(0.95 + 0.05 * np.cos((b - top) * np.float32(2.0 * np.pi / period)),
                        1.0 - 0.22 * np.minimum((a / half) ** 2, 1.0), colour)
    cv2.polylines(rgb, _sprite_pixels(a, b, pleats).reshape(3, 2, 2), False,
                  tuple(0.8 * c for c in colour), 1)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    cv2.fillPoly(alpha, [_sprite_pixels(a, b, outline)], 255)
    return _sprite(a, b, rgb, alpha, half, colour)


def _render_sunglasses(rng: np.random.Generator) -> _Sprite:
    """One pair of dark glasses: two lenses (or one band) with bridge and arms, darker at the top."""
    style, half_w, half_h, lift, dark, tint_r, tint_g, tint_b = rng.random(8).tolist()
    half_w = 0.34 + 0.1 * half_w
    half_h = 0.22 + 0.1 * half_h
    lift = -0.08 + 0.1 * lift
    edge = 0.5 + half_w + 0.1
    a, b = _sprite_grid((-1.6 - _SPRITE_MARGIN, 1.6 + _SPRITE_MARGIN),
                        (lift - half_h - _SPRITE_MARGIN, lift + half_h + _SPRITE_MARGIN))
    tone = 8.0 + 50.0 * dark
    colour = tuple(tone * (0.7 + 0.6 * t) for t in (tint_r, tint_g, tint_b))
    # Darker at the top of the lenses, like gradient-tinted glasses.
    rgb = _shaded_layer(1.3 - 0.6 * np.clip((b - (lift - half_h)) / (2.0 * half_h), 0.0, 1.0),
                        np.ones_like(a), colour)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    if style < 0.3:
        band = [(-edge, lift - half_h), (edge, lift - half_h), (edge, lift + half_h), (-edge, lift + half_h)]
        cv2.fillPoly(alpha, [_sprite_pixels(a, b, band)], 255)
    else:
        axes = (round(half_w * _SPRITE_SCALE), round(half_h * _SPRITE_SCALE))
        for centre in _sprite_pixels(a, b, [(-0.5, lift), (0.5, lift)]).tolist():
            cv2.ellipse(alpha, centre, axes, 0.0, 0, 360, 255, -1)
    rims = [(-0.5 + half_w, lift - 0.3 * half_h), (0.5 - half_w, lift - 0.3 * half_h),
            (-0.5 - half_w, lift - 0.5 * half_h), (-1.6, lift - 0.5 * half_h),
            (0.5 + half_w, lift - 0.5 * half_h), (1.6, lift - 0.5 * half_h)]
    # Bridge and arms: 2 px wide at 112x112, where the inter-ocular distance is ~35 px.
    thickness = max(1, round(2.0 * _SPRITE_SCALE / (_LANDMARKS[1, 0] - _LANDMARKS[0, 0])))
    cv2.polylines(alpha, _sprite_pixels(a, b, rims).reshape(3, 2, 2), False, 255, thickness)
    return _sprite(a, b, rgb, alpha, 0.0, colour)


@functools.lru_cache(maxsize=None)
def _sprites(kind: str) -> tuple[_Sprite, ...]:
    """The process's bank of pre-rendered variants of `kind`, the same in every process."""
    render = {"mask": _render_mask, "sunglasses": _render_sunglasses}[kind]
    rng = np.random.default_rng([_SPRITE_SEED, _SPRITE_STREAMS[kind]])
    return tuple(render(rng) for _ in range(_SPRITE_VARIANTS))


def _variant(kind: str, rng: np.random.Generator) -> _Sprite:
    """A uniformly drawn variant of the bank of `kind`."""
    bank = _sprites(kind)
    return bank[int(rng.random() * len(bank))]


def medical_mask(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Places a surgical mask over the nose and mouth.

    One of `_SPRITE_VARIANTS` pre-rendered masks (shape, colour, pleats, folds and darker sides, drawn
    once per process from a fixed seed) is warped through a face frame from jittered standard
    landmarks (nose tip as origin, eye distance as unit), and ear loops are drawn from the cheeks
    towards the ears.

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face (not modified).
      rng: random generator.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    frame = _FaceFrame.at(landmarks[2], landmarks[0], landmarks[1])
    sprite = _variant("mask", rng)
    half = sprite.half
    out = image.copy()
    occluder = np.zeros((height, width), np.uint8)
    # Ear loops first: the mask's edge covers where they start. Two-point open polylines draw every
    # segment in one OpenCV call, pixel for pixel as cv2.line.
    loops = np.array(frame.pixels([(half, 0.22), (half + 0.45, -0.2), (-half, 0.22), (-half - 0.45, -0.2)]),
                     np.int32).reshape(2, 2, 2)
    cv2.polylines(out, loops, False, tuple(0.85 * c for c in sprite.colour), 1)
    cv2.polylines(occluder, loops, False, 1, 1)
    _place(out, occluder, sprite, frame)
    return out, occluder == 0


def sunglasses(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Places dark sunglasses (two lenses with bridge and arms, or one band) over the eyes.

    One of `_SPRITE_VARIANTS` pre-rendered pairs (drawn once per process from a fixed seed) is warped
    through a face frame from jittered standard landmarks (eye midpoint as origin, eye distance as
    unit).

    Args:
      image: `[H, W, 3]` uint8 RGB aligned face (not modified).
      rng: random generator.

    Returns:
      (occluded image `[H, W, 3]` uint8, pixel mask `[H, W]` bool, True = visible).
    """
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    (left_x, left_y), (right_x, right_y) = landmarks[0], landmarks[1]
    frame = _FaceFrame.at(((left_x + right_x) / 2.0, (left_y + right_y) / 2.0), landmarks[0],
                          landmarks[1])
    sprite = _variant("sunglasses", rng)
    out = image.copy()
    occluder = np.zeros((height, width), np.uint8)
    _place(out, occluder, sprite, frame)
    return out, occluder == 0


@functools.lru_cache(maxsize=4)
def load_rgba(path: str) -> np.ndarray:
    """Reads an RGBA occluder once per process: `[h, w, 4]` float32 premultiplied RGBA, 0..255.

    Raises:
      ValueError: `path` is empty, or the file is not a decodable image with 4 channels.
      FileNotFoundError: `path` does not exist.
    """
    if not path:
        raise ValueError(
            "prob_rgba > 0 needs an RGBA occluder image: data.occlusion.rgba_path is empty")
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"RGBA occluder {path!r} (data.occlusion.rgba_path) does not exist")
    data = cv2.imdecode(np.frombuffer(file.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
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
    rgba = load_rgba(str(rgba_path))
    height, width = image.shape[:2]
    landmarks = _jittered_landmarks(rng, height, width)
    frame = _FaceFrame.at(landmarks[2], landmarks[0], landmarks[1])
    top, bottom, half = _mask_shape(rng)
    corners = np.array(frame.points([(-half, top), (half, top), (-half, bottom)]), np.float32)
    src_h, src_w = rgba.shape[:2]
    source = np.array([[0, 0], [src_w, 0], [0, src_h]], np.float32)
    warp = cv2.getAffineTransform(source, corners)
    warped = cv2.warpAffine(rgba, warp, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = warped[..., 3:] * np.float32(1.0 / 255.0)
    blended = image.astype(np.float32) * (1.0 - alpha) + warped[..., :3]
    out = np.clip(np.rint(blended), 0.0, 255.0).astype(np.uint8)
    return out, alpha[..., 0] <= 0.5
