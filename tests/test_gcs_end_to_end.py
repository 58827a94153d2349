"""gs:// end to end: every user path of a run through the real GCS clients and the fake GCS server.

The tiny training data is written to gs://, trained on with a gs:// workdir (validation on the gs://
val.bin), resumed there, evaluated there, embedded from there by `FaceModel` and by the inference command
line, and trained by `python train.py` too. Each program runs in a fresh process (so every client reads
the fake's environment from its start) in an empty working directory, which must stay empty.

    python tests/test_gcs_end_to_end.py GS_ROOT LOCAL_DIR     # the in-library part; prints JSON
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
STEPS, RESUMED_STEPS = 2, 4  # first run, then resumed to


def _worker(gs_root: str, local_dir: str) -> dict:
    """Trains, resumes, evaluates and embeds on gs://; trains the same run locally for reference."""
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    train_worker.enable_compilation_cache()
    from data_pipelines import bin_pairs, images
    from etils import epath
    from oaml_jax import train
    from oaml_jax.evaluation import runner
    from oaml_jax.evaluation.verdict import CalibratedFaceModel

    data = train_worker.make_tiny_data(f"{gs_root}/data")
    faces = bin_pairs.load_bin(f"{data}/val.bin")[0][:FACES]
    for i, face in enumerate(faces):
        epath.Path(f"{gs_root}/faces/{i}.png").write_bytes(images.encode_png(face))
    run = f"{gs_root}/run"
    first = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=STEPS, eval_every=0), run)
    resumed = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=RESUMED_STEPS, eval_every=0), run)
    local_data = train_worker.make_tiny_data(os.path.join(local_dir, "data"))
    local = train.train_and_evaluate(train_worker.tiny_config(local_data, max_steps=RESUMED_STEPS, eval_every=-1),
                                     os.path.join(local_dir, "run"))
    evaluated = runner.run(train_worker.tiny_config(data), run)
    model = CalibratedFaceModel.from_workdir(run)
    embeddings, _ = model.embed(faces)
    return {
        "steps": [first["step"], resumed["step"]],
        "losses": {str(k): v for k, v in {**first["losses"], **resumed["losses"]}.items()},
        "local_losses": {str(k): v for k, v in local["losses"].items()},
        "validation": [first["validation"].get("val_accuracy"), resumed["validation"].get("val_accuracy")],
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
    cwds = {name: tmp_path / name for name in ("library", "inference", "train_cli")}
    for cwd in cwds.values():
        cwd.mkdir()
    out = _run([sys.executable, os.path.abspath(__file__), gcs.root, str(tmp_path / "local")], cwds["library"])
    result = json.loads(out.strip().splitlines()[-1])

    # Trained, validated on gs:// val.bin, resumed: the same losses as one uninterrupted local run.
    assert result["steps"] == [STEPS, RESUMED_STEPS]
    assert sorted(result["losses"], key=int) == [str(s) for s in range(RESUMED_STEPS)]
    for step, loss in result["local_losses"].items():
        np.testing.assert_allclose(result["losses"][step], loss, rtol=1e-6, err_msg=f"step {step}")
    assert all(0.0 <= v <= 1.0 for v in result["validation"])
    assert result["eval_step"] == result["model_step"] == RESUMED_STEPS and result["fusion_stats"]
    assert all(path.startswith(gcs.url("run/eval/")) for path in result["eval_files"].values())

    # The inference command line, reading its faces from and writing its embeddings to gs://.
    inference_flags = ["--workdir", gcs.url("run"), "--images", gcs.url("faces"), "--out", gcs.url("feats/faces.npy")]
    _run([sys.executable, "-m", "oaml_jax.inference", "embed", *inference_flags], cwds["inference"])
    np.testing.assert_allclose(np.load(io.BytesIO(gcs.get("feats/faces.npy"))), result["embeddings"],
                               rtol=1e-5, atol=1e-6)
    assert gcs.get("feats/faces.txt").decode().splitlines() == [f"{i}.png\t0" for i in range(FACES)]

    # The training command line.
    _run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/default.py:test",
          f"--workdir={gcs.url('cli')}", f"--config.data.path={gcs.url('data')}", "--config.train.max_steps=2"],
         cwds["train_cli"])

    objects = gcs.objects()
    expected = {"data/train.rec", "data/train.idx", "data/property", "data/val.bin", "data/train.labels.v2.npy",
                "run/eval/results.txt", "run/eval/results.json", "run/eval/calibration.json",
                "run/eval/roc_val_clean.png", "run/eval/occlusion_grid.png", "feats/faces.npy", "feats/faces.txt"}
    for run, steps in (("run", (STEPS, RESUMED_STEPS)), ("cli", (2,))):
        for step in steps:
            expected |= {f"{run}/checkpoints/{step}/{name}" for name in (
                "commit_success.txt", "state/manifest.ocdbt", "config/metadata")}
    assert expected <= set(objects), sorted(expected - set(objects))
    assert json.loads(gcs.get("run/eval/results.json"))["step"] == RESUMED_STEPS
    for prefix in ("run/", "run/eval/", "cli/"):  # TensorBoard event files, one per writer
        assert any(name.startswith(f"{prefix}events.out.tfevents.") and "/" not in name[len(prefix):]
                   for name in objects), prefix
    # Each run leased its workdir through the bucket (lock.json written, then deleted at the end).
    for run in ("run", "cli"):
        assert f"{run}/lock.json" not in objects
        assert any(r["method"] == "DELETE" and r["path"].endswith(f"/o/{run}%2Flock.json") for r in gcs.requests())
    assert ("data/val.bin", 206) in {(name, status) for name, status, _ in gcs.reads()}  # validation read it
    assert not [r for r in gcs.requests() if r["status"] >= 500]

    # Nothing on local disk: every working directory is still empty, no "gs:" folder anywhere near.
    assert {name: sorted(os.listdir(cwd)) for name, cwd in cwds.items()} == {name: [] for name in cwds}
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists(tmp_path / "gs:")


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], sys.argv[2])))
