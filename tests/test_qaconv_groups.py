"""QAConv matching groups in the OAML model: equal to a loop over the groups (and, with one group, to the
all-pairs einsum path), BatchNorm statistics over all groups, the occlusion-weighting switch, the group-size
check, and 8 sharded devices that exchange no feature maps."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_worker
from test_oaml import PassThrough, numpy_variables

from oaml_jax.models.oaml import OAML, check_group_size
from oaml_jax.models.qaconv import hard_triplet_loss, pairwise_matching_loss, retrieval_accuracy
from oaml_jax.models.qaconv_matcher import match_features_einsum

B, HW_SIDE, C, E = 12, 3, 8, 8
# Groups of 4: identity 0 appears in groups 0 and 2 (never compared across them); group 1 has no negative.
LABELS = np.array([0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0], np.int32)


def _backbone_outputs(seed=0):
    """(embeddings [B, E], norms [B, 1], feature map [B, 3, 3, C]) fed through the PassThrough backbone."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(B, E)).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    fmap = rng.normal(size=(B, HW_SIDE, HW_SIDE, C)).astype(np.float32)
    masks = rng.uniform(size=(B, HW_SIDE, HW_SIDE)).astype(np.float32)
    return (emb / norms, norms, fmap), masks


def _model(group_size, **kwargs):
    return OAML(PassThrough(embedding_size=E), num_classes=4, occ_hidden=4, qaconv_group_size=group_size, **kwargs)


def _setup():
    outputs, masks = _backbone_outputs()
    return outputs, masks, numpy_variables(_model(0), outputs, LABELS, masks)


def _model_qa(group_size, variables, outputs, masks):
    """Eval-mode QAConv loss terms of the model, and the gradient of loss_qa w.r.t. (feature map, QAConv params)."""
    model = _model(group_size)

    def loss_qa(fmap, qaconv_params):
        params = dict(variables["params"], qaconv=qaconv_params)
        _, metrics = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 (outputs[0], outputs[1], fmap), LABELS, masks)
        return metrics["loss_qa"], metrics

    (_, metrics), grads = jax.value_and_grad(loss_qa, argnums=(0, 1), has_aux=True)(
        outputs[2], variables["params"]["qaconv"])
    return {k: metrics[k] for k in ("loss_qa", "loss_pair", "loss_trip", "trip_valid", "acc_qa")}, grads


def _looped_qa(group_size, variables, outputs, masks):
    """The same, one group at a time with the einsum matcher and the [G, G] losses, combined as documented:
    pair term and accuracy averaged over groups, triplet term averaged over the valid rows of all groups."""
    model = _model(group_size)

    def loss_qa(fmap, qaconv_params):
        params = dict(variables["params"], qaconv=qaconv_params)
        model_vars = {"params": params, "batch_stats": variables["batch_stats"]}
        embedded = model.apply(model_vars, (outputs[0], outputs[1], fmap), method=OAML.embed)
        feats, vis = embedded["feature_map"], jax.lax.stop_gradient(embedded["occlusion"])
        pair, acc, trip_sum, valid = [], [], 0.0, 0.0
        for start in range(0, B, group_size):
            part = slice(start, start + group_size)
            x = match_features_einsum(feats[part], feats[part], vis[part], vis[part])
            scores = model.apply(model_vars, x, method=lambda m, x: m.qaconv.score_features(x))
            pair.append(pairwise_matching_loss(scores, LABELS[part]))
            trip, fraction = hard_triplet_loss(scores, LABELS[part])
            trip_sum, valid = trip_sum + trip * fraction * group_size, valid + fraction * group_size
            acc.append(retrieval_accuracy(scores, LABELS[part]))
        loss_pair, loss_trip = jnp.mean(jnp.stack(pair)), trip_sum / jnp.maximum(valid, 1.0)
        return loss_pair + 0.5 * loss_trip, dict(loss_qa=loss_pair + 0.5 * loss_trip, loss_pair=loss_pair,
                                                 loss_trip=loss_trip, trip_valid=valid / B,
                                                 acc_qa=jnp.mean(jnp.stack(acc)))

    (_, metrics), grads = jax.value_and_grad(loss_qa, argnums=(0, 1), has_aux=True)(
        outputs[2], variables["params"]["qaconv"])
    return metrics, grads


@pytest.mark.parametrize("group_size", [4, B])
def test_groups_equal_a_loop_over_the_groups(group_size):
    """Eval-mode BN (running statistics) makes every group's scores independent of the others, so the loop
    is exact. With one group of the whole batch the loop is today's all-pairs einsum path. float32: values
    rtol 1e-5, gradients rtol 1e-4 / atol 1e-6 (GEMM and einsum sum in different orders)."""
    outputs, masks, variables = _setup()
    got, got_grads = jax.jit(_model_qa, static_argnums=0)(group_size, variables, outputs, masks)
    want, want_grads = jax.jit(_looped_qa, static_argnums=0)(group_size, variables, outputs, masks)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    if group_size == 4:
        # Group 1 has no negative: its 4 rows have no triplet term; rows 0..3 and 8..11 all have one.
        np.testing.assert_allclose(got["trip_valid"], 8 / 12)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert np.abs(want_leaf).max() > 0
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6)


def test_group_size_zero_is_one_group_of_the_batch():
    outputs, masks, variables = _setup()
    run = jax.jit(_model_qa, static_argnums=0)
    zero, zero_grads = run(0, variables, outputs, masks)
    whole, whole_grads = run(B, variables, outputs, masks)
    for a, b in zip(jax.tree.leaves((zero, zero_grads)), jax.tree.leaves((whole, whole_grads))):
        np.testing.assert_array_equal(a, b)


def test_train_mode_batchnorm_statistics_span_all_groups():
    """In train mode the QAConv BNs normalize with one mean/variance over the matching features of all groups."""
    outputs, masks, variables = _setup()
    model = _model(4)

    @jax.jit
    def run(variables):
        _, updates = model.apply(variables, outputs, LABELS, masks, train=True, mutable=["batch_stats"])
        embedded, _ = model.apply(variables, outputs, train=True, method=OAML.embed, mutable=["batch_stats"])
        feats, vis = embedded["feature_map"], embedded["occlusion"]
        x = jnp.stack([match_features_einsum(feats[i:i + 4], feats[i:i + 4], vis[i:i + 4], vis[i:i + 4])
                       for i in range(0, B, 4)])
        return updates["batch_stats"]["qaconv"]["bn"], x

    stats, x = run(variables)
    old = variables["batch_stats"]["qaconv"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.9 * old["mean"] + 0.1 * np.mean(x), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 * old["var"] + 0.1 * np.var(x), rtol=1e-4)


def test_no_occlusion_weighting_equals_all_ones_maps():
    """qaconv_occlusion_weighting=False against a weighted model whose occlusion head outputs exactly 1.0
    (zero 1x1 kernel, bias 100: sigmoid(100) rounds to 1 in float32): the same losses and gradients, up to
    the float32 rounding of differently fused programs (rtol 1e-6, atol 1e-7)."""
    outputs, masks, variables = _setup()
    params = jax.tree.map(np.asarray, variables["params"])
    params["occlusion"]["conv2"]["kernel"] = np.zeros_like(params["occlusion"]["conv2"]["kernel"])
    params["occlusion"]["conv2"]["bias"] = np.full_like(params["occlusion"]["conv2"]["bias"], 100.0)

    @jax.jit
    def run(params):
        results = []
        for weighting in (True, False):
            model = _model(4, qaconv_occlusion_weighting=weighting, detach_qaconv_vis=False)

            def loss(params, fmap):
                (value, metrics), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                                  (outputs[0], outputs[1], fmap), LABELS, masks, train=True,
                                                  mutable=["batch_stats"])
                return value, metrics

            results.append(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, outputs[2]))
        occ = _model(4).apply({"params": params, "batch_stats": variables["batch_stats"]}, outputs,
                              method=OAML.embed)["occlusion"]
        return results, occ

    (weighted, unweighted), occ = run(params)
    assert np.all(np.asarray(occ) == 1.0)
    for a, b in zip(jax.tree.leaves(weighted), jax.tree.leaves(unweighted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # With the head's own (non-constant) maps the switch matters: it changes loss_qa, and with weighting the
    # QAConv loss adds to the occlusion head's gradient (which L_occ alone gives without weighting).
    (weighted, unweighted), _ = run(variables["params"])
    assert abs(float(weighted[0][1]["loss_qa"]) - float(unweighted[0][1]["loss_qa"])) > 1e-3
    head_grads = [np.asarray(r[1][0]["occlusion"]["conv2"]["kernel"]) for r in (weighted, unweighted)]
    assert np.abs(head_grads[0] - head_grads[1]).max() > 1e-4


def test_check_group_size():
    assert check_group_size(0, global_batch=512, num_devices=8, k=4) == 512
    assert check_group_size(32, global_batch=512, num_devices=8, k=4) == 32
    assert check_group_size(64, global_batch=512, num_devices=8, k=4) == 64
    with pytest.raises(ValueError, match=r"model.qaconv_group_size=128 must be 0 \(the whole batch\) or divide "
                                         r"the per-device batch 64"):
        check_group_size(128, global_batch=512, num_devices=8, k=4)
    with pytest.raises(ValueError, match="model.qaconv_group_size=24 must be 0"):
        check_group_size(24, global_batch=512, num_devices=8, k=4)
    with pytest.raises(ValueError, match="model.qaconv_group_size=-4 must be 0"):
        check_group_size(-4, global_batch=512, num_devices=8, k=4)
    for bad in (2, 4):  # not a multiple of K; a single identity (no negatives)
        with pytest.raises(ValueError, match=rf"model.qaconv_group_size={bad} must be a multiple of data.k=4 and "
                                             r"at least 2 x 4"):
            check_group_size(bad, global_batch=512, num_devices=8, k=4)
    with pytest.raises(ValueError, match="train.batch_size=500 must split evenly over the 8 devices"):
        check_group_size(4, global_batch=500, num_devices=8, k=4)


def test_group_size_must_divide_the_batch():
    outputs, masks, variables = _setup()
    jax.eval_shape(_model(5).init, jax.random.key(0), outputs, LABELS, masks)  # init takes any batch
    with pytest.raises(ValueError, match="model.qaconv_group_size=5 must be 0 or divide the batch of 12"):
        jax.eval_shape(lambda v: _model(5).apply(v, outputs, LABELS, masks), variables)


_SHARDED_SCRIPT = textwrap.dedent("""
    import re
    import sys

    import jax
    import numpy as np
    import optax

    sys.path.insert(0, ".")
    from configs import default
    from oaml_jax import sharding, step as step_lib
    from oaml_jax.models import factory

    # Collectives that move a tensor of rank >= 3 between devices: a feature map [b, h, w, c] or [n, hw, c].
    # (All-reduces only sum; the class-parallel AdaFace head legitimately gathers [B, E] embeddings.)
    MOVING = re.compile(r"= [a-z0-9]+\\[\\d+,\\d+,\\d+[,\\d]*\\][^=]*\\b(all-gather|all-to-all|collective-permute|"
                        r"reduce-scatter)(-start)?\\(")
    BATCH = 64  # 8 per device


    def compiled_step(group_size, devices):
        \"\"\"The train step train.py compiles (configs/default.py:test, K = 4), over a mesh of `devices`.\"\"\"
        config = default.get_config("test")
        config.model.qaconv_group_size = group_size
        model = factory.build_model(config.model, 8)
        mesh = sharding.make_mesh(devices)
        train_step = step_lib.build_train_step(model, optax.sgd(0.01), optax.constant_schedule(0.01),
                                               factory.input_contract(config.model), mesh, global_batch=BATCH)
        compiled = train_step.step.lower(train_step.abstract_state, train_step.abstract_batch).compile()
        rng = np.random.default_rng(0)
        host = {"image": rng.integers(0, 256, (BATCH, 112, 112, 3), dtype=np.uint8),
                "label": np.repeat(np.arange(BATCH // 4, dtype=np.int32) % 8, 4),
                "mask": rng.uniform(size=(BATCH, 7, 7)).astype(np.float32),
                "corrupt": np.zeros(BATCH, np.int32)}
        batch = {k: jax.device_put(v, train_step.abstract_batch[k].sharding) for k, v in host.items()}
        _, metrics = compiled(train_step.init(jax.random.PRNGKey(0)), batch)
        return compiled.as_text(), jax.device_get(metrics)


    assert jax.device_count() == 8, jax.devices()
    moving = {}
    for group_size in (8, 0):  # 8 = the per-device batch; 0 = all pairs over the global batch
        hlo, metrics = compiled_step(group_size, jax.devices())
        moving[group_size] = [line.strip()[:200] for line in hlo.splitlines() if MOVING.search(line)]
        if group_size:
            _, single = compiled_step(group_size, jax.devices()[:1])
            for name in ("loss", "loss_ada", "loss_qa", "loss_pair", "loss_trip", "loss_occ", "acc_qa"):
                np.testing.assert_allclose(metrics[name], single[name], rtol=2e-5, err_msg=name)
    assert not moving[8], "\\n".join(moving[8])
    assert moving[0], "all-pairs matching over the global batch must gather feature maps"
    print("GROUPS_SHARDED_OK", len(moving[0]))
""")


@pytest.mark.slow
def test_sharded_groups_move_no_feature_maps():
    """8 CPU devices, G = per-device batch (8 of 64): the compiled train step (train.py's, `step.build_train_step`)
    moves no feature map between devices (no all-gather, all-to-all, collective-permute or reduce-scatter of a
    rank >= 3 tensor; G = 0, the all-pairs path, does gather), and its losses equal the 1-device run's."""
    result = train_worker.run_script_on_devices(_SHARDED_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GROUPS_SHARDED_OK" in result.stdout
