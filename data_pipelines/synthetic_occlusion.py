"""A synthetic occlusion set in OAML's layout: procedural coverings on the embedded synthetic faces.

    write_occlusion_set("demo_workdir/data/occlusion", num_images=320, seed=0)
    -> kept_faces/occ_00000.png ... + masks/occ_00000_mask.png ... (masks 160x160, 255 = visible)
or, from the command line (the demo's set: `python -m oaml_jax.demo` writes the same one itself):
    python -m data_pipelines.synthetic_occlusion --out demo_workdir/data/occlusion --images 320 --seed 0

Each image is a synthetic face (`synthetic.render_face`, identities of their own) covered by one of:
"lower" (everything below a curved line under the nose: niqab, high collar), "slit" (all but an eye slit:
niqab), "scarf" (a slanted band over mouth and chin plus a head covering) or "hand" (a palm and fingers over
mouth or cheek), in a random colour with a random texture (plain, stripes, checks, noise) and shading.
Coverings are drawn anti-aliased at the mask's resolution (160 px, not a multiple of any grid), so masks
carry graded edges, and the face receives the same coverage area-averaged to 112 px: the mask is exactly
the face's visibility, which the reader turns into the grid targets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import cv2
import numpy as np
from absl import app, flags, logging

from data_pipelines import synthetic
from data_pipelines.images import encode_png
from data_pipelines.occlusion_sets import IMAGE_DIRS, MASK_DIR, MASK_SUFFIX
from oaml_jax.models.face_input import ARCFACE_TEMPLATE, FACE_SIZE
from oaml_jax.paths import user_path

KINDS = ("lower", "slit", "scarf", "hand")
MASK_SIZE = 160
RECORD_NAME = "occlusion_set.json"
VERSION = 1
# The set's faces are identities of their own: neither training nor held-out verification ids.
IDENTITY_OFFSET = 2 * synthetic.HOLDOUT_ID_OFFSET
_IDENTITIES = 64
_SHIFT = 4  # fixed-point bits of cv2's sub-pixel drawing


def _px(points: np.ndarray) -> np.ndarray:
    """Face coordinates (112 px frame) -> fixed-point mask pixels for cv2."""
    return np.round(np.asarray(points, np.float64) * (MASK_SIZE / FACE_SIZE) * (1 << _SHIFT)).astype(np.int32)


def _fill(cover: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(cover, [_px(points)], 255, lineType=cv2.LINE_AA, shift=_SHIFT)


def _curve(x0: float, x1: float, y_edge: float, sag: float, n: int = 24) -> np.ndarray:
    xs = np.linspace(x0, x1, n)
    return np.stack([xs, y_edge + sag * np.sin(np.linspace(0, np.pi, n))], axis=1)


def _covering(kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 `[MASK_SIZE, MASK_SIZE]` coverage (255 = covered) of one covering of `kind`."""
    cover = np.zeros((MASK_SIZE, MASK_SIZE), np.uint8)
    eye_y, nose_y, mouth_y = ARCFACE_TEMPLATE[0, 1], ARCFACE_TEMPLATE[2, 1], ARCFACE_TEMPLATE[3, 1]
    big = 2.0 * FACE_SIZE
    if kind in ("lower", "slit"):
        top = nose_y + rng.uniform(-6.0, 6.0)
        edge = _curve(-10.0, FACE_SIZE + 10.0, top, rng.uniform(-5.0, 8.0))
        _fill(cover, np.concatenate([edge, [[FACE_SIZE + 10.0, big], [-10.0, big]]]))
    if kind == "slit":
        brow = eye_y - rng.uniform(8.0, 14.0)
        _fill(cover, np.array([[-10.0, -10.0], [FACE_SIZE + 10.0, -10.0], [FACE_SIZE + 10.0, brow], [-10.0, brow]]))
        # The slit's lower edge rises to the eyes' line in places: the cover under the eyes.
        _fill(cover, np.concatenate([_curve(-10.0, FACE_SIZE + 10.0, eye_y + rng.uniform(7.0, 12.0), -3.0),
                                     [[FACE_SIZE + 10.0, nose_y + 10.0], [-10.0, nose_y + 10.0]]]))
    if kind == "scarf":
        centre, slope, half = mouth_y + rng.uniform(-8.0, 6.0), rng.uniform(-0.25, 0.25), rng.uniform(12.0, 20.0)
        xs = np.array([-10.0, FACE_SIZE + 10.0])
        ys = centre + slope * (xs - FACE_SIZE / 2)
        _fill(cover, np.array([[xs[0], ys[0] - half], [xs[1], ys[1] - half], [xs[1], ys[1] + half],
                               [xs[0], ys[0] + half]]))
        cap = rng.uniform(18.0, 32.0)
        _fill(cover, np.concatenate([_curve(-10.0, FACE_SIZE + 10.0, cap, rng.uniform(2.0, 8.0)),
                                     [[FACE_SIZE + 10.0, -10.0], [-10.0, -10.0]]]))
    if kind == "hand":
        cx, cy = rng.uniform(35.0, 77.0), rng.uniform(nose_y - 5.0, mouth_y + 8.0)
        angle = rng.uniform(-0.6, 0.6)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        palm = np.stack([22.0 * np.cos(t := np.linspace(0, 2 * np.pi, 32)), 17.0 * np.sin(t)], axis=1)
        _fill(cover, palm @ rot.T + [cx, cy])
        for k in range(4):
            x = -15.0 + 10.0 * k
            finger = np.array([[x - 4.0, -8.0], [x + 4.0, -8.0], [x + 4.0, -8.0 - rng.uniform(20.0, 30.0)],
                               [x - 4.0, -8.0 - rng.uniform(20.0, 30.0)]])
            _fill(cover, finger @ rot.T + [cx, cy])
    return cover


def _texture(rng: np.random.Generator) -> np.ndarray:
    """float32 `[112, 112, 3]` covering colour with a random texture and a shading ramp."""
    colour = rng.uniform(0.0, 255.0, 3)
    yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE].astype(np.float32)
    pattern = rng.integers(4)
    if pattern == 1:
        period, phase = rng.uniform(4.0, 12.0), rng.uniform(0, np.pi)
        gain = 1.0 + 0.3 * np.sign(np.sin((xx * np.cos(phase) + yy * np.sin(phase)) * 2 * np.pi / period))
    elif pattern == 2:
        period = rng.uniform(6.0, 14.0)
        gain = 1.0 + 0.25 * (((xx // period) + (yy // period)) % 2 * 2 - 1)
    elif pattern == 3:
        gain = 1.0 + rng.normal(0.0, 0.15, (FACE_SIZE, FACE_SIZE)).astype(np.float32)
    else:
        gain = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    shade = 1.0 + rng.uniform(-0.3, 0.3) * (xx / FACE_SIZE - 0.5) + rng.uniform(-0.3, 0.3) * (yy / FACE_SIZE - 0.5)
    return colour[None, None, :] * (gain * shade)[..., None]


def render_occluded(index: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Image `index` of the set: (uint8 `[112, 112, 3]` RGB face, uint8 `[160, 160]` mask 255 = visible, kind).

    Deterministic in `(index, seed)`.
    """
    rng = np.random.default_rng([seed, index, 7])
    identity = IDENTITY_OFFSET + index % _IDENTITIES
    face = synthetic.render_face(synthetic.identity_params(seed, identity), index // _IDENTITIES, seed)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    cover = _covering(kind, rng)
    alpha = cv2.resize(cover.astype(np.float32) / 255.0, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA)
    out = face.astype(np.float32) * (1.0 - alpha[..., None]) + _texture(rng) * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), 255 - cover, kind


def write_occlusion_set(out_dir: str, num_images: int, seed: int) -> dict:
    """Writes `num_images` occluded synthetic faces in OAML's layout under `out_dir` (any epath).

    Returns:
        {"out_dir", "num_images", "kinds": {kind: count}}; the same dict (with the version) is written to
        `out_dir/occlusion_set.json`.

    Raises:
        ValueError: `num_images` < 1.
    """
    if num_images < 1:
        raise ValueError(f"write_occlusion_set: num_images must be >= 1, got {num_images}")
    out = user_path(out_dir, "out_dir")
    faces, masks = out / IMAGE_DIRS[0], out / MASK_DIR
    faces.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    kinds = dict.fromkeys(KINDS, 0)
    for i in range(num_images):
        face, mask, kind = render_occluded(i, seed)
        kinds[kind] += 1
        name = f"occ_{i:05d}"
        (faces / f"{name}.png").write_bytes(encode_png(face))
        (masks / f"{name}{MASK_SUFFIX}.png").write_bytes(cv2.imencode(".png", mask)[1].tobytes())
    summary = {"out_dir": str(out_dir), "num_images": num_images, "kinds": kinds}
    (out / RECORD_NAME).write_text(json.dumps({"version": VERSION, "seed": seed, **summary}))
    logging.info("synthetic occlusion set: %d faces %s -> %s", num_images, kinds, out_dir)
    return summary


def _define_flags() -> None:
    """Command-line flags, defined only when this module is the program (importers keep their own)."""
    flags.DEFINE_string("out", None, "Output folder (OAML's layout: kept_faces/ + masks/).", required=True)
    flags.DEFINE_integer("images", 320, "Number of occluded faces (the demo's set has 320).")
    flags.DEFINE_integer("seed", 0, "Set seed (the demo's is its --data_seed).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    summary = write_occlusion_set(f.out, f.images, f.seed)
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["kinds"].items())
    print(f"wrote {summary['num_images']} occluded faces with masks ({kinds}) to {summary['out_dir']}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
