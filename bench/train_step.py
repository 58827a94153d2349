"""Throughput of the OAML train step that train.py compiles (images/s, MFU) on device-resident batches.

    python bench/train_step.py --arch=ir_50 --batch=512 --dtype=bfloat16 --mode=both --num_classes=85742 \
        --qaconv_group_size=0,128
    python bench/train_step.py --arch=ir_18 --widths=16,32,32,64 --batch=32 --steps=3 --mode=adaface_only
    python bench/train_step.py --arch=ir_50 --batch=512 --dtype=bfloat16 --occlusion_batch=38 --num_classes=85742

The step is `oaml_jax.step.build_train_step`, the one train.py runs: uint8 batches mapped to the model's
input on the device, the non-finite guard, the metrics, SGD with weight decay, explicit shardings over a
mesh of every local device, the state donated. --mode=full times the whole OAML loss, once per QAConv
matching group size of --qaconv_group_size (0 = all pairs of the batch); --mode=adaface_only the same step
with lam_qa = lam_occ = 0 (the AdaFace baseline's step: QAConv and the occlusion head are not computed).
--occlusion_batch=N times each full step also with an occlusion batch of N images (OAML's second stream,
`data.occlusion_batch`) and prints its cost against the same step without it.
Only jax, flax, optax, numpy and absl are needed besides oaml_jax (no data or config packages), so it runs
unchanged on accelerator hosts.
MFU uses the FLOPs `oaml_jax.metrics.jaxpr_flops` counts in the traced step (the same figure on every
backend) and its peak table.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from oaml_jax import metrics as metrics_lib  # noqa: E402
from oaml_jax import sharding as sharding_lib  # noqa: E402
from oaml_jax import step as step_lib  # noqa: E402
from oaml_jax.models.backbone import build_backbone  # noqa: E402
from oaml_jax.models.face_input import FACE_SHAPE, InputContract, grid_size  # noqa: E402
from oaml_jax.models.oaml import OAML, check_group_size  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "ir_50", "Backbone preset.")
_WIDTHS = flags.DEFINE_list("widths", None, "Optional stage widths override, e.g. 16,32,32,64.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch (images per step).")
_K = flags.DEFINE_integer("k", 4, "Images per identity in the batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile+warmup step).")
_MODE = flags.DEFINE_enum("mode", "full", ["full", "adaface_only", "both"], "Which loss to time.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10_000, "Width of the class kernel.")
_BLOCK_MB = flags.DEFINE_integer("qaconv_block_mb", 256, "QAConv matcher block, MiB of float32 similarities "
                                 "(model.qaconv_block_mb).")
_OCCLUSION = flags.DEFINE_integer("occlusion_batch", 0, "Also time each full step with an occlusion batch of "
                                  "this many images (0 = not).")
_GROUPS = flags.DEFINE_list("qaconv_group_size", ["0"], "QAConv matching group sizes of the full step (images; "
                            "0 = the whole batch); one run each.")


def _batch(spec: dict, seed: int = 0) -> dict:
    """A random global batch with the step's shardings: P identities x K images, masks of ones."""
    rng = np.random.default_rng(seed)
    b = _BATCH.value
    host = {"image": rng.integers(0, 256, (b,) + FACE_SHAPE, dtype=np.uint8),
            "label": (np.arange(b) // _K.value).astype(np.int32),
            "mask": np.ones(spec["mask"].shape, np.float32), "corrupt": np.zeros(b, np.int32)}
    if "occ_image" in spec:
        n = spec["occ_image"].shape[0]
        host.update(occ_image=rng.integers(0, 256, (n,) + FACE_SHAPE, dtype=np.uint8),
                    occ_target=rng.random(spec["occ_target"].shape).astype(np.float32),
                    occ_corrupt=np.zeros(n, np.int32))
    return {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}


def _bench(mode: str, backbone, dtype, group_size: int, occlusion_batch: int = 0) -> dict:
    lam = {"lam_qa": 0.0, "lam_occ": 0.0} if mode == "adaface_only" else {}
    num_classes = sharding_lib.padded_num_classes(_NUM_CLASSES.value, jax.device_count())
    check_group_size(group_size, global_batch=_BATCH.value, num_devices=jax.device_count(), k=_K.value)
    model = OAML(backbone=backbone, num_classes=num_classes, dtype=dtype, qaconv_group_size=group_size,
                 qaconv_block_bytes=_BLOCK_MB.value * 2**20, **lam)
    contract = InputContract(grid=grid_size(backbone.feature_stage))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    mesh = sharding_lib.make_mesh()
    train_step = step_lib.build_train_step(model, tx, optax.constant_schedule(0.1), contract, mesh,
                                           global_batch=_BATCH.value, occlusion_batch=occlusion_batch)
    flops = metrics_lib.jaxpr_flops(train_step.step, train_step.abstract_state, train_step.abstract_batch)
    t0 = time.perf_counter()
    compiled = train_step.step.lower(train_step.abstract_state, train_step.abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    state = train_step.init(jax.random.PRNGKey(0))
    batch = _batch(train_step.abstract_batch)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / _STEPS.value
    name = mode if mode == "adaface_only" else f"full G={group_size or _BATCH.value}"
    return {"mode": name + (f" +occ {occlusion_batch}" if occlusion_batch else ""),
            "images_per_s": _BATCH.value / seconds, "step_ms": 1e3 * seconds,
            "gflop_per_image": flops / _BATCH.value / 1e9,
            "mfu": metrics_lib.mfu(flops, seconds, jax.device_count()), "compile_s": compile_s,
            "loss": float(metrics["loss"])}


def main(argv):
    del argv
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    overrides = {"widths": tuple(int(w) for w in _WIDTHS.value)} if _WIDTHS.value else {}
    backbone = build_backbone(_ARCH.value, dtype=dtype, **overrides)
    device = jax.devices()[0]
    logging.info("benchmarking on %d x %s", jax.device_count(), device)
    groups = [int(g) for g in _GROUPS.value]
    runs = [("full", g) for g in groups] if _MODE.value in ("full", "both") else []
    runs += [("adaface_only", 0)] if _MODE.value in ("adaface_only", "both") else []
    print(f"devices={jax.device_count()} x {device.device_kind} ({device.platform}) arch={_ARCH.value} "
          f"widths={backbone.widths} batch={_BATCH.value} dtype={_DTYPE.value} classes={_NUM_CLASSES.value} "
          f"peak={metrics_lib.peak_flops(device):.3g} FLOP/s per device")
    print(f"{'mode':<24}{'images/s':>10}{'step ms':>10}{'GFLOP/img':>11}{'MFU':>8}{'compile s':>11}{'loss':>9}")
    for mode, group_size in runs:
        r = _bench(mode, backbone, dtype, group_size)
        _print(r)
        if mode == "full" and _OCCLUSION.value:
            occ = _bench(mode, backbone, dtype, group_size, _OCCLUSION.value)
            _print(occ)
            print(f"occlusion batch of {_OCCLUSION.value}: step time x{occ['step_ms'] / r['step_ms']:.3f}")


def _print(r: dict) -> None:
    print(f"{r['mode']:<24}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}{r['gflop_per_image']:>11.2f}"
          f"{r['mfu']:>8.1%}{r['compile_s']:>11.1f}{r['loss']:>9.3f}")


if __name__ == "__main__":
    app.run(main)
