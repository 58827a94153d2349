"""What a run is, checked once before anything is read or compiled.

    spec = validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())

Each section of the config is checked by the code that consumes it (`SECTION_CHECKS`, one signature); the
result is the run's frozen description (`RunSpec`), which the run (oaml_jax/train.py) takes as given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from data_pipelines import occlusion_sets, pipeline
from oaml_jax import optim
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.models import factory
from oaml_jax.models.face_input import InputContract
from oaml_jax.models.oaml import check_group_size

NONFINITE = ("stop", "skip")


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.train` (and the batch's split by `data.k`); raises ValueError naming the field.

    Args:
        config: the whole run config; `config.train` and `config.data.k` are read.
        num_devices, process_count: the global batch must split evenly over them.
    """
    train_cfg, k = config["train"], config["data"]["k"]
    batch = train_cfg["batch_size"]
    if batch <= 0:
        raise ValueError(f"train.batch_size={batch} must be positive")
    if batch % num_devices:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {num_devices} devices")
    if batch % process_count:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} processes")
    if k <= 0 or batch % k:
        raise ValueError(f"train.batch_size={batch} is not divisible by data.k={k} (P identities x K images per "
                         "batch)")
    if batch // k < 2:
        raise ValueError(f"train.batch_size={batch} / data.k={k} gives fewer than 2 identities per batch: QAConv "
                         "needs negative pairs")
    for field in ("epochs", "log_every", "checkpoint_every", "keep"):
        if train_cfg[field] <= 0:
            raise ValueError(f"train.{field}={train_cfg[field]} must be positive")
    for field in ("max_steps", "profile_steps"):
        if train_cfg[field] < 0:
            raise ValueError(f"train.{field}={train_cfg[field]} must be >= 0")
    if train_cfg["eval_every"] < -1:
        raise ValueError(f"train.eval_every={train_cfg['eval_every']} must be >= -1 (-1 = never, 0 = at the end)")
    if train_cfg["nonfinite"] not in NONFINITE:
        raise ValueError(f"train.nonfinite={train_cfg['nonfinite']!r}; expected one of {NONFINITE}")
    if not 0 <= train_cfg["max_skipped_share"] < 1:
        raise ValueError(f"train.max_skipped_share={train_cfg['max_skipped_share']} must be in [0, 1)")


# What `validate_config` runs, in order: each checks the fields its module consumes, with one signature
# `check(config, *, num_devices, process_count)` over the whole config.
SECTION_CHECKS = (check_config, factory.check_config, optim.check_config, pipeline.check_config,
                  occlusion_sets.check_config, evaluators_lib.check_config)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What `validate_config` establishes about a run; the rest of the run takes it as given.

    Attributes:
        global_batch: images per step over all devices and processes (`train.batch_size`).
        per_device_batch: images per device and step.
        per_process_batch: images each process reads per step.
        identities_per_batch: P of the PK layout (`global_batch // data.k`).
        group_size: QAConv's matching group in images (`model.qaconv_group_size`, the global batch for 0).
        graph_k: neighbours per class the graph sampler needs (a class and its nearest fill one group).
        contract: the model's input contract (channel order, feature-map side).
    """
    global_batch: int
    per_device_batch: int
    per_process_batch: int
    identities_per_batch: int
    group_size: int
    graph_k: int
    contract: InputContract


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> RunSpec:
    """Checks the whole config before anything is read or compiled: each section by the code that consumes it.

    Returns:
        The run's description.

    Raises:
        ValueError: an inconsistent or unknown value, naming the field.
    """
    for check in SECTION_CHECKS:
        check(config, num_devices=num_devices, process_count=process_count)
    group_size = check_group_size(config.model.qaconv_group_size, global_batch=config.train.batch_size,
                                  num_devices=num_devices, k=config.data.k)
    batch = config.train.batch_size
    return RunSpec(global_batch=batch, per_device_batch=batch // num_devices, per_process_batch=batch // process_count,
                   identities_per_batch=batch // config.data.k, group_size=group_size,
                   graph_k=group_size // config.data.k - 1, contract=factory.input_contract(config.model))
