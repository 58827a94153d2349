"""oaml_jax.export: SavedModel, ONNX and StableHLO artefacts against the JAX forward and `FaceModel.embed`,
through `export` (a hand-written forward) and through the command line (tiny checkpoints)."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags
from test_backbone import random_variables
from test_inference import faces
from tiny_checkpoint import STEP, write_converted_checkpoint, write_training_checkpoint

from oaml_jax import export
from oaml_jax.evaluation import calibration
from oaml_jax.evaluation.verdict import calibration_path
from oaml_jax.models.backbone import build_backbone
from oaml_jax.models.face_input import InputContract
from oaml_jax.models.oaml import OAML
from oaml_jax.serving import FaceModel

# One worker runs the whole module: its module fixtures export the model once (pytest.ini runs pytest-xdist).
pytestmark = pytest.mark.xdist_group("export")

# configs/default.py:test's narrow IR-18.
TINY = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), embedding_size=32)
BATCH_SIZES = (1, 3)


@pytest.fixture(scope="module")
def model():
    return OAML(backbone=build_backbone("ir_18", **TINY), num_classes=4)


@pytest.fixture(scope="module")
def variables(model):
    """Random weights and BN statistics away from (0, 1), so inference-mode BN is exercised."""
    return random_variables(model, method=model.embed)


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
    """JAX outputs for each batch size, computed before any export."""
    plain = jax.jit(forward)
    return {n: jax.tree.map(np.asarray, plain(variables, _images(n, seed=n))) for n in BATCH_SIZES}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, forward, variables):
    """out_dir of each format, exported once for the module."""
    out = {}
    for fmt in export.FORMATS:
        out_dir = tmp_path_factory.mktemp(fmt)
        path = export.export(forward, variables, fmt=fmt, out_dir=out_dir)
        assert path == out_dir / export.ARTEFACTS[fmt] and path.exists()
        out[fmt] = out_dir
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_artefact_matches_jax_for_two_batch_sizes(fmt, exported, references):
    run = export.load(fmt=fmt, out_dir=exported[fmt])
    for count in BATCH_SIZES:
        _assert_matches(run(_images(count, seed=count)), references[count])


def test_export_leaves_the_jax_model_unchanged(exported, forward, variables, references):
    # jax2onnx patches flax.linen modules while it traces; afterwards JAX must compute what it did before.
    assert exported
    _assert_matches(jax.tree.map(np.asarray, jax.jit(forward)(variables, _images(3, seed=3))), references[3])


def test_artefacts_load_with_their_own_runtimes(exported, references):
    """Each artefact is usable without oaml_jax: names, dynamic batch, platforms."""
    images = _images(3, seed=3)
    want = references[3]

    import onnxruntime  # pylint: disable=g-import-not-at-top
    session = onnxruntime.InferenceSession(str(exported["onnx"] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.name == "images" and onnx_input.type == "tensor(uint8)"
    assert onnx_input.shape == ["N", 112, 112, 3]
    assert [o.name for o in session.get_outputs()] == ["embedding", "norm", "occlusion"]
    np.testing.assert_allclose(session.run(["embedding"], {"images": images})[0], want["embedding"], atol=1e-4)

    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    signature = tf.saved_model.load(str(exported["savedmodel"] / "saved_model")).signatures[
        "serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, 112, 112, 3] and spec.dtype == tf.uint8
    np.testing.assert_allclose(signature(images=tf.constant(images))["embedding"].numpy(), want["embedding"],
                               atol=1e-4)

    deserialized = jax.export.deserialize((exported["stablehlo"] / "model.jax_export").read_bytes())
    assert deserialized.platforms == ("cpu", "cuda")
    assert not isinstance(deserialized.in_avals[0].shape[0], int)  # symbolic batch
    np.testing.assert_allclose(deserialized.call(images)["embedding"], want["embedding"], atol=1e-4)


def test_saved_model_stores_the_dtypes_jax_computes_in(tmp_path, forward, variables, references):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    as_float64 = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
    export.export(forward, as_float64, fmt="savedmodel", out_dir=tmp_path)
    stored = tf.train.list_variables(str(tmp_path / "saved_model" / "variables" / "variables"))
    reader = tf.train.load_checkpoint(str(tmp_path / "saved_model" / "variables" / "variables"))
    dtypes = {reader.get_variable_to_dtype_map()[name] for name, _ in stored if "VARIABLE_VALUE" in name}
    assert dtypes == {tf.float32}
    _assert_matches(export.load(fmt="savedmodel", out_dir=tmp_path)(_images(3, seed=3)), references[3])


def test_check_forward_names_what_is_wrong(forward, variables):
    assert export.check_forward(forward, variables) == ("embedding", "norm", "occlusion")

    def without(name):
        def fn(v, images):
            out = dict(forward(v, images))
            del out[name]
            return out
        return fn

    # No occlusion head (a converted backbone): two outputs.
    assert export.check_forward(without("occlusion"), variables) == ("embedding", "norm")
    with pytest.raises(ValueError, match=r"forward: expected a dict with keys \('embedding', 'norm'\) and optionally "
                                         r"'occlusion', got \['embedding', 'occlusion'\]"):
        export.check_forward(without("norm"), variables)
    with pytest.raises(ValueError, match=r"got \['embedding', 'logits', 'norm', 'occlusion'\]"):
        export.check_forward(lambda v, x: {**forward(v, x), "logits": forward(v, x)["norm"]}, variables)
    with pytest.raises(ValueError, match=r"output 'norm' must be floating \[N\] with rank 1; .* \(2, 1\)"):
        export.check_forward(lambda v, x: {**forward(v, x), "norm": forward(v, x)["norm"][:, None]}, variables)
    with pytest.raises(ValueError, match=r"output 'embedding' must be floating .* got int32 \(2, 32\)"):
        export.check_forward(
            lambda v, x: {**forward(v, x), "embedding": forward(v, x)["embedding"].astype(jnp.int32)}, variables)


def test_export_and_load_errors(tmp_path, forward, variables, exported, monkeypatch):
    with pytest.raises(ValueError,
                       match=r"fmt: expected one of \('savedmodel', 'onnx', 'stablehlo'\), got 'saved_model'"):
        export.export(forward, variables, fmt="saved_model", out_dir=tmp_path)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        export.load(fmt="torchscript", out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.onnx: no onnx export there \(write one with python -m "
                                                r"oaml_jax.export\)"):
        export.load(fmt="onnx", out_dir=tmp_path)
    run = export.load(fmt="stablehlo", out_dir=exported["stablehlo"])
    with pytest.raises(ValueError, match=r"images: expected aligned faces, uint8 RGB \[N, 112, 112, 3\], got float32"):
        run(_images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \[112, 112, 3\]"):
        run(_images(1)[0])
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(ImportError, match=r"ONNX export needs jax2onnx and onnx .* pip install -r requirements\.txt"):
        export.export(forward, variables, fmt="onnx", out_dir=tmp_path)


# The command line on tiny checkpoints: flip fusion on, each format loaded by its own runtime, against
# FaceModel.embed (the embeddings eval.py scores).


def run_main(*args):
    """`export.main` with its flags parsed from `args`, as `python -m oaml_jax.export ARGS` runs it."""
    flag_values = flags.FlagValues()
    export.define_flags(flag_values)
    export.main(flag_values(["oaml-export", *args]), flag_values)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_training_checkpoint(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def cli_exports(workdir, tmp_path_factory):
    out = {}
    for fmt in export.FORMATS:
        out[fmt] = tmp_path_factory.mktemp(f"cli_{fmt}")
        run_main(f"--workdir={workdir}", f"--format={fmt}", f"--out={out[fmt]}")  # the default: flip test in
    return out


@pytest.fixture(scope="module")
def embedded(workdir):
    """`FaceModel` features of a batch of 1 and a batch of 3 synthetic faces."""
    model = FaceModel.from_checkpoint(workdir, batch_size=4)
    return {n: (faces(n, seed=n), model.extract(faces(n, seed=n))) for n in BATCH_SIZES}


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_command_line_export_matches_face_model_embed(fmt, cli_exports, embedded, workdir):
    run = export.load(fmt=fmt, out_dir=cli_exports[fmt])
    for images, features in embedded.values():
        out = run(images)
        assert sorted(out) == ["embedding", "norm", "occlusion"]
        np.testing.assert_allclose(out["embedding"], features.embeddings, atol=1e-4, rtol=0)
        np.testing.assert_allclose(out["norm"], features.norms, rtol=1e-4, atol=0)
        np.testing.assert_allclose(out["occlusion"], features.occlusion, atol=1e-4, rtol=0)
    metadata = json.loads((cli_exports[fmt] / export.METADATA_FILES[fmt]).read_text())
    assert metadata == {"format": fmt, "artefact": export.ARTEFACTS[fmt], "step": STEP, "flip": True,
                        "checkpoint": os.path.join(workdir, "checkpoints"),
                        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 112, 112, 3], "channels": "RGB"},
                        "outputs": ["embedding", "norm", "occlusion"], "calibration": None}


def test_converted_backbone_exports_without_occlusion(tmp_path, embedded, capsys):
    """A converted AdaFace backbone has no occlusion head: embedding and norm only, the same embeddings."""
    converted = write_converted_checkpoint(str(tmp_path / "adaface"))
    run_main(f"--workdir={converted}", "--format=stablehlo", f"--out={tmp_path / 'out'}", "--flip")
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "model.jax_export")
    run = export.load(fmt="stablehlo", out_dir=tmp_path / "out")
    for images, features in embedded.values():
        out = run(images)
        assert sorted(out) == ["embedding", "norm"]
        np.testing.assert_allclose(out["embedding"], features.embeddings, atol=1e-4, rtol=0)
    metadata = json.loads((tmp_path / "out" / export.METADATA_FILES["stablehlo"]).read_text())
    assert metadata["outputs"] == ["embedding", "norm"]


def test_the_default_export_is_what_eval_calibrated(workdir, tmp_path):
    """The calibration's AdaFace thresholds (fitted on `FaceModel` cosines, as eval.py fits them) are in
    export.<format>.json and hold for the default export's outputs: its cosines are the calibrated scores."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    images = faces(12, seed=5)
    model = FaceModel.from_checkpoint(str(run), batch_size=4)
    embeddings = model.embed(images)[0].astype(np.float64)
    scores = np.sum(embeddings[0::2] * embeddings[1::2], axis=1)
    fitted = calibration.fit({"adaface": scores}, np.arange(6) % 2 == 0, step=STEP, checkpoint="c", fitted_on=["s"])
    calibration.save(fitted, calibration_path(run))
    run_main(f"--workdir={run}", "--format=stablehlo", f"--out={tmp_path / 'out'}")
    metadata = json.loads((tmp_path / "out" / export.METADATA_FILES["stablehlo"]).read_text())
    assert metadata["flip"] is True
    thresholds = {float(far): t for far, t in metadata["calibration"]["thresholds"].items()}
    assert thresholds == fitted.thresholds["adaface"] and set(thresholds) == set(calibration.FARS)
    exported = export.load(fmt="stablehlo", out_dir=tmp_path / "out")(images)["embedding"].astype(np.float64)
    np.testing.assert_allclose(np.sum(exported[0::2] * exported[1::2], axis=1), scores, atol=1e-5)
    # Without the flip test the outputs are other embeddings: no thresholds are written for them.
    run_main(f"--workdir={run}", "--format=stablehlo", f"--out={tmp_path / 'plain'}", "--noflip")
    metadata = json.loads((tmp_path / "plain" / export.METADATA_FILES["stablehlo"]).read_text())
    assert metadata["flip"] is False and metadata["calibration"] is None
    plain = export.load(fmt="stablehlo", out_dir=tmp_path / "plain")(images)["embedding"]
    assert np.abs(plain - exported).max() > 1e-3


def test_command_line_errors(workdir, tmp_path):
    with pytest.raises(flags.IllegalFlagValueError, match="format"):
        run_main(f"--workdir={workdir}", "--format=saved_model", f"--out={tmp_path}")
    with pytest.raises(flags.IllegalFlagValueError, match="--out"):
        run_main(f"--workdir={workdir}", "--format=onnx")
    with pytest.raises(app.UsageError, match=r"unexpected arguments \['extra'\]"):
        run_main(f"--workdir={workdir}", "--format=onnx", f"--out={tmp_path}", "extra")
    with pytest.raises(FileNotFoundError, match="no step 9"):
        run_main(f"--workdir={workdir}", "--step=9", "--format=onnx", f"--out={tmp_path}")
