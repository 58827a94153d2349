"""QAConv: matcher vs loop and einsum references (values, custom-VJP gradients, memory), occlusion weighting,
chunked/pair evaluation, and the losses."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax.models.qaconv import (QAConv, hard_triplet_loss, pairwise_matching_loss, qaconv_loss, qaconv_pair_scores,
                                    qaconv_scores_chunked, retrieval_accuracy)
from oaml_jax.models.qaconv_matcher import l2_normalize_channels, match_features, match_features_einsum, plan_blocks

H, W, C = 2, 2, 5
HW = H * W
EPS = 1e-5


def _features(seed, n):
    """Channel-normalized random maps, made in numpy so that no shape needs its own compilation."""
    x = np.random.default_rng(seed).normal(size=(n, H, W, C)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _vis(seed, n):
    return np.random.default_rng(seed).uniform(size=(n, H, W)).astype(np.float32)


def _variables():
    fc_kernel = np.linspace(-0.5, 1.0, 2 * HW, dtype=np.float32)[:, None]
    return {
        "params": {"bn": {"scale": np.array([1.5], np.float32), "bias": np.array([0.2], np.float32)},
                   "fc": {"kernel": fc_kernel, "bias": np.array([0.3], np.float32)},
                   "logit_bn": {"scale": np.array([0.7], np.float32), "bias": np.array([-0.1], np.float32)}},
        "batch_stats": {"bn": {"mean": np.array([0.1], np.float32), "var": np.array([2.0], np.float32)},
                        "logit_bn": {"mean": np.array([0.5], np.float32), "var": np.array([0.5], np.float32)}},
    }


@functools.partial(jax.jit, static_argnames=("train",))
def _apply(variables, probe, gallery, probe_vis, gallery_vis, train=False):
    return QAConv().apply(variables, probe, gallery, probe_vis, gallery_vis, train=train,
                          mutable=["batch_stats"] if train else False)


def _loop_reference(variables, probe, gallery, probe_vis, gallery_vis, train):
    """Plain Python loops over pairs and locations; returns (scores [p, g], new running stats)."""
    probe, gallery = np.asarray(probe, np.float64), np.asarray(gallery, np.float64)
    p, g = probe.shape[0], gallery.shape[0]
    pf, gf = probe.reshape(p, HW, C), gallery.reshape(g, HW, C)
    pv = np.ones((p, HW)) if probe_vis is None else np.asarray(probe_vis, np.float64).reshape(p, HW)
    gv = np.ones((g, HW)) if gallery_vis is None else np.asarray(gallery_vis, np.float64).reshape(g, HW)
    x = np.zeros((p, g, 2 * HW))
    for i in range(p):
        for j in range(g):
            sim = np.zeros((HW, HW))
            for s in range(HW):
                for r in range(HW):
                    sim[s, r] = sum(pf[i, s, k] * gf[j, r, k] for k in range(C)) * pv[i, s] * gv[j, r]
            x[i, j, :HW] = sim.max(axis=1)
            x[i, j, HW:] = sim.max(axis=0)
    params, stats = variables["params"], variables["batch_stats"]
    new_stats = {}

    def bn(v, name):
        if train:
            mean, var = v.mean(), v.var()
            old = stats[name]
            new_stats[name] = (0.9 * old["mean"][0] + 0.1 * mean, 0.9 * old["var"][0] + 0.1 * var)
        else:
            mean, var = stats[name]["mean"][0], stats[name]["var"][0]
        return (v - mean) / math.sqrt(var + EPS) * params[name]["scale"][0] + params[name]["bias"][0]

    x = bn(x, "bn")
    logits = x @ params["fc"]["kernel"][:, 0] + params["fc"]["bias"][0]
    return bn(logits, "logit_bn"), new_stats


def test_l2_normalize_channels_unit_norm_and_zero_safe():
    x = np.concatenate([np.random.default_rng(0).normal(size=(1, 2, 2, 3)), np.zeros((1, 2, 2, 3))])
    y = jax.jit(l2_normalize_channels)(x)
    np.testing.assert_allclose(np.linalg.norm(y[0], axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(y[1]) == 0.0)


def test_init_values():
    variables = jax.jit(QAConv().init)(jax.random.key(0), _features(0, 2), _features(1, 3))
    np.testing.assert_allclose(variables["params"]["fc"]["kernel"], np.full((2 * HW, 1), 1.0 / HW))
    np.testing.assert_allclose(variables["params"]["fc"]["bias"], [0.0])
    assert variables["batch_stats"]["bn"]["mean"].shape == (1,)
    assert variables["params"]["logit_bn"]["scale"].shape == (1,)


@pytest.mark.parametrize("train", [False, True])
def test_einsum_matches_loop_reference(train):
    probe, gallery, pv, gv = _features(0, 2), _features(1, 3), _vis(2, 2), _vis(3, 3)
    out = _apply(_variables(), probe, gallery, pv, gv, train=train)
    expected, new_stats = _loop_reference(_variables(), probe, gallery, pv, gv, train)
    if train:
        scores, updates = out
        for name, (mean, var) in new_stats.items():
            np.testing.assert_allclose(updates["batch_stats"][name]["mean"], [mean], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(updates["batch_stats"][name]["var"], [var], rtol=1e-4, atol=1e-6)
    else:
        scores = out
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_all_ones_map_equals_no_weighting():
    probe, gallery = _features(0, 2), _features(1, 3)
    weighted = _apply(_variables(), probe, gallery, np.ones((2, H, W), np.float32), np.ones((3, H, W), np.float32))
    np.testing.assert_allclose(weighted, _apply(_variables(), probe, gallery, None, None), rtol=1e-6)


def test_location_with_zero_visibility_contributes_nothing():
    probe, gallery, pv, gv = _features(0, 2), _features(1, 3), _vis(2, 2), _vis(3, 3)
    pv[0, 0, 1], gv[2, 1, 0] = 0.0, 0.0
    base = _apply(_variables(), probe, gallery, pv, gv)
    probe2, gallery2 = probe.copy(), gallery.copy()
    probe2[0, 0, 1] = _features(5, 1)[0, 0, 0]
    gallery2[2, 1, 0] = _features(6, 1)[0, 0, 0]
    np.testing.assert_allclose(_apply(_variables(), probe2, gallery2, pv, gv), base, rtol=1e-6)
    # The same feature change does move the scores when the location is visible.
    assert not np.allclose(_apply(_variables(), probe2, gallery2, None, None),
                           _apply(_variables(), probe, gallery, None, None))


def test_chunked_equals_unchunked():
    probe, gallery, pv, gv = _features(0, 5), _features(1, 7), _vis(2, 5), _vis(3, 7)
    full = _apply(_variables(), probe, gallery, pv, gv)
    chunked = qaconv_scores_chunked(_variables(), probe, gallery, pv, gv, chunk_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)


def test_pair_scores_are_the_symmetrized_diagonal():
    n = 5
    a, b, av, bv = _features(0, n), _features(1, n), _vis(2, n), _vis(3, n)
    both, both_vis = np.concatenate([a, b]), np.concatenate([av, bv])
    full = np.asarray(_apply(_variables(), both, both, both_vis, both_vis))
    expected = 0.5 * (np.diag(full[:n, n:]) + np.diag(full[n:, :n]))
    pairs = qaconv_pair_scores(_variables(), a, b, av, bv, chunk_size=2)
    np.testing.assert_allclose(pairs, expected, rtol=1e-5, atol=1e-6)


def test_mismatched_visibility_map_is_rejected():
    with pytest.raises(ValueError, match=r"gallery: visibility map must be \(3, 2, 2\)"):
        qaconv_scores_chunked(_variables(), _features(0, 2), _features(1, 3), None, np.ones((3, 1, 1)))


SCORES = np.array([[-3.0, 1.0, -1.0, 0.5],
                   [2.5, 3.0, 0.0, -2.0],
                   [1.0, -0.5, 1.5, 0.2],
                   [0.3, 0.1, -0.3, 1.0]], np.float32)
LABELS = np.array([0, 0, 1, 2], np.int32)


@jax.jit
def _loss_outputs(scores, labels):
    """Every loss output for one labelling, compiled once for all the 4x4 cases."""
    loss, parts = qaconv_loss(scores, labels, triplet_weight=0.5, margin=1.0)
    trip_grad = jax.grad(lambda s: hard_triplet_loss(s, labels, margin=1.0)[0])(scores)
    return dict(pair=pairwise_matching_loss(scores, labels), triplet=hard_triplet_loss(scores, labels, 1.0),
                loss=loss, parts=parts, accuracy=retrieval_accuracy(scores, labels), trip_grad=trip_grad)


def _bce(x, y):
    return math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))


def test_losses_known_answer():
    pair = sum(_bce(float(SCORES[i, j]), LABELS[i] == LABELS[j]) for i in range(4) for j in range(4)) / 4
    out = _loss_outputs(SCORES, LABELS)
    np.testing.assert_allclose(out["pair"], pair, rtol=1e-6)
    # Row 0: min_pos = 1.0 (the diagonal -3.0 is not a positive), max_neg = 0.5 -> 0.5.
    # Row 1: min_pos = 2.5, max_neg = 0.0 -> 0. Rows 2 and 3 have no positive: left out.
    trip, valid = out["triplet"]
    np.testing.assert_allclose(trip, 0.25, rtol=1e-6)
    np.testing.assert_allclose(valid, 0.5)
    np.testing.assert_allclose(out["loss"], pair + 0.5 * 0.25, rtol=1e-6)
    np.testing.assert_allclose(out["parts"]["loss_pair"], pair, rtol=1e-6)
    np.testing.assert_allclose(out["parts"]["loss_trip"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(out["parts"]["trip_valid"], 0.5)
    # Rows 0 and 1 find their positive; rows 2 and 3 (no other positive) cannot.
    np.testing.assert_allclose(out["accuracy"], 0.5)


def test_triplet_masks_rows_without_positive_or_negative():
    # Row 3 has no positive; its hinge would be 1 - (inf - max_neg) if faked with a fill value.
    labels = np.array([0, 0, 0, 1], np.int32)
    out = _loss_outputs(SCORES, labels)
    loss, valid = out["triplet"]
    per_row = [max(0.0, 1.0 - (min(SCORES[i, j] for j in range(3) if j != i) - SCORES[i, 3])) for i in range(3)]
    np.testing.assert_allclose(loss, sum(per_row) / 3, rtol=1e-6)
    np.testing.assert_allclose(valid, 0.75)
    grad = np.asarray(out["trip_grad"])
    assert np.all(np.isfinite(grad)) and np.all(grad[3] == 0.0)
    # No negatives anywhere: nothing valid, loss exactly 0 with a finite zero gradient.
    out = _loss_outputs(SCORES, np.zeros(4, np.int32))
    loss, valid = out["triplet"]
    assert float(loss) == 0.0 and float(valid) == 0.0
    assert np.all(np.asarray(out["trip_grad"]) == 0.0)


def _matcher_vjps(fn, probe, gallery, probe_vis, gallery_vis, cotangents):
    """Value and (d probe, d gallery, d probe_vis, d gallery_vis) of `fn` for each cotangent."""
    value, vjp = jax.vjp(fn, probe, gallery, probe_vis, gallery_vis)
    return value, [vjp(ct) for ct in cotangents]


@functools.partial(jax.jit, static_argnames=("block_bytes",))
def _matcher_and_reference(probe, gallery, probe_vis, gallery_vis, cotangents, block_bytes):
    new = _matcher_vjps(functools.partial(match_features, block_bytes=block_bytes), probe, gallery, probe_vis,
                        gallery_vis, cotangents)
    return new, _matcher_vjps(match_features_einsum, probe, gallery, probe_vis, gallery_vis, cotangents)


@pytest.mark.parametrize("weighted", [True, False])
def test_custom_vjp_matcher_equals_einsum_autodiff(weighted):
    """Values and gradients (features and maps) of both matching directions against the einsum reference.

    float32; tolerance rtol = atol = 1e-5 (the two compute the same sums in different orders). block_bytes
    makes 3 gallery blocks of 2 images for 5 gallery images (one padded), so the blocked loops, the padding
    and the one-block path of `_matcher_and_reference`'s first call are all exercised.
    """
    probe, gallery = _features(0, 3), _features(1, 5)
    probe_vis, gallery_vis = (_vis(2, 3), _vis(3, 5)) if weighted else (None, None)
    weights = np.random.default_rng(4).normal(size=(3, 5, 2 * HW)).astype(np.float32)
    first, second = weights.copy(), weights.copy()
    first[..., HW:], second[..., :HW] = 0.0, 0.0  # probe -> gallery maxima; gallery -> probe maxima
    for block_bytes in (4 * 3 * HW * HW * 2, 2**20):
        assert plan_blocks(3, 5, HW, block_bytes) == ((3, 2) if block_bytes < 2**20 else (1, 5))
        (value, grads), (ref_value, ref_grads) = _matcher_and_reference(
            probe, gallery, probe_vis, gallery_vis, (first, second), block_bytes=block_bytes)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
        for direction, (got, want) in enumerate(zip(grads, ref_grads)):
            names = ("probe", "gallery", "probe_vis", "gallery_vis")
            for name, g, r in zip(names, got, want):
                if r is None:
                    assert g is None
                    continue
                assert np.abs(r).max() > 0, (direction, name)
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"{name}, direction {direction}")


def test_bfloat16_matcher_follows_float32_reference():
    """bfloat16 GEMMs (inputs and the backward pass's gradient of S rounded to 8 bits of mantissa): values and
    gradients within 2% of the largest float32 entry; cotangents come back in the inputs' dtypes."""
    probe, gallery, pv, gv = _features(0, 3), _features(1, 5), _vis(2, 3), _vis(3, 5)
    weights = np.random.default_rng(4).normal(size=(3, 5, 2 * HW)).astype(np.float32)

    @jax.jit
    def run(probe, gallery, pv, gv):
        def loss(dtype, fn):
            return lambda *args: jnp.sum(fn(*args, dtype=dtype) * weights)
        args = (probe, gallery, pv, gv)
        return (jax.value_and_grad(loss(jnp.bfloat16, match_features), argnums=(0, 1, 2, 3))(*args),
                jax.value_and_grad(loss(jnp.float32, match_features_einsum), argnums=(0, 1, 2, 3))(*args))

    got, want = run(probe, gallery, pv, gv)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=0.02 * np.abs(w).max(), rtol=0)


def test_loss_shapes_are_checked():
    with pytest.raises(ValueError, match=r"got scores \(2, 3, 4\) and labels \(2, 3\)"):
        qaconv_loss(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"got scores \(4, 4\) and labels \(2, 2\)"):
        retrieval_accuracy(np.zeros((4, 4), np.float32), np.zeros((2, 2), np.int32))


def test_detached_maps_get_no_gradient_and_features_keep_theirs():
    probe, gallery, pv, gv = _features(0, 3), _features(1, 4), _vis(2, 3), _vis(3, 4)

    def loss(probe, pv, detach):
        maps = jax.lax.stop_gradient(pv) if detach else pv
        return jnp.sum(match_features(probe, gallery, maps, gv) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    d_probe, d_maps = grad(probe, pv, True)
    d_probe_attached, d_maps_attached = grad(probe, pv, False)
    assert np.all(np.asarray(d_maps) == 0.0) and np.abs(d_maps_attached).max() > 0
    np.testing.assert_array_equal(d_probe, d_probe_attached)


def test_grouped_matching_equals_each_group_alone():
    probe, gallery, pv, gv = _features(0, 6), _features(1, 8), _vis(2, 6), _vis(3, 8)
    grouped = jax.jit(match_features)(probe.reshape(2, 3, H, W, C), gallery.reshape(2, 4, H, W, C),
                                      pv.reshape(2, 3, H, W), gv.reshape(2, 4, H, W))
    assert grouped.shape == (2, 3, 4, 2 * HW)
    for i in range(2):
        alone = match_features_einsum(probe[3 * i:3 * i + 3], gallery[4 * i:4 * i + 4], pv[3 * i:3 * i + 3],
                                      gv[4 * i:4 * i + 4])
        np.testing.assert_allclose(grouped[i], alone, rtol=1e-6, atol=1e-6)


def test_matcher_propagates_nan():
    probe, gallery = _features(0, 2), _features(1, 3)
    probe[1, 0, 0, 0] = np.nan
    out = np.asarray(jax.jit(match_features)(probe, gallery))
    assert np.isnan(out[1]).any() and not np.isnan(out[0]).any()


def test_plan_blocks_bound_and_errors():
    # 512 x 512 images of 7x7 under 256 MiB: 54 images fit, so 10 blocks of 52 (520, 8 padded).
    assert plan_blocks(512, 512, 49, 256 * 2**20) == (10, 52)
    assert plan_blocks(4, 7, 4, 1) == (7, 1)  # at least one image per block
    with pytest.raises(ValueError, match="block_bytes must be >= 1, got 0"):
        plan_blocks(4, 7, 4, 0)


def _loss_memory(batch, channels, old):
    """Compiled temporary bytes of value_and_grad of the QAConv training loss (7x7 maps, float32)."""
    module = QAConv(block_bytes=16 * 2**20)
    feats = jax.ShapeDtypeStruct((batch, 7, 7, channels), np.float32)
    maps = jax.ShapeDtypeStruct((batch, 7, 7), np.float32)
    labels = jax.ShapeDtypeStruct((batch,), np.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), feats, feats, maps, maps)

    def loss(params, batch_stats, features, vis, labels):
        variables_ = {"params": params, "batch_stats": batch_stats}
        if old:
            x = match_features_einsum(features, features, vis, vis)
            scores, _ = module.apply(variables_, x, train=True, method=QAConv.score_features,
                                     mutable=["batch_stats"])
        else:
            scores, _ = module.apply(variables_, features, features, vis, vis, train=True, mutable=["batch_stats"])
        return qaconv_loss(scores, labels)[0]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).lower(
        variables["params"], variables["batch_stats"], feats, maps, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_training_loss_temporary_memory_is_bounded():
    """B = 128, 7x7x64: S alone is 128^2 * 49^2 float32 = 150 MiB, which the einsum path keeps (and more:
    756 MiB of temporaries on CPU when written); the blocked matcher with 16 MiB blocks needs 37 MiB. The
    bound, 64 MiB, fails as soon as S (or a quarter of it) is kept for the backward pass."""
    bound = 64 * 2**20
    assert _loss_memory(128, 64, old=False) < bound
    assert _loss_memory(128, 64, old=True) > 4 * bound
