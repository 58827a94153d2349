"""The project's embedded default dataset, written from procedurally rendered synthetic identities.

The identities come from `data_pipelines.synthetic_identity` (`identity_params`), their images from
`data_pipelines.synthetic_faces` (`render_face`).
`write_dataset` writes faces_emore-style RecordIO (`train.rec`, `train.idx`, `property`) for the training
identities and `.bin` verification pair files over held-out identities that training never sees.

    python -m data_pipelines.synthetic --out /tmp/synth --identities 500 --images 20 --pairs 600 --seed 0
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags, logging

from data_pipelines import bin_pairs, images
from data_pipelines.recordio_format import IDX_NAME, PROPERTY_NAME, REC_NAME, write_recordio
from data_pipelines.synthetic_faces import render_face
from data_pipelines.synthetic_identity import identity_params
from oaml_jax.models.face_input import FACE_SIZE
from oaml_jax.paths import user_path


# What `write_dataset` writes beside the data: its arguments and the generator's version (bumped whenever the
# same arguments would give other images; 2: head hair drawn per image, not per identity).
RECORD_NAME = "synthetic.json"
GENERATOR_VERSION = 2

# Held-out (verification) identities are numbered from here so they never collide with training ids.
HOLDOUT_ID_OFFSET = 1_000_000


def _validate(num_identities: int, images_per_identity: int, num_pairs: int, holdout: int,
              bin_names: Sequence[str]) -> None:
    if not 1 <= num_identities <= HOLDOUT_ID_OFFSET:
        raise ValueError(f"write_dataset: num_identities must be in [1, {HOLDOUT_ID_OFFSET}], got {num_identities}")
    if images_per_identity < 1:
        raise ValueError(f"write_dataset: images_per_identity must be >= 1, got {images_per_identity}")
    if num_pairs < 2:
        raise ValueError(f"write_dataset: num_pairs must be >= 2 (half same, half different), got {num_pairs}")
    if holdout < 2:
        raise ValueError(f"write_dataset: holdout_identities must be >= 2 to form different pairs, got {holdout}")
    if len(set(bin_names)) != len(bin_names) or any(not n or os.sep in n for n in bin_names):
        raise ValueError(f"write_dataset: bin_names must be distinct plain file names, got {list(bin_names)}")


class _Progress:
    """Logs done/total with rate and ETA at most every `every_s` seconds."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        logging.info("%s: %d/%d (%.0f/s, ETA %.0fs)", self.what, done, self.total, rate, eta)


def _training_items(seed: int, num_identities: int, images_per_identity: int) -> Iterator[tuple[bytes, int]]:
    progress = _Progress("synthetic train images", num_identities * images_per_identity)
    for identity in range(num_identities):
        params = identity_params(seed, identity)
        for sample in range(images_per_identity):
            yield images.encode_jpeg(render_face(params, sample, seed)), identity
        progress.update((identity + 1) * images_per_identity)


def verification_pairs(seed: int, bin_index: int, num_pairs: int,
                       holdout_identities: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The balanced pairs of pair file number `bin_index`, over the held-out identities.

    Args:
      seed: dataset seed.
      bin_index: position of the pair file in `bin_names`.
      num_pairs: N, the number of pairs; N // 2 are same-identity pairs, in shuffled order.
      holdout_identities: H, the held-out identities are ids [HOLDOUT_ID_OFFSET, HOLDOUT_ID_OFFSET + H).

    Returns:
      (identity ids int64 [2N], sample numbers int64 [2N], issame bool [N]); pair i is images (2i, 2i+1).
      Sample numbers are distinct across all pair files, so no image appears twice.
    """
    rng = np.random.default_rng([seed, bin_index, 2])
    issame = rng.permutation(np.arange(num_pairs) < num_pairs // 2)
    first = rng.integers(0, holdout_identities, num_pairs)
    # A different identity: offset by 1..H-1 modulo H, so it never equals `first`.
    other = (first + rng.integers(1, holdout_identities, num_pairs)) % holdout_identities
    second = np.where(issame, first, other)
    ids = np.stack([first, second], axis=1).reshape(-1) + HOLDOUT_ID_OFFSET
    samples = bin_index * 2 * num_pairs + np.arange(2 * num_pairs)
    return ids, samples, issame


def record(num_identities: int, images_per_identity: int, num_pairs: int, seed: int,
           holdout_identities: int | None = None, bin_names: Sequence[str] = ("lfw",)) -> dict:
    """The generator version and arguments that `write_dataset` records in `RECORD_NAME` for these arguments."""
    holdout = max(10, num_identities // 5) if holdout_identities is None else int(holdout_identities)
    return {"generator": GENERATOR_VERSION, "num_identities": num_identities,
            "images_per_identity": images_per_identity, "num_pairs": num_pairs, "seed": seed,
            "holdout_identities": holdout, "bin_names": list(bin_names)}


def write_dataset(out_dir: str, num_identities: int, images_per_identity: int, num_pairs: int, seed: int,
                  holdout_identities: int | None = None, bin_names: Sequence[str] = ("lfw",)) -> dict:
    """Writes the synthetic dataset: faces_emore RecordIO for training and `.bin` pair files for validation.

    Training identities are ids [0, num_identities) with label = id. Verification pairs use held-out
    identities, ids [HOLDOUT_ID_OFFSET, HOLDOUT_ID_OFFSET + holdout_identities), never seen in training.
    Each pair file holds `num_pairs` pairs, `num_pairs // 2` of them same-identity, in shuffled order;
    every image in every pair file is a distinct sample.

    Args:
      out_dir: output folder, local or any epath URI (created if missing); gets `train.rec`, `train.idx`,
        `property`, `<name>.bin` for each name in `bin_names` and `RECORD_NAME` (see `record`).
      num_identities: number of training identities (classes).
      images_per_identity: training images per identity.
      num_pairs: pairs per `.bin` file.
      seed: dataset seed; the same arguments always write the same images.
      holdout_identities: number of held-out identities (default max(10, num_identities // 5)).
      bin_names: names of the pair files to write.

    Returns:
      Summary dict: out_dir, seed, num_classes, num_images, images_per_identity, train_identity_range,
      holdout_identity_range, paths (rec, idx, property) and bins {name: {path, num_pairs, num_same}}.
    """
    written = record(num_identities, images_per_identity, num_pairs, seed, holdout_identities, bin_names)
    holdout, bin_names = written["holdout_identities"], tuple(bin_names)
    _validate(num_identities, images_per_identity, num_pairs, holdout, bin_names)
    out = user_path(out_dir, "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    logging.info("synthetic dataset: %d identities x %d images, %d held-out identities, %d pairs per bin %s "
                 "-> %s", num_identities, images_per_identity, holdout, num_pairs, list(bin_names), out_dir)
    num_images = write_recordio(out, _training_items(seed, num_identities, images_per_identity), num_identities,
                                image_size=(FACE_SIZE, FACE_SIZE))
    bins = {}
    for k, name in enumerate(bin_names):
        ids, samples, issame = verification_pairs(seed, k, num_pairs, holdout)
        progress = _Progress(f"synthetic pairs {name}", len(ids))
        pair_images = np.empty((len(ids), FACE_SIZE, FACE_SIZE, 3), np.uint8)
        for j, (identity, sample) in enumerate(zip(ids, samples)):
            pair_images[j] = render_face(identity_params(seed, int(identity)), int(sample), seed)
            progress.update(j + 1)
        path = out / f"{name}.bin"
        bin_pairs.write_bin(path, pair_images, issame)
        bins[name] = {"path": str(path), "num_pairs": int(num_pairs), "num_same": int(issame.sum())}
    summary = {
        "out_dir": out_dir,
        "seed": seed,
        "num_classes": num_identities,
        "num_images": num_images,
        "images_per_identity": images_per_identity,
        "train_identity_range": (0, num_identities),
        "holdout_identity_range": (HOLDOUT_ID_OFFSET, HOLDOUT_ID_OFFSET + holdout),
        "paths": {name: str(out / file) for name, file in
                  (("rec", REC_NAME), ("idx", IDX_NAME), ("property", PROPERTY_NAME))},
        "bins": bins,
    }
    (out / RECORD_NAME).write_text(json.dumps(written))
    logging.info("synthetic dataset written: %d images of %d identities, bins %s", num_images, num_identities,
                 list(bins))
    return summary


def _define_flags() -> None:
    """Command-line flags, defined only when this module is the program (importers keep their own)."""
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_integer("identities", 500, "Number of training identities.")
    flags.DEFINE_integer("images", 20, "Training images per identity.")
    flags.DEFINE_integer("pairs", 1000, "Verification pairs per .bin file.")
    flags.DEFINE_integer("seed", 0, "Dataset seed.")
    flags.DEFINE_integer("holdout", None, "Held-out identities for the pair files "
                         "(default max(10, identities // 5)).")
    flags.DEFINE_list("bins", ["lfw"], "Names of the .bin pair files to write.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    summary = write_dataset(f.out, f.identities, f.images, f.pairs, f.seed, holdout_identities=f.holdout,
                            bin_names=f.bins)
    print(f"wrote {summary['num_images']} images of {summary['num_classes']} identities to "
          f"{summary['out_dir']}")
    for name, info in summary["bins"].items():
        print(f"  {name}.bin: {info['num_pairs']} pairs ({info['num_same']} same) over held-out identities")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
