"""Throughput of train.py's whole loop (Grain workers, host-to-device copies, metrics, checkpoints) on random
faces, against the same config's train step on device-resident batches (what bench/train_step.py times).

    python bench/train_loop.py --arch=ir_18 --widths=16,32,32,64 --batch=32 --steps=8 --num_workers=2 --repeats=3

Writes `--identities` x 8 random 112x112 JPEG faces as a RecordIO set in a temporary folder. Each repeat
trains 2 x `--steps` steps (`train.log_every` = `--steps`, no validation, a checkpoint only at the end; the
loop's figure is the images/s of the second interval, its steady state: the first holds the first step's
warm-up), then times `--steps` calls of the same compiled step (model, optimizer and input contract built
from the same config by the same functions train.py calls) on one device-resident batch, after one warm-up
call. Loop and step alternate, so the drift of a shared machine's speed falls on both; the ratio of each
pair is printed, then the medians. An epoch is `--identities` x 8 / `--batch` steps (16 by default): with
2 x `--steps` inside one epoch the second interval is the loop's steady state; one that crosses an epoch
start also times the start of the next epoch's Grain workers.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "ir_18", "Backbone preset (model.arch).")
_WIDTHS = flags.DEFINE_list("widths", ["16", "32", "32", "64"], "Stage widths override (empty: the preset's).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch (train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 8, "Steps per timed interval.")
_WORKERS = flags.DEFINE_integer("num_workers", 2, "Grain worker processes (data.num_workers).")
_IDENTITIES = flags.DEFINE_integer("identities", 64, "Identities of 8 images each (the class count).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Loop / step pairs, alternating.")


def _write_faces(folder: str) -> None:
    from data_pipelines import recordio_format
    from data_pipelines.images import encode_jpeg

    rng = np.random.default_rng(0)
    items = [(encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)), i)
             for i in range(_IDENTITIES.value) for _ in range(8)]
    recordio_format.write_recordio(folder, items, num_classes=_IDENTITIES.value)


def _config(data_path: str):
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
    config.data.path = data_path
    return config


def _step_images_per_s(config, num_classes: int) -> float:
    """Images/s of the config's compiled train step on one device-resident batch (P identities x K images)."""
    from data_pipelines import pipeline
    from oaml_jax import optim, sharding, step
    from oaml_jax.models import factory

    batch_size, k = config.train.batch_size, config.data.k
    spe = pipeline.steps_per_epoch(_IDENTITIES.value * 8, batch_size)
    model = factory.build_model(config.model, sharding.padded_num_classes(num_classes, jax.device_count()))
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=spe, epochs=config.train.epochs,
                                        global_batch=batch_size)
    train_step = step.build_train_step(model, tx, schedule, factory.input_contract(config.model),
                                       sharding.make_mesh(), global_batch=batch_size, **step.occlusion_options(config))
    compiled = train_step.step.lower(train_step.abstract_state, train_step.abstract_batch).compile()
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (batch_size, 112, 112, 3), dtype=np.uint8),
            "label": (np.arange(batch_size) // k).astype(np.int32)}
    for name, spec in train_step.abstract_batch.items():  # masks all visible, no corrupt records
        if name not in host:
            host[name] = (np.zeros if "corrupt" in name else np.ones)(spec.shape, spec.dtype)
    batch = {name: jax.device_put(host[name], spec.sharding) for name, spec in train_step.abstract_batch.items()}
    state = train_step.init(jax.random.PRNGKey(0))
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return _STEPS.value * batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    from oaml_jax import train

    print(f"arch={_ARCH.value} widths={_WIDTHS.value or 'preset'} batch={_BATCH.value} workers={_WORKERS.value} "
          f"steps={_STEPS.value}: images/s")
    figures = {"loop": [], "step": [], "ratio": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "faces")
        _write_faces(data_path)
        for repeat in range(_REPEATS.value):
            result = train.train_and_evaluate(_config(data_path), os.path.join(tmp, f"work{repeat}"))
            loop = result["metrics"]["images_per_sec"]
            step_rate = _step_images_per_s(_config(data_path), result["num_classes"])
            for name, value in (("loop", loop), ("step", step_rate), ("ratio", loop / step_rate)):
                figures[name].append(value)
            print(f"repeat {repeat}: loop {loop:.1f}, step {step_rate:.1f}, loop/step {loop / step_rate:.3f}")
    print(f"median: loop {statistics.median(figures['loop']):.1f}, step {statistics.median(figures['step']):.1f}, "
          f"loop/step {statistics.median(figures['ratio']):.3f}")


if __name__ == "__main__":
    app.run(main)
