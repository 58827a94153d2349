"""Drawing a synthetic identity's face on the canonical 112x112 frame: the face parts of the renderer.

cv2 drawing primitives at sub-pixel precision, the parts an identity's renders share (`_geometry`: neck,
ears, earrings, face outline, blush, freckles, moles, facial hair, brow curves, lip profile), the head hair
layers behind and over the face, eyes, nose and mouth, and `draw_face`, which draws one sample's head hair
and expression (yaw, gaze, blink, brow raise, smile, open mouth, clothing) before the sample is posed.

The identities are `data_pipelines.synthetic_identity`, the per-sample rendering `data_pipelines.synthetic_faces`;
a change here that gives other images for the same arguments bumps `data_pipelines.synthetic`'s
`GENERATOR_VERSION`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np

from data_pipelines.synthetic_identity import HeadHair, IdentityParams, head_hair
from oaml_jax.models.face_input import FACE_SIZE


# cv2 draws with sub-pixel precision when coordinates are fixed point with this many fractional bits.
_SHIFT = 4
_SCALE = float(1 << _SHIFT)
_AA = cv2.LINE_AA
# Centre of the canonical face; pose transforms rotate and scale about it.
CENTRE = (56.0, 60.0)


def _fixed(points: np.ndarray) -> np.ndarray:
    """[..., 2] float pixel coordinates -> int32 fixed point for cv2 drawing with `shift=_SHIFT`."""
    return np.round(np.asarray(points) * _SCALE).astype(np.int32)


def fill(canvas: np.ndarray, points: np.ndarray, colour) -> None:
    cv2.fillPoly(canvas, [_fixed(points)], colour, _AA, _SHIFT)


def _line(canvas: np.ndarray, points: np.ndarray, colour, thickness: int) -> None:
    cv2.polylines(canvas, [_fixed(points)], False, colour, max(1, int(thickness)), _AA, _SHIFT)


def ellipse(canvas: np.ndarray, centre, axes, angle: float, colour, thickness: int = -1) -> None:
    cv2.ellipse(canvas, (int(round(centre[0] * _SCALE)), int(round(centre[1] * _SCALE))),
                (max(1, int(round(axes[0] * _SCALE))), max(1, int(round(axes[1] * _SCALE)))),
                angle, 0, 360, colour, thickness, _AA, _SHIFT)


def clamp(x: float, lo: float, hi: float) -> float:
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
    cx, ax, ay = CENTRE[0], p.face_axes[0], p.face_axes[1]
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
        ellipse(canvas, (x, p.eye_y), (ew, 1.0), tilt, dark, 1)
        return
    ellipse(canvas, (x, p.eye_y), (ew, eh), tilt, (235.0, 232.0, 225.0))
    ir = min(p.iris_radius, eh + 0.5)
    ellipse(canvas, (x + gaze[0], p.eye_y + gaze[1]), (ir, ir), 0.0, p.iris)
    ellipse(canvas, (x + gaze[0], p.eye_y + gaze[1]), (0.45 * ir, 0.45 * ir), 0.0, (15.0, 12.0, 12.0))
    cv2.ellipse(canvas, (int(round(x * _SCALE)), int(round(p.eye_y * _SCALE))),
                (int(round(ew * _SCALE)), int(round(eh * _SCALE))), tilt, 180, 360, dark, 1, _AA, _SHIFT)


def _draw_nose(canvas: np.ndarray, p: IdentityParams, x: float, yaw: float) -> None:
    tip_x, tip_y, half = x + 3.0 * yaw, p.nose_tip_y, 0.5 * p.nose_width
    top = (x + 0.5 * yaw, tip_y - p.nose_length)
    fill(canvas, np.array([top, (tip_x - half, tip_y), (tip_x + half, tip_y)]), _shade(p.skin, 0.93))
    _line(canvas, np.array([top, (tip_x + (0.7 if yaw >= 0 else -0.7) * half, tip_y - 2.0)]),
          _shade(p.skin, 0.82), 1)
    nostril = _shade(p.skin, 0.45)
    for side in (-1, 1):
        ellipse(canvas, (tip_x + side * 0.6 * half, tip_y + 0.5), (0.32 * half, 1.3), 0.0, nostril)


def _draw_mouth(canvas: np.ndarray, p: IdentityParams, g: _Geometry, x: float, smile: float,
                open_px: float) -> None:
    xs = x + g.mouth_x
    curve = 1.0 - _U9 ** 2
    mid = (p.mouth_y - 1.5 * smile) + (3.0 * smile) * curve
    inner = mid + open_px * curve
    upper, lower = np.stack([xs, mid - g.lip_top], -1), np.stack([xs, inner + g.lip_bottom], -1)
    fill(canvas, np.concatenate([upper, lower[::-1]]), p.lip)
    if open_px > 0.8:
        fill(canvas, np.concatenate([np.stack([xs, mid - 0.3], -1), np.stack([xs, inner], -1)[::-1]]),
             (45.0, 20.0, 22.0))
        teeth = np.stack([xs[2:7], mid[2:7]], -1)
        fill(canvas, np.concatenate([teeth - (0.0, 0.3), (teeth + (0.0, min(1.5, 0.4 * open_px)))[::-1]]),
             (230.0, 228.0, 215.0))
    else:
        _line(canvas, np.stack([xs, mid], -1), _shade(p.lip, 0.55), 1)


def draw_face(canvas: np.ndarray, p: IdentityParams, rng: np.random.Generator) -> float:
    """Draws identity `p` with sampled head hair and expression on `canvas` (canonical frame).

    Returns the yaw.
    """
    g = _geometry(p)
    hair = head_hair(rng)
    # Two draws for all the expression nuisance. z: clothing colour (3), blink?, eye openness, mouth open?,
    # mouth opening. n: yaw, gaze (2), brow raise, smile.
    z = rng.random(7)
    n = rng.standard_normal(5)
    yaw = clamp(0.4 * n[0], -1.0, 1.0)
    fx = CENTRE[0] + _FEATURE_YAW * yaw
    clothing = (10.0 + 235.0 * z[0], 10.0 + 235.0 * z[1], 10.0 + 235.0 * z[2])
    ellipse(canvas, (CENTRE[0] + _HEAD_YAW * yaw, FACE_SIZE + 22.0), (62.0, 30.0), 0.0, clothing)
    _draw_layers(canvas, _layers([(_hair_back(p, hair, CENTRE[0]), hair.colour, _HEAD_YAW, False)]), yaw)
    _draw_layers(canvas, g.under, yaw)
    _draw_layers(canvas, _layers([(_hair_front(p, hair, CENTRE[0]), hair.colour, _HEAD_YAW, False)]), yaw)
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
    smile = clamp(0.2 + 0.45 * n[4], -0.6, 1.2)
    _draw_mouth(canvas, p, g, fx, smile, 1.0 + 5.0 * z[6] if z[5] < 0.25 else 0.0)
    return yaw
