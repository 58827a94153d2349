"""The end-to-end demo: synthetic identities -> train -> evaluate -> table.

    python -m oaml_jax.demo --workdir demo_workdir

1. Writes the embedded synthetic identities (data_pipelines/synthetic.py) as faces_emore RecordIO plus a
   held-out `lfw.bin`, unless `<workdir>/data` already holds them.
2. Trains `configs/demo.py` (a narrow IR backbone with the three OAML branches) with the real pipeline:
   RecordIO -> Grain -> jitted, sharded train step -> Orbax checkpoints in `<workdir>/train`.
3. Evaluates the last checkpoint with eval.py's code path on the clean and occluded held-out pairs and
   prints the table (also in `<workdir>/train/eval/results.txt`).

Any config field can be overridden as in train.py, e.g. `--config.train.epochs=2`.
"""

import json

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from data_pipelines import occlusion_sets
from data_pipelines import recordio_format
from data_pipelines import synthetic
from data_pipelines import synthetic_occlusion
from oaml_jax import logs
from oaml_jax import train
from oaml_jax.evaluation import runner
from oaml_jax.paths import user_path

DEMO_CONFIG = epath.resource_path("oaml_jax") / "configs" / "demo.py"
# The synthetic occlusion set (OAML's second stream) in <data>/occlusion.
OCCLUSION_SET, OCCLUSION_SET_IMAGES = "occlusion", 320



def define_flags(workdir: str = "demo_workdir") -> None:
    """The demo's flags (also the ablation's: same config, data and workdir flags)."""
    config_flags.DEFINE_config_file("config", str(DEMO_CONFIG), "Training config (the demo's).", lock_config=True)
    flags.DEFINE_string("workdir", workdir, "Where the data, checkpoints and results go (any epath).")
    flags.DEFINE_integer("identities", 128, "Synthetic training identities.")
    flags.DEFINE_integer("images", 16, "Images per training identity.")
    flags.DEFINE_integer("pairs", 600, "Held-out verification pairs.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic identities.")


def prepare(flag_values: flags.FlagValues = flags.FLAGS) -> tuple[epath.Path, ml_collections.ConfigDict]:
    """(workdir, config on the workdir's synthetic data) from the flags of `define_flags`; writes the data
    into `<workdir>/data` unless it is already there."""
    f = flag_values
    workdir = user_path(f.workdir, "--workdir")
    data_dir = workdir / "data"
    ensure_data(data_dir, f.identities, f.images, f.pairs, f.data_seed)
    config = f.config.copy_and_resolve_references()
    with config.unlocked():
        config.data.path = str(data_dir)
        if occlusion_sets.set_paths(config.data.occlusion_sets):
            config.data.occlusion_sets = (ensure_occlusion_set(data_dir, f.data_seed),)
    return workdir, config


def ensure_data(data_dir: epath.Path, identities: int = 128, images: int = 16, pairs: int = 600,
                seed: int = 0) -> None:
    """Writes the synthetic dataset into `data_dir` unless a complete one is already there.

    Data is reused only when `synthetic.RECORD_NAME` beside it says it was written by this generator version
    with these arguments.

    Raises:
        ValueError: the data there was written with other arguments or by another generator version (named),
            so a changed flag is never ignored.
    """
    needed = [recordio_format.REC_NAME, recordio_format.IDX_NAME, recordio_format.PROPERTY_NAME, "lfw.bin"]
    asked = synthetic.record(identities, images, pairs, seed)
    if all((data_dir / name).exists() for name in needed):
        path = data_dir / synthetic.RECORD_NAME
        written = json.loads(path.read_text()) if path.exists() else {"generator": "unknown (no record)"}
        changed = [f"{k}: {written.get(k)} there, now {v}" for k, v in asked.items() if written.get(k) != v]
        if changed:
            raise ValueError(f"{data_dir} holds synthetic data written with other arguments ({'; '.join(changed)}); "
                             "use another --workdir or delete that data folder")
        logging.info("Reusing the synthetic data in %s", data_dir)
        return
    logging.info("Writing %d synthetic identities x %d images and %d held-out pairs to %s",
                 identities, images, pairs, data_dir)
    synthetic.write_dataset(str(data_dir), num_identities=identities, images_per_identity=images,
                            num_pairs=pairs, seed=seed, bin_names=("lfw",))


def ensure_occlusion_set(data_dir: epath.Path, seed: int = 0) -> str:
    """`<data_dir>/occlusion`, the synthetic occlusion set of the demo's config, written unless a set of this
    generator version and seed is there; returns its path.

    Raises:
        ValueError: the set there was written with another seed or generator version.
    """
    folder = data_dir / OCCLUSION_SET
    record = folder / synthetic_occlusion.RECORD_NAME
    asked = {"version": synthetic_occlusion.VERSION, "seed": seed, "num_images": OCCLUSION_SET_IMAGES}
    if record.exists():
        written = json.loads(record.read_text())
        if any(written.get(k) != v for k, v in asked.items()):
            raise ValueError(f"{folder} holds a synthetic occlusion set written with other arguments ({written}, now "
                             f"{asked}); use another --workdir or delete that folder")
        return str(folder)
    synthetic_occlusion.write_occlusion_set(str(folder), OCCLUSION_SET_IMAGES, seed)
    return str(folder)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir, config = prepare()
    train_dir = workdir / "train"
    train.train_and_evaluate(config, train_dir)
    runner.run(config, train_dir, print_table=True)


def cli() -> None:
    """`python -m oaml_jax.demo` / `oaml-demo`."""
    define_flags()
    logs.run(main)


if __name__ == "__main__":
    cli()
