"""oaml_jax/ablation.py: each variant builds the config it says; paired comparisons on hand-made decisions; the
command runs end to end on tiny runs."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags

import train_worker
from configs import demo
from oaml_jax import ablation, checkpointing
from oaml_jax.evaluation import pairs, verification
from oaml_jax.models import factory

flags.FLAGS.mark_as_parsed()
train_worker.enable_compilation_cache()


def test_variants_build_the_configs_they_say():
    base = demo.get_config()
    configs = {name: ablation.variant_config(base, name, seed=2) for name in ablation.VARIANTS}
    for name, config in configs.items():
        assert (config.seed, config.data.seed) == (2, 2), name
        changed = {f"{s}.{k}" for s in ("model", "data", "optim", "train") for k in config[s]
                   if config[s][k] != base[s][k] and k != "seed"}
        assert changed == set(ablation.VARIANTS[name]), name
    expected = base.to_dict()
    expected["seed"] = expected["data"]["seed"] = 2
    assert configs["full"].to_dict() == expected  # the base config, only the seeds set
    adaface_only = configs["adaface_only"].model
    assert (adaface_only.lam_ada, adaface_only.lam_qa, adaface_only.lam_occ) == (1.0, 0.0, 0.0)
    assert configs["no_occlusion_weighting"].model.qaconv_occlusion_weighting is False
    detached = configs["qaconv_detached"].model
    assert detached.qaconv_to_backbone is False and detached.lam_ada == 1.0 and detached.lam_qa > 0
    assert base.model.qaconv_occlusion_weighting and base.model.qaconv_to_backbone  # base left as it was
    for config in configs.values():
        factory.check_config(config, num_devices=1, process_count=1)
    with pytest.raises(ValueError, match=r"--variants: unknown 'huge'"):
        ablation.variant_config(base, "huge", 0)


def test_summary_is_mean_and_std_over_seeds():
    def metrics(acc):
        return {"lfw": {"clean": {"adaface": {"accuracy": acc}, "qaconv": {"accuracy": acc + 0.1}}}}

    summary = ablation.summarize({"full": [metrics(0.5), metrics(0.7)]}, "lfw")
    mean, std, n = summary["full"]["clean"]["adaface"]
    assert (round(mean, 6), round(std, 6), n) == (60.0, 10.0, 2)
    assert summary["full"]["clean"]["qaconv"][0] == pytest.approx(70.0)
    assert "fused" not in summary["full"]["clean"]
    assert "60.00 +- 10.00" in ablation.table(summary)


def test_mcnemar_exact_by_hand():
    ones, zeros = np.ones(5, bool), np.zeros(5, bool)
    # 5 pairs only a gets right, none only b: p = 2 * 0.5^5.
    assert ablation.mcnemar_exact(ones, zeros) == (5, 0, pytest.approx(0.0625))
    # b = 3, c = 1 (plus one pair both get right): p = 2 * (1 + 4) / 16.
    a = np.array([1, 1, 1, 0, 1], bool)
    b = np.array([0, 0, 0, 1, 1], bool)
    assert ablation.mcnemar_exact(a, b) == (3, 1, pytest.approx(0.625))
    assert ablation.mcnemar_exact(a, a) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="expected the same pairs"):
        ablation.mcnemar_exact(a, b[:3])


def test_paired_bootstrap_by_hand():
    a, b = np.ones((2, 6), bool), np.zeros((2, 6), bool)
    assert ablation.paired_bootstrap(a, b, samples=200) == pytest.approx((100.0, 100.0, 100.0))
    assert ablation.paired_bootstrap(a, a, samples=200) == pytest.approx((0.0, 0.0, 0.0))
    # Per-pair differences 1, 1, 0, 0: a resampled mean is k / 4 with k ~ Binomial(4, 1/2), so each end of the
    # 95% interval is reached with probability 1/16 > 2.5%: the interval is [0, 100] points around 50.
    a = np.array([[1, 1, 1, 0]], bool)
    b = np.array([[0, 0, 1, 0]], bool)
    assert ablation.paired_bootstrap(a, b) == pytest.approx((50.0, 0.0, 100.0))
    # Two seeds pair row k with row k: seed 1's reversal cancels seed 0's gain on every resample.
    both_a = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    assert ablation.paired_bootstrap(both_a, both_a[::-1]) == pytest.approx((0.0, 0.0, 0.0))


def test_pair_correct_is_the_ten_fold_decision():
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 30)
    scores = {"adaface": rng.normal(size=60) + issame, "qaconv": rng.normal(size=60) + 2 * issame}
    weights = {"adaface": 0.5, "qaconv": 0.5}
    correct = ablation.pair_correct(scores, issame, weights)
    metrics, roc_scores = pairs.score_metrics(scores, issame, weights)
    for name in ("adaface", "qaconv", "fused"):  # 10 equal folds: the mean decision is the 10-fold accuracy
        assert correct[name].mean() == pytest.approx(metrics[name]["accuracy"]), name
    folds = verification.fold_indices(60, 10)
    thresholds = verification.ten_fold_accuracy(scores["qaconv"], issame)["thresholds"]
    np.testing.assert_array_equal(correct["qaconv"][folds[3]], (scores["qaconv"][folds[3]] > thresholds[3]) ==
                                  issame[folds[3]])
    assert set(ablation.pair_correct({"adaface": scores["adaface"]}, issame, weights)) == {"adaface"}


def test_comparisons_pair_scores_within_a_variant_and_variants_against_the_first():
    n = 20
    right, wrong = np.ones(n, bool), np.zeros(n, bool)
    full = {"clean": {"adaface": wrong, "qaconv": right, "fused": right}}
    baseline = {"clean": {"adaface": right}}
    rows = ablation.comparisons({"full": [full, full], "adaface_only": [baseline, baseline]})
    assert [(r["a"], r["b"]) for r in rows] == [
        ("full clean qaconv", "full clean adaface"), ("full clean fused", "full clean adaface"),
        ("full clean fused", "full clean qaconv"), ("adaface_only clean adaface", "full clean adaface")]
    assert rows[0]["diff"] == 100.0 and rows[0]["ci"] == [100.0, 100.0] and rows[0]["seeds"] == 2
    assert rows[0]["discordant"] == [[20, 0], [20, 0]] and rows[0]["mcnemar_p"][0] == pytest.approx(2 * 0.5 ** 20)
    assert rows[2]["diff"] == 0.0 and rows[2]["mcnemar_p"] == [1.0, 1.0]
    text = ablation.comparisons_table(rows)
    assert "full clean qaconv  vs  full clean adaface" in text and "[+100.00, +100.00]" in text


def test_command_runs_variants_and_reuses_finished_runs(tmp_path):
    """`python -m oaml_jax.ablation` (its `main`): 2 variants x 1 seed of 2 steps on tiny synthetic data; then, in
    this process, a finished run is reused, one of another config refused, and its lost per-pair decisions
    scored again to the same values."""
    cmd = [sys.executable, "-m", "oaml_jax.ablation", "--config=configs/default.py:test", f"--workdir={tmp_path}",
           "--identities=8", "--images=8", "--pairs=20", "--seeds=1", "--variants=full,adaface_only",
           "--config.train.max_steps=2", "--config.eval.bin_names=('lfw',)", "--config.eval.tensorboard=False",
           "--config.eval.occlusion_variants=('clean','mask')"]
    env = dict(os.environ, **train_worker.CACHE_ENV)
    first = subprocess.run(cmd, cwd=train_worker.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["set"] == "lfw" and saved["seeds"] == 1 and len(saved["wall"]) == 2
    assert set(saved["summary"]["full"]["mask"]) == {"adaface", "qaconv", "fused"}
    assert set(saved["summary"]["adaface_only"]["mask"]) == {"adaface"}  # its QAConv is never trained
    assert saved["summary"]["full"]["clean"]["adaface"][2] == 1
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert first.stdout.splitlines()[0].split()[:4] == ["variant", "occlusion", "AdaFace", "acc"]
    # 3 score pairs x 2 occlusions within full, then adaface_only against full on AdaFace x 2 occlusions.
    compared = [(c["a"], c["b"]) for c in saved["comparisons"]]
    assert len(compared) == 8 and compared[-1] == ("adaface_only mask adaface", "full mask adaface")
    assert "adaface_only mask adaface  vs  full mask adaface" in first.stdout
    run_dir = tmp_path / "full" / "seed0"
    decisions = np.load(run_dir / ablation.PAIRS_FILE)
    # The per-pair decisions average to the accuracy eval.py reported (20 pairs: 10 folds of 2).
    assert decisions["mask/qaconv"].shape == (20,)
    assert 100 * decisions["mask/qaconv"].mean() == pytest.approx(saved["summary"]["full"]["mask"]["qaconv"][0])

    saver = checkpointing.Checkpointer(run_dir, every=1, keep=1)
    config = ml_collections.ConfigDict(saver.restore_config(saver.latest_step()))
    saver.close()
    done = (run_dir / "ablation_done").stat().st_mtime
    metrics, correct = ablation.run_one(config, run_dir)
    assert (run_dir / "ablation_done").stat().st_mtime == done  # reused, not retrained
    assert 100 * metrics["lfw"]["mask"]["qaconv"]["accuracy"] == pytest.approx(
        saved["summary"]["full"]["mask"]["qaconv"][0])
    np.testing.assert_array_equal(correct["mask"]["qaconv"], decisions["mask/qaconv"])
    (run_dir / ablation.PAIRS_FILE).unlink()  # a run finished before the decisions were kept: scored again
    _, rescored = ablation.run_one(config, run_dir)
    for key in decisions.files:
        occlusion, score = key.split("/")
        np.testing.assert_array_equal(rescored[occlusion][score], decisions[key], err_msg=key)
    config.train.max_steps = 3
    with pytest.raises(ValueError, match=r"holds a finished run of another config \(train.max_steps: saved 2, now 3\)"):
        ablation.run_one(config, run_dir)
