"""Optimizers and learning-rate schedules from `config.optim`.

The learning rate in the config is for a global batch of 512 images and scales linearly with the batch
(the AdaFace/OAML recipe trains 512 images per step at lr 0.1). Weight decay is plain L2 added to the
gradient (PyTorch SGD semantics) for SGD and decoupled for AdamW, applied to conv/dense kernels and the
class kernel only: BatchNorm scales/biases, PReLU slopes and biases are not decayed.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

LR_REFERENCE_BATCH = 512

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.optim`; raises ValueError naming the field (a negative lr would climb the loss).

    Args:
        config: the whole run config; only `config.optim` is read.
        num_devices, process_count: unused here (the signature every section check of `run_spec.validate_config`
            shares).
    """
    optim_cfg = config["optim"]
    if optim_cfg["name"] not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim_cfg['name']!r} is unknown; expected one of {OPTIMIZERS}")
    if optim_cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim_cfg['schedule']!r} is unknown; expected one of {SCHEDULES}")

    def refuse(field: str, expected: str):
        raise ValueError(f"optim.{field}={optim_cfg[field]} {expected}")

    if not (math.isfinite(optim_cfg["lr"]) and optim_cfg["lr"] > 0):
        refuse("lr", "must be a positive learning rate (per 512 images)")
    if not 0 <= optim_cfg["momentum"] < 1:
        refuse("momentum", "must be in [0, 1)")
    for field in ("weight_decay", "warmup_epochs", "grad_clip_norm"):
        if not (math.isfinite(optim_cfg[field]) and optim_cfg[field] >= 0):
            refuse(field, "must be >= 0")
    if not 0 < optim_cfg["drop_factor"] <= 1:
        refuse("drop_factor", "must be in (0, 1]")
    drops = tuple(optim_cfg["drop_epochs"])
    if any(e <= 0 for e in drops) or list(drops) != sorted(drops):
        raise ValueError(f"optim.drop_epochs={drops}: expected increasing positive epochs")


def scaled_lr(optim_cfg: ml_collections.ConfigDict, global_batch: int) -> float:
    """Peak learning rate for `global_batch` images per step (linear scaling rule)."""
    return optim_cfg.lr * global_batch / LR_REFERENCE_BATCH


def lr_schedule(optim_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, epochs: int,
                global_batch: int) -> optax.Schedule:
    """Learning rate as a function of the step.

    "step": linear warmup over `warmup_epochs`, then the peak multiplied by `drop_factor` at each of
    `drop_epochs`. "cosine": linear warmup, then cosine decay to 0 at the end of `epochs`.

    Args:
        optim_cfg: `config.optim`.
        steps_per_epoch: optimizer steps per epoch.
        epochs: total epochs of the run.
        global_batch: images per step, over all devices.

    Returns:
        An optax schedule, step -> float32 learning rate.
    """
    peak = scaled_lr(optim_cfg, global_batch)
    warmup_steps = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    total_steps = max(epochs * steps_per_epoch, warmup_steps + 1)
    if optim_cfg.schedule == "step":
        main = optax.piecewise_constant_schedule(
            peak, {int(e * steps_per_epoch) - warmup_steps: optim_cfg.drop_factor
                   for e in optim_cfg.drop_epochs})
    else:
        main = optax.cosine_decay_schedule(peak, total_steps - warmup_steps)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: every "kernel" (conv, dense, class kernel)."""
    def is_kernel(path, leaf):
        name = getattr(path[-1], "key", None)
        return name == "kernel" and jnp.ndim(leaf) >= 2
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, epochs: int,
                   global_batch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimizer from `config.optim`.

    Args:
        optim_cfg: `config.optim`, checked by `check_config`.
        steps_per_epoch: optimizer steps per epoch.
        epochs: total epochs of the run.
        global_batch: images per step, over all devices.

    Returns:
        (transformation, schedule): clip (if `grad_clip_norm` > 0) -> weight decay -> SGD/AdamW.
    """
    schedule = lr_schedule(optim_cfg, steps_per_epoch=steps_per_epoch, epochs=epochs,
                           global_batch=global_batch)
    parts = []
    if optim_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
    if optim_cfg.name == "sgd":
        if optim_cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=optim_cfg.momentum or None))
    else:
        parts.append(optax.adamw(schedule, b1=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                                 mask=decay_mask))
    return optax.chain(*parts), schedule
