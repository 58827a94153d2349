"""IJB template pooling and 1:1 template-pair scoring (numpy; no model).

A template's feature pools its faces' features per media (mean over the frames of one video or the single
photo), sums the media features and L2-normalizes; template pairs are scored by cosine. insightface's best
setting feeds un-normalized (norm-weighted) flip-summed features, scaled by the detector score;
`template_features` takes the features as given and optional per-face weights so the caller picks the mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse

from oaml_jax.evaluation import verification

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      face_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Media-pooled template features.

    Each face feature is scaled by its weight (if given); faces of one media (same template and media
    id) are averaged; a template's media features are summed and the sum L2-normalized.

    Args:
        face_features: `[F, E]` features (insightface's best mode passes un-normalized features).
        templates: `[F]` template id per face.
        medias: `[F]` media id per face.
        face_weights: optional `[F]` per-face weights (e.g. detector scores).

    Returns:
        `(template_ids [T] sorted int64, features [T, E] float32 unit rows)`.
    """
    feats = np.asarray(face_features)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    if feats.ndim != 2:
        raise ValueError(f"face_features: expected [F, E], got shape {feats.shape}")
    num_faces = feats.shape[0]
    if templates.shape != (num_faces,) or medias.shape != (num_faces,):
        raise ValueError(f"templates {templates.shape} / medias {medias.shape}: expected ({num_faces},)")
    if num_faces == 0:
        raise ValueError("face_features: no faces")
    weights = np.ones(num_faces, dtype=np.float32)
    if face_weights is not None:
        weights = np.asarray(face_weights, dtype=np.float32)
        if weights.shape != (num_faces,):
            raise ValueError(f"face_weights: expected ({num_faces},), got {weights.shape}")
    _, media_of_face, media_counts = np.unique(np.stack([templates, medias], axis=1), axis=0,
                                               return_inverse=True, return_counts=True)
    template_ids, template_of_face = np.unique(templates, return_inverse=True)
    # Media mean then template sum is one linear map: face i enters its template with weight
    # w_i / |media(i)|. A sparse [T, F] matrix applies it without sorting or copying the features
    # (np.add.reduceat over rows is ~40x slower on IJB-sized inputs).
    coefficients = weights / media_counts[media_of_face.reshape(-1)]
    pooling = scipy.sparse.csr_matrix((coefficients, (template_of_face.reshape(-1), np.arange(num_faces))),
                                      shape=(template_ids.size, num_faces))
    template_feats = np.asarray(pooling @ np.asarray(feats, dtype=np.float32))

    norms = np.linalg.norm(template_feats, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"template {template_ids[zero[0]]}: pooled feature is zero, cannot normalize")
    return template_ids, (template_feats / norms).astype(np.float32)


def _template_rows(template_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Row of each template of `pairs` [M, 2] in `template_ids`; unknown ids raise naming the pair."""
    template_ids = np.asarray(template_ids, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs: expected [M, 2] template ids, got shape {pairs.shape}")
    order = np.argsort(template_ids, kind="stable")
    sorted_ids = template_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, pairs), 0, max(sorted_ids.size - 1, 0))
    found = sorted_ids[pos] == pairs
    if not found.all():
        m, k = np.argwhere(~found)[0]
        raise KeyError(f"pair {m}: template {pairs[m, k]} has no feature")
    return order[pos]


def verify_templates(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                     chunk: int = 100_000) -> np.ndarray:
    """Cosine score of each template pair, `chunk` pairs at a time.

    Args:
        template_ids: `[T]` ids of the rows of `template_feats`.
        template_feats: `[T, E]` unit template features.
        pairs: `[M, 2]` template ids.
        chunk: pairs per step (bounds the `[chunk, E]` temporaries).

    Returns:
        `[M]` float32 cosines.
    """
    rows = _template_rows(template_ids, pairs)
    feats = np.asarray(template_feats, dtype=np.float32)
    scores = np.empty(rows.shape[0], dtype=np.float32)
    for lo in range(0, rows.shape[0], chunk):
        a = feats[rows[lo:lo + chunk, 0]]
        b = feats[rows[lo:lo + chunk, 1]]
        scores[lo:lo + chunk] = np.einsum("me,me->m", a, b)
    return scores


def template_pair_scores_from_pairwise(templates: np.ndarray, pairs: np.ndarray,
                                       score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                                       chunk: int = 65_536) -> np.ndarray:
    """Template-pair scores as the mean of an image-pair score over all their faces' pairs.

    For pair (T1, T2) the score is `mean_{a in T1, b in T2} score_fn(a, b)`. All image pairs of all
    template pairs are enumerated lazily and handed to `score_fn` `chunk` at a time (a large template
    pair spans several calls), e.g. QAConv between the faces' feature maps. The cost is
    `sum_m |T1_m| * |T2_m|` image-pair scores: plan for it on the full IJB-C.

    Args:
        templates: `[F]` template id of each face.
        pairs: `[M, 2]` template ids.
        score_fn: `(idx_a [n] int64, idx_b [n] int64) -> [n]` scores of faces `idx_a[i]` vs `idx_b[i]`.
        chunk: image pairs per `score_fn` call.

    Returns:
        `[M]` float64 mean scores.
    """
    templates = np.asarray(templates, dtype=np.int64)
    if chunk < 1:
        raise ValueError(f"chunk: expected >= 1, got {chunk}")
    faces_by_template = np.argsort(templates, kind="stable")
    template_ids, starts, counts = np.unique(templates[faces_by_template], return_index=True,
                                             return_counts=True)
    rows = _template_rows(template_ids, pairs)
    start_a, start_b = starts[rows[:, 0]], starts[rows[:, 1]]
    count_a, count_b = counts[rows[:, 0]], counts[rows[:, 1]]
    sizes = count_a * count_b
    pair_end = np.cumsum(sizes)
    pair_start = pair_end - sizes
    sums = np.zeros(rows.shape[0], dtype=np.float64)
    total = int(pair_end[-1]) if pair_end.size else 0
    for lo in range(0, total, chunk):
        k = np.arange(lo, min(lo + chunk, total), dtype=np.int64)
        m = np.searchsorted(pair_end, k, side="right")
        local = k - pair_start[m]
        idx_a = faces_by_template[start_a[m] + local // count_b[m]]
        idx_b = faces_by_template[start_b[m] + local % count_b[m]]
        scores = np.asarray(score_fn(idx_a, idx_b), dtype=np.float64)
        if scores.shape != k.shape:
            raise ValueError(f"score_fn returned shape {scores.shape} for {k.size} image pairs")
        np.add.at(sums, m, scores)
    return sums / sizes


def ijb_tar_table(scores: np.ndarray, labels: np.ndarray,
                  fars: Sequence[float] = IJB_FARS) -> dict[float, float]:
    """TAR at each FAR of the IJB protocol (see `verification.tar_at_far` for the exact definition).

    A FAR below `1 / #impostor pairs` allows no false accept, so it is measured at FAR 0 (the threshold
    is the highest impostor score).

    Args:
        scores: `[M]` template-pair similarities.
        labels: `[M]` bool / 0-1 ground truth.
        fars: false accept rates.

    Returns:
        dict far -> tar.
    """
    return verification.tar_at_far(scores, labels, fars)
