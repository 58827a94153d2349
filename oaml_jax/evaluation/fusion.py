"""Score fusion: the z-normalization statistics, the fused and the visibility-gated scores, their 10-fold protocol.

    fused = sum_k w_k (s_k - mean_k) / std_k        over k in ("adaface", "qaconv")
    gated = z(qaconv) if v < t else z(adaface)      v = the pair's mean predicted visibility (OAML's hybrid)

The statistics are fitted on scores the decision may see: the training folds only inside the 10-fold
protocol (`ten_fold_fused_accuracy`), all clean pairs of the validation sets for the calibration eval.py
writes (`calibration.fit`, `<workdir>/eval/calibration.json`, read back by `CalibratedFaceModel.from_workdir` for
the same checkpoint step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from oaml_jax.evaluation import verification

SCORE_NAMES = ("adaface", "qaconv")
DEFAULT_WEIGHTS = {"adaface": 0.5, "qaconv": 0.5}
# Gate thresholds tried on the training folds: 0 = AdaFace for every pair, inf = QAConv for every pair.
GATE_GRID = np.append(np.round(np.linspace(0.0, 1.0, 21), 2), np.inf)


def check_weights(weights: Sequence[float]) -> dict[str, float]:
    """`config.eval.fusion_weights` (w_adaface, w_qaconv) as a name -> weight dict.

    Raises:
        ValueError: not one finite weight per score.
    """
    weights = tuple(weights)
    if len(weights) != len(SCORE_NAMES) or not all(np.isfinite(w) for w in weights):
        raise ValueError(f"eval.fusion_weights={weights}: expected {len(SCORE_NAMES)} finite weights for "
                         f"{SCORE_NAMES}")
    return dict(zip(SCORE_NAMES, (float(w) for w in weights)))


@dataclasses.dataclass(frozen=True)
class FusionStats:
    """Per-score z-normalization statistics: `mean[name]`, `std[name]` (population std)."""

    mean: Mapping[str, float]
    std: Mapping[str, float]

    @classmethod
    def fit(cls, score_dict: Mapping[str, np.ndarray]) -> FusionStats:
        """Mean and std of each score array.

        Args:
            score_dict: name -> `[N]` scores (the pairs the statistics may see).

        Returns:
            The fitted statistics; a constant score (std 0) raises ValueError naming it.
        """
        mean, std = {}, {}
        for name, values in score_dict.items():
            values = verification.as_scores(values, f"scores '{name}'")
            if values.size == 0:
                raise ValueError(f"scores '{name}': cannot fit statistics on no scores")
            mean[name] = float(values.mean())
            std[name] = float(values.std())
            if std[name] == 0.0:
                raise ValueError(f"scores '{name}': constant scores cannot be z-normalized (std 0)")
        return cls(mean=mean, std=std)


def fuse(score_dict: Mapping[str, np.ndarray], weights: Mapping[str, float],
         stats: FusionStats) -> np.ndarray:
    """Weighted sum of z-normalized scores: `sum_k w_k * (s_k - mean_k) / std_k`.

    Args:
        score_dict: name -> `[N]` scores; must hold every name in `weights` (others are ignored).
        weights: name -> weight.
        stats: statistics from `FusionStats.fit` holding every name in `weights`.

    Returns:
        `[N]` float64 fused scores.
    """
    if not weights:
        raise ValueError("weights: expected at least one score name")
    fused = None
    for name, weight in weights.items():
        if name not in score_dict:
            raise KeyError(f"weights name '{name}' has no scores; have {sorted(score_dict)}")
        if name not in stats.mean:
            raise KeyError(f"weights name '{name}' has no fusion statistics; have {sorted(stats.mean)}")
        values = verification.as_scores(score_dict[name], f"scores '{name}'")
        term = weight * (values - stats.mean[name]) / stats.std[name]
        if fused is not None and term.shape != fused.shape:
            raise ValueError(f"scores '{name}': shape {term.shape} differs from the others' {fused.shape}")
        fused = term if fused is None else fused + term
    return fused


def ten_fold_fused_accuracy(score_dict: Mapping[str, np.ndarray], issame: np.ndarray,
                            weights: Mapping[str, float], n_folds: int = 10,
                            thresholds: np.ndarray | None = None) -> dict:
    """10-fold accuracy of fused scores, the z-normalization fitted on the training folds only.

    For each held-out fold the statistics come from `FusionStats.fit` on the other folds' scores, so
    nothing about the test fold (not even its score distribution) reaches the fused decision.

    Args:
        score_dict: name -> `[N]` scores, pairs in file order.
        issame: `[N]` bool ground truth.
        weights: name -> fusion weight.
        n_folds: number of contiguous folds.
        thresholds: optional fixed candidate grid (of fused scores).

    Returns:
        As `ten_fold_accuracy`, plus "stats": the `FusionStats` used for each fold.
    """
    if not weights:
        raise ValueError("weights: expected at least one score name")
    missing = [name for name in weights if name not in score_dict]
    if missing:
        raise KeyError(f"weights names {missing} have no scores; have {sorted(score_dict)}")
    arrays = {name: verification.as_scores(score_dict[name], f"scores '{name}'") for name in weights}
    n = next(iter(arrays.values())).size
    for name, values in arrays.items():
        if values.size != n:
            raise ValueError(f"scores '{name}': {values.size} scores, the others have {n}")
    issame = verification.as_labels(issame, n)
    fold_stats = []

    def fold_scores(train_idx, test_idx):
        stats = FusionStats.fit({name: values[train_idx] for name, values in arrays.items()})
        fold_stats.append(stats)
        train = fuse({name: values[train_idx] for name, values in arrays.items()}, weights, stats)
        test = fuse({name: values[test_idx] for name, values in arrays.items()}, weights, stats)
        return train, test

    result = verification.ten_fold(issame, n_folds, thresholds, fold_scores)
    result["stats"] = fold_stats
    return result


def gated(score_dict: Mapping[str, np.ndarray], visibility: np.ndarray, threshold: float,
          stats: FusionStats) -> np.ndarray:
    """OAML's visibility-gated score: per pair, z(qaconv) when `visibility < threshold`, else z(adaface).

    Both scores are z-normalized with `stats` so one decision threshold serves the mixture.

    Args:
        score_dict: {"adaface": `[N]`, "qaconv": `[N]`}.
        visibility: `[N]` mean predicted visibility of each pair's two faces, in [0, 1].
        threshold: the gate.
        stats: statistics of both scores.

    Returns:
        `[N]` float64 gated scores.
    """
    z = {name: (verification.as_scores(score_dict[name], f"scores '{name}'") - stats.mean[name]) / stats.std[name]
         for name in SCORE_NAMES}
    visibility = np.asarray(visibility, dtype=np.float64)
    if visibility.shape != z["adaface"].shape:
        raise ValueError(f"visibility: expected shape {z['adaface'].shape} like the scores, got {visibility.shape}")
    return np.where(visibility < threshold, z["qaconv"], z["adaface"])


def ten_fold_gated_accuracy(score_dict: Mapping[str, np.ndarray], visibility: np.ndarray, issame: np.ndarray,
                            n_folds: int = 10, gates: np.ndarray = GATE_GRID) -> dict:
    """10-fold accuracy of the gated score, the statistics and the gate fitted on the training folds only.

    For each held-out fold: `FusionStats.fit` on the other folds' scores; then the gate of `gates` whose gated
    training scores reach the best training accuracy (ties: the first, i.e. the lowest gate); the decision
    threshold is that best one (`verification.best_threshold`).

    Returns:
        As `verification.ten_fold_accuracy`, plus "stats" and "gates" (per fold) and "scores" (`[N]`
        out-of-fold gated scores, for the ROC and TAR).
    """
    arrays = {name: verification.as_scores(score_dict[name], f"scores '{name}'") for name in SCORE_NAMES}
    issame = verification.as_labels(issame, arrays["adaface"].size)
    visibility = np.asarray(visibility, dtype=np.float64)
    fold_stats, fold_gates = [], []
    out_of_fold = np.empty(issame.size)

    def fold_scores(train_idx, test_idx):
        stats = FusionStats.fit({name: values[train_idx] for name, values in arrays.items()})
        train = {name: values[train_idx] for name, values in arrays.items()}
        accuracies = [verification.best_threshold(gated(train, visibility[train_idx], g, stats),
                                                  issame[train_idx])[1] for g in gates]
        gate = float(gates[int(np.argmax(accuracies))])
        fold_stats.append(stats)
        fold_gates.append(gate)
        test = gated({name: values[test_idx] for name, values in arrays.items()}, visibility[test_idx], gate, stats)
        out_of_fold[test_idx] = test
        return gated(train, visibility[train_idx], gate, stats), test

    result = verification.ten_fold(issame, n_folds, None, fold_scores)
    result.update(stats=fold_stats, gates=np.asarray(fold_gates), scores=out_of_fold)
    return result
