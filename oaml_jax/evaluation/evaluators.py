"""`config.eval` -> evaluators, and the one check of that section.

Evaluators are small objects with `evaluate(model)` (rich results for tables and plots) and `run(model)`
yielding `(name, value)` pairs (big_vision's `evaluators/`): train-time validation and eval.py build them
here from the same fields, so both score the same pairs the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from oaml_jax.evaluation import fusion, ijb, pairs
from oaml_jax.paths import user_path

Evaluator = Union[pairs.PairSetEvaluator, ijb.IJBEvaluator]


def check_config(eval_cfg: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.eval` before anything is loaded or compiled; raises ValueError naming the field."""
    batch = eval_cfg["batch_size"]
    if batch <= 0 or batch % (2 * num_devices) or batch % process_count:
        raise ValueError(f"eval.batch_size={batch} must be a positive multiple of 2 x the {num_devices} devices "
                         f"(pairs are scored within a batch) and of the {process_count} processes")
    names = tuple(eval_cfg["bin_names"])
    if not all(isinstance(n, str) and n and "/" not in n for n in names):
        raise ValueError(f"eval.bin_names={names}: expected set names such as 'lfw' (files <name>.bin)")
    fusion.check_weights(eval_cfg["fusion_weights"])
    pairs.check_variants(eval_cfg["occlusion_variants"])
    unknown = [n for n in eval_cfg["ijb_names"] if n.lower() not in ijb.IJB_NAMES]
    if unknown:
        raise ValueError(f"eval.ijb_names: unknown {unknown}; expected names from {ijb.IJB_NAMES}")
    if eval_cfg["ijb_batch_size"] < 0:
        raise ValueError(f"eval.ijb_batch_size={eval_cfg['ijb_batch_size']}: expected >= 0 (0 = eval.batch_size)")
    if eval_cfg["ijb_qaconv_chunk"] < 1:
        raise ValueError(f"eval.ijb_qaconv_chunk={eval_cfg['ijb_qaconv_chunk']}: expected >= 1")


def pair_sets_folder(config: Mapping[str, Any]) -> tuple[str, str]:
    """(field, folder) of the `.bin` sets: `eval.data_dir`, or `data.path` when that is empty."""
    if config["eval"]["data_dir"]:
        return "eval.data_dir", config["eval"]["data_dir"]
    return "data.path", config["data"]["path"]


def from_config(config: Mapping[str, Any], *, training: bool) -> dict[str, Evaluator]:
    """The evaluators `config` asks for; loading their data checks it (before any training step).

    Args:
        config: the whole config (fields `eval.*`, and `data.path` where `eval.data_dir` is empty).
        training: train-time validation: clean pairs only, no IJB.

    Returns:
        {"pairs": PairSetEvaluator} when a `.bin` set is found, plus {"ijb": IJBEvaluator} when
        `eval.ijb_root` is set (not in training).

    Raises:
        ValueError / FileNotFoundError: a malformed set or IJB meta file, or a set too small for the protocol.
    """
    eval_cfg = config["eval"]
    weights = fusion.check_weights(eval_cfg["fusion_weights"])
    field, folder = pair_sets_folder(config)
    sets = pairs.load_pair_sets(user_path(folder, field), eval_cfg["bin_names"], field)
    evaluators: dict[str, Evaluator] = {}
    if sets:
        variants = ("clean",) if training else eval_cfg["occlusion_variants"]
        evaluators["pairs"] = pairs.PairSetEvaluator(sets, variants, weights)
    if eval_cfg["ijb_root"] and not training:
        evaluators["ijb"] = ijb.IJBEvaluator(
            user_path(eval_cfg["ijb_root"], "eval.ijb_root"), tuple(n.lower() for n in eval_cfg["ijb_names"]),
            qaconv=eval_cfg["ijb_qaconv"], batch_size=eval_cfg["ijb_batch_size"],
            qaconv_chunk=eval_cfg["ijb_qaconv_chunk"], fusion_weights=weights)
    return evaluators
