"""Throughput of train.py's whole loop (Grain workers, host-to-device copies, metrics, checkpoints) on random
faces, to compare with bench/train_step.py's figure for the same step on device-resident batches.

    python bench/train_loop.py --arch=ir_18 --widths=16,32,32,64 --batch=32 --steps=8 --num_workers=2
    python bench/train_step.py --arch=ir_18 --widths=16,32,32,64 --batch=32 --steps=8 --mode=full \
        --num_classes=64

Writes `--identities` x 8 random 112x112 JPEG faces as a RecordIO set in a temporary folder, trains
2 x `--steps` steps (`train.log_every` = `--steps`, no validation, a checkpoint only at the end) and prints
the images/s of the second interval, the loop's steady state (the first holds the first step's warm-up).
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "ir_18", "Backbone preset (model.arch).")
_WIDTHS = flags.DEFINE_list("widths", ["16", "32", "32", "64"], "Stage widths override (empty: the preset's).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch (train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 8, "Steps per timed interval.")
_WORKERS = flags.DEFINE_integer("num_workers", 2, "Grain worker processes (data.num_workers).")
_IDENTITIES = flags.DEFINE_integer("identities", 64, "Identities of 8 images each (the class count).")


def _write_faces(folder: str) -> None:
    from data_pipelines import recordio_format
    from data_pipelines.images import encode_jpeg

    rng = np.random.default_rng(0)
    items = [(encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)), i)
             for i in range(_IDENTITIES.value) for _ in range(8)]
    recordio_format.write_recordio(folder, items, num_classes=_IDENTITIES.value)


def main(argv):
    del argv
    from oaml_jax import train
    from oaml_jax.configs import default

    config = default.get_config()
    config.model.arch = _ARCH.value
    if _WIDTHS.value:
        config.model.backbone.widths = tuple(int(w) for w in _WIDTHS.value)
    config.train.batch_size = _BATCH.value
    config.train.max_steps = 2 * _STEPS.value
    config.train.log_every = _STEPS.value
    config.train.checkpoint_every = 10 * _STEPS.value
    config.train.eval_every = -1
    config.data.num_workers = _WORKERS.value
    with tempfile.TemporaryDirectory() as tmp:
        config.data.path = os.path.join(tmp, "faces")
        _write_faces(config.data.path)
        result = train.train_and_evaluate(config, os.path.join(tmp, "work"))
    print(f"train loop: arch={_ARCH.value} widths={_WIDTHS.value or 'preset'} batch={_BATCH.value} "
          f"workers={_WORKERS.value}: {result['metrics']['images_per_sec']:.1f} images/s "
          f"(steps {_STEPS.value}-{2 * _STEPS.value})")


if __name__ == "__main__":
    app.run(main)
