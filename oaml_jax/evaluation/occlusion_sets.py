"""The occlusion head on real occlusion: its maps against the drawn masks of occlusion sets.

    config.eval.evaluators.occlusion = dict(type="occlusion", validation=True)    # the default entry
    result = evaluator.evaluate(face_model)       # per set: MAE, IoU, and the all-visible predictor's
    evaluator.scalars(result)                     # {"niqab/mae": ..., "niqab/all_visible_mae": ..., ...}
    evaluator.tables(result)                      # the "occlusion set (%)" table section
    evaluator.write(result, out_dir)              # occlusion_sets.png: faces, predicted and true maps

For each set, the held-out part of a training set (`data.occlusion_holdout`, the same split training
leaves out) or the whole of a named validation set (`eval.occlusion_sets`). Metrics over all cells of all
its faces: the mean absolute error of the predicted visible fraction, and the IoU of the occluded cells
(map < `threshold`) of the prediction against those of the mask grid. The all-visible predictor (a map of
ones, what a head that learned nothing from occlusion predicts) is scored beside it: its MAE is the mean
occluded fraction and its IoU 0 (or 1 on a set without occluded cells).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.occlusion_sets import OcclusionSet, set_paths
from oaml_jax.evaluation import base
from oaml_jax.serving import FaceModel

GRID_FILE = "occlusion_sets.png"
_GRID_FACES = 8
_LISTING_GRID = 7
# Table column -> metric.
_COLUMNS = {"MAE": "mae", "IoU": "iou", "all-visible MAE": "all_visible_mae", "all-visible IoU": "all_visible_iou"}


@dataclasses.dataclass(frozen=True)
class SetResult:
    """One set's scores.

    Attributes:
        metrics: "mae", "iou", "all_visible_mae", "all_visible_iou", "faces".
        faces: uint8 `[n, 112, 112, 3]` the first faces (for the figure).
        predicted: float32 `[n, g, g]` their predicted maps.
        targets: float32 `[n, g, g]` their mask grids.
    """

    metrics: dict[str, float]
    faces: np.ndarray
    predicted: np.ndarray
    targets: np.ndarray


def occluded_iou(predicted: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """IoU of the occluded cells (value < threshold) of two stacks of maps, pooled over all maps; 1.0 when
    neither has an occluded cell."""
    p, t = predicted < threshold, targets < threshold
    union = np.sum(p | t)
    return float(np.sum(p & t) / union) if union else 1.0


def score(predicted: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """MAE and occluded-cell IoU of `predicted` `[N, g, g]` against `targets`, and the all-visible
    predictor's."""
    ones = np.ones_like(targets)
    return {"mae": float(np.mean(np.abs(predicted - targets))), "iou": occluded_iou(predicted, targets, threshold),
            "all_visible_mae": float(np.mean(np.abs(ones - targets))),
            "all_visible_iou": occluded_iou(ones, targets, threshold), "faces": float(targets.shape[0])}


class OcclusionSetEvaluator(base.Evaluator):
    """Type "occlusion": scores a model's occlusion maps on occlusion sets (see the module docstring).

    Settings: `threshold` (a cell is occluded below this visible fraction, for the IoU; default 0.5). The
    sets come from `eval.occlusion_sets` (scored whole) or else the held-out part of `data.occlusion_sets`
    (`common.data_config`); with neither (or `data.occlusion_holdout` = 0) the evaluator is `empty`. Targets
    are taken at the evaluated model's grid (`model.contract.grid`).
    """

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        """Opens the sets (so a missing or empty one is refused before any training step).

        Raises:
            FileNotFoundError: a set that does not exist (naming its field).
            ValueError: a set without pairs, or without held-out pairs; a threshold outside (0, 1].
        """
        super().__init__(name, settings, common)
        threshold = settings.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"eval.evaluators.{name}.threshold={threshold!r}: expected a visible fraction "
                             "in (0, 1]")
        self.threshold = float(threshold)
        self.sets: dict[str, tuple[OcclusionSet, np.ndarray]] = {}
        data = common.data_config
        named = set_paths(common.eval_config.get("occlusion_sets", ()))
        if named:
            self._open(named, held_out=False, holdout=0.0, aligned=data["occlusion_aligned"],
                       field="eval.occlusion_sets")
        elif set_paths(data.get("occlusion_sets", ())) and data["occlusion_holdout"] > 0:
            self._open(set_paths(data["occlusion_sets"]), held_out=True, holdout=data["occlusion_holdout"],
                       aligned=data["occlusion_aligned"], field="data.occlusion_sets")

    def _open(self, paths: Sequence[str], *, held_out: bool, holdout: float, aligned: bool, field: str) -> None:
        for i, path in enumerate(paths):
            # Listed at the default grid; `evaluate` takes the targets at the model's.
            opened = OcclusionSet(path, _LISTING_GRID, aligned=aligned, field=f"{field}[{i}]")
            indices = opened.split(holdout)[1] if held_out else np.arange(len(opened))
            if not len(indices):
                pairs = f"{len(opened)} pair{'s' * (len(opened) != 1)}"
                raise ValueError(f"{field}[{i}]={path}: no held-out pair to validate the occlusion head on with "
                                 f"data.occlusion_holdout={holdout} (a set of {pairs}; add faces, or set "
                                 "data.occlusion_holdout=0 to validate on none, or name a validation set in "
                                 "eval.occlusion_sets)")
            set_name = epath.Path(path).name or f"set{i}"
            self.sets[set_name if set_name not in self.sets else f"{set_name}_{i}"] = (opened, indices)

    @property
    def empty(self) -> bool:
        return not self.sets

    def evaluate(self, model: FaceModel) -> dict[str, SetResult]:
        """Per set name: its `SetResult`; {} for a model without an occlusion head (a converted AdaFace
        checkpoint), logged."""
        if not model.has_qaconv:
            logging.info("%s: the model has no occlusion head (a converted AdaFace checkpoint?); %d occlusion "
                         "sets not scored", self.name, len(self.sets))
            return {}
        grid = model.contract.grid
        results = {}
        for set_name, (opened, indices) in self.sets.items():
            if opened.grid != grid:
                opened = copy.copy(opened)
                opened.grid = grid
            items = [opened[int(i)] for i in indices]
            faces = np.stack([face for face, _ in items])
            targets = np.stack([target for _, target in items])
            predicted = np.asarray(model.occlusion_maps(faces), np.float32)
            results[set_name] = SetResult(score(predicted, targets, self.threshold), faces[:_GRID_FACES],
                                          predicted[:_GRID_FACES], targets[:_GRID_FACES])
        return results

    def scalars(self, result: Mapping[str, SetResult]) -> dict[str, float]:
        """"<set>/<metric>" for "mae", "iou", "all_visible_mae", "all_visible_iou" and "faces"."""
        return {f"{set_name}/{metric}": value for set_name, r in result.items() for metric, value in r.metrics.items()}

    def tables(self, result: Mapping[str, SetResult]) -> list[base.Table]:
        """Per set ("<set> (<n> faces)"), the head's MAE and IoU beside the all-visible predictor's, in %."""
        rows = {f"{set_name} ({int(r.metrics['faces'])} faces)": {column: 100 * r.metrics[metric]
                                                                   for column, metric in _COLUMNS.items()}
                for set_name, r in result.items()}
        return [base.Table("occlusion set (%)", tuple(_COLUMNS), rows)] if rows else []

    def write(self, result: Mapping[str, SetResult], out_dir: epath.Path) -> dict[str, epath.Path]:
        """Writes `occlusion_sets.png` in `out_dir`: per set a row of faces with their predicted maps and a
        row of the same faces with their mask grids. Returns {"occlusion_sets": path} ({} without results)."""
        from oaml_jax.evaluation import plots  # matplotlib: only where figures are written

        if not result:
            return {}
        faces, maps, titles = [], [], []
        columns = max(r.faces.shape[0] for r in result.values())
        for set_name, r in result.items():
            n = r.faces.shape[0]
            for row, label in ((r.predicted, "predicted"), (r.targets, "mask")):
                faces.append(np.concatenate([r.faces, np.zeros((columns - n,) + r.faces.shape[1:], np.uint8)]))
                maps.append(np.concatenate([row, np.ones((columns - n,) + row.shape[1:], np.float32)]))
                titles += [f"{set_name} {label}"] * n + [""] * (columns - n)
        fig = plots.occlusion_grid_figure(np.concatenate(faces), np.concatenate(maps), titles, columns=columns)
        path = epath.Path(out_dir) / GRID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path.write_bytes(buffer.getvalue())
        return {"occlusion_sets": path}
