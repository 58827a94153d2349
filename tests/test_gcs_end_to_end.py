"""gs:// end to end: every user path of a run through the real GCS clients and the fake GCS server.

The tiny training data is uploaded to gs:// (tests/test_synthetic.py writes a data set there through the
library), trained on by `python train.py` with a gs:// workdir, resumed there by the library (validation
on the gs:// val.bin), evaluated there, embedded from there by `FaceModel` and by the inference command
line. Each program runs in a fresh process (so every client reads the fake's environment from its start)
in an empty working directory, which must stay empty.

    python tests/test_gcs_end_to_end.py GS_ROOT LOCAL_DATA LOCAL_RUN   # the in-library part; prints JSON
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_worker

ROOT = train_worker.ROOT
FACES = 4  # aligned faces embedded by FaceModel and by the inference command line
STEPS, RESUMED_STEPS = 2, 4  # the command line's run, then resumed to by the library


def _worker(gs_root: str, local_data: str, local_run: str) -> dict:
    """Resumes, evaluates and embeds on gs://; trains the same run locally, uninterrupted, for reference."""
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    train_worker.enable_compilation_cache()
    from data_pipelines import bin_pairs
    from oaml_jax import train
    from oaml_jax.evaluation import runner
    from oaml_jax.evaluation.verdict import CalibratedFaceModel

    data, run = f"{gs_root}/data", f"{gs_root}/run"
    resumed = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=RESUMED_STEPS, eval_every=0), run)
    local = train.train_and_evaluate(train_worker.tiny_config(local_data, max_steps=RESUMED_STEPS, eval_every=-1),
                                     local_run)
    config = train_worker.tiny_config(data)
    config.eval.occlusion_variants = ("clean",)  # the other variants take the same paths
    evaluated = runner.run(config, run)
    model = CalibratedFaceModel.from_workdir(run)
    embeddings, _ = model.embed(bin_pairs.load_bin(f"{data}/val.bin")[0][:FACES])
    return {
        "step": resumed["step"], "losses": {str(k): v for k, v in resumed["losses"].items()},
        "local_losses": {str(k): v for k, v in local["losses"].items()},
        "validation": resumed["validation"].get("val_accuracy"),
        "eval_step": evaluated["step"], "eval_files": {k: str(v) for k, v in evaluated["files"].items()},
        "model_step": model.step, "fusion_stats": model.fusion_stats is not None,
        "embeddings": embeddings.tolist(),
    }


def _run(cmd: list[str], cwd, timeout: int = 900) -> str:
    """Runs `cmd` in `cwd` with the fake's environment (inherited), the compilation cache and the
    repository importable; returns its output, or fails the test with its tail."""
    env = dict(os.environ, **train_worker.CACHE_ENV, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.slow
def test_training_evaluation_and_inference_on_gcs(gcs, tmp_path):
    from data_pipelines import bin_pairs, images

    cwds = {name: tmp_path / name for name in ("train_cli", "library", "inference")}
    for cwd in cwds.values():
        cwd.mkdir()
    local_data = train_worker.make_tiny_data(str(tmp_path / "data"))
    gcs.put_tree(local_data, "data")
    for i, face in enumerate(bin_pairs.load_bin(os.path.join(local_data, "val.bin"))[0][:FACES]):
        gcs.put(f"faces/{i}.png", images.encode_png(face))

    # The training command line, validating on the gs:// val.bin at its end.
    _run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/default.py:test",
          f"--workdir={gcs.url('run')}", f"--config.data.path={gcs.url('data')}",
          f"--config.train.max_steps={STEPS}", "--config.train.eval_every=0"], cwds["train_cli"])
    out = _run([sys.executable, os.path.abspath(__file__), gcs.root, local_data, str(tmp_path / "local")],
               cwds["library"])
    result = json.loads(out.strip().splitlines()[-1])

    # Resumed from the command line's checkpoint: the same losses as one uninterrupted local run.
    assert result["step"] == RESUMED_STEPS
    assert sorted(result["losses"], key=int) == [str(s) for s in range(STEPS, RESUMED_STEPS)]
    for step, loss in result["losses"].items():
        np.testing.assert_allclose(loss, result["local_losses"][step], rtol=1e-6, err_msg=f"step {step}")
    assert 0.0 <= result["validation"] <= 1.0
    assert result["eval_step"] == result["model_step"] == RESUMED_STEPS and result["fusion_stats"]
    assert all(path.startswith(gcs.url("run/eval/")) for path in result["eval_files"].values())

    # The inference command line, reading its faces from and writing its embeddings to gs://.
    inference_flags = ["--workdir", gcs.url("run"), "--images", gcs.url("faces"), "--out", gcs.url("feats/faces.npy")]
    _run([sys.executable, "-m", "oaml_jax.inference", "embed", *inference_flags], cwds["inference"])
    np.testing.assert_allclose(np.load(io.BytesIO(gcs.get("feats/faces.npy"))), result["embeddings"],
                               rtol=1e-5, atol=1e-6)
    assert gcs.get("feats/faces.txt").decode().splitlines() == [f"{i}.png\t0" for i in range(FACES)]

    objects = gcs.objects()
    expected = {"data/train.rec", "data/train.idx", "data/property", "data/val.bin", "data/train.labels.v2.npy",
                "run/eval/results.txt", "run/eval/results.json", "run/eval/calibration.json",
                "run/eval/roc_val_clean.png", "run/eval/occlusion_grid.png", "feats/faces.npy", "feats/faces.txt"}
    for step in (STEPS, RESUMED_STEPS):
        expected |= {f"run/checkpoints/{step}/{name}" for name in (
            "commit_success.txt", "state/manifest.ocdbt", "config/metadata")}
    assert expected <= set(objects), sorted(expected - set(objects))
    assert json.loads(gcs.get("run/eval/results.json"))["step"] == RESUMED_STEPS
    # TensorBoard event files, one per writer: the command line's, the resumed run's, the evaluation's.
    events = [name for name in objects if name.startswith("run/events.out.tfevents.")]
    assert len(events) == 2 and any(name.startswith("run/eval/events.out.tfevents.") for name in objects), objects
    # Each run leased its workdir through the bucket (lock.json written, then deleted at the end).
    assert "run/lock.json" not in objects
    lock_deletions = [r for r in gcs.requests() if r["method"] == "DELETE" and r["path"].endswith("/o/run%2Flock.json")]
    assert len(lock_deletions) == 2, lock_deletions
    assert ("data/val.bin", 206) in {(name, status) for name, status, _ in gcs.reads()}  # validation read it
    assert not [r for r in gcs.requests() if r["status"] >= 500]

    # Nothing on local disk: every working directory is still empty, no "gs:" folder anywhere near.
    assert {name: sorted(os.listdir(cwd)) for name, cwd in cwds.items()} == {name: [] for name in cwds}
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists(tmp_path / "gs:")


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], sys.argv[2], sys.argv[3])))
