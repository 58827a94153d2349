"""oaml_jax/optim.py: schedules, the weight-decay mask, and one SGD step by hand."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from oaml_jax import optim


def _optim(**kw) -> ml_collections.ConfigDict:
    cfg = default.get_config().optim
    cfg.update(kw)
    return cfg


def test_step_schedule_scales_with_batch_and_drops():
    sched = optim.lr_schedule(_optim(lr=0.1, drop_epochs=(2, 3)), steps_per_epoch=10, epochs=4,
                              global_batch=1024)
    got = [float(sched(s)) for s in (0, 19, 20, 29, 30, 39)]
    np.testing.assert_allclose(got, [0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-6)


def test_warmup_then_cosine():
    sched = optim.lr_schedule(_optim(lr=0.1, schedule="cosine", warmup_epochs=1), steps_per_epoch=10,
                              epochs=3, global_batch=512)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 20, 30)],
                               [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "poly", r"optim\.schedule='poly' is unknown"),
    ("name", "lamb", r"optim\.name='lamb' is unknown"),
    ("lr", -0.1, r"optim\.lr=-0\.1 must be a positive learning rate"),
    ("lr", 0.0, r"optim\.lr=0\.0 must be a positive learning rate"),
    ("lr", float("nan"), r"optim\.lr=nan must be a positive"),
    ("weight_decay", -5e-4, r"optim\.weight_decay=-0\.0005 must be >= 0"),
    ("momentum", 1.0, r"optim\.momentum=1\.0 must be in \[0, 1\)"),
    ("warmup_epochs", -1.0, r"optim\.warmup_epochs=-1\.0 must be >= 0"),
    ("drop_factor", 0.0, r"optim\.drop_factor=0\.0 must be in \(0, 1\]"),
    ("drop_epochs", (20, 12), r"optim\.drop_epochs=\(20, 12\): expected increasing positive epochs"),
])
def test_check_config_refuses_nonsense_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        optim.check_config({"optim": _optim(**{field: value})}, num_devices=1, process_count=1)


def test_defaults_pass_the_check():
    optim.check_config({"optim": _optim()}, num_devices=1, process_count=1)


PARAMS = {"backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
                       "prelu": {"negative_slope": jnp.ones(2)}, "dense": {"kernel": jnp.ones((4, 2)),
                                                                          "bias": jnp.ones(2)}},
          "head": {"kernel": jnp.ones((2, 5))}}


def test_decay_mask_only_kernels():
    mask = optim.decay_mask(PARAMS)
    assert mask["backbone"]["conv"]["kernel"] and mask["backbone"]["dense"]["kernel"] and mask["head"]["kernel"]
    assert not any([mask["backbone"]["bn"]["scale"], mask["backbone"]["bn"]["bias"],
                    mask["backbone"]["prelu"]["negative_slope"], mask["backbone"]["dense"]["bias"]])


def test_sgd_step_by_hand():
    tx, _ = optim.make_optimizer(_optim(lr=0.1, momentum=0.9, weight_decay=0.5, grad_clip_norm=0.0),
                                 steps_per_epoch=10, epochs=1, global_batch=512)
    params = {"w": {"kernel": jnp.array([[2.0]])}, "b": {"bias": jnp.array([2.0])}}
    grads = {"w": {"kernel": jnp.array([[1.0]])}, "b": {"bias": jnp.array([1.0])}}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    # PyTorch SGD: d = g + wd * p (kernels only); buf = d; p -= lr * buf.
    np.testing.assert_allclose(updates["w"]["kernel"], [[-0.1 * (1.0 + 0.5 * 2.0)]], rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["bias"], [-0.1], rtol=1e-6)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["b"]["bias"], [-0.1 * (1.0 + 0.9)], rtol=1e-6)


def test_clipping_bounds_the_update():
    tx, _ = optim.make_optimizer(_optim(lr=512.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0),
                                 steps_per_epoch=1, epochs=1, global_batch=512)
    params = {"b": {"bias": jnp.zeros(2)}}
    updates, _ = tx.update({"b": {"bias": jnp.array([30.0, 40.0])}}, tx.init(params), params)
    np.testing.assert_allclose(updates["b"]["bias"], [-512 * 0.6, -512 * 0.8], rtol=1e-6)


def test_adamw_decays_kernels_only():
    tx, _ = optim.make_optimizer(_optim(name="adamw", lr=0.1, weight_decay=0.1), steps_per_epoch=1, epochs=1,
                                 global_batch=512)
    params = {"w": {"kernel": jnp.ones((1, 1))}, "b": {"bias": jnp.ones(1)}}
    zeros = {"w": {"kernel": jnp.zeros((1, 1))}, "b": {"bias": jnp.zeros(1)}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"]["kernel"], [[-0.1 * 0.1]], rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["bias"], [0.0], atol=1e-9)
