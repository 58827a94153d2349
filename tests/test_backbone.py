"""Tests for oaml_jax.models.backbone: shapes, parameter counts derived by hand, modes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax.models.backbone import ARCHS, IRUnit, PReLU, build_backbone, feature_map_shape

TINY = dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128), embedding_size=64)
DEPTHS = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_100": (3, 13, 30, 3),
    "ir_se_50": (3, 4, 14, 3),
    "ir_se_100": (3, 13, 30, 3),
}


def _abstract(module, batch=2):
    """(outputs, variables) as ShapeDtypeStructs: no real compute."""
    images = jax.ShapeDtypeStruct((batch, 112, 112, 3), jnp.float32)
    return jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x), images)


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _hand_count(stage_sizes, widths=(64, 128, 256, 512), se=False, embedding=512, output="flatten"):
    """(params, batch_stats) sizes of an IR backbone, derived layer by layer."""
    params, stats = 0, 0
    # Stem: conv3x3 3->64 without bias, BN (scale+bias; mean+var), PReLU slope per channel.
    c = widths[0]
    params += 3 * 3 * 3 * c + 2 * c + c
    stats += 2 * c
    cin = c
    for n, cout in zip(stage_sizes, widths):
        for _ in range(n):
            # bn_in over the input channels, two 3x3 convs, bn1, bn2, PReLU between the convs.
            params += 2 * cin + 9 * cin * cout + 2 * cout + cout + 9 * cout * cout + 2 * cout
            stats += 2 * cin + 2 * cout + 2 * cout
            if se:  # fc1 C -> C/16 and fc2 C/16 -> C, 1x1 without bias.
                params += 2 * cout * (cout // 16)
            if cin != cout:  # projection shortcut: conv1x1 + BN; identity shortcuts have none.
                params += cin * cout + 2 * cout
                stats += 2 * cout
            cin = cout
    if output == "flatten":
        # BN2d(C), Dense(C*7*7 -> E) with bias, BN1d(E) without scale/bias (statistics only).
        params += 2 * cin + cin * 49 * embedding + embedding
        stats += 2 * cin + 2 * embedding
    elif output == "gdc":
        # depthwise 7x7 (C kernels of 7x7), BN2d(C), Dense(C -> E) without bias, BN1d(E) stats only.
        params += 49 * cin + 2 * cin + cin * embedding
        stats += 2 * cin + 2 * embedding
    else:  # gnap: two BNs without scale/bias.
        stats += 2 * cin + 2 * cin
    return params, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_shapes_and_parameter_counts(arch):
    (emb, norms, fmap), variables = _abstract(build_backbone(arch))
    assert emb.shape == (2, 512) and emb.dtype == jnp.float32
    assert norms.shape == (2, 1) and norms.dtype == jnp.float32
    assert fmap.shape == (2, 7, 7, 512)
    params, stats = _hand_count(DEPTHS[arch], se="se" in arch)
    assert _count(variables["params"]) == params
    assert _count(variables["batch_stats"]) == stats
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_known_totals():
    # The published IR-50 (AdaFace / insightface) has 43.6M parameters.
    assert _hand_count(DEPTHS["ir_50"]) == (43_585_600, 38_016)
    assert _hand_count(DEPTHS["ir_se_50"], se=True)[0] == 43_808_320


def test_ir50_feature_stage_3_and_bf16():
    module = build_backbone("ir_50", feature_stage=3, dtype=jnp.bfloat16)
    (emb, norms, fmap), variables = _abstract(module)
    assert fmap.shape == (2, 14, 14, 256) and fmap.dtype == jnp.bfloat16
    assert feature_map_shape(module) == (14, 14, 256)
    assert feature_map_shape(build_backbone("ir_18", **TINY)) == (7, 7, 128)
    assert emb.dtype == jnp.float32 and norms.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("output", ["gnap", "gdc"])
def test_alternative_output_layers_shapes_and_counts(output):
    (emb, norms, fmap), variables = _abstract(build_backbone("ir_18", output_layer=output))
    assert emb.shape == (2, 512) and norms.shape == (2, 1) and fmap.shape == (2, 7, 7, 512)
    params, stats = _hand_count(DEPTHS["ir_18"], output=output)
    assert (_count(variables["params"]), _count(variables["batch_stats"])) == (params, stats)


def random_variables(module, seed=0, method=None):
    """Random variables of `module` (initialized through `method`, default `__call__`) from numpy (no
    jax.random: its compilation is slow on CPU)."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, method=method),
                            jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        value = rng.standard_normal(shape.shape).astype(np.float32)
        name = path[-1].key
        if name == "var":
            return 0.5 + np.abs(value)
        if name == "kernel":
            return (value / np.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)
        return value

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((3, 112, 112, 3)).astype(np.float32)


_APPLY = {}


def _forward(module, variables, images):
    """Eval-mode forward, one compilation per backbone configuration."""
    if module not in _APPLY:
        _APPLY[module] = jax.jit(lambda v, x: module.apply(v, x))
    return _APPLY[module](variables, images)


@pytest.mark.parametrize("output", ["flatten", "gnap", "gdc"])
def test_tiny_forward_unit_norm(images, output):
    overrides = dict(TINY, output_layer=output)
    if output == "gnap":
        overrides["embedding_size"] = 128
    module = build_backbone("ir_18", **overrides)
    emb, norms, fmap = _forward(module, random_variables(module), images)
    assert emb.shape == (3, overrides["embedding_size"]) and fmap.shape == (3, 7, 7, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(norms) > 0)
    # Different images give different embeddings (nothing collapsed).
    assert np.abs(np.asarray(emb[0]) - np.asarray(emb[1])).max() > 1e-3


def test_train_mode_updates_batch_stats_and_uses_dropout(images):
    module = build_backbone("ir_18", **TINY)
    variables = random_variables(module)
    train_apply = jax.jit(lambda v, x, key: module.apply(
        v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]))
    outs, updates = train_apply(variables, images, jax.random.key(2, impl="rbg"))
    assert jax.tree.structure(variables["batch_stats"]) == jax.tree.structure(updates["batch_stats"])
    flat_before = dict(jax.tree_util.tree_leaves_with_path(variables["batch_stats"]))
    for path, after in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]):
        assert not np.allclose(flat_before[path], after), jax.tree_util.keystr(path)
    # Momentum 0.9 (PyTorch's 0.1): new mean = 0.9 * old + 0.1 * batch mean of the stem conv output.
    stem_out = jax.lax.conv_general_dilated(
        images, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = 0.9 * variables["batch_stats"]["stem_bn"]["mean"] + 0.1 * np.asarray(stem_out).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"], expected, rtol=1e-4, atol=1e-5)
    # Dropout differs between keys in train mode.
    outs2, _ = train_apply(variables, images, jax.random.key(3, impl="rbg"))
    assert not np.allclose(outs[0], outs2[0])


def test_tiny_bf16_compute_keeps_fp32_params_and_outputs(images):
    module = build_backbone("ir_18", **TINY, dtype=jnp.bfloat16, feature_stage=3)
    variables = random_variables(module)
    emb, norms, fmap = _forward(module, variables, images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(_abstract(module)[1]))
    assert emb.dtype == jnp.float32 and norms.dtype == jnp.float32
    assert fmap.shape == (3, 14, 14, 64) and fmap.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    # bf16 compute stays close to the fp32 result (the embedding does not depend on feature_stage).
    emb32, _, _ = _forward(build_backbone("ir_18", **TINY), variables, images)
    assert np.min(np.sum(np.asarray(emb) * np.asarray(emb32), axis=-1)) > 0.99


def test_stable_variable_names():
    _, variables = _abstract(build_backbone("ir_se_50", **dict(TINY, widths=(16, 32, 64, 128))))
    params = variables["params"]
    assert set(params) == {"stem_conv", "stem_bn", "stem_prelu", "output"} | {f"body_{i}" for i in range(4)}
    assert set(params["body_0"]) == {"bn_in", "conv1", "bn1", "prelu", "conv2", "bn2", "se"}
    assert set(params["body_1"]) == {"bn_in", "conv1", "bn1", "prelu", "conv2", "bn2", "se",
                                     "shortcut_conv", "shortcut_bn"}
    assert set(params["output"]) == {"bn", "dense"}
    assert set(variables["batch_stats"]["output"]) == {"bn", "features_bn"}
    assert params["stem_prelu"]["negative_slope"].shape == (16,)


def test_prelu_known_answer():
    x = jnp.array([[-2.0, 3.0], [4.0, -1.0]])
    variables = {"params": {"negative_slope": jnp.array([0.25, 0.5])}}
    np.testing.assert_allclose(PReLU().apply(variables, x), [[-0.5, 3.0], [4.0, -0.5]])


def test_identity_unit_without_residual_subsamples():
    # Zeroing the last BN's scale and bias kills the residual: an identity unit then subsamples its input.
    x = np.random.default_rng(4).standard_normal((1, 8, 8, 16)).astype(np.float32)
    unit = IRUnit(16, 2)
    shapes = jax.eval_shape(lambda v: unit.init(jax.random.key(0), v, False), x)
    unit_vars = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
    unit_vars["params"]["bn2"] = jax.tree.map(np.zeros_like, unit_vars["params"]["bn2"])
    out = jax.jit(lambda v, y: unit.apply(v, y, False))(unit_vars, x)
    np.testing.assert_allclose(out, x[:, ::2, ::2, :], atol=1e-6)


def test_prelu_init():
    variables = PReLU().init(jax.random.key(0), jnp.zeros((1, 5)))
    np.testing.assert_array_equal(variables["params"]["negative_slope"], np.full(5, 0.25, np.float32))


def test_unknown_arch_and_override():
    with pytest.raises(ValueError, match=r"unknown arch 'ir_101'; expected one of \('ir_18'"):
        build_backbone("ir_101")
    with pytest.raises(ValueError, match=r"unknown backbone override\(s\) \['depth'\]; expected some of"):
        build_backbone("ir_18", depth=3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(output_layer="avgpool"), r"output_layer 'avgpool' unknown; expected one of \('flatten'"),
        (dict(feature_stage=5), r"feature_stage must be one of \(1, 2, 3, 4\), got 5"),
        (dict(stage_sizes=(1, 1, 1)), r"stage_sizes must be 4 positive unit counts, got \(1, 1, 1\)"),
        (dict(widths=(8, 16, 16, 32), use_se=True), r"too narrow for squeeze-excitation"),
        (dict(output_layer="gnap", embedding_size=64), r"embedding_size 64 must equal widths\[-1\] = 512"),
    ],
)
def test_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("ir_18", **overrides)


@pytest.mark.parametrize("shape", [(2, 112, 112), (2, 96, 112, 3), (2, 112, 112, 1)])
def test_bad_input_shape(shape):
    module = build_backbone("ir_18", **TINY)
    with pytest.raises(ValueError, match=r"input must have shape \[N, 112, 112, 3\], got " + str(shape).replace(
            "(", r"\(").replace(")", r"\)")):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))
