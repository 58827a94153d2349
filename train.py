"""Trains OAML.

    python train.py --config=configs/ir50_ms1mv2.py --workdir=/tmp/ir50 --config.data.path=/data/faces_emore
    python train.py --config=configs/demo.py --workdir=demo_workdir/run
"""

from absl import app, flags
from ml_collections import config_flags

from oaml_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and summaries go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
