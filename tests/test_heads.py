"""Known-answer tests of the margin heads on a hand-sized case (E=2, C=3)."""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax.models.heads import AdaFace, ArcFace, CosFace

# Columns of different lengths: the heads must normalize them.
KERNEL = np.array([[2.0, 0.0, -1.0],
                   [0.0, 3.0, -1.0]], np.float32)
UNIT_COLUMNS = [(1.0, 0.0), (0.0, 1.0), (-1.0 / math.sqrt(2.0), -1.0 / math.sqrt(2.0))]
ANGLES = [0.3, 1.0, 2.0, 0.3]
EMBEDDINGS = np.array([[math.cos(a), math.sin(a)] for a in ANGLES], np.float32)
NORMS = np.array([[10.0], [20.0], [50.0], [30.0]], np.float32)
# Row 3 targets the class pointing (almost) away from it: theta + 0.5 passes pi for ArcFace.
LABELS = np.array([0, 1, 2, 2], np.int32)
S, EPS = 64.0, 1e-3


def _plain_cosines():
    cos = [[e[0] * w[0] + e[1] * w[1] for w in UNIT_COLUMNS] for e in EMBEDDINGS.tolist()]
    return [[min(max(c, -1.0 + EPS), 1.0 - EPS) for c in row] for row in cos]


def _expected_logits(target_fn):
    """s * cos everywhere, s * target_fn(row, cos) on the target column."""
    out = []
    for i, row in enumerate(_plain_cosines()):
        out.append([S * (target_fn(i, c) if j == LABELS[i] else c) for j, c in enumerate(row)])
    return np.array(out)


@functools.partial(jax.jit, static_argnames=("head", "train", "mutable"))
def _apply(head, variables, train, mutable):
    return head.apply(variables, jnp.asarray(EMBEDDINGS), jnp.asarray(NORMS), jnp.asarray(LABELS),
                      train=train, mutable=["batch_stats"] if mutable else False)


def _variables(batch_mean=20.0, batch_std=1.0):
    return {"params": {"kernel": jnp.asarray(KERNEL)},
            "batch_stats": {"batch_mean": jnp.float32(batch_mean), "batch_std": jnp.float32(batch_std)}}


def test_arcface_known_answer_with_theta_clip():
    def target(i, c):
        theta = math.acos(c) + 0.5
        return math.cos(min(max(theta, EPS), math.pi - EPS))

    assert math.acos(_plain_cosines()[3][2]) + 0.5 > math.pi - EPS  # the clip is exercised
    logits = _apply(ArcFace(num_classes=3, embedding_size=2), {"params": {"kernel": KERNEL}}, True, False)
    np.testing.assert_allclose(logits, _expected_logits(target), rtol=1e-5, atol=1e-4)


def test_cosface_known_answer():
    logits = _apply(CosFace(num_classes=3, embedding_size=2), {"params": {"kernel": KERNEL}}, True, False)
    np.testing.assert_allclose(logits, _expected_logits(lambda i, c: c - 0.35), rtol=1e-5, atol=1e-4)


def test_adaface_train_known_answer_and_ema_update():
    # A small stored std makes the margin scaler of norms 10 and 50 hit both clips; 20 stays inside.
    norms = NORMS[:, 0].tolist()
    new_mean = 0.01 * statistics.mean(norms) + 0.99 * 20.0
    new_std = 0.01 * statistics.stdev(norms) + 0.99 * 1.0  # stdev is the unbiased (n - 1) estimate
    raw = [0.333 * (n - new_mean) / (new_std + EPS) for n in norms]
    scaler = [min(max(r, -1.0), 1.0) for r in raw]
    assert raw[0] < -1.0 and raw[2] > 1.0 and -1.0 < raw[1] < 1.0

    def target(i, c):
        theta = math.acos(c) - 0.4 * scaler[i]
        return math.cos(min(max(theta, EPS), math.pi - EPS)) - (0.4 + 0.4 * scaler[i])

    head = AdaFace(num_classes=3, embedding_size=2)
    logits, updates = _apply(head, _variables(), True, True)
    np.testing.assert_allclose(logits, _expected_logits(target), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["batch_mean"], new_mean, rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["batch_std"], new_std, rtol=1e-6)
    # Only the target column moved away from s * cos.
    plain = S * np.array(_plain_cosines())
    off_target = np.arange(3)[None, :] != LABELS[:, None]
    np.testing.assert_allclose(np.asarray(logits)[off_target], plain[off_target], rtol=1e-5, atol=1e-4)
    assert np.all(np.abs(np.asarray(logits)[~off_target] - plain[~off_target]) > 1.0)

    # Train mode without a mutable collection: same logits, nothing stored.
    np.testing.assert_allclose(_apply(head, _variables(), True, False), logits, rtol=1e-6)


def test_adaface_eval_uses_stored_statistics_without_update():
    scaler = [min(max(0.333 * (n - 20.0) / (1.0 + EPS), -1.0), 1.0) for n in NORMS[:, 0].tolist()]

    def target(i, c):
        theta = math.acos(c) - 0.4 * scaler[i]
        return math.cos(min(max(theta, EPS), math.pi - EPS)) - (0.4 + 0.4 * scaler[i])

    logits, updates = _apply(AdaFace(num_classes=3, embedding_size=2), _variables(), False, True)
    np.testing.assert_allclose(logits, _expected_logits(target), rtol=1e-5, atol=1e-4)
    assert float(updates["batch_stats"]["batch_mean"]) == 20.0
    assert float(updates["batch_stats"]["batch_std"]) == 1.0


def test_adaface_init_statistics_and_cosine():
    head = AdaFace(num_classes=3, embedding_size=2)
    # An "rbg" key: threefry initializers compile slowly on CPU.
    variables = head.init(jax.random.key(0, impl="rbg"), EMBEDDINGS, NORMS, LABELS, train=True)
    assert float(variables["batch_stats"]["batch_mean"]) == 20.0
    assert float(variables["batch_stats"]["batch_std"]) == 100.0
    assert variables["params"]["kernel"].shape == (2, 3)
    cos = head.apply(_variables(), EMBEDDINGS, method=AdaFace.cosine)
    expected = [[e[0] * w[0] + e[1] * w[1] for w in UNIT_COLUMNS] for e in EMBEDDINGS.tolist()]
    np.testing.assert_allclose(cos, expected, rtol=1e-6, atol=1e-6)


def test_adaface_norms_get_no_gradient():
    head = AdaFace(num_classes=3, embedding_size=2)

    def loss(norms):
        logits, _ = head.apply(_variables(100.0, 10.0), EMBEDDINGS, norms, LABELS, train=True,
                               mutable=["batch_stats"])
        return logits.sum()

    assert np.all(np.asarray(jax.grad(loss)(jnp.asarray(NORMS))) == 0.0)


def test_bad_embedding_width_is_rejected():
    with pytest.raises(ValueError, match=r"embeddings must be \[N, 4\] \(embedding_size\)"):
        AdaFace(num_classes=3, embedding_size=4).init(jax.random.key(0), EMBEDDINGS, NORMS, LABELS)
