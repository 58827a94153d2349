"""`config.eval` -> evaluators, built by type (big_vision's `evaluators/common.py:from_config`).

`config.eval.evaluators` names evaluator entries, each a ConfigDict with a `type` of `REGISTRY`, an optional
`validation` (also run by train-time validation) and its type's settings:

    config.eval.evaluators.bins = dict(type="bin_pairs", validation=True)        # eval.bin_names
    config.eval.evaluators.niqab = dict(type="folder", path="/data/niqab", aligned=False)
    config.eval.evaluators.mfr2 = dict(type="pairs_file", pairs="/data/mfr2/pairs.txt", images="/data/mfr2")
    config.eval.evaluators.ar = dict(type="identification", gallery="/data/ar/gallery", probe="/data/ar/probe")

eval.py runs them in order (`runner.run`); train-time validation runs those marked `validation` on clean
pairs (`validation_metrics`). The interface every type implements is `base.Evaluator`; a new type is a class
in its own module and one line in `REGISTRY`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax.evaluation import base, fusion, pairs

# type -> "module:class". Classes are imported when a config names their type.
REGISTRY = {
    "bin_pairs": "oaml_jax.evaluation.pairs:BinPairsEvaluator",
    "pairs_file": "oaml_jax.evaluation.pairs_file:PairsFileEvaluator",
    "folder": "oaml_jax.evaluation.folder:FolderEvaluator",
    "ijb": "oaml_jax.evaluation.ijb:IJBEvaluator",
    "identification": "oaml_jax.evaluation.identification:IdentificationEvaluator",
    "tinyface": "oaml_jax.evaluation.identification_benchmarks:TinyFaceEvaluator",
    "ijb_1n": "oaml_jax.evaluation.identification_benchmarks:IJB1NEvaluator",
    "occlusion": "oaml_jax.evaluation.occlusion_sets:OcclusionSetEvaluator",
}


def evaluator_class(name: str, type_name: Any) -> type[base.Evaluator]:
    """The class of `REGISTRY[type_name]`; ValueError naming the entry for an unknown type."""
    if type_name not in REGISTRY:
        raise ValueError(f"eval.evaluators.{name}.type={type_name!r}: expected one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[type_name].split(":")
    return getattr(importlib.import_module(module), cls)


def _entries(eval_cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    entries = dict(eval_cfg["evaluators"])
    for name, entry in entries.items():
        if not isinstance(entry, (Mapping, ml_collections.ConfigDict)) or "type" not in entry:
            raise ValueError(f"eval.evaluators.{name}: expected a ConfigDict with a `type` of {sorted(REGISTRY)}")
    return entries


def common_settings(config: Mapping[str, Any], *, training: bool) -> base.Common:
    """The settings every evaluator shares, each checked here and only here.

    Raises:
        ValueError: bad fusion weights, an unknown occlusion variant or a gate outside [0, 1], naming the field.
    """
    eval_cfg = config["eval"]
    gate = eval_cfg["gate_threshold"]
    if not (isinstance(gate, (int, float)) and 0.0 <= gate <= 1.0):
        raise ValueError(f"eval.gate_threshold={gate}: expected a mean visibility in [0, 1]")
    variants = pairs.check_variants(eval_cfg["occlusion_variants"])
    return base.Common(fusion_weights=fusion.check_weights(eval_cfg["fusion_weights"]),
                       variants=("clean",) if training else variants, gate_threshold=float(gate),
                       training=training, data_path=str(config["data"]["path"]), eval_config=eval_cfg,
                       data_config=config["data"])


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.eval` before anything is loaded or compiled: the shared settings and every entry's type.

    Each type checks its own settings when it is built (`from_config`), next to where it uses them.

    Args:
        config: the whole run config (`config.eval` is checked).
        num_devices, process_count: unused here (the signature every section check of `run_spec.validate_config`
            shares).
    """
    common_settings(config, training=False)
    for name, entry in _entries(config["eval"]).items():
        evaluator_class(name, entry["type"])


def from_config(config: Mapping[str, Any], *, training: bool) -> list[base.Evaluator]:
    """The evaluators `config.eval.evaluators` declares, in order; building them loads (so checks) their data.

    Args:
        config: the whole config (`eval.*`, and `data.path` where `.bin` sets are looked for by default).
        training: train-time validation: only the entries with `validation`, clean pairs only.

    Returns:
        The evaluators with something to score (e.g. a `.bin` evaluator none of whose sets exists is left out,
        warned about when built).

    Raises:
        ValueError / FileNotFoundError: a bad setting, a malformed set, a missing folder (naming them).
    """
    common = common_settings(config, training=training)
    evaluators = []
    for name, entry in _entries(config["eval"]).items():
        if training and not entry.get("validation", False):
            continue
        evaluator = evaluator_class(name, entry["type"])(name, entry, common)
        if not evaluator.empty:
            evaluators.append(evaluator)
    return evaluators


def validation_metrics(evaluators: Sequence[base.Evaluator], model: Any) -> dict[str, float]:
    """Train-time validation: every scalar of every evaluator under "val/", and the checkpoint ranking metric
    `checkpoint.BEST_METRIC`, the mean of the evaluators' `best_metric`s (NaN when none has one)."""
    results, best = {}, []
    for evaluator in evaluators:
        scalars = {name: float(value) for name, value in evaluator.run(model)}
        results.update({f"val/{name}": value for name, value in scalars.items()})
        value = evaluator.best_metric(scalars)
        if value is not None:
            best.append(value)
    results[checkpoint_lib.BEST_METRIC] = float(np.mean(best)) if best else math.nan
    return results
