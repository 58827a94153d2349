"""QAConv: query-adaptive local matching of feature maps, with occlusion weighting, and its losses.

For probe features P `[p, hw, c]` and gallery features G `[g, hw, c]` (L2-normalized over channels):

    S[p, g, s, r] = sum_c P[p, s, c] G[g, r, c]        s: probe location, r: gallery location
    S *= v_p[p, s] * v_g[g, r]                        each location weighted by its own image's map
    x  = concat(max_r S, max_s S)                     [p, g, 2hw]
    score = BN1(Dense_1(BN1(x)))                      [p, g], BN1 = one scalar mean/var (BatchNorm1d(1))

Matching groups: the matcher, the module and the losses also take a leading group axis (probe
`[n, p, ...]`, gallery `[n, g, ...]`, scores `[n, p, g]`). Groups are matched independently (one batched
GEMM); only the two scalar BatchNorms see all groups together. Training matches groups of G consecutive
images of the batch against themselves (`oaml_jax.models.oaml.OAML.qaconv_group_size`).

The matcher (`match_features`) computes S of a group as one 2-D GEMM `[p*hw, c] @ [c, g*hw]` and takes the
maxima over every `hw x hw` block in both directions without ever keeping S: the gallery is cut into
blocks of at most `block_bytes` of float32 similarities per group, and a `jax.custom_vjp` saves only the
argmax positions (uint8 up to 16x16 grids) for the backward pass, which rebuilds the sparse gradient of S
one block at a time and multiplies it back with two GEMMs. Evaluation uses the same matcher:
`qaconv_scores_chunked` holds at most `[chunk, chunk]` image pairs at once and `qaconv_pair_scores` scores
n aligned pairs as n groups of one pair.
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST

# Float32 similarities of one gallery block of one group.
BLOCK_BYTES = 256 * 2**20


def l2_normalize_channels(feature_map: Array, eps: float = 1e-12) -> Array:
    """L2-normalizes every location of a feature map over its channels.

    Args:
        feature_map: `[..., c]` features.
        eps: lower bound of the norm, so an all-zero location stays zero instead of NaN.

    Returns:
        Same shape, float32, unit norm over the last axis.
    """
    x = feature_map.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _inverse_hw_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Dense kernel `[2hw, 1]` filled with 1/hw: the initial score is the sum of the two mean max-similarities."""
    del key
    return jnp.full(shape, 2.0 / shape[0], dtype)


def _check_maps(where: str, features: Array, vis: Array | None) -> None:
    if features.ndim not in (4, 5):
        raise ValueError(f"oaml_jax/models/qaconv.py {where}: features must be [n, h, w, c] or grouped "
                         f"[groups, n, h, w, c], got shape {tuple(features.shape)}")
    if vis is not None and vis.shape != features.shape[:-1]:
        raise ValueError(f"oaml_jax/models/qaconv.py {where}: visibility map must be {features.shape[:-1]} "
                         f"(the shape of its features without c), got shape {tuple(vis.shape)}")


def _check_pair(probe: Array, gallery: Array, probe_vis: Array | None, gallery_vis: Array | None) -> None:
    _check_maps("probe", probe, probe_vis)
    _check_maps("gallery", gallery, gallery_vis)
    if probe.ndim != gallery.ndim or probe.shape[-3:] != gallery.shape[-3:]:
        raise ValueError(f"oaml_jax/models/qaconv.py: probe and gallery maps must share [h, w, c] and the "
                         f"group axis, got shapes {tuple(probe.shape)} and {tuple(gallery.shape)}")
    if probe.ndim == 5 and probe.shape[0] != gallery.shape[0]:
        raise ValueError(f"oaml_jax/models/qaconv.py: probe and gallery must have the same number of groups, "
                         f"got {probe.shape[0]} and {gallery.shape[0]}")


def _precision(dtype: Any) -> jax.lax.Precision | None:
    """HIGHEST keeps float32 GEMMs in full precision (no TF32 on GPUs); narrower dtypes use the default."""
    return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _max_argmax(x: Array, axis: int) -> tuple[Array, Array]:
    """Maximum and first index of the maximum along `axis` in one variadic reduction; NaN wins (propagates)."""

    def pick(a, b):
        value_a, index_a = a
        value_b, index_b = b
        take_a = (value_a > value_b) | (value_a != value_a)
        take_index_a = take_a | ((value_a == value_b) & (index_a < index_b))
        return jax.lax.select(take_a, value_a, value_b), jax.lax.select(take_index_a, index_a, index_b)

    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
    return jax.lax.reduce((x, index), init, pick, (axis,))


def _index_dtype(hw: int) -> Any:
    return jnp.uint8 if hw <= 256 else jnp.int32


def _block_similarity(probe: Array, gallery_block: Array, probe_vis: Array | None,
                      gallery_vis_block: Array | None, precision) -> tuple[Array, Array]:
    """Raw and weighted float32 similarities `[n, p, hw, cb, hw]`: probe `[n, p, hw, c]` x block `[n, cb, hw, c]`."""
    n, p, hw, c = probe.shape
    cb = gallery_block.shape[1]
    raw = jax.lax.dot_general(probe.reshape(n, p * hw, c), gallery_block.reshape(n, cb * hw, c),
                              (((2,), (2,)), ((0,), (0,))), precision=precision,
                              preferred_element_type=jnp.float32).reshape(n, p, hw, cb, hw)
    weighted = raw
    if probe_vis is not None:
        weighted = weighted * probe_vis[:, :, :, None, None]
    if gallery_vis_block is not None:
        weighted = weighted * gallery_vis_block[:, None, None]
    return raw, weighted


def _over_blocks(fn, xs):
    """`jax.lax.map(fn, xs)` over the leading (block) axis; a single block runs without a loop."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)


def _features_of(x1: Array, x2: Array) -> Array:
    """`[n, p, hw_s, cb]` best gallery match per probe location and `[n, p, cb, hw_r]` best probe match per
    gallery location -> `[n, p, cb, 2hw]`."""
    return jnp.concatenate([x1.transpose(0, 1, 3, 2), x2], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_match(probe: Array, gallery_blocks: Array, probe_vis: Array | None,
                 gallery_vis_blocks: Array | None, precision) -> Array:
    """Matching features of probe `[n, p, hw, c]` against gallery blocks `[nb, n, cb, hw, c]`.

    Visibility maps are float32 `[n, p, hw]` and `[nb, n, cb, hw]` (or None). Returns float32
    `[nb, n, p, cb, 2hw]`.
    """

    def block(part):
        gallery_block, gallery_vis_block = part
        _, weighted = _block_similarity(probe, gallery_block, probe_vis, gallery_vis_block, precision)
        return _features_of(weighted.max(axis=4), weighted.max(axis=2))

    return _over_blocks(block, (gallery_blocks, gallery_vis_blocks))


def _block_match_fwd(probe, gallery_blocks, probe_vis, gallery_vis_blocks, precision):
    # symbolic_zeros: every array argument arrives as CustomVJPPrimal(value, perturbed).
    feature_grad = probe.perturbed or gallery_blocks.perturbed
    vis_grad = any(v is not None and v.perturbed for v in (probe_vis, gallery_vis_blocks))
    probe, gallery_blocks = probe.value, gallery_blocks.value
    probe_vis = None if probe_vis is None else probe_vis.value
    gallery_vis_blocks = None if gallery_vis_blocks is None else gallery_vis_blocks.value
    index_dtype = _index_dtype(probe.shape[2])

    def block(part):
        gallery_block, gallery_vis_block = part
        raw, weighted = _block_similarity(probe, gallery_block, probe_vis, gallery_vis_block, precision)
        x1, a1 = _max_argmax(weighted, 4)  # [n, p, hw_s, cb]
        x2, a2 = _max_argmax(weighted, 2)  # [n, p, cb, hw_r]
        # The unweighted similarity at each argmax: d(max)/d(visibility) needs it, and only it.
        t1 = t2 = None
        if vis_grad:
            t1 = jnp.take_along_axis(raw, a1[..., None], axis=4)[..., 0]
            t2 = jnp.take_along_axis(raw, a2[:, :, None], axis=2)[:, :, 0]
        return _features_of(x1, x2), (a1.astype(index_dtype), a2.astype(index_dtype), t1, t2)

    out, (a1, a2, t1, t2) = _over_blocks(block, (gallery_blocks, gallery_vis_blocks))
    features = (probe, gallery_blocks) if feature_grad else None
    return out, (features, probe_vis, gallery_vis_blocks, a1, a2, t1, t2)


def _block_match_bwd(precision, residuals, cotangent):
    features, probe_vis, gallery_vis_blocks, a1, a2, t1, t2 = residuals
    if isinstance(cotangent, SymbolicZero) or (features is None and t1 is None):
        return None, None, None, None
    nb, n, p, cb, hw2 = cotangent.shape
    hw = hw2 // 2
    # Cotangents of the two maxima in the layouts of a1 [nb, n, p, hw_s, cb] and a2 [nb, n, p, cb, hw_r].
    d1 = cotangent[..., :hw].transpose(0, 1, 2, 4, 3)
    d2 = cotangent[..., hw:]
    ones = jnp.ones((), jnp.float32)
    locations = jnp.arange(hw, dtype=jnp.int32)

    def block(carry, part):
        d_probe, d_probe_vis = carry
        gallery_block, gallery_vis_block, a1_b, a2_b, d1_b, d2_b, t1_b, t2_b = part
        at_a1 = a1_b.astype(jnp.int32)[..., None] == locations                     # [n, p, s, cb, r]
        at_a2 = a2_b.astype(jnp.int32)[:, :, None] == locations[:, None, None]     # [n, p, s, cb, r]

        def scatter(v1, v2):
            """The dense [n, p, s, cb, r] tensor holding v1 at the row maxima and v2 at the column maxima."""
            return jnp.where(at_a1, v1[..., None], 0.0) + jnp.where(at_a2, v2[:, :, None], 0.0)

        v_probe = ones if probe_vis is None else probe_vis[:, :, :, None, None]
        v_gallery = ones if gallery_vis_block is None else gallery_vis_block[:, None, None]
        outputs = [None, None]
        if features is not None:
            probe = features[0]
            c = probe.shape[-1]
            d_sim = (scatter(d1_b, d2_b) * v_probe * v_gallery).reshape(n, p * hw, cb * hw).astype(probe.dtype)
            d_probe = d_probe + jax.lax.dot_general(
                d_sim, gallery_block.reshape(n, cb * hw, c), (((2,), (1,)), ((0,), (0,))), precision=precision,
                preferred_element_type=jnp.float32)
            outputs[0] = jax.lax.dot_general(
                d_sim, probe.reshape(n, p * hw, c), (((1,), (1,)), ((0,), (0,))), precision=precision,
                preferred_element_type=jnp.float32).reshape(n, cb, hw, c).astype(gallery_block.dtype)
        if t1 is not None:
            d_raw = scatter(d1_b * t1_b, d2_b * t2_b)
            d_probe_vis = d_probe_vis + jnp.sum(d_raw * v_gallery, axis=(3, 4))
            outputs[1] = jnp.sum(d_raw * v_probe, axis=(1, 2))
        return (d_probe, d_probe_vis), tuple(outputs)

    gallery_blocks = None if features is None else features[1]
    init = (None if features is None else jnp.zeros((n, p * hw, features[0].shape[-1]), jnp.float32),
            None if t1 is None else jnp.zeros((n, p, hw), jnp.float32))
    parts = (gallery_blocks, gallery_vis_blocks, a1, a2, d1, d2, t1, t2)
    if nb == 1:
        (d_probe, d_probe_vis), (d_gallery, d_gallery_vis) = block(init, jax.tree.map(lambda x: x[0], parts))
        d_gallery, d_gallery_vis = jax.tree.map(lambda x: x[None], (d_gallery, d_gallery_vis))
    else:
        (d_probe, d_probe_vis), (d_gallery, d_gallery_vis) = jax.lax.scan(block, init, parts)
    if d_probe is not None:
        d_probe = d_probe.reshape(features[0].shape).astype(features[0].dtype)
    return (d_probe, d_gallery, None if probe_vis is None else d_probe_vis,
            None if gallery_vis_blocks is None else d_gallery_vis)


_block_match.defvjp(_block_match_fwd, _block_match_bwd, symbolic_zeros=True)


def plan_blocks(p: int, g: int, hw: int, block_bytes: int = BLOCK_BYTES) -> tuple[int, int]:
    """How `match_features` cuts a gallery: (number of blocks, gallery images per block).

    A block of one group holds `p * block * hw * hw` float32 similarities, at most `block_bytes` (but at
    least one gallery image). Blocks are equal; the gallery is zero-padded to `num_blocks * block`.

    Args:
        p: probe images per group.
        g: gallery images per group.
        hw: locations per feature map.
        block_bytes: bound on the float32 similarities of one block of one group.

    Returns:
        (num_blocks, images per block).
    """
    if block_bytes < 1:
        raise ValueError(f"oaml_jax/models/qaconv.py: block_bytes must be >= 1, got {block_bytes}")
    most = max(1, block_bytes // (4 * p * hw * hw))
    num_blocks = -(-g // most)
    return num_blocks, -(-g // num_blocks)


def match_features(probe: Array, gallery: Array, probe_vis: Array | None = None,
                   gallery_vis: Array | None = None, dtype: Any = jnp.float32,
                   block_bytes: int = BLOCK_BYTES) -> Array:
    """All-pairs local matching features (memory-bounded, custom VJP).

    Gradients reach the features and, unless they are stop_gradient'ed, the visibility maps. Where a
    maximum is tied (e.g. a row of zero visibility), its gradient goes to the first maximal location (a
    valid subgradient; autodiff of `max` would share it among the tied ones). In the backward pass the
    gradient of S is cast to `dtype` before its two GEMMs, as mixed precision casts activation gradients.

    Args:
        probe: `[p, h, w, c]` channel-normalized features, or `[n, p, h, w, c]` for n groups.
        gallery: `[g, h, w, c]`, or `[n, g, h, w, c]`.
        probe_vis: `[p, h, w]` (`[n, p, h, w]`) visibility of the probe locations (>= 0), or None for no
            weighting.
        gallery_vis: `[g, h, w]` (`[n, g, h, w]`) visibility of the gallery locations, or None.
        dtype: compute dtype of the GEMMs (accumulated in float32).
        block_bytes: float32 similarities held at once per group (see `plan_blocks`).

    Returns:
        `[p, g, 2hw]` (`[n, p, g, 2hw]`) float32: best gallery match of each probe location, then best probe
        match of each gallery location.

    Raises:
        ValueError: on mismatched shapes.
    """
    _check_pair(probe, gallery, probe_vis, gallery_vis)
    if probe.ndim == 4:
        out = match_features(probe[None], gallery[None], None if probe_vis is None else probe_vis[None],
                             None if gallery_vis is None else gallery_vis[None], dtype, block_bytes)
        return out[0]
    n, p, h, w, c = probe.shape
    g, hw = gallery.shape[1], h * w
    num_blocks, block = plan_blocks(p, g, hw, block_bytes)
    pad = num_blocks * block - g

    def blocks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.moveaxis(x.reshape(n, num_blocks, block, *x.shape[2:]), 1, 0)

    probe_vis = None if probe_vis is None else probe_vis.reshape(n, p, hw).astype(jnp.float32)
    gallery_vis = None if gallery_vis is None else blocks(gallery_vis.reshape(n, g, hw).astype(jnp.float32))
    x = _block_match(probe.reshape(n, p, hw, c).astype(dtype), blocks(gallery.reshape(n, g, hw, c).astype(dtype)),
                     probe_vis, gallery_vis, _precision(dtype))
    return jnp.moveaxis(x, 0, 2).reshape(n, p, num_blocks * block, 2 * hw)[:, :, :g]


def match_features_einsum(probe: Array, gallery: Array, probe_vis: Array | None = None,
                          gallery_vis: Array | None = None, dtype: Any = jnp.float32) -> Array:
    """`match_features` as one `[p, g, hw, hw]` einsum and plain autodiff: the formulation before the
    memory-bounded matcher, which keeps S (and more) for the backward pass. It is the reference of the
    tests and of `bench/qaconv_train.py --old`; same arguments and result as `match_features` (ungrouped).
    """
    _check_pair(probe, gallery, probe_vis, gallery_vis)
    p, h, w, c = probe.shape
    g = gallery.shape[0]
    sim = jnp.einsum("psc,grc->pgsr", probe.reshape(p, h * w, c).astype(dtype),
                     gallery.reshape(g, h * w, c).astype(dtype), precision=_precision(dtype),
                     preferred_element_type=jnp.float32)
    if probe_vis is not None:
        sim = sim * probe_vis.reshape(p, 1, h * w, 1).astype(jnp.float32)
    if gallery_vis is not None:
        sim = sim * gallery_vis.reshape(1, g, 1, h * w).astype(jnp.float32)
    return jnp.concatenate([sim.max(axis=3), sim.max(axis=2)], axis=-1)


def match_pair_features(a: Array, b: Array, a_vis: Array | None = None, b_vis: Array | None = None,
                        dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """Local matching features of aligned pairs (a[i] vs b[i]) in both directions.

    Each pair is a group of one probe and one gallery image for `match_features`; swapping the two halves of
    its features swaps the roles of the two images.

    Args:
        a: `[n, h, w, c]` channel-normalized features.
        b: `[n, h, w, c]` channel-normalized features.
        a_vis: `[n, h, w]` or None.
        b_vis: `[n, h, w]` or None.
        dtype: compute dtype of the GEMMs.

    Returns:
        `([n, 2hw], [n, 2hw])` float32 features with a as probe and with b as probe.
    """
    _check_pair(a, b, a_vis, b_vis)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"oaml_jax/models/qaconv.py: pair sides must have the same count, got {a.shape[0]} "
                         f"and {b.shape[0]}")
    x = match_features(a[:, None], b[:, None], None if a_vis is None else a_vis[:, None],
                       None if b_vis is None else b_vis[:, None], dtype)[:, 0, 0]
    hw = x.shape[-1] // 2
    return x, jnp.concatenate([x[:, hw:], x[:, :hw]], axis=-1)


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
                           precision=_HIGHEST)
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
    _check_pair(probe, gallery, probe_vis, gallery_vis)
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
    _check_pair(a, b, a_vis, b_vis)
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
