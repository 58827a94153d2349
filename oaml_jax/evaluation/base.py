"""The evaluator interface: what eval.py and train-time validation call on every evaluator of `config.eval`.

An evaluator is built from its own entry of `config.eval.evaluators` (a `type` and its settings) and the
settings every evaluator shares (`Common`); `evaluators.from_config` builds them by type. Then:

    result = evaluator.evaluate(model)         # the heavy part: features, scores, metrics (any FaceModel)
    evaluator.scalars(result)                  # {"<name>/<...>": value}: TensorBoard, validation, JSON
    evaluator.tables(result)                   # table sections, printed (one table per column layout)
    evaluator.summary(result)                  # JSON sections merged into results.json
    evaluator.write(result, out_dir)           # plots and other files (process 0, after the table is printed)
    evaluator.calibration_pairs(result)        # clean scored pairs that calibration.json is fitted on
    evaluator.run(model)                       # yields (name, value): evaluate + scalars (big_vision's `run`)

Only `evaluate` and `scalars` are required; the others default to nothing. A new protocol is a class of this
shape in its own module and one line in `evaluators.REGISTRY`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import numpy as np
from etils import epath


@dataclasses.dataclass(frozen=True)
class Common:
    """Settings shared by every evaluator, checked once (`evaluators.from_config`).

    Attributes:
        fusion_weights: weights of the fused score, {"adaface": w, "qaconv": w}.
        variants: occlusion variants eval.py scores ("clean" first in training, where only it is scored).
        gate_threshold: the visibility-gated score's threshold where a protocol has no training folds.
        training: built for train-time validation (clean pairs only, nothing written).
        data_path: `data.path` (where `.bin` sets are looked for when `eval.data_dir` is empty).
        eval_config: the whole `config.eval` section (the defaults a type's settings fall back on).
        data_config: the whole `config.data` section (e.g. the occlusion sets whose held-out part is scored).
    """

    fusion_weights: Mapping[str, float]
    variants: tuple[str, ...]
    gate_threshold: float
    training: bool
    data_path: str = ""
    eval_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Table:
    """A section of the printed table: rows (label -> column -> value) under `columns`.

    Sections with the same `corner` and `columns` (e.g. `.bin` sets and pairs files) are printed as one table.
    """

    corner: str
    columns: tuple[str, ...]
    rows: Mapping[str, Mapping[str, float]]
    notes: tuple[str, ...] = ()


def setting_field(name: str, settings: Mapping[str, Any], key: str) -> str:
    """What messages call setting `key` of entry `name`: `eval.evaluators.<name>.<key>`, or the name the entry's
    `fields` setting gives it (eval.py's shorthand flags name themselves: `fields={"path": "--folder"}`)."""
    return (settings.get("fields") or {}).get(key, f"eval.evaluators.{name}.{key}")


class Evaluator:
    """Base of every evaluator type; subclasses set `evaluate` and `scalars`.

    Attributes:
        name: the entry's name in `config.eval.evaluators` (prefix of its scalars).
        settings: the entry (a mapping with at least `type`).
        common: the shared settings.
        validation: run by train-time validation too (the entry's `validation`, default False).
    """

    def __init__(self, name: str, settings: Mapping[str, Any], common: Common):
        self.name = name
        self.settings = settings
        self.common = common
        self.validation = bool(settings.get("validation", False))

    @property
    def empty(self) -> bool:
        """Nothing to score (e.g. none of the named sets exists; warned when built): left out of the run."""
        return False

    def evaluate(self, model: Any) -> Any:
        """Scores the protocol with `model` (a `FaceModel`); the result is what the other methods take."""
        raise NotImplementedError

    def scalars(self, result: Any) -> dict[str, float]:
        """Scalars of `result`, named "<what>/<metric>" (no evaluator-name prefix: the caller adds it)."""
        raise NotImplementedError

    def run(self, model: Any) -> Iterator[tuple[str, float]]:
        """Yields (name, value) of `scalars(evaluate(model))`."""
        yield from self.scalars(self.evaluate(model)).items()

    def best_metric(self, scalars: Mapping[str, float]) -> Optional[float]:
        """The value train-time validation ranks checkpoints by (higher is better), or None."""
        del scalars
        return None

    def tables(self, result: Any) -> list[Table]:
        del result
        return []

    def summary(self, result: Any) -> dict[str, Any]:
        """JSON-ready sections of results.json (merged key by key over the evaluators)."""
        return {"scalars": {self.name: self.scalars(result)}}

    def write(self, result: Any, out_dir: epath.Path) -> dict[str, epath.Path]:
        """Writes plots and files under `out_dir`; returns name -> path."""
        del result, out_dir
        return {}

    def calibration_pairs(self, result: Any) -> list[tuple[str, dict[str, np.ndarray], np.ndarray]]:
        """(set name, score name -> `[N]` scores, `[N]` bool issame) of the clean pairs to calibrate on."""
        del result
        return []
