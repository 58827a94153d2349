"""The QAConv matcher: all-pairs local matching features of feature maps, memory-bounded, with a custom VJP.

For probe features P `[p, hw, c]` and gallery features G `[g, hw, c]` (L2-normalized over channels):

    S[p, g, s, r] = sum_c P[p, s, c] G[g, r, c]        s: probe location, r: gallery location
    S *= v_p[p, s] * v_g[g, r]                        each location weighted by its own image's map
    x  = concat(max_r S, max_s S)                     [p, g, 2hw]

`oaml_jax.models.qaconv.QAConv` scores x. With a leading group axis (probe `[n, p, ...]`, gallery
`[n, g, ...]`), groups are matched independently, in one batched GEMM.

`match_features` computes S of a group as one 2-D GEMM `[p*hw, c] @ [c, g*hw]` and takes the maxima over
every `hw x hw` block in both directions without ever keeping S: the gallery is cut into blocks of at most
`block_bytes` of float32 similarities per group, and a `jax.custom_vjp` saves only the argmax positions
(uint8 up to 16x16 grids) for the backward pass, which rebuilds the sparse gradient of S one block at a time
and multiplies it back with two GEMMs.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
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


def _check_maps(where: str, features: Array, vis: Array | None) -> None:
    if features.ndim not in (4, 5):
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py {where}: features must be [n, h, w, c] or grouped "
                         f"[groups, n, h, w, c], got shape {tuple(features.shape)}")
    if vis is not None and vis.shape != features.shape[:-1]:
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py {where}: visibility map must be {features.shape[:-1]} "
                         f"(the shape of its features without c), got shape {tuple(vis.shape)}")


def check_pair(probe: Array, gallery: Array, probe_vis: Array | None, gallery_vis: Array | None) -> None:
    """Checks that probe and gallery maps (and their visibility maps) fit together.

    Args:
        probe: `[p, h, w, c]`, or `[n, p, h, w, c]` for n groups.
        gallery: `[g, h, w, c]`, or `[n, g, h, w, c]`.
        probe_vis: `[p, h, w]` (`[n, p, h, w]`) or None.
        gallery_vis: `[g, h, w]` (`[n, g, h, w]`) or None.

    Raises:
        ValueError: naming the mismatched shapes.
    """
    _check_maps("probe", probe, probe_vis)
    _check_maps("gallery", gallery, gallery_vis)
    if probe.ndim != gallery.ndim or probe.shape[-3:] != gallery.shape[-3:]:
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py: probe and gallery maps must share [h, w, c] and the "
                         f"group axis, got shapes {tuple(probe.shape)} and {tuple(gallery.shape)}")
    if probe.ndim == 5 and probe.shape[0] != gallery.shape[0]:
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py: probe and gallery must have the same number of groups, "
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
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py: block_bytes must be >= 1, got {block_bytes}")
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
    check_pair(probe, gallery, probe_vis, gallery_vis)
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
    check_pair(probe, gallery, probe_vis, gallery_vis)
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
    check_pair(a, b, a_vis, b_vis)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"oaml_jax/models/qaconv_matcher.py: pair sides must have the same count, got {a.shape[0]} "
                         f"and {b.shape[0]}")
    x = match_features(a[:, None], b[:, None], None if a_vis is None else a_vis[:, None],
                       None if b_vis is None else b_vis[:, None], dtype)[:, 0, 0]
    hw = x.shape[-1] // 2
    return x, jnp.concatenate([x[:, hw:], x[:, :hw]], axis=-1)
