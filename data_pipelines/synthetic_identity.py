"""What a synthetic person is: the fixed face parameters of an identity and the per-sample head hair.

Every identity is a fixed set of face parameters (`IdentityParams`) drawn deterministically from
`(seed, identity)`: face outline and jaw, skin tone, eyes, brows, nose, mouth, natural hair colour (brows and
facial hair), ears, facial hair, moles and freckles, earrings.

Head hair (style, colour, hairline, volume, parting: `HeadHair`) is drawn per sample, independently of the
identity, like a new haircut. When it belonged to the identity, the demo model took most of its evidence
from it: re-rendering the second face of genuine pairs with another identity's hair removed 70% (AdaFace) and
92% (QAConv) of the gap between the mean genuine and impostor scores, another identity's eyes 3-5% and nose
and mouth 1-3%, so masks and sunglasses hid almost nothing the model used.

Drawing them is `data_pipelines.synthetic_face_parts`, rendering a sample `data_pipelines.synthetic_faces`;
a change here that gives other images for the same arguments bumps `data_pipelines.synthetic`'s
`GENERATOR_VERSION`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


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


def head_hair(rng: np.random.Generator) -> HeadHair:
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
