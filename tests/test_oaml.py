"""OAML multi-task model: losses and metrics, gradient switches, and 8-device sharding."""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_worker

from oaml_jax.models.backbone import build_backbone
from oaml_jax.models.oaml import OAML
from oaml_jax.models.qaconv import qaconv_loss, retrieval_accuracy

METRIC_KEYS = {"loss", "loss_ada", "loss_qa", "loss_pair", "loss_trip", "loss_occ", "acc_ada", "acc_qa",
               "occ_mae", "norm_mean", "trip_valid"}
LABELS = np.array([0, 0, 1, 1, 2, 3], np.int32)


class FakeBackbone(nn.Module):
    """Stand-in with the backbone contract: [B, 16, 16, 3] -> (emb [B, 8], norms [B, 1], fmap [B, 4, 4, 8])."""

    embedding_size: int = 8

    @nn.compact
    def __call__(self, images, train=False):
        fmap = nn.Conv(8, (4, 4), strides=(4, 4), name="conv")(images)
        fmap = nn.BatchNorm(use_running_average=not train, name="bn")(fmap)
        out = nn.Dense(self.embedding_size, name="fc")(fmap.mean(axis=(1, 2)))
        norms = jnp.linalg.norm(out, axis=-1, keepdims=True)
        return out / norms, norms, fmap


def _fake_inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
    masks = rng.uniform(size=(6, 4, 4)).astype(np.float32)
    return images, LABELS, masks


def _tiny_backbone():
    return build_backbone("ir_18", stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=32,
                          dropout=0.0)


def numpy_variables(model, *inputs, seed=0):
    """Variables with the shapes of `model.init`, filled in numpy.

    Threefry initializers take tens of seconds to compile on CPU; these tests only need finite, varied values
    (BN scale/var 1, bias/mean 0, AdaFace statistics at their initial 20/100, other weights ~ N(0, 1/fan_in)).
    """
    rng = np.random.default_rng(seed)
    fixed = {"scale": 1.0, "var": 1.0, "mean": 0.0, "bias": 0.0, "batch_mean": 20.0, "batch_std": 100.0}

    def leaf(path, shape):
        name = path[-1].key
        if name in fixed:
            return np.full(shape.shape, fixed[name], np.float32)
        fan_in = int(np.prod(shape.shape[:-1])) or 1
        return (rng.normal(size=shape.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(model.init, jax.random.key(0), *inputs))


def test_forward_loss_and_metrics():
    model = OAML(FakeBackbone(), num_classes=4, occ_hidden=8, lam_ada=0.2, lam_qa=0.7, lam_occ=0.3)
    images, labels, masks = _fake_inputs()

    @jax.jit
    def run(variables):
        (loss, metrics), updates = model.apply(variables, images, labels, masks, train=True,
                                               mutable=["batch_stats"])
        # Re-derive the QAConv loss from the same (train-mode) features the model saw.
        embedded, _ = model.apply(variables, images, train=True, method=OAML.embed, mutable=["batch_stats"])
        vis = embedded["occlusion"]
        scores, _ = model.apply(variables, embedded["feature_map"], embedded["feature_map"], vis, vis,
                                train=True, mutable=["batch_stats"],
                                method=lambda m, *a, **k: m.qaconv(*a, **k))
        return loss, metrics, updates, embedded, scores

    variables = numpy_variables(model, images, labels, masks)
    loss, metrics, updates, embedded, scores = run(variables)
    assert set(metrics) == METRIC_KEYS
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
    np.testing.assert_allclose(metrics["loss"], loss)
    np.testing.assert_allclose(loss, 0.2 * metrics["loss_ada"] + 0.7 * metrics["loss_qa"]
                               + 0.3 * metrics["loss_occ"], rtol=1e-6)
    loss_qa, parts = qaconv_loss(scores, labels, 0.5, 1.0)
    np.testing.assert_allclose(metrics["loss_qa"], loss_qa, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_trip"], parts["loss_trip"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["acc_qa"], retrieval_accuracy(scores, labels))
    np.testing.assert_allclose(metrics["trip_valid"], 4 / 6)  # ids 2 and 3 have a single image
    np.testing.assert_allclose(metrics["loss_occ"], np.mean((embedded["occlusion"] - masks) ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["norm_mean"], np.mean(embedded["norms"]), rtol=1e-5)

    # Train mode moved every running statistic: AdaFace EMA, occlusion BN, QAConv scalar BNs.
    stats = updates["batch_stats"]
    assert set(stats) == {"backbone", "head", "occlusion", "qaconv"}
    assert float(stats["head"]["batch_mean"]) != 20.0
    for path in (("occlusion", "bn", "mean"), ("qaconv", "bn", "mean"), ("qaconv", "logit_bn", "var")):
        old, new = variables["batch_stats"], stats
        for key in path:
            old, new = old[key], new[key]
        assert not np.allclose(old, new), path

    assert set(variables["params"]) == {"backbone", "head", "occlusion", "qaconv"}
    np.testing.assert_allclose(np.linalg.norm(embedded["feature_map"], axis=-1), 1.0, rtol=1e-5)
    assert embedded["occlusion"].shape == (6, 4, 4)
    assert np.all((embedded["occlusion"] >= 0) & (embedded["occlusion"] <= 1))


@pytest.mark.parametrize("head,expected_m", [("arcface", 0.5), ("cosface", 0.35), ("adaface", 0.4)])
def test_head_registry_and_kwargs(head, expected_m):
    model = OAML(FakeBackbone(), num_classes=5, head=head, head_kwargs={"s": 30.0})
    shapes = jax.eval_shape(model.init, jax.random.key(0), *_fake_inputs())
    assert shapes["params"]["head"]["kernel"].shape == (8, 5)
    assert ("batch_mean" in shapes["batch_stats"].get("head", {})) == (head == "adaface")
    bound = model.bind(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    assert bound.margin_head.s == 30.0 and bound.margin_head.m == expected_m


def test_bce_occlusion_loss_is_the_cross_entropy_of_the_predicted_map():
    model = OAML(FakeBackbone(), num_classes=4, occ_hidden=8, occ_loss="bce")
    images, labels, masks = _fake_inputs()
    variables = numpy_variables(model, images, labels, masks)
    (_, metrics), _ = model.apply(variables, images, labels, masks, train=True, mutable=["batch_stats"])
    (occ, _) = model.apply(variables, images, train=True, method=OAML.embed, mutable=["batch_stats"])
    p = np.asarray(occ["occlusion"], np.float64)
    expected = -np.mean(masks * np.log(p) + (1 - masks) * np.log(1 - p))
    np.testing.assert_allclose(metrics["loss_occ"], expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["occ_mae"], np.mean(np.abs(p - masks)), rtol=1e-5)


def test_bad_mask_shape_is_rejected():
    images, labels, _ = _fake_inputs()
    with pytest.raises(ValueError, match=r"masks must be \[B, h, w\] = \(6, 4, 4\)"):
        jax.eval_shape(OAML(FakeBackbone(), num_classes=4).init, jax.random.key(0), images, labels,
                       np.ones((6, 7, 7), np.float32))


def _abs_sum(tree):
    return sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(tree))


SWITCHES = {
    "occ_detached": dict(lam_ada=0.0, lam_qa=0.0, lam_occ=1.0),
    "occ_attached": dict(lam_ada=0.0, lam_qa=0.0, lam_occ=1.0, detach_occ_input=False),
    "qa_no_backbone": dict(lam_ada=0.0, lam_qa=1.0, lam_occ=0.0, qaconv_to_backbone=False),
    "qa_vis_attached": dict(lam_ada=0.0, lam_qa=1.0, lam_occ=0.0, detach_qaconv_vis=False),
}


class PassThrough(nn.Module):
    """Backbone stand-in whose "images" are precomputed backbone outputs (emb, norms, fmap)."""

    embedding_size: int = 32

    def __call__(self, outputs, train=False):
        return outputs


def test_gradient_switches_with_real_backbone():
    """Every switch, with the gradient into every param of the real IR backbone.

    The backbone runs forward once; each configuration's heads give the cotangent of its loss w.r.t. the
    backbone outputs, and one backbone VJP (compiled once, mapped over the configurations) turns each into
    the gradient w.r.t. the backbone params. By the chain rule this is the gradient of that configuration's
    OAML loss; a cut path gives an exactly zero cotangent, hence exactly zero gradients.
    """
    backbone = _tiny_backbone()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 112, 112, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)
    masks = rng.uniform(size=(4, 7, 7)).astype(np.float32)
    variables = numpy_variables(OAML(backbone, num_classes=2, occ_hidden=8), images, labels, masks)
    heads = {name: OAML(PassThrough(), num_classes=2, occ_hidden=8, **cfg) for name, cfg in SWITCHES.items()}

    @jax.jit
    def grads(variables):
        params, stats = dict(variables["params"]), dict(variables["batch_stats"])
        backbone_params, backbone_stats = params.pop("backbone"), stats.pop("backbone")

        def forward(backbone_params):
            outputs, _ = backbone.apply({"params": backbone_params, "batch_stats": backbone_stats}, images,
                                        train=True, mutable=["batch_stats"])
            return outputs

        outputs, backbone_vjp = jax.vjp(forward, backbone_params)
        cotangents, head_grads = [], {}
        for name, model in heads.items():
            def loss(outputs, params, model=model):
                (value, _), _ = model.apply({"params": params, "batch_stats": stats}, outputs, labels, masks,
                                            train=True, mutable=["batch_stats"])
                return value

            cotangent, head_grads[name] = jax.grad(loss, argnums=(0, 1))(outputs, params)
            cotangents.append(cotangent)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *cotangents)
        backbone_grads = jax.lax.map(lambda cotangent: backbone_vjp(cotangent)[0], stacked)
        return backbone_grads, head_grads

    stacked_backbone_grads, head_grads = grads(variables)
    backbone_grads = {name: jax.tree.map(lambda g, i=i: np.asarray(g)[i], stacked_backbone_grads)
                      for i, name in enumerate(heads)}
    assert set(backbone_grads["occ_detached"]) >= {"stem_conv", "body_0", "body_3", "output"}
    assert _abs_sum(backbone_grads["occ_detached"]) == 0.0
    assert _abs_sum(backbone_grads["occ_attached"]) > 0.0
    assert _abs_sum(head_grads["occ_detached"]["occlusion"]) > 0.0
    # qaconv_to_backbone: off -> zero; on -> non-zero (the occlusion input is detached in both, so the QAConv
    # features are the only way into the backbone).
    assert _abs_sum(backbone_grads["qa_no_backbone"]) == 0.0
    assert _abs_sum(backbone_grads["qa_vis_attached"]) > 0.0
    # detach_qaconv_vis: on (default) -> the QAConv loss leaves the occlusion head alone; off -> it trains it.
    assert _abs_sum(head_grads["qa_no_backbone"]["qaconv"]) > 0.0
    assert _abs_sum(head_grads["qa_no_backbone"]["occlusion"]) == 0.0
    assert _abs_sum(head_grads["qa_vis_attached"]["occlusion"]) > 0.0
    for name in heads:
        assert _abs_sum(head_grads[name]["head"]) == 0.0  # lam_ada = 0


_SHARDING_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from oaml_jax.models.backbone import build_backbone
    from oaml_jax.models.oaml import OAML
    sys.path.insert(0, "tests")
    from test_oaml import numpy_variables

    assert jax.device_count() == 8, jax.devices()
    model = OAML(build_backbone("ir_18", stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=32,
                                dropout=0.0),
                 num_classes=16, occ_hidden=8)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 112, 112, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4, dtype=np.int32), 4)
    masks = rng.uniform(size=(16, 7, 7)).astype(np.float32)
    variables = numpy_variables(model, images, labels, masks)

    def step(variables, images, labels, masks):
        (loss, metrics), updates = model.apply(variables, images, labels, masks, train=True,
                                               mutable=["batch_stats"])
        return loss, metrics, updates["batch_stats"]

    reference = jax.device_get(jax.jit(step)(variables, images, labels, masks))

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    var_shardings = jax.tree.map(lambda _: replicated, variables)
    var_shardings["params"]["head"]["kernel"] = NamedSharding(mesh, P(None, "data"))
    sharded_vars = jax.device_put(variables, var_shardings)
    assert sharded_vars["params"]["head"]["kernel"].addressable_shards[0].data.shape == (32, 2)
    sharded = jax.jit(step, in_shardings=(var_shardings, batch, batch, batch))(
        sharded_vars, *(jax.device_put(x, batch) for x in (images, labels, masks)))
    sharded = jax.device_get(sharded)

    flat_ref, tree_ref = jax.tree.flatten_with_path(reference)[0], jax.tree.structure(reference)
    assert jax.tree.structure(sharded) == tree_ref
    for (path, a), b in zip(flat_ref, jax.tree.leaves(sharded)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    print("SHARDED_OK", float(reference[0]), len(flat_ref))
""")


@pytest.mark.slow
def test_sharded_forward_matches_single_device():
    result = train_worker.run_script_on_devices(_SHARDING_SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDED_OK" in result.stdout
