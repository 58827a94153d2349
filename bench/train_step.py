"""Throughput of one OAML train step (images/s and estimated MFU) with synthetic device-resident batches.

    python bench/train_step.py --arch=ir_50 --batch=128 --dtype=bfloat16 --steps=20 --mode=full
    python bench/train_step.py --arch=ir_18 --widths=16,32,32,64 --batch=32 --steps=3 --mode=adaface_only

--mode=full times the whole OAML loss (AdaFace + QAConv over the batch + occlusion head); --mode=adaface_only
times backbone + AdaFace head alone (QAConv and the occlusion head are not computed). Only jax, flax,
optax, numpy and absl are needed besides oaml_jax's models (no data or config packages), so it runs
unchanged on accelerator hosts. MFU uses the FLOPs `oaml_jax.metrics.jaxpr_flops` counts in the traced
step (forward, backward and optimizer: the same figure on every backend) and its peak table.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from oaml_jax import metrics as metrics_lib  # noqa: E402
from oaml_jax.models.backbone import build_backbone, feature_map_shape  # noqa: E402
from oaml_jax.models.oaml import OAML  # noqa: E402

_ARCH = flags.DEFINE_string("arch", "ir_50", "Backbone preset.")
_WIDTHS = flags.DEFINE_list("widths", None, "Optional stage widths override, e.g. 16,32,32,64.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch (images per step).")
_K = flags.DEFINE_integer("k", 4, "Images per identity in the batch.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile+warmup step).")
_MODE = flags.DEFINE_enum("mode", "full", ["full", "adaface_only", "both"], "Which loss to time.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10_000, "Width of the class kernel.")


class AdaFaceOnly(OAML):
    """Backbone + margin head only: the AdaFace baseline's step."""

    def __call__(self, images, labels, masks, train=False):
        embeddings, norms, _ = self.backbone(images, train=train)
        logits = self.margin_head(embeddings, norms, labels, train=train)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"loss": loss}


def _bench(mode: str, backbone, dtype) -> dict:
    cls = OAML if mode == "full" else AdaFaceOnly
    model = cls(backbone=backbone, num_classes=_NUM_CLASSES.value, dtype=dtype)
    grid = feature_map_shape(backbone)[0]
    rng = jax.random.PRNGKey(0)
    images = jax.random.normal(rng, (_BATCH.value, 112, 112, 3), jnp.float32)
    labels = jnp.arange(_BATCH.value, dtype=jnp.int32) // _K.value
    masks = jnp.ones((_BATCH.value, grid, grid), jnp.float32)
    variables = jax.jit(lambda r: model.init({"params": r, "dropout": r}, images[:2], labels[:2], masks[:2]))(rng)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def step(state, images, labels, masks):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            (loss, _), upd = model.apply({"params": p, "batch_stats": batch_stats}, images, labels, masks,
                                         train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return loss, upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    flops = metrics_lib.jaxpr_flops(step, state, images, labels, masks)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels, masks).compile()
    compile_s = time.perf_counter() - t0
    state, loss = compiled(state, images, labels, masks)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, loss = compiled(state, images, labels, masks)
    loss.block_until_ready()
    seconds = (time.perf_counter() - t0) / _STEPS.value
    return {"mode": mode, "images_per_s": _BATCH.value / seconds, "step_ms": 1e3 * seconds,
            "gflop_per_image": flops / _BATCH.value / 1e9, "mfu": metrics_lib.mfu(flops, seconds),
            "compile_s": compile_s, "loss": float(loss)}


def main(argv):
    del argv
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    overrides = {"widths": tuple(int(w) for w in _WIDTHS.value)} if _WIDTHS.value else {}
    backbone = build_backbone(_ARCH.value, dtype=dtype, **overrides)
    device = jax.devices()[0]
    logging.info("benchmarking on %s", device)
    modes = ["full", "adaface_only"] if _MODE.value == "both" else [_MODE.value]
    print(f"device={device.device_kind} ({device.platform}) arch={_ARCH.value} widths={backbone.widths} "
          f"batch={_BATCH.value} dtype={_DTYPE.value} classes={_NUM_CLASSES.value} "
          f"peak={metrics_lib.peak_flops(device):.3g} FLOP/s")
    print(f"{'mode':<14}{'images/s':>10}{'step ms':>10}{'GFLOP/img':>11}{'MFU':>8}{'compile s':>11}{'loss':>9}")
    for mode in modes:
        r = _bench(mode, backbone, dtype)
        print(f"{r['mode']:<14}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}{r['gflop_per_image']:>11.2f}"
              f"{r['mfu']:>8.1%}{r['compile_s']:>11.1f}{r['loss']:>9.3f}")


if __name__ == "__main__":
    app.run(main)
