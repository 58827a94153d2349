"""Tests for oaml_jax.export: SavedModel, ONNX and StableHLO artefacts against the JAX forward."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax import export
from oaml_jax.evaluation import verification
from oaml_jax.models.backbone import build_backbone
from oaml_jax.models.oaml import OAML
from oaml_jax.models.face_input import InputContract

# configs/default.py:test's narrow IR-18.
TINY = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=32)
BATCH_SIZES = (1, 3)


@pytest.fixture(scope="module")
def model():
    return OAML(backbone=build_backbone("ir_18", **TINY), num_classes=4)


@pytest.fixture(scope="module")
def variables(model):
    """Random weights and BN statistics away from (0, 1), so inference-mode BN is exercised."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method=model.embed),
                            jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
    rng = np.random.default_rng(0)

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
def forward(model):
    """The input contract (BGR, (x - 127.5) / 127.5) inside the graph."""

    def fn(variables, images):
        out = model.apply(variables, InputContract(channel_order="BGR").preprocess(images), method=model.embed)
        return dict(embedding=out["embeddings"], norm=out["norms"][:, 0], occlusion=out["occlusion"])

    return fn


def _images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


def _assert_matches(got, want):
    assert set(got) == set(export.OUTPUT_NAMES)
    for name in export.OUTPUT_NAMES:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32, name
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["occlusion"], want["occlusion"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def references(forward, variables):
    """JAX outputs for each batch size, plain and flip-fused, computed before any export."""
    plain, fused = jax.jit(forward), jax.jit(export.flip_fused(forward))
    return {(n, flip): jax.tree.map(np.asarray, (fused if flip else plain)(variables, _images(n, seed=n)))
            for n in BATCH_SIZES for flip in (False, True)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, forward, variables):
    """out_dir of each (format, flip), exported once for the module."""
    out = {}
    for fmt in export.FORMATS:
        for flip in (False, True):
            out_dir = tmp_path_factory.mktemp(f"{fmt}_{'flip' if flip else 'plain'}")
            path = export.export(forward, variables, fmt=fmt, out_dir=out_dir, flip=flip)
            assert path == out_dir / export.ARTEFACTS[fmt] and path.exists()
            out[fmt, flip] = out_dir
    return out


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_artefact_matches_jax_for_two_batch_sizes(fmt, flip, exported, references):
    run = export.load(fmt=fmt, out_dir=exported[fmt, flip])
    for count in BATCH_SIZES:
        _assert_matches(run(_images(count, seed=count)), references[count, flip])


def test_export_leaves_the_jax_model_unchanged(exported, forward, variables, references):
    # jax2onnx patches flax.linen modules while it traces; afterwards JAX must compute what it did before.
    assert exported
    _assert_matches(jax.tree.map(np.asarray, jax.jit(forward)(variables, _images(3, seed=3))),
                    references[3, False])


def test_flip_fusion_is_adaface_flip_test(forward, variables, references):
    images = _images(3, seed=3)
    plain = jax.jit(forward)
    out, mirrored = plain(variables, images), plain(variables, np.ascontiguousarray(images[:, :, ::-1]))
    expected = verification.flip_fused_embeddings(out["embedding"], out["norm"][:, None],
                                                  mirrored["embedding"], mirrored["norm"][:, None])
    fused = references[3, True]
    np.testing.assert_allclose(fused["embedding"], expected, atol=1e-5)
    feature = (np.asarray(out["embedding"]) * np.asarray(out["norm"])[:, None]
               + np.asarray(mirrored["embedding"]) * np.asarray(mirrored["norm"])[:, None])
    np.testing.assert_allclose(fused["norm"], np.linalg.norm(feature, axis=1) / 2, rtol=1e-5)
    np.testing.assert_allclose(fused["occlusion"], out["occlusion"], atol=1e-6)
    # A mirror-symmetric face is its own mirror image: fusion changes neither embedding nor norm.
    symmetric = np.concatenate([images[:, :, :56], images[:, :, :56][:, :, ::-1]], axis=2)
    single, both = plain(variables, symmetric), jax.jit(export.flip_fused(forward))(variables, symmetric)
    np.testing.assert_allclose(both["embedding"], single["embedding"], atol=1e-5)
    np.testing.assert_allclose(both["norm"], single["norm"], rtol=1e-5)


def test_artefacts_load_with_their_own_runtimes(exported, references):
    """Each artefact is usable without oaml_jax: names, dynamic batch, platforms."""
    images = _images(3, seed=3)
    want = references[3, False]

    import onnxruntime  # pylint: disable=g-import-not-at-top
    session = onnxruntime.InferenceSession(str(exported["onnx", False] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.name == "images" and onnx_input.type == "tensor(uint8)"
    assert onnx_input.shape == ["N", 112, 112, 3]
    assert [o.name for o in session.get_outputs()] == ["embedding", "norm", "occlusion"]
    np.testing.assert_allclose(session.run(["embedding"], {"images": images})[0], want["embedding"], atol=1e-4)

    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    signature = tf.saved_model.load(str(exported["saved_model", False] / "saved_model")).signatures[
        "serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, 112, 112, 3] and spec.dtype == tf.uint8
    np.testing.assert_allclose(signature(images=tf.constant(images))["embedding"].numpy(), want["embedding"],
                               atol=1e-4)

    deserialized = jax.export.deserialize((exported["stablehlo", False] / "model.jax_export").read_bytes())
    assert deserialized.platforms == ("cpu", "cuda")
    assert not isinstance(deserialized.in_avals[0].shape[0], int)  # symbolic batch
    np.testing.assert_allclose(deserialized.call(images)[0], want["embedding"], atol=1e-4)


def test_saved_model_stores_the_dtypes_jax_computes_in(tmp_path, forward, variables, references):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    as_float64 = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    export.export(forward, as_float64, fmt="saved_model", out_dir=tmp_path)
    stored = tf.train.list_variables(str(tmp_path / "saved_model" / "variables" / "variables"))
    reader = tf.train.load_checkpoint(str(tmp_path / "saved_model" / "variables" / "variables"))
    dtypes = {reader.get_variable_to_dtype_map()[name] for name, _ in stored if "VARIABLE_VALUE" in name}
    assert dtypes == {tf.float32}
    _assert_matches(export.load(fmt="saved_model", out_dir=tmp_path)(_images(3, seed=3)), references[3, False])


def test_check_forward_names_what_is_wrong(forward, variables):
    shapes = export.check_forward(forward, variables)
    assert shapes["embedding"].shape == (2, 32) and shapes["occlusion"].shape == (2, 7, 7)

    def without_norm(v, images):
        out = dict(forward(v, images))
        del out["norm"]
        return out

    with pytest.raises(ValueError, match=r"forward: expected a dict with keys .* got \['embedding', 'occlusion'\]"):
        export.check_forward(without_norm, variables)
    with pytest.raises(ValueError, match=r"output 'norm' must be floating \[N\] with rank 1; .* \(2, 1\)"):
        export.check_forward(lambda v, x: {**forward(v, x), "norm": forward(v, x)["norm"][:, None]}, variables)
    with pytest.raises(ValueError, match=r"output 'embedding' must be floating .* got int32 \(2, 32\)"):
        export.check_forward(
            lambda v, x: {**forward(v, x), "embedding": forward(v, x)["embedding"].astype(jnp.int32)}, variables)


def test_export_and_load_errors(tmp_path, forward, variables, exported, monkeypatch):
    with pytest.raises(ValueError, match=r"fmt: expected one of \('saved_model', 'onnx', 'stablehlo'\), got 'tflite'"):
        export.export(forward, variables, fmt="tflite", out_dir=tmp_path)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        export.load(fmt="torchscript", out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.onnx: no onnx export there"):
        export.load(fmt="onnx", out_dir=tmp_path)
    run = export.load(fmt="stablehlo", out_dir=exported["stablehlo", False])
    with pytest.raises(ValueError, match=r"images: expected uint8 \[N, 112, 112, 3\] RGB aligned faces, got float32"):
        run(_images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(112, 112, 3\)"):
        run(_images(1)[0])
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(ImportError, match=r"ONNX export needs jax2onnx and onnx .* pip install -r requirements\.txt"):
        export.export(forward, variables, fmt="onnx", out_dir=tmp_path)
