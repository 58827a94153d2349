"""oaml_jax/ablation.py: each variant builds the config it says; the command runs end to end on tiny runs."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags

import train_worker
from configs import demo
from oaml_jax import ablation
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
    assert configs["full"].to_dict() == ablation.variant_config(base, "full", 2).to_dict()
    adaface_only = configs["adaface_only"].model
    assert (adaface_only.lam_ada, adaface_only.lam_qa, adaface_only.lam_occ) == (1.0, 0.0, 0.0)
    assert configs["no_occlusion_weighting"].model.qaconv_occlusion_weighting is False
    detached = configs["qaconv_detached"].model
    assert detached.qaconv_to_backbone is False and detached.lam_ada == 1.0 and detached.lam_qa > 0
    assert base.model.qaconv_occlusion_weighting and base.model.qaconv_to_backbone  # base left as it was
    for config in configs.values():
        factory.check_config(config.model)
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


def test_command_runs_variants_and_seeds_and_reuses_finished_runs(tmp_path):
    """`python -m oaml_jax.ablation`: 2 variants x 2 seeds of 2 steps each on tiny synthetic data; a second
    call reuses the finished runs."""
    cmd = [sys.executable, "-m", "oaml_jax.ablation", "--config=configs/default.py:test", f"--workdir={tmp_path}",
           "--identities=8", "--images=8", "--pairs=20", "--seeds=2", "--variants=full,adaface_only",
           "--config.train.max_steps=2", "--config.eval.bin_names=('lfw',)", "--config.eval.tensorboard=False",
           "--config.eval.occlusion_variants=('clean','mask')"]
    env = dict(os.environ, **train_worker.CACHE_ENV)
    first = subprocess.run(cmd, cwd=train_worker.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["set"] == "lfw" and saved["seeds"] == 2 and len(saved["wall"]) == 4
    assert set(saved["summary"]["full"]["mask"]) == {"adaface", "qaconv", "fused"}
    assert set(saved["summary"]["adaface_only"]["mask"]) == {"adaface"}  # its QAConv is never trained
    assert saved["summary"]["full"]["clean"]["adaface"][2] == 2
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert first.stdout.splitlines()[0].split()[:4] == ["variant", "occlusion", "AdaFace", "acc"]
    done = (tmp_path / "full" / "seed0" / "ablation_done").stat().st_mtime
    again = subprocess.run(cmd[:-6] + ["--seeds=1", "--variants=full"] + cmd[-4:], cwd=train_worker.ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (tmp_path / "full" / "seed0" / "ablation_done").stat().st_mtime == done  # reused, not retrained
    changed = subprocess.run(cmd[:-6] + ["--seeds=1", "--variants=full", "--config.train.max_steps=3"] + cmd[-3:],
                             cwd=train_worker.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0
    assert f"{tmp_path / 'full' / 'seed0'} holds a finished run of another config (train.max_steps: saved 2, now 3)" \
        in changed.stderr
