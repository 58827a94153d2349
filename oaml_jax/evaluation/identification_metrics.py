"""1:N identification metrics from a probe x gallery score matrix, kept per probe in `O(P K)` memory.

Definitions (each probe searched against the whole gallery; scores are similarities, higher = more alike):
- A probe is *mated* when at least one searched gallery entry has its identity (a gallery photo without a
  usable face is no entry), *non-mated* otherwise.
- Rank of a mated probe = 1 + the number of non-mated gallery entries scoring at least as high as its best
  mated entry (ties count against the probe, so a constant score never looks like a hit).
  rank-r = share of mated probes with rank <= r; the CMC curve is rank-r for r = 1..K.
- Open set, as NIST FRVT 1:N (Grother et al., NISTIR 8271) and the IJB-B/C 1:N protocol define them:
  FPIR(T) = share of non-mated probes whose top gallery score is > T;
  TPIR(T) = share of mated probes whose mate is at rank 1 AND scores > T (= 1 - FNIR at rank 1).
  At a target FPIR f, T is the lowest threshold with FPIR(T) <= f: the (floor(f n) + 1)-th highest of the
  n non-mated top scores (`verification.far_threshold`). With fewer than 1/f non-mated probes no false
  alarm is allowed and T is their highest score: `identification.IdentificationResult.resolved` says so. (insightface's
  IJB 1:N script instead thresholds all non-mated probe-gallery pairs: another quantity.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from oaml_jax.evaluation import verification

# Gallery label of entries that are nobody's mate (distractors); probes without a gallery identity get -1.
DISTRACTOR = -2
NON_MATED = -1



@dataclasses.dataclass(frozen=True)
class TopScores:
    """What the metrics need of a `[P, G]` score matrix, kept in `O(P K)` memory.

    Attributes:
        mate: `[P]` float64 best mated gallery score; -inf for non-mated probes.
        nonmate: `[P, K]` float64 the K highest non-mated gallery scores, descending (-inf padded).
        mated: `[P]` bool, the probe's identity is in the gallery.
    """

    mate: np.ndarray
    nonmate: np.ndarray
    mated: np.ndarray


class TopScoreAccumulator:
    """Builds `TopScores` from gallery chunks: `update(scores [P, g], same [P, g])` per chunk, then `result()`."""

    def __init__(self, num_probes: int, k: int):
        if k < 1:
            raise ValueError(f"k: expected >= 1, got {k}")
        self.mate = np.full(num_probes, -np.inf)
        self.nonmate = np.full((num_probes, k), -np.inf)
        self.mated = np.zeros(num_probes, bool)

    def update(self, scores: np.ndarray, same: np.ndarray) -> None:
        """Adds one gallery chunk: `scores` `[P, g]` similarities, `same` `[P, g]` bool (gallery entry is a mate)."""
        scores = np.asarray(scores, np.float64)
        same = np.asarray(same, bool)
        if scores.shape != same.shape or scores.shape[0] != self.mate.size:
            raise ValueError(f"scores {scores.shape} and same {same.shape}: expected equal [{self.mate.size}, g]")
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores: non-finite identification scores")
        if scores.shape[1] == 0:
            return
        self.mated |= same.any(axis=1)
        self.mate = np.maximum(self.mate, np.where(same, scores, -np.inf).max(axis=1))
        k = self.nonmate.shape[1]
        merged = np.concatenate([self.nonmate, np.where(same, -np.inf, scores)], axis=1)
        top = -np.partition(-merged, k - 1, axis=1)[:, :k] if merged.shape[1] > k else merged
        self.nonmate = -np.sort(-top, axis=1)

    def result(self) -> TopScores:
        return TopScores(mate=self.mate.copy(), nonmate=self.nonmate.copy(), mated=self.mated.copy())


def mated_ranks(top: TopScores) -> np.ndarray:
    """`[M]` int rank of each mated probe (probe order); K + 1 means "beyond the K kept" (rank > K)."""
    mate = top.mate[top.mated]
    return 1 + np.sum(top.nonmate[top.mated] >= mate[:, None], axis=1)


def cmc(top: TopScores, length: Optional[int] = None) -> np.ndarray:
    """`[length]` CMC: entry r-1 = share of mated probes at rank <= r (length <= K, default K).

    Raises:
        ValueError: no mated probe, or `length` beyond the K scores kept.
    """
    k = top.nonmate.shape[1]
    length = k if length is None else length
    if not 1 <= length <= k:
        raise ValueError(f"CMC length {length}: expected 1..{k} (the non-mated scores kept per probe)")
    ranks = mated_ranks(top)
    if ranks.size == 0:
        raise ValueError("no mated probe: rank-N and CMC are undefined")
    return np.array([np.mean(ranks <= r) for r in range(1, length + 1)])


def tpir_at_fpir(top: TopScores, fpirs: Sequence[float]) -> dict[float, tuple[float, float, float]]:
    """Open-set TPIR at each target FPIR (module docstring).

    Returns:
        fpir -> (TPIR, threshold T, measured FPIR(T) <= fpir).

    Raises:
        ValueError: no mated or no non-mated probe.
    """
    nonmated_top = top.nonmate[~top.mated, 0]
    if nonmated_top.size == 0:
        raise ValueError("no non-mated probe: FPIR is undefined (open-set metrics need probes without a mate)")
    if not top.mated.any():
        raise ValueError("no mated probe: TPIR is undefined")
    rank_one = mated_ranks(top) == 1
    mate = top.mate[top.mated]
    out = {}
    for fpir in fpirs:
        threshold = verification.far_threshold(nonmated_top, fpir)
        out[fpir] = (float(np.mean(rank_one & (mate > threshold))), threshold,
                     float(np.mean(nonmated_top > threshold)))
    return out


def identity_ids(probe_labels: Sequence[Any], gallery_labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids: gallery identities 0..; `None` gallery labels (distractors) `DISTRACTOR`; probes whose
    identity is not in the gallery `NON_MATED`. Returns (`[P]`, `[G]`) int64."""
    index: dict[Any, int] = {}
    gallery = np.array([DISTRACTOR if g is None else index.setdefault(g, len(index)) for g in gallery_labels],
                       np.int64)
    probe = np.array([index.get(p, NON_MATED) for p in probe_labels], np.int64)
    return probe, gallery


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One score's metrics: `ranks` r -> rank-r, `cmc` `[K]`, `tpir` fpir -> TPIR (empty without non-mated
    probes), `thresholds` fpir -> T, `fpir` fpir -> measured FPIR(T)."""

    ranks: dict[int, float]
    cmc: np.ndarray
    tpir: dict[float, float]
    thresholds: dict[float, float]
    fpir: dict[float, float]


def method_result(top: TopScores, ranks: Sequence[int], fpirs: Sequence[float]) -> MethodResult:
    """Metrics of one score from its `TopScores` (open-set ones only when non-mated probes exist)."""
    curve = cmc(top)
    open_set = tpir_at_fpir(top, fpirs) if (~top.mated).any() else {}
    return MethodResult(ranks={r: float(curve[r - 1]) for r in ranks}, cmc=curve,
                        tpir={f: v[0] for f, v in open_set.items()},
                        thresholds={f: v[1] for f, v in open_set.items()},
                        fpir={f: v[2] for f, v in open_set.items()})
