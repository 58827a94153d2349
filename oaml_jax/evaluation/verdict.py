"""Verdicts: the fused score, the calibration eval.py writes, and "same" or "different" at a chosen FAR.

`CalibratedFaceModel` is the serving `FaceModel` with what evaluation adds on top of its scores:

    model = CalibratedFaceModel.from_workdir("/tmp/run")  # latest checkpoint + <workdir>/eval/calibration.json
    scores = model.match(probe_images, gallery_images)    # {"adaface", "qaconv", "fused"} [p, g]
    verdict = verify_faces(model, face_a, face_b, far=1e-3)

- "fused": `sum_k w_k (s_k - mean_k) / std_k` over ("adaface", "qaconv"). The z-normalization statistics
  are, in this order: the `stats` argument of `match`; those of the calibration eval.py fitted on the
  clean validation pairs of the same checkpoint (`<workdir>/eval/calibration.json`, loaded by
  `from_workdir`); otherwise they are fitted on the probe x gallery score matrix itself (needs at least
  two distinct scores of each kind; a single pair gets no fused score). Without QAConv it is None.

A pair is the same person under a score when the score is above that score's threshold at the chosen
false accept rate, from the calibration (`oaml_jax.evaluation.calibration`); the overall verdict is the
fused score's when it has a threshold, else AdaFace's. Without a calibration there are scores only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from absl import logging
from etils import epath

from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax.evaluation import calibration as calibration_lib
from oaml_jax.evaluation import fusion
from oaml_jax.paths import user_path
from oaml_jax.serving import FaceModel

# eval.py's output folder inside a workdir (results, plots, calibration.json).
EVAL_SUBDIR = "eval"
DEFAULT_FAR = 1e-3


def calibration_path(workdir: epath.PathLike) -> epath.Path:
    """`<workdir>/eval/calibration.json`: where eval.py writes the calibration of a workdir's checkpoints."""
    return user_path(workdir, "workdir") / EVAL_SUBDIR / calibration_lib.CALIBRATION_FILE


class CalibratedFaceModel(FaceModel):
    """A `FaceModel` with the fused score's weights and statistics and the checkpoint's calibration."""

    def __init__(self, *args: Any, fusion_stats: Optional[fusion.FusionStats] = None,
                 fusion_weights: Mapping[str, float] = fusion.DEFAULT_WEIGHTS,
                 calibration: Optional[calibration_lib.Calibration] = None, **kwargs: Any):
        """Wraps a model and its variables (`args`, `kwargs`: see `FaceModel.__init__`).

        Args:
            *args: `FaceModel`'s positional arguments.
            fusion_stats: default z-normalization statistics of `match`'s fused score.
            fusion_weights: weights of the fused score.
            calibration: decision thresholds of this checkpoint's scores (see `verify_faces`).
            **kwargs: `FaceModel`'s keyword arguments.
        """
        super().__init__(*args, **kwargs)
        self.fusion_stats = fusion_stats
        self.fusion_weights = dict(fusion_weights)
        self.calibration = calibration

    @classmethod
    def from_workdir(cls, workdir: epath.PathLike, step: Optional[int] = None,
                     **kwargs: Any) -> CalibratedFaceModel:
        """`from_checkpoint(workdir, step)` with the calibration eval.py wrote for the same step.

        The calibration (`calibration_path(workdir)`; absent or fitted for another step: none, the
        latter warned about; a `calibration` argument: that one) gives the decision thresholds, and the
        fused score's statistics and weights unless `fusion_stats` / `fusion_weights` are passed: then the
        fused thresholds, fitted on another fused score, are dropped (warned).
        """
        model = cls.from_checkpoint(workdir, step, **kwargs)
        if model.calibration is not None:
            return model
        calibration = calibration_lib.load(calibration_path(workdir), model.step)
        if calibration is None:
            return model
        if calibration.fusion_stats is not None:
            if "fusion_weights" not in kwargs:
                model.fusion_weights = dict(calibration.fusion_weights)
            if model.fusion_stats is None:
                model.fusion_stats = calibration.fusion_stats
            if (model.fusion_weights != calibration.fusion_weights
                    or model.fusion_stats != calibration.fusion_stats):
                logging.warning("the fused score uses weights %s and statistics %s, the calibration was fitted with "
                                "%s and %s: no fused threshold", model.fusion_weights, model.fusion_stats,
                                calibration.fusion_weights, calibration.fusion_stats)
                calibration = calibration.without_fused()
        model.calibration = calibration
        return model

    def match(self, probe_images: np.ndarray, gallery_images: np.ndarray,
              stats: Optional[fusion.FusionStats] = None) -> dict[str, Optional[np.ndarray]]:
        """All-pairs scores between two sets of faces, the fused one included.

        Args:
            probe_images: uint8 `[p, 112, 112, 3]` RGB.
            gallery_images: uint8 `[g, 112, 112, 3]` RGB.
            stats: z-normalization statistics of the fused score (see the module docstring for the
                fallbacks when None).

        Returns:
            {"adaface": `[p, g]`, "qaconv": `[p, g]` or None, "fused": `[p, g]` or None} float64.
        """
        scores = super().match(probe_images, gallery_images)
        if scores["qaconv"] is None:
            return dict(scores, fused=None)
        stats = stats or self.fusion_stats
        if stats is None:
            if min(np.unique(s).size for s in scores.values()) < 2:
                logging.warning("no fusion statistics and too few scores to fit them: no fused score")
                return dict(scores, fused=None)
            stats = fusion.FusionStats.fit({k: v.reshape(-1) for k, v in scores.items()})
        fused = fusion.fuse({k: v.reshape(-1) for k, v in scores.items()}, self.fusion_weights, stats)
        return dict(scores, fused=fused.reshape(scores["adaface"].shape))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Scores of one pair of faces and, with a calibration, the decisions at one false accept rate.

    Attributes:
        scores: "adaface", "qaconv", "fused" -> score (None where the model or the statistics cannot give it).
        far: the false accept rate of the thresholds.
        thresholds: score name -> threshold at `far`, for the scores that have one (none without calibration).
        calibration: where the thresholds come from, None without calibration.
    """

    scores: Mapping[str, Optional[float]]
    far: float
    thresholds: Mapping[str, float]
    calibration: Optional[calibration_lib.Calibration]

    def same(self, name: str) -> bool:
        """Score `name`'s decision: above its threshold (see `calibration.fit`)."""
        return self.scores[name] > self.thresholds[name]

    @property
    def decided_by(self) -> Optional[str]:
        """The score of the overall verdict: "fused" when it has a threshold, else "adaface", else None."""
        return next((name for name in ("fused", "adaface") if name in self.thresholds), None)

    @property
    def is_same(self) -> Optional[bool]:
        """The overall verdict (None without calibration)."""
        return None if self.decided_by is None else self.same(self.decided_by)

    def lines(self) -> list[str]:
        """One line per score: value, and with a threshold the comparison and its decision."""
        lines = []
        for name, value in self.scores.items():
            if value is None:
                lines.append(f"{name:<8} {'-':>8}")
            elif name in self.thresholds:
                same = self.same(name)
                lines.append(f"{name:<8} {value:8.4f} {'>' if same else '<='} {self.thresholds[name]:.4f}: "
                             f"{'same' if same else 'different'}")
            else:
                lines.append(f"{name:<8} {value:8.4f}")
        return lines

    def headline(self) -> str:
        """The overall verdict in words, e.g. "same person (fused score at FAR 0.001)"."""
        if self.decided_by is None:
            return "no verdict: no calibration, scores only"
        return (f"{'same person' if self.is_same else 'different people'} "
                f"({self.decided_by} score at FAR {self.far:g})")


def verify_faces(model: CalibratedFaceModel, face_a: np.ndarray, face_b: np.ndarray,
                 far: float = DEFAULT_FAR) -> Verdict:
    """Scores two aligned faces and decides at `far` with the model's calibration.

    Args:
        model: the model, with `calibration` for decisions (`from_workdir` loads it).
        face_a, face_b: uint8 `[112, 112, 3]` RGB aligned faces.
        far: false accept rate; one the calibration was fitted at (`calibration.FARS`).

    Returns:
        The `Verdict`.

    Raises:
        ValueError: `far` is not a calibrated rate, a face is not a 112x112 uint8 RGB crop, or a score is NaN or
            Inf (no verdict is given on it).
    """
    scores = model.match(face_a[None], face_b[None])
    values = {name: None if s is None else float(s[0, 0]) for name, s in scores.items()}
    checkpoint_lib.check_finite({k: np.float64(v) for k, v in values.items() if v is not None}, "the pair's scores")
    cal = model.calibration
    thresholds = {}
    if cal is not None:
        key = cal.far_key(far)
        thresholds = {name: t[key] for name, t in cal.thresholds.items() if values.get(name) is not None}
    return Verdict(scores=values, far=far, thresholds=thresholds, calibration=cal)


def describe_calibration(verdict: Verdict) -> str:
    """Where the verdict's thresholds come from, and whether its FAR is measured on that many impostors."""
    cal = verdict.calibration
    text = (f"thresholds at FAR {verdict.far:g} fitted on the clean pairs of {', '.join(cal.fitted_on)} "
            f"({cal.num_pairs} pairs, {cal.num_impostors} impostors) at step {cal.step}; "
            "same when the score is above its threshold")
    if not cal.resolved(verdict.far):
        text += (f"\nnote: {cal.num_impostors} impostor pairs measure FAR down to {1.0 / cal.num_impostors:.1e} "
                 f"only; at {verdict.far:g} each threshold is the highest impostor score")
    return text


def plot_verdict(verdict: Verdict, face_a: np.ndarray, face_b: np.ndarray, maps: Optional[np.ndarray],
                 out: epath.PathLike, title: str) -> epath.Path:
    """Writes the pair PNG: both faces, their occlusion maps (all visible when None), scores and verdict."""
    from oaml_jax.evaluation import plots  # pylint: disable=g-import-not-at-top  (matplotlib only here)
    if maps is None:
        maps = np.ones((2, 1, 1), np.float32)
    return plots.plot_pair_verification(face_a, face_b, maps[0], maps[1], verdict.lines(),
                                        user_path(out, "--out"), title=title, verdict=verdict.headline())

