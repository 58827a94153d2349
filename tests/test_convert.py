"""Tests for oaml_jax.convert: AdaFace name/layout mapping, round trips, errors, Orbax export."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from oaml_jax import checkpoint, convert
from oaml_jax.models.backbone import build_backbone
from test_backbone import random_variables

PLAIN = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SE = dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), embedding_size=16)
EPS = 1e-5


def adaface_state_dict(widths, embedding_size, se, seed=0, prefix="model."):
    """A Lightning-style AdaFace state_dict for a 1-unit-per-stage IR(-SE), written with AdaFace's names."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, out_c, in_c, k):
        sd[name + ".weight"] = (rng.standard_normal((out_c, in_c, k, k)) / np.sqrt(in_c * k * k)).astype(np.float32)

    def bn(name, c, affine=True):
        if affine:
            sd[name + ".weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
            sd[name + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[name + ".running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[name + ".running_var"] = (0.5 + rng.random(c)).astype(np.float32)
        sd[name + ".num_batches_tracked"] = np.array(1234, np.int64)

    def prelu(name, c):
        sd[name + ".weight"] = (0.25 + 0.05 * rng.standard_normal(c)).astype(np.float32)

    conv("input_layer.0", widths[0], 3, 3)
    bn("input_layer.1", widths[0])
    prelu("input_layer.2", widths[0])
    c_in = widths[0]
    for i, c_out in enumerate(widths):
        unit = f"body.{i}."
        bn(unit + "res_layer.0", c_in)
        conv(unit + "res_layer.1", c_out, c_in, 3)
        bn(unit + "res_layer.2", c_out)
        prelu(unit + "res_layer.3", c_out)
        conv(unit + "res_layer.4", c_out, c_out, 3)
        bn(unit + "res_layer.5", c_out)
        if se:
            conv(unit + "res_layer.se_block.fc1", c_out // 16, c_out, 1)
            conv(unit + "res_layer.se_block.fc2", c_out, c_out // 16, 1)
        if c_in != c_out:
            conv(unit + "shortcut_layer.0", c_out, c_in, 1)
            bn(unit + "shortcut_layer.1", c_out)
        c_in = c_out
    bn("output_layer.0", c_in)
    sd["output_layer.3.weight"] = (rng.standard_normal((embedding_size, c_in * 49)) / np.sqrt(c_in * 49)).astype(
        np.float32)
    sd["output_layer.3.bias"] = (0.1 * rng.standard_normal(embedding_size)).astype(np.float32)
    bn("output_layer.4", embedding_size, affine=False)
    sd = {prefix + k: v for k, v in sd.items()}
    sd["head.kernel"] = rng.standard_normal((embedding_size, 5)).astype(np.float32)  # margin head: ignored
    return sd


def reference_forward_nchw(sd, images_nhwc, se, prefix="model."):
    """AdaFace's eval-mode forward written independently in numpy, NCHW, float64."""
    p = {k[len(prefix):]: v.astype(np.float64) for k, v in sd.items() if k.startswith(prefix)}

    def conv(x, name, stride, pad):
        w = p[name + ".weight"]
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
        return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)

    def bn(x, name, affine=True):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - p[name + ".running_mean"].reshape(shape)) / np.sqrt(p[name + ".running_var"].reshape(shape) + EPS)
        if affine:
            y = y * p[name + ".weight"].reshape(shape) + p[name + ".bias"].reshape(shape)
        return y

    def prelu(x, name):
        return np.where(x >= 0, x, p[name + ".weight"].reshape(1, -1, 1, 1) * x)

    x = np.transpose(images_nhwc, (0, 3, 1, 2)).astype(np.float64)
    x = prelu(bn(conv(x, "input_layer.0", 1, 1), "input_layer.1"), "input_layer.2")
    i = 0
    while f"body.{i}.res_layer.0.running_mean" in p:
        unit = f"body.{i}."
        r = bn(x, unit + "res_layer.0")
        r = prelu(bn(conv(r, unit + "res_layer.1", 1, 1), unit + "res_layer.2"), unit + "res_layer.3")
        r = bn(conv(r, unit + "res_layer.4", 2, 1), unit + "res_layer.5")  # every unit here has stride 2
        if se:
            g = r.mean(axis=(2, 3), keepdims=True)
            g = np.maximum(conv(g, unit + "res_layer.se_block.fc1", 1, 0), 0)
            r = r / (1 + np.exp(-conv(g, unit + "res_layer.se_block.fc2", 1, 0)))
        if unit + "shortcut_layer.0.weight" in p:
            s = bn(conv(x, unit + "shortcut_layer.0", 2, 0), unit + "shortcut_layer.1")
        else:
            s = x[:, :, ::2, ::2]
        x = r + s
        i += 1
    fmap = x
    y = bn(x, "output_layer.0").reshape(x.shape[0], -1)  # PyTorch flattens C, H, W
    y = y @ p["output_layer.3.weight"].T + p["output_layer.3.bias"]
    y = bn(y, "output_layer.4", affine=False)
    norms = np.linalg.norm(y, axis=-1, keepdims=True)
    return y / norms, norms, np.transpose(fmap, (0, 2, 3, 1))


_APPLY = {}


def forward(overrides, variables, images):
    """Eval-mode forward, one compilation per backbone configuration."""
    key = tuple(sorted(overrides.items()))
    if key not in _APPLY:
        module = build_backbone("ir_se_50" if overrides is SE else "ir_18", **overrides)
        _APPLY[key] = jax.jit(lambda v, x: module.apply(v, x))
    return [np.asarray(o) for o in _APPLY[key](variables, images)]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).standard_normal((2, 112, 112, 3)).astype(np.float32)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("arch, overrides", [("ir_18", PLAIN), ("ir_se_50", SE)])
def test_adaface_state_dict_matches_reference_forward(images, arch, overrides):
    se = arch.startswith("ir_se")
    sd = adaface_state_dict(overrides["widths"], overrides["embedding_size"], se)
    variables = convert.adaface_to_flax(sd, arch, **overrides)
    emb, norms, fmap = forward(overrides, variables, images)
    ref_emb, ref_norms, ref_fmap = reference_forward_nchw(sd, images, se)
    np.testing.assert_allclose(fmap, ref_fmap, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5)


def test_permuted_tensors_element_by_element():
    sd = adaface_state_dict(PLAIN["widths"], PLAIN["embedding_size"], se=False, prefix="")
    variables = convert.adaface_to_flax(sd, "ir_18", **PLAIN)
    params, stats = variables["params"], variables["batch_stats"]
    # Output Dense: PyTorch weight [E, C*H*W] reads the NCHW flatten, input index c*49 + y*7 + x;
    # our kernel [H*W*C, E] reads the NHWC flatten, input index (y*7 + x)*C + c.
    w_t = sd["output_layer.3.weight"]
    kernel = params["output"]["dense"]["kernel"]
    channels, side = 32, 7
    assert kernel.shape == (side * side * channels, 16)
    for o in range(16):
        for c in range(channels):
            for y in range(side):
                for x in range(side):
                    assert kernel[(y * side + x) * channels + c, o] == w_t[o, c * side * side + y * side + x]
    # Convs: OIHW [o, i, ky, kx] -> HWIO [ky, kx, i, o].
    w_t = sd["body.1.res_layer.4.weight"]
    kernel = params["body_1"]["conv2"]["kernel"]
    o, i, ky, kx = np.indices(w_t.shape).reshape(4, -1)
    np.testing.assert_array_equal(kernel[ky, kx, i, o], w_t[o, i, ky, kx])
    np.testing.assert_array_equal(params["body_1"]["shortcut_conv"]["kernel"][0, 0],
                                  sd["body.1.shortcut_layer.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["output"]["dense"]["bias"], sd["output_layer.3.bias"])
    np.testing.assert_array_equal(params["stem_prelu"]["negative_slope"], sd["input_layer.2.weight"])
    np.testing.assert_array_equal(params["body_2"]["bn_in"]["scale"], sd["body.2.res_layer.0.weight"])
    np.testing.assert_array_equal(stats["body_2"]["bn_in"]["var"], sd["body.2.res_layer.0.running_var"])
    np.testing.assert_array_equal(stats["output"]["features_bn"]["mean"], sd["output_layer.4.running_mean"])
    assert "features_bn" not in params["output"]


@pytest.mark.parametrize("arch, overrides", [("ir_18", PLAIN), ("ir_se_50", SE)])
def test_round_trip_identical_trees_and_outputs(images, arch, overrides):
    variables = random_variables(build_backbone(arch, **overrides), seed=3)
    state_dict = convert.flax_to_adaface(variables, arch, **overrides)
    assert all(k.startswith(("input_layer.", "body.", "output_layer.")) for k in state_dict)
    assert state_dict["body.0.res_layer.0.num_batches_tracked"].dtype == np.int64
    if arch == "ir_se_50":
        assert state_dict["body.3.res_layer.se_block.fc1.weight"].shape == (4, 64, 1, 1)
    back = convert.adaface_to_flax(state_dict, arch, **overrides)
    assert_trees_equal(back, variables)
    for a, b in zip(forward(overrides, back, images), forward(overrides, variables, images)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("output", ["gnap", "gdc"])
def test_round_trip_alternative_output_layers(output):
    overrides = dict(PLAIN, output_layer=output, embedding_size=32)
    variables = random_variables(build_backbone("ir_18", **overrides), seed=5)
    state_dict = convert.flax_to_adaface(variables, "ir_18", **overrides)
    if output == "gdc":
        assert state_dict["output_layer.conv_6_dw.conv.weight"].shape == (32, 1, 7, 7)
        assert state_dict["output_layer.linear.weight"].shape == (32, 32)
    else:
        assert set(k for k in state_dict if k.startswith("output_layer")) == {
            f"output_layer.bn{j}.{leaf}" for j in (1, 2)
            for leaf in ("running_mean", "running_var", "num_batches_tracked")}
    assert_trees_equal(convert.adaface_to_flax(state_dict, "ir_18", **overrides), variables)


def test_prefixes_and_ignored_keys():
    plain = adaface_state_dict(PLAIN["widths"], PLAIN["embedding_size"], se=False, prefix="")
    lightning = adaface_state_dict(PLAIN["widths"], PLAIN["embedding_size"], se=False, prefix="model.")
    lightning["model.qaconv.bn.weight"] = np.ones(1, np.float32)
    assert_trees_equal(convert.adaface_to_flax(plain, "ir_18", **PLAIN),
                       convert.adaface_to_flax(lightning, "ir_18", **PLAIN))


def test_every_problem_listed_at_once():
    sd = adaface_state_dict(PLAIN["widths"], PLAIN["embedding_size"], se=False)
    del sd["model.body.1.res_layer.4.weight"]
    sd["model.body.4.res_layer.0.weight"] = np.ones(32, np.float32)
    sd["model.output_layer.3.bias"] = np.zeros(17, np.float32)
    sd["model.output_layer.3.weight"] = sd["model.output_layer.3.weight"].T
    with pytest.raises(ValueError) as info:
        convert.adaface_to_flax(sd, "ir_18", **PLAIN)
    message = str(info.value)
    assert "does not match backbone ir_18(embedding_size=16, stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32))" \
        in message
    assert "(4 problems)" in message
    assert "missing: body.1.res_layer.4.weight expected shape (16, 16, 3, 3)" in message
    assert "unused: body.4.res_layer.0.weight shape (32,)" in message
    assert "mis-shaped: output_layer.3.bias expected shape (16,), got (17,)" in message
    assert "mis-shaped: output_layer.3.weight expected shape (16, 1568), got (1568, 16)" in message


def test_non_finite_tensors_are_refused_by_name():
    sd = adaface_state_dict(PLAIN["widths"], PLAIN["embedding_size"], se=False)
    sd["model.body.1.res_layer.4.weight"] = sd["model.body.1.res_layer.4.weight"].copy()
    sd["model.body.1.res_layer.4.weight"][0, 0, 1, :2] = [np.nan, np.inf]
    sd["model.output_layer.3.bias"] = np.full(16, np.nan, np.float32)
    with pytest.raises(ValueError) as info:
        convert.adaface_to_flax(sd, "ir_18", **PLAIN)
    message = str(info.value)
    assert "(2 problems)" in message
    assert "non-finite: body.1.res_layer.4.weight holds 2 NaN or Inf values of 2304" in message
    assert "non-finite: output_layer.3.bias holds 16 NaN or Inf values of 16" in message


def test_se_checkpoint_into_plain_arch_lists_se_tensors_unused():
    sd = adaface_state_dict(SE["widths"], SE["embedding_size"], se=True)
    with pytest.raises(ValueError, match=r"unused: body\.0\.res_layer\.se_block\.fc1\.weight shape \(1, 16, 1, 1\)"):
        convert.adaface_to_flax(sd, "ir_18", **SE)


def test_flax_to_adaface_reports_missing_and_unused_leaves():
    variables = random_variables(build_backbone("ir_18", **PLAIN))
    del variables["params"]["body_0"]["conv1"]
    variables["batch_stats"]["extra"] = {"mean": np.zeros(3, np.float32)}
    with pytest.raises(ValueError) as info:
        convert.flax_to_adaface(variables, "ir_18", **PLAIN)
    assert "missing: params/body_0/conv1/kernel" in str(info.value)
    assert "unused: batch_stats/extra/mean shape (3,)" in str(info.value)


def test_cli_converts_npz_into_a_checkpoint_restore_reads(tmp_path):
    """`python -m oaml_jax.convert` on a .npz state_dict (no torch): the restored backbone gives the same
    embeddings as the weights mapped in this process."""
    backbone = build_backbone("ir_18")
    state_dict = convert.flax_to_adaface(random_variables(backbone, seed=3), "ir_18")
    np.savez(tmp_path / "adaface_ir18.npz", **{"model." + k: v for k, v in state_dict.items()})
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "oaml_jax.convert", f"--ckpt={tmp_path / 'adaface_ir18.npz'}",
                             "--arch=ir_18", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = checkpoint.restore(str(out))
    assert restored.contract.channel_order == "BGR" and restored.config["converted_from"].endswith(".npz")
    expected = convert.adaface_to_flax(state_dict, "ir_18")
    for collection in ("params", "batch_stats"):
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored.variables[collection]["backbone"],
                            expected[collection])
        assert all(jax.tree.leaves(same))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", weights=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"bad\.npz: not a numpy \.npz of plain arrays"):
        convert.load_state_dict(str(tmp_path / "bad.npz"))


def test_load_torch_checkpoint_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"needs torch: pip install -r requirements-torch\.txt"):
        convert.load_torch_checkpoint("adaface_ir50_ms1mv2.ckpt")


def test_cli_reports_missing_torch_or_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "oaml_jax.convert", "--ckpt", str(tmp_path / "none.ckpt"), "--arch", "ir_18",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "pip install -r requirements-torch.txt" in result.stderr or "does not exist" in result.stderr
