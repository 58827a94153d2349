"""evaluate.run on a tiny checkpoint and tiny .bin sets; the occluded protocol."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import bin_pairs
from data_pipelines.synthetic_faces import render_face
from data_pipelines.synthetic_identity import identity_params
from data_pipelines.occlusion import occlude_deterministic
from oaml_jax.evaluation import calibration, fusion, pairs, runner, verification
from oaml_jax.evaluation.verdict import CalibratedFaceModel

from tiny_checkpoint import STEP, tiny_config, write_converted_checkpoint, write_training_checkpoint

VARIANTS = ("clean", "mask", "sunglasses", "blocks")


def pair_set(num_pairs: int, seed: int):
    """Alternating genuine / impostor pairs of synthetic faces: uint8 [2N, 112, 112, 3], bool [N]."""
    images, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        images.append(render_face(identity_params(seed, i), 0, seed))
        images.append(render_face(identity_params(seed, i if same else i + 1000), 1, seed))
        issame.append(same)
    return np.stack(images), np.array(issame)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bins")
    for name, n, seed in (("val", 20, 0), ("lfw", 10, 1)):
        bin_pairs.write_bin(str(folder / f"{name}.bin"), *pair_set(n, seed))
    return str(folder)


def eval_config(data_dir, tensorboard=False):
    config = tiny_config()
    config.eval.data_dir = data_dir
    config.eval.bin_names = ("val", "lfw", "absent")
    config.eval.occlusion_variants = VARIANTS
    config.eval.tensorboard = tensorboard
    return config


def test_occluded_variants_are_deterministic_and_touch_only_second_images():
    images, _ = pair_set(3, seed=2)
    for kind in VARIANTS[1:]:
        occluded = pairs.occluded_pairs(images, kind)
        np.testing.assert_array_equal(occluded, pairs.occluded_pairs(images, kind))
        np.testing.assert_array_equal(occluded[0::2], images[0::2])
        for i in range(3):
            assert np.any(occluded[2 * i + 1] != images[2 * i + 1])
            np.testing.assert_array_equal(occluded[2 * i + 1],
                                          occlude_deterministic(images[2 * i + 1], kind, seed=i)[0])
    assert np.any(pairs.occluded_pairs(images, "mask") != pairs.occluded_pairs(images, "blocks"))
    with pytest.raises(ValueError, match="eval.occlusion_variants: unknown \\['hat'\\]"):
        config = tiny_config()
        config.eval.occlusion_variants = ("clean", "hat")
        runner.run(config, "/nonexistent")


def test_run_reports_every_set_and_variant(tmp_path, data_dir, workdir):
    workdir = str(shutil.copytree(workdir, tmp_path / "run"))  # the evaluation writes into the run
    result = runner.run(eval_config(data_dir, tensorboard=True), workdir)
    assert result["step"] == STEP and result["has_qaconv"]
    expected_rows = [f"{s} {v}" for s in ("val", "lfw") for v in VARIANTS]
    assert list(result["rows"]) == expected_rows
    for row in result["rows"].values():
        assert set(row) == set(pairs.COLUMNS)
        assert all(np.isfinite(v) and 0.0 <= v <= 100.0 for v in row.values())
    lines = result["table"].splitlines()
    assert [line.split()[:2] for line in lines[2:]] == [r.split() for r in expected_rows]
    assert "-" not in lines[2].split()[2:]
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "results.txt")) as f:
        assert f.read().strip() == result["table"]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["rows"] == result["rows"] and saved["step"] == STEP
    for name in [f"roc_{s}_{v}" for s in ("val", "lfw") for v in VARIANTS] + ["occlusion_grid"]:
        assert os.path.getsize(os.path.join(out, name + ".png")) > 0
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out))
    # The calibration: thresholds of each score at each FAR on all clean pairs of both sets, the fused
    # score's statistics fitted on those same pairs; FaceModel.from_workdir reads it back for this step.
    assert result["files"]["calibration"].name == calibration.CALIBRATION_FILE
    model = CalibratedFaceModel.from_workdir(workdir, batch_size=16)
    cal = model.calibration
    assert cal.step == STEP and cal.fitted_on == ("val", "lfw") and cal.num_pairs == 30 and cal.num_impostors == 15
    sets = [bin_pairs.load_bin(os.path.join(data_dir, f"{name}.bin")) for name in ("val", "lfw")]
    scores = [pairs.pair_scores(model, images)[0] for images, _ in sets]
    clean = {name: np.concatenate([s[name] for s in scores]) for name in ("adaface", "qaconv")}
    impostor = ~np.concatenate([issame for _, issame in sets])
    stats = fusion.FusionStats.fit(clean)
    assert set(cal.fusion_stats.mean) == {"adaface", "qaconv"}
    for name in ("adaface", "qaconv"):
        assert cal.fusion_stats.mean[name] == pytest.approx(stats.mean[name], abs=1e-5)
    clean["fused"] = fusion.fuse(clean, fusion.DEFAULT_WEIGHTS, stats)
    for name, values in clean.items():
        for far in calibration.FARS:
            t = cal.threshold(name, far)
            assert t == pytest.approx(verification.far_threshold(values[impostor], far), abs=1e-4)
            assert np.mean(values[impostor] > t + 1e-4) <= far
    assert model.fusion_stats == cal.fusion_stats and model.fusion_weights == cal.fusion_weights
    assert model.match(sets[0][0][:1], sets[0][0][1:2])["fused"].shape == (1, 1)


def test_converted_adaface_checkpoint_has_adaface_columns_only(tmp_path, data_dir):
    checkpoint = write_converted_checkpoint(str(tmp_path / "adaface"))
    config = eval_config(data_dir)
    config.eval.bin_names = ("lfw",)
    config.eval.occlusion_variants = ("clean", "mask")
    result = runner.run(config, str(tmp_path / "out"), checkpoint=checkpoint)
    assert not result["has_qaconv"] and list(result["rows"]) == ["lfw clean", "lfw mask"]
    for row in result["rows"].values():
        assert set(row) == {c for c in pairs.COLUMNS if c.startswith("AdaFace")}
    for line in result["table"].splitlines()[2:]:
        assert line.split()[2 + 3:] == ["-"] * 9  # QAConv, fused and gated cells
    # AdaFace thresholds only: no fused score without QAConv.
    cal = calibration.load(tmp_path / "out" / "eval" / calibration.CALIBRATION_FILE, 0)
    assert set(cal.thresholds) == {"adaface"} and cal.fusion_stats is None and cal.num_pairs == 10


def test_gated_score_is_the_per_pair_choice_by_hand():
    stats = fusion.FusionStats(mean={"adaface": 0.0, "qaconv": 0.0}, std={"adaface": 1.0, "qaconv": 10.0})
    scores = {"adaface": np.array([1.0, 2.0, 3.0]), "qaconv": np.array([5.0, -20.0, 40.0])}
    # Visibility 0.2 and 0.4 are below the gate: z(qaconv) = 0.5 and 4.0; 0.8 keeps z(adaface) = 2.0.
    np.testing.assert_allclose(fusion.gated(scores, np.array([0.2, 0.8, 0.4]), 0.5, stats), [0.5, 2.0, 4.0])
    np.testing.assert_allclose(fusion.gated(scores, np.array([0.2, 0.8, 0.4]), 0.0, stats), [1.0, 2.0, 3.0])


def test_gate_is_fitted_on_the_training_folds():
    # AdaFace is right on the visible pairs (0.9) and wrong on the covered ones (0.32); QAConv the other way round.
    issame = np.array([True, False] * 10)
    visibility = np.array([0.32, 0.32, 0.9, 0.9] * 5)
    sign = np.where(issame, 1.0, -1.0) * np.linspace(1.0, 2.0, 20)
    scores = {"adaface": np.where(visibility > 0.5, sign, -sign), "qaconv": np.where(visibility > 0.5, -sign, sign)}
    gated = fusion.ten_fold_gated_accuracy(scores, visibility, issame)
    # The lowest gate of the grid that sends the 0.32 pairs to QAConv and keeps the 0.9 pairs on AdaFace.
    np.testing.assert_array_equal(gated["gates"], [0.35] * 10)
    assert gated["accuracy"] == 1.0
    assert verification.ten_fold_accuracy(scores["adaface"], issame)["accuracy"] < 1.0
    metrics, roc = pairs.score_metrics(scores, issame, fusion.DEFAULT_WEIGHTS, visibility)
    assert metrics["gated"]["accuracy"] == 1.0 and metrics["gated"]["gate"] == pytest.approx(0.35)
    np.testing.assert_array_equal(roc["gated"], gated["scores"])


def test_both_and_cross_variants_are_deterministic():
    images, _ = pair_set(3, seed=2)
    n = 3
    both = pairs.occluded_pairs(images, "both_mask")
    np.testing.assert_array_equal(both, pairs.occluded_pairs(images, "both_mask"))
    np.testing.assert_array_equal(both[1::2], pairs.occluded_pairs(images, "mask")[1::2])  # second: as today
    for i in range(n):
        np.testing.assert_array_equal(both[2 * i], occlude_deterministic(images[2 * i], "mask", seed=n + i)[0])
    cross = pairs.occluded_pairs(images, "cross")
    np.testing.assert_array_equal(cross, pairs.occluded_pairs(images, "cross"))
    for i in range(n):
        np.testing.assert_array_equal(cross[2 * i], occlude_deterministic(images[2 * i], "mask", seed=n + i)[0])
        np.testing.assert_array_equal(cross[2 * i + 1],
                                      occlude_deterministic(images[2 * i + 1], "sunglasses", seed=i)[0])
    with pytest.raises(ValueError, match=r"eval.occlusion_variants: unknown \['both_hat'\]"):
        pairs.check_variants(("clean", "both_hat"))


def test_one_events_file_per_step_replaced_when_evaluated_again(tmp_path):
    import tensorflow as tf
    out = tmp_path / "eval"
    out.mkdir()
    for value in (0.5, 0.75):
        runner.write_summaries(out, 7, {"bins": {"lfw/clean/adaface_accuracy": value}}, {})
    runner.write_summaries(out, 8, {"bins": {"lfw/clean/adaface_accuracy": 0.9}}, {})
    events = sorted(p.name for p in out.iterdir())
    assert len(events) == 2 and events[0].endswith(".step_7") and events[1].endswith(".step_8")
    points = [(e.step, v.tag, float(tf.make_ndarray(v.tensor))) for name in events
              for e in tf.compat.v1.train.summary_iterator(str(out / name)) for v in e.summary.value]
    # Step 7's second evaluation replaced its first: each step is in the curve once.
    assert points == [(7, "bins/lfw/clean/adaface_accuracy", 0.75), (8, "bins/lfw/clean/adaface_accuracy",
                                                                       pytest.approx(0.9))]


def test_table_is_printed_before_any_file_is_written(tmp_path, data_dir, monkeypatch, capsys):
    workdir = write_training_checkpoint(str(tmp_path / "run"))
    config = eval_config(data_dir)
    config.eval.bin_names = ("lfw",)
    config.eval.occlusion_variants = ("clean",)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pairs.PairSetEvaluator, "write", no_space)
    with pytest.raises(OSError, match="No space left"):
        runner.run(config, workdir, print_table=True)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("set variant (%)") and printed[2].startswith("lfw clean")
