"""Decision thresholds at fixed false accept rates, and the one file that carries them to inference.

eval.py fits a `Calibration` on all clean pairs of all its `.bin` sets and writes it to
`<workdir>/eval/calibration.json`; `CalibratedFaceModel.from_workdir` reads it back for the same checkpoint step, so
`python -m oaml_jax.inference verify` can say "same" or "different" at a chosen FAR:

    cal = fit({"adaface": s_ada, "qaconv": s_qa}, issame, step=1000, fitted_on=["lfw", "cfp_fp"],
              fusion_weights={"adaface": 0.5, "qaconv": 0.5})
    cal.threshold("fused", 1e-3)      # same person when the fused score is > this

For every score (adaface, qaconv, and fused when both are there) and every FAR in `FARS`, the threshold
is `verification.far_threshold` of the impostor scores: the lowest t with
`#(impostor scores > t) / #impostors <= FAR`, the decision being "same" when `score > t`. The fused score
is z-normalized with statistics fitted on those same pairs (`fusion.FusionStats.fit`), which the file
also holds, with the fusion weights: a fused score computed with other statistics or weights is not the
score the thresholds were fitted on.

With n impostor pairs a threshold is only measured down to FAR 1/n: below that (1e-4 needs 10,000
impostor pairs) it is the highest impostor score and its true FAR is unknown; `resolved(far)` tells.

File (JSON): {"step", "checkpoint", "fitted_on": [set names], "num_pairs", "num_impostors",
"fusion_weights": {name: w} | null, "fusion_stats": {"mean": {...}, "std": {...}} | null,
"thresholds": {score: {"0.01": t, "0.001": t, "0.0001": t}}}.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from absl import logging
from etils import epath

from oaml_jax.evaluation import fusion, verification

CALIBRATION_FILE = "calibration.json"
# (file, its step, the step asked for) of the stale calibrations warned about in this process.
_STALE_WARNED: set[tuple[str, Optional[int], Optional[int]]] = set()
FARS = (1e-2, 1e-3, 1e-4)
# How the FAR keys are written in the file ("0.001"): repr of the float, read back with float().
_FAR_KEY = repr


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Thresholds of each score at each FAR, and what they were fitted on.

    Attributes:
        step: the checkpoint step whose scores were calibrated.
        checkpoint: the checkpoint folder (reported only).
        fitted_on: names of the pair sets whose clean pairs were used.
        num_pairs: number of pairs used.
        num_impostors: number of impostor (different-identity) pairs among them.
        thresholds: score name -> {far -> threshold}; "same" when `score > threshold`.
        fusion_stats: z-normalization statistics of the fused score (None without QAConv).
        fusion_weights: weights of the fused score (None without QAConv).
    """

    step: int
    checkpoint: str
    fitted_on: tuple[str, ...]
    num_pairs: int
    num_impostors: int
    thresholds: Mapping[str, Mapping[float, float]]
    fusion_stats: Optional[fusion.FusionStats] = None
    fusion_weights: Optional[Mapping[str, float]] = None

    def far_key(self, far: float) -> float:
        """The calibrated FAR equal to `far` (up to float rounding).

        Raises:
            ValueError: `far` is not one of the calibrated rates (naming them).
        """
        fars = sorted({f for values in self.thresholds.values() for f in values}, reverse=True)
        for known in fars:
            if math.isclose(far, known, rel_tol=1e-6):
                return known
        raise ValueError(f"far={far:g}: no threshold at that FAR; calibrated at {', '.join(f'{f:g}' for f in fars)}")

    def threshold(self, score: str, far: float) -> float:
        """The threshold of `score` at `far`.

        Raises:
            KeyError: `score` was not calibrated.
            ValueError: `far` was not calibrated.
        """
        if score not in self.thresholds:
            raise KeyError(f"score {score!r} has no thresholds; calibrated: {sorted(self.thresholds)}")
        return self.thresholds[score][self.far_key(far)]

    def resolved(self, far: float) -> bool:
        """Whether `far` is measurable on `num_impostors` impostor pairs (`far * num_impostors >= 1`)."""
        return far * self.num_impostors >= 1.0 - 1e-9

    def without_fused(self) -> Calibration:
        """This calibration without the fused thresholds (for a fused score computed another way)."""
        return dataclasses.replace(self, thresholds={k: v for k, v in self.thresholds.items() if k != "fused"})

    def to_json(self) -> dict:
        stats = self.fusion_stats
        return {"step": self.step, "checkpoint": self.checkpoint, "fitted_on": list(self.fitted_on),
                "num_pairs": self.num_pairs, "num_impostors": self.num_impostors,
                "fusion_weights": dict(self.fusion_weights) if self.fusion_weights is not None else None,
                "fusion_stats": ({"mean": dict(stats.mean), "std": dict(stats.std)} if stats is not None else None),
                "thresholds": {name: {_FAR_KEY(far): t for far, t in values.items()}
                               for name, values in self.thresholds.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> Calibration:
        """Inverse of `to_json` (KeyError / TypeError / ValueError on anything else)."""
        stats = data["fusion_stats"]
        weights = data["fusion_weights"]
        return cls(step=int(data["step"]), checkpoint=str(data["checkpoint"]),
                   fitted_on=tuple(str(n) for n in data["fitted_on"]), num_pairs=int(data["num_pairs"]),
                   num_impostors=int(data["num_impostors"]),
                   thresholds={str(name): {float(far): float(t) for far, t in values.items()}
                               for name, values in data["thresholds"].items()},
                   fusion_stats=(fusion.FusionStats(mean={k: float(v) for k, v in stats["mean"].items()},
                                                    std={k: float(v) for k, v in stats["std"].items()})
                                 if stats is not None else None),
                   fusion_weights={k: float(v) for k, v in weights.items()} if weights is not None else None)


def fit(scores: Mapping[str, np.ndarray], issame: np.ndarray, *, step: int, checkpoint: str,
        fitted_on: Sequence[str], fusion_weights: Optional[Mapping[str, float]] = None,
        fars: Sequence[float] = FARS) -> Calibration:
    """Thresholds at each FAR of each score, and of their fusion when every weighted score is there.

    Args:
        scores: name -> `[N]` scores of the same pairs ("adaface", optionally "qaconv").
        issame: `[N]` bool ground truth (both classes present).
        step: checkpoint step of the scores.
        checkpoint: checkpoint folder (reported only).
        fitted_on: names of the pair sets the pairs come from.
        fusion_weights: name -> weight of the fused score; None (or a score missing) = no fused score.
        fars: false accept rates in (0, 1).

    Returns:
        The `Calibration`; the fused score's statistics are fitted on these pairs.

    Raises:
        ValueError: no scores, mismatched lengths, a FAR outside (0, 1), no genuine or no impostor pair,
            or a constant score (its statistics cannot be fitted).
    """
    if not scores:
        raise ValueError("scores: expected at least one score")
    arrays = {name: verification.as_scores(values, f"scores '{name}'") for name, values in scores.items()}
    n = next(iter(arrays.values())).size
    for name, values in arrays.items():
        if values.size != n:
            raise ValueError(f"scores '{name}': {values.size} scores, the others have {n}")
    issame = verification.as_labels(issame, n)
    if issame.all() or not issame.any():
        raise ValueError(f"issame: calibration needs genuine and impostor pairs; got {int(issame.sum())} genuine "
                         f"of {n}")
    for far in fars:
        if not 0.0 < far < 1.0:
            raise ValueError(f"fars: expected rates in (0, 1), got {far}")
    stats, weights = None, None
    if fusion_weights and all(name in arrays for name in fusion_weights):
        weights = dict(fusion_weights)
        stats = fusion.FusionStats.fit({name: arrays[name] for name in weights})
        arrays["fused"] = fusion.fuse(arrays, weights, stats)
    impostors = int((~issame).sum())
    thresholds = {name: {float(far): verification.far_threshold(values[~issame], far) for far in fars}
                  for name, values in arrays.items()}
    unresolved = [f"{far:g}" for far in fars if far * impostors < 1.0 - 1e-9]
    if unresolved:
        logging.warning("calibration: %d impostor pairs measure FAR down to %.1e only; the thresholds at FAR %s "
                        "are the highest impostor score", impostors, 1.0 / impostors, ", ".join(unresolved))
    return Calibration(step=int(step), checkpoint=str(checkpoint), fitted_on=tuple(fitted_on), num_pairs=n,
                       num_impostors=impostors, thresholds=thresholds, fusion_stats=stats, fusion_weights=weights)


def save(calibration: Calibration, path: epath.PathLike) -> epath.Path:
    """Writes `calibration` as JSON at `path` (creating its folder) and returns the path."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration.to_json(), indent=2))
    return path


def load(path: epath.PathLike, step: Optional[int]) -> Optional[Calibration]:
    """The calibration in `path` when it belongs to checkpoint `step`; None when absent or stale (warned).

    Raises:
        ValueError: the file is not what `save` writes (naming the file).
    """
    path = epath.Path(path)
    if not path.exists():
        return None
    try:
        calibration = Calibration.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a calibration file ({type(e).__name__}: {e})") from e
    if calibration.step != step:
        if (str(path), calibration.step, step) not in _STALE_WARNED:  # a command may look twice (verify)
            _STALE_WARNED.add((str(path), calibration.step, step))
            logging.warning("%s was fitted for step %s, not %s: ignored (run eval.py on step %s to calibrate it)",
                            path, calibration.step, step, step)
        return None
    return calibration
