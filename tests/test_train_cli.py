"""train.py and eval.py as a user runs them: their logs, their exit statuses, and preemption by SIGTERM."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

import train_worker
from oaml_jax import cli, train

flags.FLAGS.mark_as_parsed()
train_worker.enable_compilation_cache()

REPO = train_worker.ROOT
TIMEOUT_S = 900
# Lines only Orbax's or Grain's INFO logging writes.
LIBRARY_LINE = ("checkpoint_manager.py", "async_checkpointer.py", "composite_checkpoint_handler.py",
                "grain/", "standard_checkpoint_handler.py", "multihost.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return train_worker.make_tiny_data(str(tmp_path_factory.mktemp("data")))


def _command(script, *args):
    return [sys.executable, os.path.join(REPO, script), "--config=configs/default.py:test", *args]


def _run(cmd, **kwargs):
    env = dict(os.environ, **train_worker.CACHE_ENV)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)


def test_train_then_eval_command_lines_and_their_logs(data, tmp_path):
    workdir = str(tmp_path / "work")
    trained = _run(_command("train.py", f"--workdir={workdir}", f"--config.data.path={data}",
                            "--config.train.max_steps=3", "--config.train.eval_every=0"))
    assert trained.returncode == 0, trained.stderr[-4000:]
    log = trained.stderr.splitlines()
    assert any("compiling the train step: ir_18, global batch 16 over 1 devices" in line for line in log)
    assert any("compiled in" in line and "FLOPs per step" in line for line in log)
    summary = [line for line in log if "done: steps 0-3 in" in line]
    assert summary and "images/s while training; best validation" in summary[0]
    assert f"checkpoints in {workdir}/checkpoints" in summary[0]
    steps = [line.split("] ", 1)[1] for line in log if "] step " in line]
    assert re.fullmatch(r"step 1/3 \(epoch 0\.25\): loss [\d.]+ \| acc ada [\d.]+ qa [\d.]+ \| occ mae [\d.]+ \| "
                        r"[\d.]+ images/s \| ETA \dm\d\ds", steps[0]), steps
    assert re.fullmatch(r"step 3 validation: val [\d.]+/[\d.]+ \(% AdaFace/QAConv, clean\); ranking metric [\d.]+",
                        steps[-1]), steps
    assert len(steps) == 4 and max(map(len, steps)) < 120, steps
    noisy = [line for line in log if any(marker in line for marker in LIBRARY_LINE)]
    assert not noisy, noisy[:5]
    evaluated = _run(_command("eval.py", f"--workdir={workdir}", f"--config.data.path={data}",
                              "--config.eval.occlusion_variants=('clean',)", "--config.eval.tensorboard=False"))
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert evaluated.stdout.splitlines()[0].startswith("set variant (%)  AdaFace acc")
    assert evaluated.stdout.splitlines()[2].split()[:2] == ["val", "clean"]


def test_a_wrong_config_path_is_reported_as_itself(tmp_path):
    result = _run([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/nope.py",
                   f"--workdir={tmp_path}"])
    assert result.returncode != 0
    assert "--config=configs/nope.py: no such config file" in result.stderr
    assert "earlier failure to load" not in result.stderr


def test_a_refused_config_field_is_one_line_and_help_lists_the_flags(tmp_path):
    result = _run([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/default.py:test",
                   f"--workdir={tmp_path / 'work'}", "--config.optim.lr=-1"])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "error: optim.lr=-1.0 must be a positive learning rate (per 512 images) [traceback: --verbosity=1]")
    assert "Traceback" not in result.stderr and not (tmp_path / "work").exists()
    shown = _run([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/default.py:test",
                  f"--workdir={tmp_path / 'work'}", "--config.optim.lr=-1", "--verbosity=1"])
    assert "Traceback" in shown.stderr
    helped = _run([sys.executable, os.path.join(REPO, "eval.py"), "--help"])
    # absl's flag listing ("\n  --name: help"), not the docstring's mentions of the flags.
    assert all(f"\n  --{name}:" in helped.stdout for name in ("config", "workdir", "step", "checkpoint")), helped.stdout


def test_a_busy_workdir_is_one_line(data, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "lock.json").write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": os.getppid(),
                                                   "heartbeat": time.time()}))
    result = _run(_command("train.py", f"--workdir={workdir}", f"--config.data.path={data}"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {workdir} is in use by another training run \(host .*\)\. Two runs on one workdir "
                        rf"would overwrite each other's checkpoints: choose another --workdir, or process "
                        rf"{os.getppid()} on this host is still running: .*", result.stderr.splitlines()[-1])


def test_a_damaged_checkpoint_is_one_line_on_stderr(data, tmp_path):
    """An interrupted copy (the latest step's data files truncated): train.py's and eval.py's refusal is all
    they print after their INFO lines."""
    workdir = tmp_path / "work"
    args = (f"--workdir={workdir}", f"--config.data.path={data}", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=-1")
    assert _run(_command("train.py", *args, "--config.train.max_steps=4")).returncode == 0
    for data_file in (workdir / "checkpoints" / "4" / "state").glob("ocdbt.process_0/d/*"):
        data_file.write_bytes(b"")  # parameters too: eval.py reads nothing else
    resumed = _run(_command("train.py", *args, "--config.train.max_steps=6"))
    evaluated = _run(_command("eval.py", f"--workdir={workdir}", f"--config.data.path={data}"))
    for done in (resumed, evaluated):
        assert done.returncode == 1
        refusal = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(refusal) == 1 and f"checkpoint {workdir}/checkpoints/4 is damaged (" in refusal[0]
        after = done.stderr[done.stderr.index(refusal[0]) + len(refusal[0]):]
        assert after.strip() == "" and "Traceback" not in done.stderr, done.stderr[-3000:]


def _saved_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _terminate_after_first_checkpoint(procs, workdir):
    """SIGTERM to the first process once a checkpoint exists (mid-run: the runs are far from their end)."""
    deadline = time.time() + TIMEOUT_S
    while not _saved_steps(workdir):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the end"
        time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)
    return [p.wait(timeout=TIMEOUT_S) for p in procs]


def test_sigterm_saves_at_an_agreed_step_exits_75_and_resumes_like_an_uninterrupted_run(data, tmp_path):
    workdir = str(tmp_path / "work")
    env = dict(os.environ, **train_worker.CACHE_ENV)
    proc = subprocess.Popen(_command("train.py", f"--workdir={workdir}", f"--config.data.path={data}",
                                     "--config.train.max_steps=200", "--config.train.epochs=60"),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    codes = _terminate_after_first_checkpoint([proc], workdir)
    log = proc.stderr.read()
    assert codes == [cli.PREEMPTED_EXIT_CODE], log[-4000:]
    agreed = _saved_steps(workdir)[-1]
    assert agreed < 200 and f"preemption notice: saved step {agreed}" in log
    stop = agreed + 3
    resumed = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=stop, epochs=60), workdir)
    uninterrupted = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=stop, epochs=60),
                                             str(tmp_path / "reference"))
    assert sorted(resumed["losses"]) == list(range(agreed, stop))
    for step, loss in resumed["losses"].items():
        np.testing.assert_allclose(loss, uninterrupted["losses"][step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step(data, tmp_path):
    """SIGTERM to process 0 of 2: JAX's preemption service makes both save the same step and exit 75; the run
    resumed on 2 processes continues as an uninterrupted one (1 process; float sums differ by layout)."""
    workdir, port = str(tmp_path / "two"), train_worker.free_port()
    procs = [train_worker.run_worker(data, workdir, str(tmp_path / f"p{i}.json"), devices=4, process_id=i,
                                     num_processes=2, port=port, max_steps=200, epochs=60) for i in range(2)]
    codes = _terminate_after_first_checkpoint(procs, workdir)
    logs = [p.stdout.read() for p in procs]
    assert codes == [cli.PREEMPTED_EXIT_CODE] * 2, logs[0][-3000:] + logs[1][-3000:]
    agreed = _saved_steps(workdir)[-1]
    for i in range(2):
        with open(tmp_path / f"p{i}.json") as f:
            saved = json.load(f)
        assert saved["preempted"] and saved["step"] == agreed
    stop, port = agreed + 2, train_worker.free_port()
    procs = [train_worker.run_worker(data, workdir, str(tmp_path / f"r{i}.json"), devices=4, process_id=i,
                                     num_processes=2, port=port, max_steps=stop, epochs=60) for i in range(2)]
    for i, proc in enumerate(procs):
        log, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, log[-4000:]
    with open(tmp_path / "r0.json") as f:
        resumed = {int(k): v for k, v in json.load(f)["losses"].items()}
    reference = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=stop, epochs=60),
                                         str(tmp_path / "reference"))
    assert sorted(resumed) == list(range(agreed, stop))
    for step, loss in resumed.items():
        np.testing.assert_allclose(loss, reference["losses"][step], rtol=2e-4, err_msg=f"step {step}")
