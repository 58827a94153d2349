"""The occlusion head on real occlusion: its maps against the drawn masks of occlusion sets.

    evaluator = OcclusionSetEvaluator(sets=("data/niqab",), grid=7, holdout=0.1)
    result = evaluator.evaluate(face_model)       # per set: MAE, IoU, and the all-visible predictor's
    dict(evaluator.run(face_model))               # {"occlusion/niqab/mae": ..., ...}
    evaluator.report(result, out_dir)             # occlusion_sets.png: faces, predicted and true maps

For each set, the held-out part of a training set (`data.occlusion_holdout`, the same split training
leaves out) or the whole of a named validation set (`eval.occlusion_sets`). Metrics over all cells of all
its faces: the mean absolute error of the predicted visible fraction, and the IoU of the occluded cells
(map < `threshold`) of the prediction against those of the mask grid. The all-visible predictor (a map of
ones, what a head that learned nothing from occlusion predicts) is scored beside it: its MAE is the mean
occluded fraction and its IoU 0 (or 1 on a set without occluded cells).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from etils import epath

from data_pipelines.occlusion_sets import OcclusionSet, set_paths
from oaml_jax.evaluation import plots
from oaml_jax.serving import FaceModel

GRID_FILE = "occlusion_sets.png"
_GRID_FACES = 8


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


class OcclusionSetEvaluator:
    """Scores a model's occlusion maps on occlusion sets (see the module docstring)."""

    def __init__(self, sets: Sequence[str] | str, *, grid: int, holdout: float = 0.1, held_out: bool = True,
                 aligned: bool = True, threshold: float = 0.5, field: str = "data.occlusion_sets"):
        """Opens the sets (so a missing or empty one is refused before any training step).

        Args:
            sets: set folders or `.array_record` files (one path or several).
            grid: the model's feature-map side.
            holdout: the held-out share (`data.occlusion_holdout`), with `held_out`.
            held_out: score the held-out part of each set; False scores every pair (validation sets).
            aligned: `data.occlusion_aligned`.
            threshold: a cell is occluded below this visible fraction (for the IoU).
            field: the config field named in errors.

        Raises:
            ValueError: a set without pairs, or without held-out pairs.
        """
        self.threshold = float(threshold)
        self.sets: dict[str, tuple[OcclusionSet, np.ndarray]] = {}
        for i, path in enumerate(set_paths(sets)):
            opened = OcclusionSet(path, grid, aligned=aligned, field=f"{field}[{i}]")
            indices = opened.split(holdout)[1] if held_out else np.arange(len(opened))
            if not len(indices):
                raise ValueError(f"{field}[{i}]={path}: no held-out pair to validate the occlusion head on with "
                                 f"data.occlusion_holdout={holdout}")
            name = os.path.basename(os.fspath(path).rstrip("/")) or f"set{i}"
            self.sets[name if name not in self.sets else f"{name}_{i}"] = (opened, indices)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], grid: int) -> Optional[OcclusionSetEvaluator]:
        """`eval.occlusion_sets` (scored whole) if given, else the held-out part of `data.occlusion_sets`;
        None when there are neither."""
        data = config["data"]
        named = set_paths(config["eval"].get("occlusion_sets", ()))
        if named:
            return cls(named, grid=grid, held_out=False, aligned=data["occlusion_aligned"],
                       field="eval.occlusion_sets")
        if not set_paths(data.get("occlusion_sets", ())) or data["occlusion_holdout"] <= 0:
            return None
        return cls(data["occlusion_sets"], grid=grid, holdout=data["occlusion_holdout"],
                   aligned=data["occlusion_aligned"])

    def evaluate(self, model: FaceModel) -> dict[str, SetResult]:
        """Per set name: its `SetResult`."""
        results = {}
        for name, (opened, indices) in self.sets.items():
            items = [opened[int(i)] for i in indices]
            faces = np.stack([face for face, _ in items])
            targets = np.stack([target for _, target in items])
            predicted = np.asarray(model.occlusion_maps(faces), np.float32)
            results[name] = SetResult(score(predicted, targets, self.threshold), faces[:_GRID_FACES],
                                      predicted[:_GRID_FACES], targets[:_GRID_FACES])
        return results

    def run(self, model: FaceModel) -> Iterator[tuple[str, float]]:
        """`(f"occlusion/{set}/{metric}", value)` scalars of `evaluate`."""
        for name, result in self.evaluate(model).items():
            for metric, value in result.metrics.items():
                yield f"occlusion/{name}/{metric}", value

    @staticmethod
    def table(results: Mapping[str, SetResult]) -> str:
        """A text table: per set, the head's MAE and IoU beside the all-visible predictor's."""
        lines = [f"{'occlusion set':<20}{'faces':>7}{'MAE':>8}{'IoU':>8}{'all-visible MAE':>17}"
                 f"{'all-visible IoU':>17}"]
        for name, r in results.items():
            m = r.metrics
            lines.append(f"{name:<20}{int(m['faces']):>7}{m['mae']:>8.3f}{m['iou']:>8.3f}"
                         f"{m['all_visible_mae']:>17.3f}{m['all_visible_iou']:>17.3f}")
        return "\n".join(lines)

    def report(self, results: Mapping[str, SetResult], out_dir: epath.PathLike) -> dict[str, epath.Path]:
        """Writes `occlusion_sets.png` in `out_dir`: per set a row of faces with their predicted maps and a
        row of the same faces with their mask grids. Returns {"occlusion_sets": path}."""
        faces, maps, titles = [], [], []
        columns = max(r.faces.shape[0] for r in results.values())
        for name, r in results.items():
            n = r.faces.shape[0]
            for row, label in ((r.predicted, "predicted"), (r.targets, "mask")):
                faces.append(np.concatenate([r.faces, np.zeros((columns - n,) + r.faces.shape[1:], np.uint8)]))
                maps.append(np.concatenate([row, np.ones((columns - n,) + row.shape[1:], np.float32)]))
                titles += [f"{name} {label}"] * n + [""] * (columns - n)
        fig = plots.occlusion_grid_figure(np.concatenate(faces), np.concatenate(maps), titles, columns=columns)
        path = epath.Path(out_dir) / GRID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path.write_bytes(buffer.getvalue())
        return {"occlusion_sets": path}
