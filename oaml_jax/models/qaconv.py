"""QAConv: query-adaptive local matching of feature maps, with occlusion weighting, and its losses.

For probe features P `[p, hw, c]` and gallery features G `[g, hw, c]` (L2-normalized over channels):

    S[p, g, s, r] = sum_c P[p, s, c] G[g, r, c]        s: probe location, r: gallery location
    S *= v_p[p, s] * v_g[g, r]                        each location weighted by its own image's map
    x  = concat(max_r S, max_s S)                     [p, g, 2hw]
    score = BN1(Dense_1(BN1(x)))                      [p, g], BN1 = one scalar mean/var (BatchNorm1d(1))

x comes from the memory-bounded matcher with its custom VJP (`oaml_jax.models.qaconv_matcher`); this module
scores it and holds the losses.

Matching groups: the matcher, the module and the losses also take a leading group axis (probe
`[n, p, ...]`, gallery `[n, g, ...]`, scores `[n, p, g]`). Groups are matched independently (one batched
GEMM); only the two scalar BatchNorms see all groups together. Training matches groups of G consecutive
images of the batch against themselves (`oaml_jax.models.oaml.OAML.qaconv_group_size`).

Evaluation uses the same matcher: `qaconv_scores_chunked` holds at most `[chunk, chunk]` image pairs at once
and `qaconv_pair_scores` scores n aligned pairs as n groups of one pair.
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from oaml_jax.models.qaconv_matcher import BLOCK_BYTES, check_pair, match_features, match_pair_features

Array = jax.Array


def _inverse_hw_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Dense kernel `[2hw, 1]` filled with 1/hw: the initial score is the sum of the two mean max-similarities."""
    del key
    return jnp.full(shape, 2.0 / shape[0], dtype)


class QAConv(nn.Module):
    """QAConv matcher with scalar BatchNorms (running statistics in "batch_stats").

    Submodules: "bn" (scalar BN of the matching features), "fc" (Dense 2hw -> 1, kernel init 1/hw,
    bias 0), "logit_bn" (scalar BN of the logits).

    Attributes:
        dtype: compute dtype of the similarity GEMMs (accumulated in float32).
        momentum: BN momentum (flax convention).
        epsilon: BN epsilon.
        block_bytes: float32 similarities held at once per group by the matcher (`match_features`).
    """

    dtype: Any = jnp.float32
    momentum: float = 0.9
    epsilon: float = 1e-5
    block_bytes: int = BLOCK_BYTES

    def setup(self):
        bn = functools.partial(nn.BatchNorm, momentum=self.momentum, epsilon=self.epsilon,
                               use_fast_variance=False)
        self.bn = bn()
        self.fc = nn.Dense(1, kernel_init=_inverse_hw_init, bias_init=nn.initializers.zeros,
                           precision=jax.lax.Precision.HIGHEST)
        self.logit_bn = bn()

    def score_features(self, x: Array, train: bool = False) -> Array:
        """Scores matching features.

        Args:
            x: `[..., 2hw]` features from `match_features` / `match_pair_features`.
            train: batch statistics (and running-stat updates) when True, running statistics otherwise. The
                statistics are one mean and one variance over every entry of `x` (all groups together).

        Returns:
            `[...]` float32 scores (logits of "same identity").
        """
        x = self.bn(x.astype(jnp.float32)[..., None], use_running_average=not train)[..., 0]
        return self.logit_bn(self.fc(x), use_running_average=not train)[..., 0]

    def __call__(self, probe: Array, gallery: Array, probe_vis: Array | None = None,
                 gallery_vis: Array | None = None, train: bool = False) -> Array:
        """All-pairs scores (of every group).

        Args:
            probe: `[p, h, w, c]` channel-normalized features, or `[n, p, h, w, c]` for n groups.
            gallery: `[g, h, w, c]` (`[n, g, h, w, c]`) channel-normalized features.
            probe_vis: `[p, h, w]` (`[n, p, h, w]`) visibility maps or None.
            gallery_vis: `[g, h, w]` (`[n, g, h, w]`) visibility maps or None.
            train: see `score_features`.

        Returns:
            `[p, g]` (`[n, p, g]`) float32 scores.
        """
        x = match_features(probe, gallery, probe_vis, gallery_vis, self.dtype, self.block_bytes)
        return self.score_features(x, train)


def _pad_chunks(x: Array | None, chunk: int) -> Array | None:
    """`[n, ...]` -> `[ceil(n / chunk), chunk, ...]`, zero-padded."""
    if x is None:
        return None
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((-1, chunk) + x.shape[1:])


@functools.partial(jax.jit, static_argnames=("chunk_size", "module"))
def _scores_chunked(variables, probe, gallery, probe_vis, gallery_vis, chunk_size, module):
    p, g = probe.shape[0], gallery.shape[0]
    cp, cg = min(chunk_size, p), min(chunk_size, g)
    gallery_chunks = (_pad_chunks(gallery, cg), _pad_chunks(gallery_vis, cg))

    def probe_chunk(probe_part):
        pc, pvc = probe_part

        def gallery_chunk(gallery_part):
            gc, gvc = gallery_part
            return module.apply(variables, pc, gc, pvc, gvc, train=False)

        return jax.lax.map(gallery_chunk, gallery_chunks)

    blocks = jax.lax.map(probe_chunk, (_pad_chunks(probe, cp), _pad_chunks(probe_vis, cp)))
    n_p, n_g = blocks.shape[:2]
    return blocks.transpose(0, 2, 1, 3).reshape(n_p * cp, n_g * cg)[:p, :g]


def qaconv_scores_chunked(variables: Mapping[str, Any], probe: Array, gallery: Array,
                          probe_vis: Array | None = None, gallery_vis: Array | None = None,
                          chunk_size: int = 256, module: QAConv | None = None) -> Array:
    """Eval-mode all-pairs scores with bounded memory.

    Args:
        variables: QAConv variables {"params", "batch_stats"} (for an OAML model, the "qaconv" subtrees).
        probe: `[p, h, w, c]` channel-normalized features.
        gallery: `[g, h, w, c]` channel-normalized features.
        probe_vis: `[p, h, w]` or None.
        gallery_vis: `[g, h, w]` or None.
        chunk_size: probe and gallery block size; at most `[chunk, chunk, hw, hw]` similarities exist at once.
            Sizes need not be divisible by it.
        module: the QAConv configuration (compute dtype etc.); default `QAConv()`.

    Returns:
        `[p, g]` float32 scores, equal to `module.apply(variables, probe, gallery, ..., train=False)`.
    """
    if chunk_size < 1:
        raise ValueError(f"oaml_jax/models/qaconv.py: chunk_size must be >= 1, got {chunk_size}")
    check_pair(probe, gallery, probe_vis, gallery_vis)
    return _scores_chunked(variables, probe, gallery, probe_vis, gallery_vis, chunk_size=chunk_size,
                           module=QAConv() if module is None else module)


@functools.partial(jax.jit, static_argnames=("chunk_size", "module"))
def _pair_scores(variables, a, b, a_vis, b_vis, chunk_size, module):
    n = a.shape[0]
    chunk = min(chunk_size, n)

    def pair_chunk(part):
        x_ab, x_ba = match_pair_features(*part, dtype=module.dtype)
        score = functools.partial(module.apply, variables, train=False, method=QAConv.score_features)
        return 0.5 * (score(x_ab) + score(x_ba))

    parts = tuple(_pad_chunks(x, chunk) for x in (a, b, a_vis, b_vis))
    return jax.lax.map(pair_chunk, parts).reshape(-1)[:n]


def qaconv_pair_scores(variables: Mapping[str, Any], a: Array, b: Array, a_vis: Array | None = None,
                       b_vis: Array | None = None, chunk_size: int = 1024,
                       module: QAConv | None = None) -> Array:
    """Eval-mode scores of aligned pairs, symmetric in the two sides.

    Args:
        variables: QAConv variables {"params", "batch_stats"}.
        a: `[n, h, w, c]` channel-normalized features of the first image of each pair.
        b: `[n, h, w, c]` channel-normalized features of the second image.
        a_vis: `[n, h, w]` or None.
        b_vis: `[n, h, w]` or None.
        chunk_size: pairs per block; at most `[chunk, hw, hw]` similarities exist at once.
        module: the QAConv configuration; default `QAConv()`.

    Returns:
        `[n]` float32: mean of score(a[i] as probe, b[i]) and score(b[i] as probe, a[i]).
    """
    if chunk_size < 1:
        raise ValueError(f"oaml_jax/models/qaconv.py: chunk_size must be >= 1, got {chunk_size}")
    check_pair(a, b, a_vis, b_vis)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"oaml_jax/models/qaconv.py: pair sides must have the same count, got {a.shape[0]} "
                         f"and {b.shape[0]}")
    return _pair_scores(variables, a, b, a_vis, b_vis, chunk_size=chunk_size,
                        module=QAConv() if module is None else module)


def _groups(scores: Array, labels: Array) -> tuple[Array, Array]:
    """`[B, B]` scores with `[B]` labels, or `[n, G, G]` with `[n, G]` -> float32 `[n, G, G]`, `[n, G]`."""
    scores, labels = jnp.asarray(scores, jnp.float32), jnp.asarray(labels)
    grouped = scores.ndim == 3 and labels.ndim == 2
    ungrouped = scores.ndim == 2 and labels.ndim == 1
    if not (grouped or ungrouped) or scores.shape[-1] != labels.shape[-1] or scores.shape[:-1] != labels.shape:
        raise ValueError(f"oaml_jax/models/qaconv.py: self-matching scores must be [B, B] with labels [B], or "
                         f"[groups, G, G] with labels [groups, G]; got scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)}")
    return (scores, labels) if grouped else (scores[None], labels[None])


def _same_label(labels: Array) -> Array:
    return labels[:, :, None] == labels[:, None, :]


def pairwise_matching_loss(scores: Array, labels: Array) -> Array:
    """Mean over rows of sum_j BCEWithLogits(scores[i, j], labels[i] == labels[j]), diagonal included.

    With groups, j runs over the row's group and the mean is over the rows of all groups, which (groups
    being equal) is the mean over groups of each group's loss: the scale depends on the group size G, not
    on the number of groups or devices.

    Args:
        scores: `[B, B]` self-matching scores of a batch, or `[n, G, G]` of n groups.
        labels: `[B]` (`[n, G]`) identities.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: when the shapes do not fit together.
    """
    scores, labels = _groups(scores, labels)
    targets = _same_label(labels).astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(scores, targets).sum(axis=-1).mean()


def hard_triplet_loss(scores: Array, labels: Array, margin: float = 1.0) -> tuple[Array, Array]:
    """Batch-hard triplet loss on scores (higher = more similar).

    Per row: max(0, margin - (min_pos - max_neg)) with min_pos over other samples of the same identity and
    max_neg over samples of other identities, both inside the row's group. Rows lacking a positive or a
    negative are left out; the loss is the mean over the valid rows of all groups.

    Args:
        scores: `[B, B]` self-matching scores, or `[n, G, G]` of n groups.
        labels: `[B]` (`[n, G]`) identities.
        margin: triplet margin.

    Returns:
        (scalar loss = mean over valid rows, 0 when none is valid; fraction of valid rows).

    Raises:
        ValueError: when the shapes do not fit together.
    """
    scores, labels = _groups(scores, labels)
    same = _same_label(labels)
    positive = same & ~jnp.eye(scores.shape[-1], dtype=bool)
    negative = ~same
    valid = positive.any(axis=-1) & negative.any(axis=-1)
    # Invalid rows get finite stand-ins so neither the value nor its gradient can turn into inf/NaN.
    min_pos = jnp.where(valid, jnp.min(jnp.where(positive, scores, jnp.inf), axis=-1), 0.0)
    max_neg = jnp.where(valid, jnp.max(jnp.where(negative, scores, -jnp.inf), axis=-1), 0.0)
    per_row = jnp.where(valid, jax.nn.relu(margin - (min_pos - max_neg)), 0.0)
    num_valid = valid.sum()
    loss = per_row.sum() / jnp.maximum(num_valid, 1).astype(jnp.float32)
    return loss, num_valid.astype(jnp.float32) / valid.size


def qaconv_loss(scores: Array, labels: Array, triplet_weight: float = 0.5,
                margin: float = 1.0) -> tuple[Array, dict[str, Array]]:
    """L_qa = pairwise matching loss + triplet_weight * hard triplet loss.

    Args:
        scores: `[B, B]` self-matching scores, or `[n, G, G]` of n groups.
        labels: `[B]` (`[n, G]`) identities.
        triplet_weight: weight of the triplet term.
        margin: triplet margin.

    Returns:
        (scalar loss, dict(loss_pair, loss_trip, trip_valid)).

    Raises:
        ValueError: when the shapes do not fit together.
    """
    loss_pair = pairwise_matching_loss(scores, labels)
    loss_trip, trip_valid = hard_triplet_loss(scores, labels, margin)
    return loss_pair + triplet_weight * loss_trip, dict(loss_pair=loss_pair, loss_trip=loss_trip,
                                                        trip_valid=trip_valid)


def retrieval_accuracy(scores: Array, labels: Array) -> Array:
    """Fraction of rows whose best-scoring other sample (j != i, in the row's group) has the same identity.

    Args:
        scores: `[B, B]` self-matching scores, or `[n, G, G]` of n groups.
        labels: `[B]` (`[n, G]`) identities.

    Returns:
        Scalar float32 accuracy over the rows of all groups.

    Raises:
        ValueError: when the shapes do not fit together.
    """
    scores, labels = _groups(scores, labels)
    masked = jnp.where(jnp.eye(scores.shape[-1], dtype=bool), -jnp.inf, scores)
    best = jnp.argmax(masked, axis=-1)
    return jnp.mean((jnp.take_along_axis(labels, best, axis=-1) == labels).astype(jnp.float32))
