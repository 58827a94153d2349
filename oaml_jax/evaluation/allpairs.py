"""All-versus-all verification with exact metrics and bounded host memory (the folder protocol's engine).

Every unordered pair (i, j), i < j, of N faces is scored exactly once (no self-pair): genuine pairs (same
label) from a list, impostor pairs tile by tile (`tile x tile` blocks of the upper triangle). Nothing holds all
pair scores; per score the host keeps:
- the G genuine scores (sorted), and a histogram of the impostors over them, `[G + 1]` int64: AUC and the ROC at
  every genuine score are exact;
- the K highest impostor scores, K = floor(max FAR x I) + 1 for I impostor pairs: TAR at every FAR is exact (the
  threshold is the (floor(FAR I) + 1)-th highest impostor score, as `verification.far_threshold`);
- every s-th impostor score (s = ceil(I / `HIST_SAMPLE`)), for the histogram figure only.
Host memory: about 8 (2G + K + `HIST_SAMPLE`) bytes per score plus the tile temporaries (a few tile^2 arrays),
independent of the N (N - 1) / 2 pairs. TAR at a FAR below 1 / I is not measurable and reported as None.

    results = verify_all_pairs(labels, pair_fn, tile_fn, fars=FARS)

`pair_fn(a, b)` and `tile_fn(rows, cols)` return the base scores ("adaface", optionally "qaconv" and the pair's
mean visibility "visibility"); the fused and gated scores are derived here with statistics fitted on a
label-free deterministic sample of pairs (`stats_pairs`), the gate given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import numpy as np

from oaml_jax.evaluation import fusion

FARS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
HIST_SAMPLE = 100_000
STATS_PAIRS = 20_000
_ROC_POINTS = 2_000

ScoreFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Exact metrics of one score over all pairs.

    Attributes:
        tar: far -> TAR, None where FAR x I < 1 (not measurable on I impostor pairs).
        auc: area under the ROC (ties count one half).
        fpr, tpr: the ROC at (at most `_ROC_POINTS` of) the genuine scores, from (0, 0) to (1, 1).
        genuine: `[G]` all genuine scores; impostor_sample: every s-th impostor score (histogram figure).
    """

    tar: dict[float, Optional[float]]
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    genuine: np.ndarray
    impostor_sample: np.ndarray


class _Accumulator:
    """Impostor scores streamed against the sorted genuine scores of one score."""

    def __init__(self, genuine: np.ndarray, num_impostors: int, fars: Sequence[float]):
        self.genuine = np.sort(np.asarray(genuine, np.float64))
        self.num_impostors = num_impostors
        self.fars = tuple(fars)
        self.keep = min(num_impostors, int(math.floor(max(self.fars) * num_impostors + 1e-9)) + 1)
        self.top = np.empty(0)
        self.above = np.zeros(self.genuine.size + 1, np.int64)  # impostors by #genuine <= score
        self.greater = 0.0  # sum over impostors of #genuine > score (+ half the ties)
        self.stride = max(1, math.ceil(num_impostors / HIST_SAMPLE))
        self.sample: list[np.ndarray] = []
        self.seen = 0

    def add(self, impostor: np.ndarray) -> None:
        x = np.asarray(impostor, np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"impostor score {x[~np.isfinite(x)][0]} is not finite")
        left = np.searchsorted(self.genuine, x, side="left")
        right = np.searchsorted(self.genuine, x, side="right")
        self.greater += float(np.sum(self.genuine.size - right) + 0.5 * np.sum(right - left))
        self.above += np.bincount(right, minlength=self.genuine.size + 1)
        if self.top.size == self.keep:
            x_top = x[x > self.top[0]]
        else:
            x_top = x
        if x_top.size:
            merged = np.concatenate([self.top, x_top])
            if merged.size > self.keep:
                merged = np.partition(merged, merged.size - self.keep)[merged.size - self.keep:]
            self.top = np.sort(merged)
        start = (-self.seen) % self.stride
        self.sample.append(x[start::self.stride].copy())  # a copy: a view would keep all of x alive
        self.seen += x.size

    def result(self) -> ScoreResult:
        if self.seen != self.num_impostors:
            raise RuntimeError(f"{self.seen} impostor scores streamed, {self.num_impostors} expected")
        g, n = self.genuine.size, self.num_impostors
        tar = {}
        for far in self.fars:
            if far * n < 1.0 - 1e-9:
                tar[far] = None
                continue
            k = int(math.floor(far * n + 1e-9))
            threshold = -np.inf if k >= n else self.top[self.top.size - 1 - k]
            tar[far] = float(np.mean(self.genuine > threshold))
        # Threshold d = a genuine score, accept >= d: TP = #genuine >= d; an impostor x is accepted iff at least
        # R = #(genuine <= d) genuine scores are <= x.
        distinct = np.unique(self.genuine)[::-1]
        tp = g - np.searchsorted(self.genuine, distinct, side="left")
        fp_suffix = np.cumsum(self.above[::-1])[::-1]  # fp_suffix[r] = #impostors with #(genuine <= x) >= r
        fp = fp_suffix[np.searchsorted(self.genuine, distinct, side="right")]
        step = max(1, distinct.size // _ROC_POINTS)
        fpr = np.concatenate([[0.0], fp[::step] / n, [1.0]])
        tpr = np.concatenate([[0.0], tp[::step] / g, [1.0]])
        return ScoreResult(tar=tar, auc=self.greater / (g * n), fpr=fpr, tpr=tpr, genuine=self.genuine,
                           impostor_sample=np.concatenate(self.sample))


def genuine_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, with `labels[i] == labels[j]`, once: (`[G]` i, `[G]` j) int64."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    a, b = [], []
    for group in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        group = np.sort(group)
        i, j = np.triu_indices(group.size, k=1)
        a.append(group[i])
        b.append(group[j])
    return np.concatenate(a).astype(np.int64), np.concatenate(b).astype(np.int64)


def pair_counts(labels: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) unordered pair counts of `labels`."""
    _, counts = np.unique(labels, return_counts=True)
    n = int(counts.sum())
    genuine = int(np.sum(counts * (counts - 1) // 2))
    return genuine, n * (n - 1) // 2 - genuine


def sample_pairs(n: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` deterministic random pairs i < j of `range(n)` (every pair when there are fewer)."""
    if n * (n - 1) // 2 <= count:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, count)
    j = (i + rng.integers(1, n, count)) % n
    return np.minimum(i, j), np.maximum(i, j)


def derive(scores: Mapping[str, np.ndarray], weights: Mapping[str, float], stats: Optional[fusion.FusionStats],
           gate: float) -> dict[str, np.ndarray]:
    """Base scores (any equal shapes) -> the reported ones: "adaface", and with statistics also "qaconv",
    "fused" and "gated" (which needs "visibility")."""
    shape = np.shape(scores["adaface"])
    flat = {k: np.asarray(v, np.float64).reshape(-1) for k, v in scores.items()}
    out = {"adaface": flat["adaface"]}
    if stats is not None:
        out["qaconv"] = flat["qaconv"]
        out["fused"] = fusion.fuse(out, weights, stats)
        out["gated"] = fusion.gated(out, flat["visibility"], gate, stats)
    return {k: v.reshape(shape) for k, v in out.items()}


def verify_all_pairs(labels: np.ndarray, pair_fn: ScoreFn, tile_fn: ScoreFn, *, weights: Mapping[str, float],
                     gate: float, fars: Sequence[float] = FARS, tile: int = 256, stats_pairs: int = STATS_PAIRS,
                     progress: Optional[Callable[[int], None]] = None) -> dict[str, ScoreResult]:
    """Exact verification metrics of every unordered pair of distinct faces (see the module docstring).

    Args:
        labels: `[N]` identity of each face.
        pair_fn: `(a [n], b [n]) -> {"adaface": [n], "qaconv"?: [n], "visibility"?: [n]}` scores of pairs (a_k, b_k).
        tile_fn: `(rows [r], cols [c]) -> {name: [r, c]}` scores of every (row, col) combination.
        weights: fusion weights.
        gate: the gated score's visibility threshold.
        fars: FARs of the TAR table.
        tile: faces per tile side.
        stats_pairs: pairs of the label-free sample the fused/gated statistics are fitted on.
        progress: called with the number of pairs scored by each tile.

    Returns:
        score name -> `ScoreResult`.

    Raises:
        ValueError: no genuine pair (every identity has one face) or no impostor pair (one identity).
    """
    labels = np.asarray(labels)
    n = labels.size
    num_genuine, num_impostors = pair_counts(labels)
    if num_genuine == 0 or num_impostors == 0:
        raise ValueError(f"{n} faces of {np.unique(labels).size} identities give {num_genuine} genuine and "
                         f"{num_impostors} impostor pairs; verification needs both")
    sample = pair_fn(*sample_pairs(n, stats_pairs))
    stats = fusion.FusionStats.fit({k: sample[k] for k in fusion.SCORE_NAMES}) if "qaconv" in sample else None
    genuine = derive(pair_fn(*genuine_pairs(labels)), weights, stats, gate)
    accumulators = {name: _Accumulator(values, num_impostors, fars) for name, values in genuine.items()}
    for r0 in range(0, n, tile):
        rows = np.arange(r0, min(r0 + tile, n))
        for c0 in range(r0, n, tile):
            cols = np.arange(c0, min(c0 + tile, n))
            impostor = (rows[:, None] < cols[None, :]) & (labels[rows][:, None] != labels[cols][None, :])
            if not impostor.any():
                continue
            for name, values in derive(tile_fn(rows, cols), weights, stats, gate).items():
                accumulators[name].add(values[impostor])
            if progress is not None:
                progress(int(np.sum(rows[:, None] < cols[None, :])))
    return {name: acc.result() for name, acc in accumulators.items()}
