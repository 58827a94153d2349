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

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from data_pipelines import recordio
from data_pipelines import synthetic
from oaml_jax import logs
from oaml_jax import train
from oaml_jax.evaluation import runner

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")

_CONFIG = config_flags.DEFINE_config_file("config", _DEMO_CONFIG, "Demo training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where the data, checkpoints and results go.")
_IDENTITIES = flags.DEFINE_integer("identities", 128, "Synthetic training identities.")
_IMAGES = flags.DEFINE_integer("images", 16, "Images per training identity.")
_PAIRS = flags.DEFINE_integer("pairs", 600, "Held-out verification pairs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic identities.")


def ensure_data(data_dir: str, identities: int, images: int, pairs: int, seed: int) -> None:
    """Writes the synthetic dataset into `data_dir` unless a complete one is already there."""
    needed = [recordio.REC_NAME, recordio.IDX_NAME, recordio.PROPERTY_NAME, "lfw.bin"]
    if all(os.path.exists(os.path.join(data_dir, name)) for name in needed):
        logging.info("Reusing the synthetic data in %s", data_dir)
        return
    logging.info("Writing %d synthetic identities x %d images and %d held-out pairs to %s",
                 identities, images, pairs, data_dir)
    synthetic.write_dataset(data_dir, num_identities=identities, images_per_identity=images,
                            num_pairs=pairs, seed=seed, bin_names=("lfw",))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = os.path.abspath(_WORKDIR.value)
    data_dir = os.path.join(workdir, "data")
    ensure_data(data_dir, _IDENTITIES.value, _IMAGES.value, _PAIRS.value, _SEED.value)
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
        config.data.path = data_dir
    train_dir = os.path.join(workdir, "train")
    train.train_and_evaluate(config, train_dir)
    results = runner.run(config, train_dir)
    print(results["table"])


def cli() -> None:
    """`python -m oaml_jax.demo` / `oaml-demo`."""
    logs.run(main)


if __name__ == "__main__":
    cli()
