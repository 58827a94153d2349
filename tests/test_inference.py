"""FaceModel: restore (training / converted / other device count), embeddings, match, the pair PNG.

Helpers here (faces, subprocess runner) are shared with other test files; the tiny checkpoints are in
tests/tiny_checkpoint.py.
"""

import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines.synthetic_faces import render_face
from data_pipelines.synthetic_identity import identity_params
from oaml_jax import serving
from oaml_jax.evaluation import calibration, fusion, plots, verification
from oaml_jax.evaluation import verdict as verdict_lib
from oaml_jax.evaluation.verdict import CalibratedFaceModel
from oaml_jax.models import factory, qaconv_matcher
from oaml_jax.models.face_input import InputContract
from oaml_jax.models.oaml import OAML
from oaml_jax.serving import FaceModel

from tiny_checkpoint import STEP, tiny_config, tiny_variables, write_converted_checkpoint, write_training_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float32 end to end; only the summation order of reductions can differ between device layouts/batches.
ATOL = 1e-5


def faces(n: int, seed: int = 0) -> np.ndarray:
    """uint8 `[n, 112, 112, 3]` synthetic faces, two samples per identity (pairs (2i, 2i+1) are genuine)."""
    return np.stack([render_face(identity_params(seed, i // 2), i % 2, seed)
                     for i in range(n)])


def run_python(code: str, env_extra: dict) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, **env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _reference_embeddings(model, variables, images):
    """Direct `OAML.embed` on BGR-normalized images and their mirrors, flip-fused by hand."""
    preprocess = InputContract(channel_order="BGR").preprocess
    out = [model.apply(variables, preprocess(jnp.asarray(x)), method=OAML.embed) for x in (images, images[:, :, ::-1])]
    fused = out[0]["embeddings"] * out[0]["norms"] + out[1]["embeddings"] * out[1]["norms"]
    return np.asarray(fused / jnp.linalg.norm(fused, axis=1, keepdims=True)), out[0]


def test_embed_equals_direct_model_and_is_batch_independent(face_model):
    _, model, variables = tiny_variables()
    images = faces(5)
    embeddings, norms = face_model.embed(images)  # 5 images, batch 4: two steps, the second padded
    expected, plain = _reference_embeddings(model, variables, images)
    assert face_model.step == STEP and face_model.has_qaconv and isinstance(face_model.model, OAML)
    assert embeddings.shape == (5, 32) and norms.shape == (5,)
    np.testing.assert_allclose(embeddings, expected, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(embeddings[:1], face_model.embed(images[:1])[0], atol=ATOL)
    np.testing.assert_allclose(face_model.occlusion_maps(images), plain["occlusion"], atol=ATOL)


def test_match_agrees_with_pair_scores_and_fuses_with_given_stats(face_model):
    images = faces(6)
    features = face_model.extract(images, pair_scores=True)
    stats = fusion.FusionStats(mean={"adaface": 0.2, "qaconv": 0.1}, std={"adaface": 0.5, "qaconv": 2.0})
    scores = face_model.match(images[0::2], images[1::2], stats=stats)
    assert {k: v.shape for k, v in scores.items()} == {"adaface": (3, 3), "qaconv": (3, 3), "fused": (3, 3)}
    np.testing.assert_allclose(np.diag(scores["adaface"]), verification.cosine_pair_scores(features.embeddings),
                               atol=ATOL)
    # The all-pairs route (qaconv_scores_chunked, both directions) equals the in-batch pair route.
    np.testing.assert_allclose(np.diag(scores["qaconv"]), features.pair_qaconv, atol=ATOL)
    expected = 0.5 * (scores["adaface"] - 0.2) / 0.5 + 0.5 * (scores["qaconv"] - 0.1) / 2.0
    np.testing.assert_allclose(scores["fused"], expected, atol=1e-9)
    # Without statistics they are fitted on the 3 x 3 matrix itself: fused scores have mean 0.
    assert abs(face_model.match(images[0::2], images[1::2])["fused"].mean()) < 1e-9


def test_converted_checkpoint_gives_adaface_only(tmp_path, face_model):
    model = CalibratedFaceModel.from_checkpoint(write_converted_checkpoint(str(tmp_path / "adaface")), batch_size=4)
    images = faces(3)
    assert isinstance(model.model, factory.EmbeddingModel) and not model.has_qaconv
    assert model.contract.channel_order == "BGR"
    np.testing.assert_allclose(model.embed(images)[0], face_model.embed(images)[0], atol=ATOL)
    scores = model.match(images[:2], images[2:])
    assert scores["qaconv"] is None and scores["fused"] is None and scores["adaface"].shape == (2, 1)
    with pytest.raises(ValueError, match="no occlusion head"):
        model.occlusion_maps(images)


def test_checkpoint_saved_before_the_block_setting_existed_restores(tmp_path, face_model):
    saved = tiny_config().to_dict()
    del saved["model"]["qaconv_block_mb"]  # a run of the release before model.qaconv_block_mb
    old = write_training_checkpoint(str(tmp_path / "old"), config=ml_collections.ConfigDict(saved))
    model = CalibratedFaceModel.from_workdir(old, batch_size=4)
    assert model.model.qaconv_block_bytes == qaconv_matcher.BLOCK_BYTES
    images = faces(3)
    np.testing.assert_allclose(model.embed(images)[0], face_model.embed(images)[0], atol=ATOL)


def test_step_directory_and_bad_batch_size(workdir):
    with pytest.raises(ValueError, match="multiple of 2 x the 1 devices"):
        FaceModel.from_checkpoint(os.path.join(workdir, "checkpoints", str(STEP)), batch_size=3)
    with pytest.raises(FileNotFoundError, match="no step 7"):
        FaceModel.from_checkpoint(workdir, step=7)


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
    """A checkpoint written by an 8-device run (class kernel sharded over 8) embeds identically on 1."""
    out = tmp_path / "eight"
    images = faces(6)
    np.save(tmp_path / "faces.npy", images)
    # The subprocess gets the variables ready-made: initializing there would compile the model twice.
    with open(tmp_path / "variables.pkl", "wb") as f:
        pickle.dump(jax.device_get(tiny_variables()[2]), f)
    run_python(f"""
        import jax, numpy as np
        import sys; sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        import test_inference as t
        from oaml_jax import sharding
        from oaml_jax.serving import FaceModel
        assert jax.device_count() == 8
        import pickle
        with open({str(tmp_path / "variables.pkl")!r}, "rb") as f:
            variables = pickle.load(f)
        mesh = sharding.make_mesh()
        variables = jax.device_put(variables, sharding.state_shardings(variables, mesh))
        assert len(variables["params"]["head"]["kernel"].sharding.device_set) == 8
        t.write_training_checkpoint({str(out)!r}, variables)
        faces = np.load({str(tmp_path / "faces.npy")!r})
        embeddings, _ = FaceModel.from_checkpoint({str(out)!r}, batch_size=16).embed(faces)
        np.save({str(out / "emb8.npy")!r}, embeddings)
    """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert jax.device_count() == 1
    model = FaceModel.from_checkpoint(str(out), batch_size=4)
    np.testing.assert_allclose(model.embed(images)[0], np.load(out / "emb8.npy"), atol=ATOL)


def _calibration(step, scores, offsets, fused_weights=fusion.DEFAULT_WEIGHTS, stats=None):
    """A calibration whose threshold of each score is `scores[name] - offsets[name]` at every FAR."""
    thresholds = {name: {far: scores[name] - offsets[name] for far in calibration.FARS} for name in offsets}
    return calibration.Calibration(step=step, checkpoint="c", fitted_on=("lfw", "agedb_30"), num_pairs=6000,
                                   num_impostors=3000, thresholds=thresholds, fusion_stats=stats,
                                   fusion_weights=fused_weights if stats else None)


def test_verdict_is_the_fused_decision_else_adaface(workdir, face_model):
    images = faces(4, seed=3)
    stats = fusion.FusionStats(mean={"adaface": 0.1, "qaconv": 0.2}, std={"adaface": 0.3, "qaconv": 0.4})
    raw = face_model.match(images[:1], images[2:3], stats=stats)
    scores = {name: float(value[0, 0]) for name, value in raw.items()}
    model = CalibratedFaceModel.from_workdir(workdir, batch_size=4)
    assert model.calibration is None
    # No calibration: scores only, and one pair cannot have its own fusion statistics.
    verdict = verdict_lib.verify_faces(model, images[0], images[2])
    assert verdict.thresholds == {} and verdict.is_same is None and verdict.scores["fused"] is None
    assert verdict.headline() == "no verdict: no calibration, scores only"
    assert verdict.lines()[2].split() == ["fused", "-"]
    # AdaFace above its threshold, QAConv and fused below theirs: the fused score decides.
    model.fusion_stats = stats
    model.calibration = _calibration(STEP, scores, {"adaface": 0.01, "qaconv": -0.01, "fused": -0.01}, stats=stats)
    verdict = verdict_lib.verify_faces(model, images[0], images[2], far=1e-3)
    assert verdict.scores == pytest.approx(scores, abs=1e-6)
    assert verdict.same("adaface") and not verdict.same("qaconv") and not verdict.same("fused")
    assert verdict.decided_by == "fused" and verdict.is_same is False
    assert verdict.headline() == "different people (fused score at FAR 0.001)"
    assert verdict.lines()[0].endswith(f"> {scores['adaface'] - 0.01:.4f}: same")
    assert verdict.lines()[2].endswith(f"<= {scores['fused'] + 0.01:.4f}: different")
    # Without fused thresholds (a converted backbone's calibration) AdaFace decides.
    model.calibration = _calibration(STEP, scores, {"adaface": 0.01})
    assert (verdict_lib.verify_faces(model, images[0], images[2]).headline()
            == "same person (adaface score at FAR 0.001)")
    with pytest.raises(ValueError, match="far=0.05: no threshold at that FAR"):
        verdict_lib.verify_faces(model, images[0], images[2], far=0.05)


def test_from_workdir_takes_the_calibration_of_its_step_only(tmp_path, workdir, caplog):
    run = str(tmp_path / "run")
    shutil.copytree(workdir, run)
    stats = fusion.FusionStats(mean={"adaface": 0.1, "qaconv": 0.2}, std={"adaface": 0.3, "qaconv": 0.4})
    weights = {"adaface": 0.25, "qaconv": 0.75}
    offsets = {"adaface": 0.0, "qaconv": 0.0, "fused": 0.0}
    path = verdict_lib.calibration_path(run)
    calibration.save(_calibration(STEP, dict.fromkeys(offsets, 1.0), offsets, weights, stats), path)
    model = CalibratedFaceModel.from_workdir(run, batch_size=4)
    assert model.calibration.thresholds["fused"][1e-3] == 1.0
    assert model.fusion_stats == stats and model.fusion_weights == weights
    # Other fusion weights than the calibration's: the fused thresholds do not apply to that score.
    model = CalibratedFaceModel.from_workdir(run, batch_size=4, fusion_weights={"adaface": 0.5, "qaconv": 0.5})
    assert set(model.calibration.thresholds) == {"adaface", "qaconv"}
    assert "no fused threshold" in caplog.text
    calibration.save(_calibration(STEP + 1, dict.fromkeys(offsets, 1.0), offsets, weights, stats), path)
    model = CalibratedFaceModel.from_workdir(run, batch_size=4)
    assert model.calibration is None and model.fusion_stats is None
    assert f"was fitted for step {STEP + 1}, not {STEP}: ignored" in caplog.text


def test_pair_png_shows_both_faces_and_the_verdict(tmp_path, face_model):
    images = faces(4, seed=3)[0::2]  # two identities
    scores = {"adaface": 0.5, "qaconv": 0.2, "fused": None}
    verdict = verdict_lib.Verdict(scores=scores, far=1e-3, thresholds={"adaface": 0.4, "qaconv": 0.3},
                                calibration=_calibration(STEP, {"adaface": 0.5}, {"adaface": 0.1}))
    maps = face_model.occlusion_maps(images)
    out = verdict_lib.plot_verdict(verdict, images[0], images[1], maps, str(tmp_path / "pair.png"), title="a vs b")
    png = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    # Rebuild the same figure to learn where its top-row axes (plain faces A and B) were drawn.
    fig = plots.pair_verification_figure(images[0], images[1], maps[0], maps[1], verdict.lines(), "a vs b",
                                         verdict.headline())
    assert png.shape == (*np.round(fig.get_size_inches()[::-1] * fig.dpi).astype(int), 3)
    texts = [t.get_text() for t in fig.texts]
    assert texts[0] == "a vs b" and texts[1] == "same person (adaface score at FAR 0.001)"
    assert texts[2:] == verdict.lines() and texts[3].endswith("<= 0.3000: different")
    height = png.shape[0]
    for ax, face, other in ((fig.axes[0], images[0], images[1]), (fig.axes[1], images[1], images[0])):
        x0, y0, x1, y1 = np.round(ax.get_window_extent().extents).astype(int)
        region = png[height - y1 + 2:height - y0 - 2, x0 + 2:x1 - 2]
        shown = cv2.resize(region, (112, 112), interpolation=cv2.INTER_AREA).astype(float)
        error = np.abs(shown - face).mean()
        assert error < 12.0 and error < 0.5 * np.abs(shown - other).mean()


def test_forward_flip_is_adaface_flip_test(face_model):
    """`FaceModel.forward` (what `extract` runs and `export` exports) against the host-side flip test."""
    images = faces(3, seed=4)
    plain = jax.jit(face_model.forward(flip=False))
    fused = jax.jit(face_model.forward(flip=True, feature_maps=True))
    out = plain(face_model.variables, images)
    mirrored = plain(face_model.variables, np.ascontiguousarray(images[:, :, ::-1]))
    both = fused(face_model.variables, images)
    # AdaFace's flip test: normalize(e n + e_flip n_flip).
    feature = (np.asarray(out["embedding"]) * np.asarray(out["norm"])[:, None]
               + np.asarray(mirrored["embedding"]) * np.asarray(mirrored["norm"])[:, None])
    np.testing.assert_allclose(both["embedding"], feature / np.linalg.norm(feature, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(both["norm"], np.linalg.norm(feature, axis=1) / 2, rtol=1e-5)
    np.testing.assert_allclose(both["occlusion"], out["occlusion"], atol=1e-6)
    assert both["feature_map"].shape == (3, 7, 7, 32) and "feature_map" not in out
    # A mirror-symmetric face is its own mirror image: fusion changes neither embedding nor norm.
    symmetric = np.concatenate([images[:, :, :56], images[:, :, :56][:, :, ::-1]], axis=2)
    single, fused_symmetric = plain(face_model.variables, symmetric), fused(face_model.variables, symmetric)
    np.testing.assert_allclose(fused_symmetric["embedding"], single["embedding"], atol=1e-5)
    np.testing.assert_allclose(fused_symmetric["norm"], single["norm"], rtol=1e-5)


def test_progress_bar_only_for_long_runs_on_process_zero(face_model, capsys, monkeypatch):
    short = faces(serving.PROGRESS_MIN_STEPS * face_model.batch_size)
    face_model.extract(short)
    assert capsys.readouterr().err == ""
    long = faces((serving.PROGRESS_MIN_STEPS + 1) * face_model.batch_size - 1)
    face_model.extract(long)
    err = capsys.readouterr().err
    assert "faces: 100%" in err and f"{long.shape[0]}/{long.shape[0]}" in err and "img/s" in err
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    face_model.extract(long)
    assert capsys.readouterr().err == ""
