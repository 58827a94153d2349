"""Procedurally rendered synthetic face identities: the renderer of the project's embedded dataset.

Every identity is a fixed set of face parameters (`IdentityParams`) drawn deterministically from
`(seed, identity)`: face outline and jaw, skin tone, eyes, brows, nose, mouth, natural hair colour (brows and
facial hair), ears, facial hair, moles and freckles, earrings. `render_face` draws one sample of an identity
with per-sample nuisance (head hair, in-plane pose, yaw-like compression, expression, blink, gaze, lighting,
background clutter, clothing, noise, blur, JPEG degradation) on the standard 112x112 five-landmark template
(eyes ~ (38, 52) and (74, 52), nose ~ (56, 72), mouth corners ~ (42, 92) and (71, 92)), so occlusion placed
from those landmarks covers the right parts.

Head hair (style, colour, hairline, volume, parting: `HeadHair`) is drawn per sample, independently of the
identity, like a new haircut. When it belonged to the identity, the demo model took most of its evidence
from it: re-rendering the second face of genuine pairs with another identity's hair removed 70% (AdaFace) and
92% (QAConv) of the gap between the mean genuine and impostor scores, another identity's eyes 3-5% and nose
and mouth 1-3%, so masks and sunglasses hid almost nothing the model used.

The per-channel mean colour of every rendered image is moved to a per-sample target drawn from one
distribution shared by all identities, so mean colour carries no identity information: identities must be
told apart from geometry, shapes and texture.

The dataset writer and its command line are `data_pipelines.synthetic`; a change here that gives other
images for the same arguments bumps its `GENERATOR_VERSION`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np
import simplejpeg

from oaml_jax.models.face_input import FACE_SIZE


# cv2 draws with sub-pixel precision when coordinates are fixed point with this many fractional bits.
_SHIFT = 4
_SCALE = float(1 << _SHIFT)
_AA = cv2.LINE_AA
# Centre of the canonical face; pose transforms rotate and scale about it.
_CENTRE = (56.0, 60.0)

# A fixed bank of Gaussian noise; each sample reads a random window of it (much cheaper than drawing
# 112*112*3 normals per image, and still deterministic).
_NOISE = np.random.default_rng(20240611).standard_normal((2 * FACE_SIZE, 2 * FACE_SIZE, 3)).astype(
    np.float32)
_CORNER_Y, _CORNER_X = np.mgrid[-1.0:1.0:2j, -1.0:1.0:2j]

_HAIR_PALETTE = np.array([
    (25, 20, 18), (60, 40, 28), (100, 70, 45), (150, 110, 65), (200, 165, 105), (130, 60, 30),
    (165, 160, 155), (90, 85, 80)], dtype=np.float32)
_IRIS_PALETTE = np.array([
    (60, 40, 25), (100, 70, 40), (70, 110, 150), (80, 120, 80), (110, 110, 120), (40, 30, 25)],
    dtype=np.float32)
_SKIN_LIGHT = np.array((245, 210, 185), dtype=np.float32)
_SKIN_DARK = np.array((85, 55, 40), dtype=np.float32)

HAIR_STYLES = ("short", "long", "bangs", "parted", "bald", "curly")
BEARD_STYLES = ("none", "moustache", "goatee", "full")


@dataclasses.dataclass(frozen=True)
class IdentityParams:
    """Fixed appearance of one synthetic identity. Lengths in pixels of the canonical 112x112 frame.

    Colours are RGB float triples in [0, 255].
    """

    identity: int
    face_axes: tuple[float, float]  # half width, half height of the face outline
    face_centre_y: float
    jaw_taper: float  # how much narrower the jaw is than the cheeks, 0 = ellipse
    jaw_power: float  # small = pointed chin, large = square jaw
    skin: tuple[float, float, float]
    eye_y: float
    eye_half_spacing: float
    eye_size: tuple[float, float]  # half width, half height of the eye opening
    eye_tilt: float  # degrees, positive lifts the outer corners
    iris_radius: float
    iris: tuple[float, float, float]
    brow_offset: float  # distance above the eye centre
    brow_thickness: int
    brow_angle: float  # degrees, positive raises the outer end
    brow_arch: float
    brow_length: float
    nose_length: float
    nose_width: float
    nose_tip_y: float
    mouth_y: float
    mouth_half_width: float
    lip_thickness: tuple[float, float]  # upper, lower
    lip: tuple[float, float, float]
    hair: tuple[float, float, float]  # natural hair colour: brows and facial hair
    ear_size: tuple[float, float]
    beard_style: str
    beard_density: float
    moles: tuple[tuple[float, float, float], ...]  # (u, v, radius) in face-normalized coordinates
    freckles: tuple[tuple[float, float], ...]  # (u, v) in face-normalized coordinates
    blush: float
    earrings: tuple[float, float, float] | None  # earring colour, None when absent


@dataclasses.dataclass(frozen=True)
class HeadHair:
    """Head hair of one rendered sample, drawn independently of the identity. Lengths in pixels of the
    canonical 112x112 frame; the colour is an RGB float triple in [0, 255]."""

    style: str  # one of HAIR_STYLES
    colour: tuple[float, float, float]
    hairline_y: float
    volume: float
    part: float  # horizontal position of the parting in [-1, 1]


def _colour(rgb: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(rgb, 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _head_hair(rng: np.random.Generator) -> HeadHair:
    """Draws the head hair of one sample from a distribution shared by every identity.

    Args:
      rng: the sample's generator.

    Returns:
      The sample's `HeadHair`.
    """
    style_u, colour_u, hairline_u, volume_u, part_u = rng.random(5).tolist()
    style = HAIR_STYLES[int(style_u * len(HAIR_STYLES))]
    hairline = {"bangs": (30.0, 38.0), "bald": (2.0, 12.0)}.get(style, (14.0, 28.0))
    colour = _HAIR_PALETTE[int(colour_u * len(_HAIR_PALETTE))] + rng.normal(0, 10, 3)
    return HeadHair(style=style, colour=_colour(colour),
                    hairline_y=hairline[0] + (hairline[1] - hairline[0]) * hairline_u,
                    volume=2.0 + 10.0 * volume_u, part=-0.6 + 1.2 * part_u)


@functools.lru_cache(maxsize=4096)
def identity_params(seed: int, identity: int) -> IdentityParams:
    """Draws the fixed appearance of `identity`, deterministically from `(seed, identity)` (cached).

    Args:
      seed: dataset seed (non-negative).
      identity: identity number (non-negative).

    Returns:
      The identity's `IdentityParams`.
    """
    if seed < 0 or identity < 0:
        raise ValueError(f"synthetic identity: seed and identity must be >= 0, got seed={seed}, "
                         f"identity={identity}")
    rng = np.random.default_rng([seed, identity, 0])
    u = rng.uniform
    ax, ay = u(33.0, 41.0), u(45.0, 54.0)
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u(0.0, 1.0) + rng.normal(0, 8, 3)
    hair = _HAIR_PALETTE[rng.integers(len(_HAIR_PALETTE))] + rng.normal(0, 10, 3)
    iris = _IRIS_PALETTE[rng.integers(len(_IRIS_PALETTE))] + rng.normal(0, 10, 3)
    lip = skin * np.array((0.95, 0.62, 0.62)) + np.array((30.0, 5.0, 10.0)) + rng.normal(0, 6, 3)
    beard_style = BEARD_STYLES[rng.choice(len(BEARD_STYLES), p=(0.6, 0.15, 0.1, 0.15))]
    moles = tuple((u(-0.8, 0.8), u(-0.5, 0.85), u(0.8, 2.0)) for _ in range(rng.integers(0, 4)))
    freckles = (tuple((u(-0.6, 0.6), u(0.05, 0.45)) for _ in range(rng.integers(10, 30)))
                if u() < 0.3 else ())
    earrings = (_colour(np.array((230, 190, 60)) if u() < 0.5 else np.array((200, 200, 210)))
                if u() < 0.2 else None)
    return IdentityParams(
        identity=identity,
        face_axes=(ax, ay),
        face_centre_y=u(57.0, 63.0),
        jaw_taper=u(0.0, 0.35),
        jaw_power=u(1.2, 3.5),
        skin=_colour(skin),
        eye_y=u(49.5, 54.5),
        eye_half_spacing=u(15.0, 20.0),
        eye_size=(u(6.0, 9.0), u(2.6, 4.8)),
        eye_tilt=u(-10.0, 10.0),
        iris_radius=u(2.2, 3.4),
        iris=_colour(iris),
        brow_offset=u(7.0, 11.5),
        brow_thickness=int(rng.integers(1, 5)),
        brow_angle=u(-15.0, 15.0),
        brow_arch=u(0.0, 3.5),
        brow_length=u(8.0, 12.5),
        nose_length=u(13.0, 22.0),
        nose_width=u(7.0, 14.0),
        nose_tip_y=u(69.0, 76.0),
        mouth_y=u(88.0, 95.0),
        mouth_half_width=u(11.0, 17.5),
        lip_thickness=(u(1.0, 3.5), u(1.5, 4.5)),
        lip=_colour(lip),
        hair=_colour(hair),
        ear_size=(u(4.0, 7.0), u(8.0, 13.0)),
        beard_style=beard_style,
        beard_density=u(0.35, 0.9),
        moles=moles,
        freckles=freckles,
        blush=u(0.0, 0.15) if u() < 0.4 else 0.0,
        earrings=earrings,
    )


def _fixed(points: np.ndarray) -> np.ndarray:
    """[..., 2] float pixel coordinates -> int32 fixed point for cv2 drawing with `shift=_SHIFT`."""
    return np.round(np.asarray(points) * _SCALE).astype(np.int32)


def _fill(canvas: np.ndarray, points: np.ndarray, colour) -> None:
    cv2.fillPoly(canvas, [_fixed(points)], colour, _AA, _SHIFT)


def _line(canvas: np.ndarray, points: np.ndarray, colour, thickness: int) -> None:
    cv2.polylines(canvas, [_fixed(points)], False, colour, max(1, int(thickness)), _AA, _SHIFT)


def _ellipse(canvas: np.ndarray, centre, axes, angle: float, colour, thickness: int = -1) -> None:
    cv2.ellipse(canvas, (int(round(centre[0] * _SCALE)), int(round(centre[1] * _SCALE))),
                (max(1, int(round(axes[0] * _SCALE))), max(1, int(round(axes[1] * _SCALE)))),
                angle, 0, 360, colour, thickness, _AA, _SHIFT)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(float(x), lo), hi)


def _shade(colour: Sequence[float], factor: float) -> tuple[float, float, float]:
    return (colour[0] * factor, colour[1] * factor, colour[2] * factor)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, float, float]:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b))


def _face_outline(p: IdentityParams, cx: float, t: np.ndarray, grow: float = 1.0) -> np.ndarray:
    """Points of the face outline at angles `t` [n] (0 = right cheek, pi/2 = chin) -> [n, 2]."""
    ax, ay = p.face_axes[0] * grow, p.face_axes[1] * grow
    s = np.sin(t)
    narrowing = 1.0 - p.jaw_taper * np.clip(s, 0.0, None) ** p.jaw_power
    return np.stack([cx + ax * np.cos(t) * narrowing, p.face_centre_y + ay * s], axis=-1)


_OUTLINE_T = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_U9 = np.linspace(-1.0, 1.0, 9)


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
            _ellipse(canvas, (x, y), (4.0 + 26.0 * v[6], 4.0 + 26.0 * v[7]), 360.0 * v[5], colour)
        else:
            w, h = 4.0 + 36.0 * v[6], 4.0 + 36.0 * v[7]
            _fill(canvas, np.array([(x, y), (x + w, y), (x + w, y + h), (x, y + h)]), colour)


def _ellipse_points(centre: Sequence[float], axes: Sequence[float], angle: float = 0.0,
                    n: int = 24) -> np.ndarray:
    """Polygon [n, 2] approximating an ellipse rotated by `angle` degrees."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], axis=-1)


def _hair_back(p: IdentityParams, hair: HeadHair, cx: float) -> list[np.ndarray]:
    ax, ay = p.face_axes
    if hair.style == "bald":
        return []
    cy = p.face_centre_y - 0.12 * ay
    polys = [_ellipse_points((cx, cy - 0.5 * hair.volume), (ax + hair.volume, 0.92 * ay + hair.volume))]
    if hair.style == "long":
        top = p.face_centre_y - 0.3 * ay
        width = ax + hair.volume + 2.0
        polys.append(np.array([(cx - width, top), (cx + width, top), (cx + width + 6, FACE_SIZE + 8),
                               (cx - width - 6, FACE_SIZE + 8)]))
    elif hair.style == "curly":
        for a in np.linspace(np.pi, 2.0 * np.pi, 12):
            polys.append(_ellipse_points((cx + (ax + hair.volume) * math.cos(a),
                                          cy + (0.92 * ay + hair.volume) * math.sin(a)), (6.0, 6.0), n=12))
    return polys


def _hair_front(p: IdentityParams, hair: HeadHair, cx: float) -> list[np.ndarray]:
    """Hair over the forehead: the region between the top of the face outline and the hairline."""
    ay = p.face_axes[1]
    side_y = p.eye_y - 14.0
    if hair.hairline_y >= side_y - 2.0:
        side_y = hair.hairline_y + 4.0
    s0 = (side_y - p.face_centre_y) / (ay * 1.04)
    if s0 <= -1.0:
        return []
    a0 = math.asin(s0)
    top = _face_outline(p, cx, np.linspace(np.pi - a0, 2.0 * np.pi + a0, 24), grow=1.04)
    left, right = top[0], top[-1]
    uu = np.linspace(1.0, -1.0, 17)
    xs = right[0] + (left[0] - right[0]) * (1.0 - uu) / 2.0
    if hair.style == "bangs":
        shape = np.abs(uu) ** 6
    elif hair.style == "parted":
        shape = np.clip(np.abs(uu - hair.part) / (1.0 + abs(hair.part)), 0, 1) ** 0.8
    else:
        shape = np.abs(uu) ** 2.2
    ys = hair.hairline_y + (side_y - hair.hairline_y) * shape
    return [np.concatenate([top, np.stack([xs, ys], axis=-1)])]


def _facial_hair(p: IdentityParams, cx: float) -> list[np.ndarray]:
    polys = []
    if p.beard_style in ("moustache", "full"):
        xs = cx + _U9 * (p.mouth_half_width + 1.5)
        upper = p.mouth_y - p.lip_thickness[0] - 1.0
        polys.append(np.concatenate([np.stack([xs, upper - 3.5 * (1 - _U9 ** 2) ** 0.5 - 0.5], -1),
                                     np.stack([xs[::-1], np.full(9, upper)], -1)]))
    if p.beard_style == "full":
        chin = _face_outline(p, cx, np.linspace(0.08 * np.pi, 0.92 * np.pi, 15))
        lower_lip = p.mouth_y + p.lip_thickness[1] + 1.5
        inner = np.array([(cx - p.mouth_half_width - 2, p.mouth_y - 1), (cx, lower_lip + 2),
                          (cx + p.mouth_half_width + 2, p.mouth_y - 1)])
        polys.append(np.concatenate([chin, inner]))
    elif p.beard_style == "goatee":
        top = p.mouth_y + p.lip_thickness[1] + 1.0
        chin_y = p.face_centre_y + p.face_axes[1] * 0.97
        w = 0.45 * p.mouth_half_width
        polys.append(np.array([(cx - w, top), (cx + w, top), (cx + 0.8 * w, chin_y), (cx - 0.8 * w, chin_y)]))
    return polys


# How far (pixels per unit yaw) each part moves sideways when the head turns: the head outline moves
# against the features, the ears further still.
_HEAD_YAW, _EAR_YAW, _FEATURE_YAW = -1.5, -3.5, 2.5


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Polygons of one colour, in fixed point, moved sideways by `yaw_shift` * yaw."""

    polys: tuple[np.ndarray, ...]
    colour: tuple[float, float, float]
    yaw_shift: float
    dots: bool = False  # draw each 2-point poly as a dot instead of filling


def _layers(specs: Sequence[tuple[list[np.ndarray], tuple[float, float, float], float, bool]]
            ) -> tuple[_Layer, ...]:
    """(polygons, colour, yaw shift, dots) specs -> layers, leaving out those without polygons."""
    return tuple(_Layer(tuple(_fixed(q) for q in polys), colour, shift, dots)
                 for polys, colour, shift, dots in specs if polys)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """What an identity's renders share, precomputed once: fixed layers, brow curves, lip profile."""

    under: tuple[_Layer, ...]  # drawn between the head hair's back and front, before the eyes
    beard: tuple[_Layer, ...]  # drawn before the mouth
    brows: tuple[np.ndarray, np.ndarray]  # [9, 2] relative to the left / right eye centre
    mouth_x: np.ndarray  # [9] x of the lip profile relative to the mouth centre
    lip_top: np.ndarray  # [9] upper lip height above the mouth line
    lip_bottom: np.ndarray  # [9] lower lip height below the mouth line


@functools.lru_cache(maxsize=4096)
def _geometry(p: IdentityParams) -> _Geometry:
    """Precomputes the parts of identity `p` that no per-sample expression changes."""
    cx, ax, ay = _CENTRE[0], p.face_axes[0], p.face_axes[1]
    ear_y = p.eye_y + 7.0
    ears = [_ellipse_points((cx + side * (ax - 1.0), ear_y), p.ear_size, -side * 8.0, n=16) for side in (-1, 1)]
    under = [
        ([np.array([(cx - 0.5 * ax, p.face_centre_y), (cx + 0.5 * ax, p.face_centre_y),
                    (cx + 0.55 * ax, FACE_SIZE + 4), (cx - 0.55 * ax, FACE_SIZE + 4)])],
         _shade(p.skin, 0.8), _HEAD_YAW, False),
        (ears, _shade(p.skin, 0.9), _EAR_YAW, False),
    ]
    if p.earrings is not None:
        under.append(([_ellipse_points((cx + side * (ax - 1.0), ear_y + p.ear_size[1] + 1.5), (1.8, 1.8), n=8)
                       for side in (-1, 1)], p.earrings, _EAR_YAW, False))
    under.append(([_face_outline(p, cx, _OUTLINE_T)], p.skin, _HEAD_YAW, False))
    if p.blush > 0:
        under.append(([_ellipse_points((cx + side * (p.eye_half_spacing + 2), p.nose_tip_y - 2), (7.0, 4.5))
                       for side in (-1, 1)], _mix(p.skin, (220.0, 90.0, 90.0), p.blush), _FEATURE_YAW, False))
    if p.freckles:
        dots = [np.array([(cx + u * ax, p.face_centre_y + v * ay), (cx + u * ax + 0.3, p.face_centre_y + v * ay)])
                for u, v in p.freckles]
        under.append((dots, _shade(p.skin, 0.75), _FEATURE_YAW, True))
    for u, v, r in p.moles:
        under.append(([_ellipse_points((cx + u * ax * 0.85, p.face_centre_y + v * ay * 0.85), (r, r), n=10)],
                      _shade(p.skin, 0.4), _FEATURE_YAW, False))
    beard = [(_facial_hair(p, cx), _mix(p.skin, p.hair, p.beard_density), _FEATURE_YAW, False)]

    brows = []
    for side in (-1, 1):
        outer = _U9 * side  # +1 at the outer end of this brow
        brows.append(np.stack([side * 0.15 * p.brow_length + _U9 * p.brow_length / 2.0,
                               -p.brow_offset - p.brow_arch * (1.0 - _U9 ** 2)
                               - outer * math.tan(math.radians(p.brow_angle)) * p.brow_length / 2.0], axis=-1))
    bulge = (1.0 - _U9 ** 2) ** 0.7
    return _Geometry(
        under=_layers(under), beard=_layers(beard), brows=(brows[0], brows[1]),
        mouth_x=_U9 * p.mouth_half_width,
        lip_top=p.lip_thickness[0] * (bulge - 0.6 * np.exp(-(_U9 / 0.15) ** 2)),
        lip_bottom=p.lip_thickness[1] * bulge)


def _draw_layers(canvas: np.ndarray, layers: Sequence[_Layer], yaw: float) -> None:
    for layer in layers:
        dx = int(round(layer.yaw_shift * yaw * _SCALE))
        if layer.dots:
            dots = [q + np.array([dx, 0], np.int32) for q in layer.polys]
            cv2.polylines(canvas, dots, False, layer.colour, 1, _AA, _SHIFT)
        else:
            # One polygon per call: fillPoly fills overlapping polygons of one call with the even-odd rule.
            for q in layer.polys:
                cv2.fillPoly(canvas, [q], layer.colour, _AA, _SHIFT, (dx, 0))


def _draw_eye(canvas: np.ndarray, p: IdentityParams, x: float, side: int, openness: float,
              gaze: tuple[float, float], width_scale: float) -> None:
    ew, eh = p.eye_size[0] * width_scale, p.eye_size[1] * openness
    tilt = -p.eye_tilt * side  # side = -1 left eye (image left), +1 right eye
    dark = _shade(p.skin, 0.35)
    if openness < 0.25:
        _ellipse(canvas, (x, p.eye_y), (ew, 1.0), tilt, dark, 1)
        return
    _ellipse(canvas, (x, p.eye_y), (ew, eh), tilt, (235.0, 232.0, 225.0))
    ir = min(p.iris_radius, eh + 0.5)
    _ellipse(canvas, (x + gaze[0], p.eye_y + gaze[1]), (ir, ir), 0.0, p.iris)
    _ellipse(canvas, (x + gaze[0], p.eye_y + gaze[1]), (0.45 * ir, 0.45 * ir), 0.0, (15.0, 12.0, 12.0))
    cv2.ellipse(canvas, (int(round(x * _SCALE)), int(round(p.eye_y * _SCALE))),
                (int(round(ew * _SCALE)), int(round(eh * _SCALE))), tilt, 180, 360, dark, 1, _AA, _SHIFT)


def _draw_nose(canvas: np.ndarray, p: IdentityParams, x: float, yaw: float) -> None:
    tip_x, tip_y, half = x + 3.0 * yaw, p.nose_tip_y, 0.5 * p.nose_width
    top = (x + 0.5 * yaw, tip_y - p.nose_length)
    _fill(canvas, np.array([top, (tip_x - half, tip_y), (tip_x + half, tip_y)]), _shade(p.skin, 0.93))
    _line(canvas, np.array([top, (tip_x + (0.7 if yaw >= 0 else -0.7) * half, tip_y - 2.0)]),
          _shade(p.skin, 0.82), 1)
    nostril = _shade(p.skin, 0.45)
    for side in (-1, 1):
        _ellipse(canvas, (tip_x + side * 0.6 * half, tip_y + 0.5), (0.32 * half, 1.3), 0.0, nostril)


def _draw_mouth(canvas: np.ndarray, p: IdentityParams, g: _Geometry, x: float, smile: float,
                open_px: float) -> None:
    xs = x + g.mouth_x
    curve = 1.0 - _U9 ** 2
    mid = (p.mouth_y - 1.5 * smile) + (3.0 * smile) * curve
    inner = mid + open_px * curve
    upper, lower = np.stack([xs, mid - g.lip_top], -1), np.stack([xs, inner + g.lip_bottom], -1)
    _fill(canvas, np.concatenate([upper, lower[::-1]]), p.lip)
    if open_px > 0.8:
        _fill(canvas, np.concatenate([np.stack([xs, mid - 0.3], -1), np.stack([xs, inner], -1)[::-1]]),
              (45.0, 20.0, 22.0))
        teeth = np.stack([xs[2:7], mid[2:7]], -1)
        _fill(canvas, np.concatenate([teeth - (0.0, 0.3), (teeth + (0.0, min(1.5, 0.4 * open_px)))[::-1]]),
              (230.0, 228.0, 215.0))
    else:
        _line(canvas, np.stack([xs, mid], -1), _shade(p.lip, 0.55), 1)


def _draw_face(canvas: np.ndarray, p: IdentityParams, rng: np.random.Generator) -> float:
    """Draws identity `p` with sampled head hair and expression on `canvas` (canonical frame).

    Returns the yaw.
    """
    g = _geometry(p)
    hair = _head_hair(rng)
    # Two draws for all the expression nuisance. z: clothing colour (3), blink?, eye openness, mouth open?,
    # mouth opening. n: yaw, gaze (2), brow raise, smile.
    z = rng.random(7)
    n = rng.standard_normal(5)
    yaw = _clamp(0.4 * n[0], -1.0, 1.0)
    fx = _CENTRE[0] + _FEATURE_YAW * yaw
    clothing = (10.0 + 235.0 * z[0], 10.0 + 235.0 * z[1], 10.0 + 235.0 * z[2])
    _ellipse(canvas, (_CENTRE[0] + _HEAD_YAW * yaw, FACE_SIZE + 22.0), (62.0, 30.0), 0.0, clothing)
    _draw_layers(canvas, _layers([(_hair_back(p, hair, _CENTRE[0]), hair.colour, _HEAD_YAW, False)]), yaw)
    _draw_layers(canvas, g.under, yaw)
    _draw_layers(canvas, _layers([(_hair_front(p, hair, _CENTRE[0]), hair.colour, _HEAD_YAW, False)]), yaw)
    openness = 0.1 + 0.4 * z[4] if z[3] < 0.1 else 0.8 + 0.3 * z[4]
    gaze = (0.8 * n[1], 0.4 * n[2])
    brow_colour = _shade(p.hair, 0.8)
    for side, brow in zip((-1, 1), g.brows):
        ex = fx + side * p.eye_half_spacing
        # The eye turned away from the camera looks narrower.
        _draw_eye(canvas, p, ex, side, openness, gaze, 1.0 - 0.25 * max(0.0, -side * yaw))
        _line(canvas, brow + (ex, p.eye_y - 0.8 * n[3]), brow_colour, p.brow_thickness)
    _draw_nose(canvas, p, fx, yaw)
    _draw_layers(canvas, g.beard, yaw)
    smile = _clamp(0.2 + 0.45 * n[4], -0.6, 1.2)
    _draw_mouth(canvas, p, g, fx, smile, 1.0 + 5.0 * z[6] if z[5] < 0.25 else 0.0)
    return yaw


def _pose_matrix(rng: np.random.Generator, yaw: float) -> np.ndarray:
    """Affine [2, 3] taking the canonical frame to the sampled pose: rotation, scale, yaw squeeze, shift."""
    angle = math.radians(_clamp(rng.normal(0.0, 5.0), -12.0, 12.0))
    scale = float(rng.uniform(0.93, 1.07))
    squeeze = 1.0 - 0.12 * abs(yaw)
    shift = np.clip(rng.normal(0.0, 1.5, 2), -4.0, 4.0)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[c * squeeze, -s], [s * squeeze, c]])
    centre = np.array(_CENTRE)
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
    yaw = _draw_face(canvas, params, rng)
    canvas = cv2.warpAffine(canvas, _pose_matrix(rng, yaw), (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    return _photometric(canvas, rng)
