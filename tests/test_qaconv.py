"""QAConv: einsum vs loop reference, occlusion weighting, chunked/pair evaluation, and the losses."""

import functools
import math

import jax
import numpy as np
import pytest

from oaml_jax.models.qaconv import (QAConv, hard_triplet_loss, l2_normalize_channels, pairwise_matching_loss,
                                    qaconv_loss, qaconv_pair_scores, qaconv_scores_chunked, retrieval_accuracy)

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
