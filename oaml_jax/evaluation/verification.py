"""Face verification metrics over numpy score arrays.

Everything here is a pure function of similarity scores (higher = more likely the same identity) and
ground-truth labels, so it is shared by training-time validation, `eval.py` and the IJB protocol.

Conventions:
- 10-fold protocol (LFW and the other `.bin` pair sets): pairs stay in file order and are split into
  contiguous folds like scikit-learn's `KFold(n_splits, shuffle=False)` (the first `N % n_folds` folds get
  one extra pair), which is what insightface's `verification.py` does. A pair is predicted "same" when
  `score > threshold`.
- ROC: a pair is predicted positive when `score >= threshold` at each distinct score (scikit-learn's
  convention), so `roc_curve` and `roc_auc` agree with `sklearn.metrics.roc_curve` / `auc`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# insightface thresholds a squared L2 distance between unit embeddings, d = 2 - 2 cos, on the grid
# np.arange(0, 4, 0.01) with "same" when d < t; the equivalent similarity grid (same when cos > 1 - t/2).
INSIGHTFACE_COSINE_THRESHOLDS = 1.0 - np.arange(0.0, 4.0, 0.01) / 2.0


def as_scores(scores: np.ndarray, field: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D array of scores, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"{field}: score {bad} is not finite ({scores[bad]})")
    return scores


def as_labels(issame: np.ndarray, n: int, field: str = "issame") -> np.ndarray:
    issame = np.asarray(issame)
    if issame.shape != (n,):
        raise ValueError(f"{field}: expected shape ({n},) matching the scores, got {issame.shape}")
    if issame.dtype != bool:
        if not np.all((issame == 0) | (issame == 1)):
            raise ValueError(f"{field}: expected booleans or 0/1 labels")
        issame = issame.astype(bool)
    return issame


def fold_indices(n: int, n_folds: int = 10) -> list[np.ndarray]:
    """Contiguous folds of `range(n)`, sized like scikit-learn's `KFold(n_folds, shuffle=False)`.

    Args:
        n: number of pairs.
        n_folds: number of folds.

    Returns:
        `n_folds` int arrays; the first `n % n_folds` hold `n // n_folds + 1` indices, the others
        `n // n_folds`.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds: expected at least 2, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} pairs into {n_folds} folds")
    return np.array_split(np.arange(n), n_folds)


def threshold_accuracies(scores: np.ndarray, issame: np.ndarray,
                         thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of the rule `same = score > t` for every threshold.

    Args:
        scores: `[N]` similarities.
        issame: `[N]` bool ground truth.
        thresholds: `[K]` candidate thresholds.

    Returns:
        `[K]` float64 accuracies.
    """
    pos = np.sort(scores[issame])
    neg = np.sort(scores[~issame])
    thresholds = np.asarray(thresholds, dtype=np.float64)
    true_accepts = pos.size - np.searchsorted(pos, thresholds, side="right")
    true_rejects = np.searchsorted(neg, thresholds, side="right")
    return (true_accepts + true_rejects) / scores.size


def best_threshold(scores: np.ndarray, issame: np.ndarray,
                   thresholds: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold maximizing the accuracy of `same = score > t` on (training) pairs.

    Candidates are, by default, the midpoints between consecutive distinct scores plus -inf (everything
    "same") and +inf (everything "different"): every achievable split of these pairs, with the decision
    boundary halfway between neighbours. Ties between equally accurate candidates go to the highest
    threshold, as insightface's argmax over its ascending distance grid does.

    Args:
        scores: `[N]` similarities.
        issame: `[N]` bool ground truth.
        thresholds: optional `[K]` fixed grid of candidates (e.g. `INSIGHTFACE_COSINE_THRESHOLDS`).

    Returns:
        `(threshold, accuracy on these pairs)`.
    """
    if thresholds is None:
        distinct = np.unique(scores)
        thresholds = np.concatenate([[-np.inf], (distinct[:-1] + distinct[1:]) / 2.0, [np.inf]])
    else:
        thresholds = np.unique(np.asarray(thresholds, dtype=np.float64))
        if thresholds.size == 0:
            raise ValueError("thresholds: expected at least one candidate threshold")
    accuracies = threshold_accuracies(scores, issame, thresholds)
    best = accuracies.size - 1 - int(np.argmax(accuracies[::-1]))
    return float(thresholds[best]), float(accuracies[best])


def ten_fold(issame: np.ndarray, n_folds: int, thresholds: np.ndarray | None,
             fold_scores: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> dict:
    """The 10-fold protocol over any scoring: `fold_scores(train_idx, test_idx) -> (train, test scores)`.

    Returns:
        As `ten_fold_accuracy`.
    """
    fold_acc, fold_thr = [], []
    folds = fold_indices(issame.size, n_folds)
    for k, test_idx in enumerate(folds):
        train_idx = np.concatenate([f for j, f in enumerate(folds) if j != k])
        train_scores, test_scores = fold_scores(train_idx, test_idx)
        threshold, _ = best_threshold(train_scores, issame[train_idx], thresholds)
        fold_thr.append(threshold)
        fold_acc.append(float(np.mean((test_scores > threshold) == issame[test_idx])))
    fold_acc = np.asarray(fold_acc)
    return {"accuracy": float(fold_acc.mean()), "std": float(fold_acc.std()),
            "fold_accuracies": fold_acc, "thresholds": np.asarray(fold_thr)}


def ten_fold_accuracy(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                      thresholds: np.ndarray | None = None) -> dict:
    """The LFW protocol: threshold chosen on the other folds, accuracy measured on the held-out fold.

    Args:
        scores: `[N]` similarities of the pairs, in file order.
        issame: `[N]` bool ground truth.
        n_folds: number of contiguous folds.
        thresholds: optional fixed candidate grid; by default every midpoint of the training scores
            (see `best_threshold`).

    Returns:
        dict with "accuracy" (mean over folds), "std" (population std over folds, as insightface reports),
        "fold_accuracies" `[n_folds]` and "thresholds" `[n_folds]` (the threshold used on each fold).
    """
    scores = as_scores(scores, "scores")
    issame = as_labels(issame, scores.size)
    return ten_fold(issame, n_folds, thresholds, lambda tr, te: (scores[tr], scores[te]))


def far_threshold(impostor_scores: np.ndarray, far: float) -> float:
    """The lowest threshold whose false accept rate (`score > t`) does not exceed `far`.

    With `n` impostor scores at most `k = floor(far * n)` may be accepted, so the threshold is the
    `(k+1)`-th largest impostor score (ties can make fewer than `k` accepted: never more); -inf when
    `k >= n`.

    Args:
        impostor_scores: `[n]` scores of different-identity pairs.
        far: target false accept rate in [0, 1].

    Returns:
        The threshold.
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far: expected a rate in [0, 1], got {far}")
    n = impostor_scores.size
    if n == 0:
        raise ValueError("no impostor pairs: FAR is undefined")
    # The epsilon keeps products like 0.29 * 100 = 28.999999999999996 from losing an allowed accept.
    k = int(np.floor(far * n + 1e-9))
    if k >= n:
        return -np.inf
    return float(-np.partition(-impostor_scores, k)[k])


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """True accept rate at fixed false accept rates.

    For each `far`, the threshold is `far_threshold(impostor scores, far)` (the `(floor(far*n)+1)`-th
    largest impostor score), and TAR is the fraction of genuine scores strictly above it. This is the
    best TAR whose measured FAR is <= `far`; insightface's IJB script instead reports the ROC point whose
    FPR is nearest to `far` (which may exceed it), so numbers can differ slightly at tiny FARs.

    Args:
        scores: `[N]` similarities.
        issame: `[N]` bool ground truth.
        fars: target false accept rates.

    Returns:
        dict far -> tar.
    """
    scores = as_scores(scores, "scores")
    issame = as_labels(issame, scores.size)
    genuine = scores[issame]
    if genuine.size == 0:
        raise ValueError("no genuine pairs: TAR is undefined")
    impostor = scores[~issame]
    return {far: float(np.mean(genuine > far_threshold(impostor, far))) for far in fars}


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC over every distinct score (positive when `score >= threshold`).

    Args:
        scores: `[N]` similarities.
        issame: `[N]` bool ground truth, both classes present.

    Returns:
        `(fpr, tpr, thresholds)`, each `[K+1]` for K distinct scores: thresholds descending, starting at
        +inf (the (0, 0) point), as `sklearn.metrics.roc_curve(drop_intermediate=False)`.
    """
    scores = as_scores(scores, "scores")
    issame = as_labels(issame, scores.size)
    n_pos = int(issame.sum())
    n_neg = issame.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes; got {n_pos} genuine and {n_neg} impostor pairs")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(issame[order])
    fp = np.arange(1, scores.size + 1) - tp
    last_of_value = np.flatnonzero(np.diff(sorted_scores) != 0)
    last_of_value = np.append(last_of_value, scores.size - 1)
    fpr = np.concatenate([[0.0], fp[last_of_value] / n_neg])
    tpr = np.concatenate([[0.0], tp[last_of_value] / n_pos])
    thresholds = np.concatenate([[np.inf], sorted_scores[last_of_value]])
    return fpr, tpr, thresholds


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, so tied scores count one half).

    Args:
        scores: `[N]` similarities.
        issame: `[N]` bool ground truth, both classes present.

    Returns:
        AUC in [0, 1]: the probability that a random genuine pair outscores a random impostor pair.
    """
    fpr, tpr, _ = roc_curve(scores, issame)
    return float(np.trapezoid(tpr, fpr))


def _l2_normalize(x: np.ndarray, field: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{field}: row {int(np.flatnonzero(norms[..., 0] == 0)[0])} has zero norm")
    return x / norms


def cosine_pair_scores(emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (2i, 2i+1), the `.bin` pair order.

    Args:
        emb: `[2N, E]` embeddings (normalized here, so any scale works).

    Returns:
        `[N]` float64 cosines.
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"emb: expected [2N, E] embeddings in pair order, got shape {emb.shape}")
    emb = _l2_normalize(emb, "emb")
    return np.sum(emb[0::2] * emb[1::2], axis=-1)


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str],
                 fmt: str = "{:.2f}", corner: str = "") -> str:
    """A plain-text table: one row per set/variant, one column per method; missing cells show "-".

    Args:
        rows: row label -> {column -> value}.
        columns: column order.
        fmt: format of each value (e.g. "{:.2f}" for percentages already multiplied by 100).
        corner: header of the row-label column.

    Returns:
        The table, lines joined by newlines, columns aligned.
    """
    header = [corner, *columns]
    body = [[label, *(fmt.format(values[c]) if c in values else "-" for c in columns)]
            for label, values in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join([cells[0].ljust(widths[0])] +
                         [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
