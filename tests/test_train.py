"""Training on the tiny config, in this process (one CPU device)."""

import os
import signal

import jax
import numpy as np
import pytest
from absl import flags

import train_worker
from oaml_jax import checkpoint, checkpointing, run_spec, serving, sharding, train

flags.FLAGS.mark_as_parsed()
train_worker.enable_compilation_cache()

LOSS_TERMS = ("loss", "loss_ada", "loss_qa", "loss_pair", "loss_trip", "loss_occ", "acc_ada", "acc_qa",
              "occ_mae", "norm_mean", "trip_valid", "lr", "grad_norm", "nonfinite", "corrupt", "images_per_sec",
              "mfu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return train_worker.make_tiny_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """Six uninterrupted steps (4 steps per epoch: crosses an epoch boundary), validating at step 6."""
    workdir = str(tmp_path_factory.mktemp("full"))
    result = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6, eval_every=0), workdir)
    return workdir, result


def test_few_steps_learn_and_update_statistics(full_run):
    workdir, result = full_run
    assert result["step"] == 6
    assert sorted(result["losses"]) == list(range(6))
    assert all(np.isfinite(v) for v in result["losses"].values())
    assert set(LOSS_TERMS) <= set(result["metrics"])
    assert 0.0 <= result["validation"]["val/val/clean/adaface_accuracy"] <= 1.0
    assert result["validation"]["val_accuracy"] == result["validation"]["val/val/clean/adaface_accuracy"]
    assert {"val/val/clean/qaconv_accuracy", "val/val/clean/fused_auc"} <= set(result["validation"])
    r4, r6 = (checkpoint.restore(workdir, step=s) for s in (4, 6))
    v4, v6 = r4.variables, r6.variables
    assert r6.config["train"]["batch_size"] == 16
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), v4, v6)
    assert all(jax.tree.leaves(changed["params"]["backbone"]))  # every backbone parameter moved
    assert changed["params"]["head"]["kernel"]
    bn_means = [m for p, m in jax.tree_util.tree_leaves_with_path(v6["batch_stats"]["backbone"])
                if p[-1].key == "mean"]
    assert bn_means and all(np.any(np.asarray(m) != 0) for m in bn_means)  # BN statistics left their init
    head = v6["batch_stats"]["head"]
    assert float(head["batch_mean"]) != 20.0 and float(head["batch_std"]) != 100.0  # AdaFace EMA updated
    assert changed["batch_stats"]["head"]["batch_mean"]


def test_kill_and_resume_reproduces_uninterrupted_run(full_run, data, tmp_path, monkeypatch, capfd):
    _, full = full_run
    workdir = str(tmp_path / "resumed")
    monkeypatch.setattr(serving, "PROGRESS_MIN_STEPS", 0)  # validation would show a bar for any run
    first = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=3, eval_every=0), workdir)
    assert "%|" not in capfd.readouterr().err  # validation is one log line, no progress bar
    assert first["step"] == 3
    second = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6, eval_every=0), workdir)
    assert sorted(second["losses"]) == [3, 4, 5]  # resumed mid-epoch, crossed into epoch 1
    for step in range(6):
        got = first["losses"].get(step, second["losses"].get(step))
        np.testing.assert_allclose(got, full["losses"][step], rtol=1e-6, err_msg=f"step {step}")
    assert second["validation"]["val_accuracy"] == pytest.approx(full["validation"]["val_accuracy"])


def test_ctrl_c_mid_epoch_saves_that_step_and_resumes_bitwise(full_run, data, tmp_path, monkeypatch):
    """One Ctrl-C while step 2 runs (4 steps per epoch): the run saves step 3 and stops like a preemption; the
    resumed run continues with the very losses of the uninterrupted one."""
    _, full = full_run
    calls, real = [], sharding.global_batch
    logged, info = [], train.logging.info
    monkeypatch.setattr(train.logging, "info", lambda msg, *args: (logged.append(str(msg) % args if args else str(msg)),
                                                                   info(msg, *args)))

    def interrupted(local, mesh):
        calls.append(len(calls))
        if len(calls) == 3:  # the batch of step 2 is put on the devices while step 1 runs
            os.kill(os.getpid(), signal.SIGINT)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", interrupted)
    workdir = str(tmp_path / "interrupted")
    first = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6, eval_every=-1), workdir)
    monkeypatch.undo()
    assert (first["preempted"], first["signal"], first["step"]) == (True, "SIGINT", 3)
    assert any(line.startswith("stopped by Ctrl-C: steps 0-3 in ") for line in logged)
    assert checkpoint.locate(workdir)[1] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    second = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6, eval_every=0), workdir)
    assert sorted(second["losses"]) == [3, 4, 5]
    for step in range(6):
        got = first["losses"].get(step, second["losses"].get(step))
        assert got == full["losses"][step], f"step {step}: {got} != {full['losses'][step]}"


def test_a_second_ctrl_c_stops_at_once():
    with checkpointing.StopRequests() as stop:
        assert not stop.reached(0)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT" and stop.reached(1)
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def poison_train_batch(monkeypatch, steps) -> None:
    """Makes the train batches of `steps` (an int or several; their ground-truth masks) NaN, from outside
    the loop."""
    steps = {steps} if isinstance(steps, int) else set(steps)
    calls = []
    real = sharding.global_batch

    def poisoned(local, mesh):
        if "mask" in local:
            if len(calls) in steps:
                local = dict(local, mask=np.full_like(local["mask"], np.nan))
            calls.append(len(calls))
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", poisoned)


def test_nan_stops_loudly_and_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    workdir = str(tmp_path / "nan")
    poison_train_batch(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"at step 3 .*last good checkpoint: .*checkpoints/2"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6), workdir)
    variables = checkpoint.restore(workdir).variables
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [2]


def test_nan_skip_keeps_previous_state(data, tmp_path, monkeypatch):
    workdir = str(tmp_path / "skip")
    poison_train_batch(monkeypatch, 1)
    config = train_worker.tiny_config(data, max_steps=2, nonfinite="skip", checkpoint_every=1)
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == 2 and np.isnan(result["losses"][1])
    v1, v2 = (checkpoint.restore(workdir, step=s).variables for s in (1, 2))
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), v1, v2)
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("field,value,devices,error,match", [
    ("batch_size", 30, 8, ValueError, r"train\.batch_size=30 is not divisible by the 8 devices"),
    ("batch_size", 18, 1, ValueError, r"train\.batch_size=18 is not divisible by data\.k=4"),
    ("arch", "ir_7", 1, ValueError, r"model\.arch='ir_7' is unknown"),
    ("sampler", "random", 1, ValueError, r"data\.sampler: unknown sampler 'random'"),
    ("lam_qa", -1.0, 1, ValueError, r"model\.lam_qa=-1\.0 must be >= 0"),
])
def test_config_validation_errors(data, field, value, devices, error, match):
    config = train_worker.tiny_config(data)
    section = {"batch_size": config.train, "arch": config.model, "sampler": config.data,
               "lam_qa": config.model}[field]
    section[field] = value
    with pytest.raises(error, match=match):
        run_spec.validate_config(config, num_devices=devices, process_count=1)


def test_missing_data_folder_fails_before_compiling(tmp_path):
    config = train_worker.tiny_config(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"data\.path: training data folder"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")
