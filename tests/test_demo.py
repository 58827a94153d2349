"""python -m oaml_jax.demo: data, training and evaluation in one command; data flags never silently ignored."""

import json
import os
import re
import subprocess
import sys

import pytest
from etils import epath

import train_worker
from data_pipelines import synthetic
from oaml_jax import demo


@pytest.mark.slow
def test_demo_command_writes_data_trains_evaluates_and_refuses_other_data_flags(tmp_path):
    cmd = [sys.executable, "-m", "oaml_jax.demo", "--config=configs/default.py:test", f"--workdir={tmp_path}",
           "--identities=8", "--images=8", "--pairs=20", "--config.train.max_steps=2",
           "--config.eval.bin_names=('lfw',)", "--config.eval.tensorboard=False",
           "--config.eval.occlusion_variants=('clean',)"]
    env = dict(os.environ, **train_worker.CACHE_ENV)
    first = subprocess.run(cmd, cwd=train_worker.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stdout.splitlines()[0].startswith("set variant (%)  AdaFace acc")
    assert first.stdout.splitlines()[2].split()[:2] == ["lfw", "clean"]
    assert json.loads((tmp_path / "data" / synthetic.RECORD_NAME).read_text()) == {
        "generator": synthetic.GENERATOR_VERSION, "num_identities": 8, "images_per_identity": 8, "num_pairs": 20,
        "seed": 0, "holdout_identities": 10, "bin_names": ["lfw"]}
    assert (tmp_path / "train" / "eval" / "results.json").exists()
    other = subprocess.run(cmd + ["--data_seed=1"], cwd=train_worker.ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert other.returncode == 1
    assert (f"error: {tmp_path / 'data'} holds synthetic data written with other arguments (seed: 0 there, now 1); "
            "use another --workdir or delete that data folder") in other.stderr
    (tmp_path / "data" / synthetic.RECORD_NAME).unlink()  # data of an older generator, which wrote no record
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'data'} holds synthetic data written with other arguments (generator: unknown (no record) "
            f"there, now {synthetic.GENERATOR_VERSION}; ")):
        demo.ensure_data(epath.Path(tmp_path / "data"), identities=8, images=8, pairs=20, seed=0)
