"""Inputs from the field that used to fail late or silently: each is refused (or survived) before it costs work.

Class count below the labels, too few identities for a batch, a validation set too small for its protocol, a
run skipping every step, a validation that fails, two runs on one workdir, a workdir that cannot be written,
a resumed config that changes the model, a resume on changed identity folders, a damaged latest checkpoint,
a full disk.
"""

import errno
import json
import os
import socket
import time

import orbax.checkpoint as ocp
import pytest
from absl import flags
from etils import epath

import train_worker
from configs import default
from data_pipelines import bin_pairs
from oaml_jax import checkpoint, logs, resume, run_spec, train
from oaml_jax.evaluation import pairs
from oaml_jax.workdir_lock import LOCK_FILE, WorkdirBusyError
from test_train import poison_train_batch

flags.FLAGS.mark_as_parsed()
train_worker.enable_compilation_cache()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return train_worker.make_tiny_data(str(tmp_path_factory.mktemp("data")))


def _steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def test_class_count_below_the_labels_is_refused_by_name(data, tmp_path):
    config = train_worker.tiny_config(data, max_steps=2)
    config.model.num_classes = 5  # the tiny data has labels 0..7
    with pytest.raises(ValueError, match=r"model\.num_classes=5 but data\.path=.* holds labels up to 7: it needs "
                                         r"at least 8 classes"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")


def test_negative_learning_rate_is_refused_by_name(data):
    config = train_worker.tiny_config(data)
    config.optim.lr = -0.1
    with pytest.raises(ValueError, match=r"optim\.lr=-0\.1 must be a positive learning rate"):
        run_spec.validate_config(config, num_devices=1, process_count=1)


def test_a_validation_set_too_small_for_ten_folds_is_refused_before_step_one(data, tmp_path):
    images, issame = bin_pairs.load_bin(os.path.join(data, "val.bin"))
    bin_pairs.write_bin(str(tmp_path / "three.bin"), images[:6], issame[:3])
    config = train_worker.tiny_config(data, max_steps=2, eval_every=0)
    config.eval.data_dir = str(tmp_path)
    config.eval.bin_names = ("three",)
    with pytest.raises(ValueError, match=r"three\.bin: 3 pairs cannot be split into the 10 folds"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert _steps(str(tmp_path / "work")) == []


def test_a_skip_run_that_skips_every_step_stops(data, tmp_path, monkeypatch):
    poison_train_batch(monkeypatch, range(100))
    config = train_worker.tiny_config(data, max_steps=8, nonfinite="skip")
    with pytest.raises(FloatingPointError, match=r"2 of the 2 steps so far had a non-finite loss or gradient "
                                                 r"norm, more than train\.max_skipped_share=0\.1; last good "
                                                 r"checkpoint: none"):
        train.train_and_evaluate(config, str(tmp_path / "work"))


def test_a_failing_validation_keeps_the_training_state(data, tmp_path, monkeypatch):
    def broken(self, model):
        raise OSError("val.bin vanished")
        yield  # pragma: no cover - makes this a generator like the real run()

    monkeypatch.setattr(pairs.PairSetEvaluator, "run", broken)
    workdir = str(tmp_path / "work")
    config = train_worker.tiny_config(data, max_steps=6, eval_every=3, checkpoint_every=100)
    with pytest.raises(RuntimeError, match=r"validation at step 3 failed \(OSError: val\.bin vanished\); the "
                                           r"training state of step 3 is saved in .*checkpoints/3"):
        train.train_and_evaluate(config, workdir)
    assert _steps(workdir) == [3]
    monkeypatch.undo()
    resumed = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6, eval_every=3), workdir)
    assert sorted(resumed["losses"]) == [3, 4, 5]


def _write_lock(workdir, host, pid, age_s=0.0):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "w") as f:
        json.dump({"owner": "other-run", "host": host, "pid": pid, "heartbeat": time.time() - age_s}, f)


def test_a_second_run_on_a_busy_workdir_stops(data, tmp_path):
    workdir = str(tmp_path / "work")
    _write_lock(workdir, socket.gethostname(), os.getppid())  # a live process of this host
    with pytest.raises(WorkdirBusyError, match=r"work is in use by another training run \(host .*, pid "
                                               rf"{os.getppid()}, heartbeat 0 s ago"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)
    assert _steps(workdir) == []
    _write_lock(workdir, "another-host", 1, age_s=10.0)  # a live run elsewhere, heartbeat fresh
    with pytest.raises(WorkdirBusyError, match="host another-host"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)


def test_a_killed_runs_lock_does_not_block(data, tmp_path):
    workdir = str(tmp_path / "work")
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    _write_lock(workdir, socket.gethostname(), dead)
    assert train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)["step"] == 2
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))  # released at the end
    _write_lock(workdir, "another-host", 1, age_s=3600.0)  # heartbeat an hour old
    assert train.train_and_evaluate(train_worker.tiny_config(data, max_steps=3), workdir)["step"] == 3


def test_resuming_with_a_model_change_is_refused_unless_allowed(data, tmp_path):
    workdir = str(tmp_path / "work")
    train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)
    config = train_worker.tiny_config(data, max_steps=4)
    config.model.lam_qa = 0.5
    config.data.seed = 3
    with pytest.raises(ValueError, match=r"data\.seed: saved 0, now 3; model\.lam_qa: saved 0\.9, now 0\.5\. Use "
                                         r"another --workdir"):
        train.train_and_evaluate(config, workdir)
    config.train.allow_config_change = True
    assert sorted(train.train_and_evaluate(config, workdir)["losses"]) == [2, 3]


def test_a_field_missing_from_a_saved_config_counts_as_its_default():
    config = default.get_config()
    saved = config.to_dict()
    del saved["model"]["qaconv_block_mb"]  # a checkpoint written before the field existed
    assert resume.config_differences(saved, config) == []
    config.model.qaconv_block_mb = 64
    assert resume.config_differences(saved, config, ("model",)) == ["model.qaconv_block_mb: saved 256, now 64"]
    assert resume.config_differences(saved, config, ("data",)) == []


def test_a_full_disk_is_one_clear_error(data, tmp_path, monkeypatch):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = str(tmp_path / "work")
    with pytest.raises(OSError, match=r"no space left on device while saving step 4 in .*work/checkpoints; the "
                                      r"last complete checkpoint is .*work/checkpoints/2"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6), workdir)
    assert checkpoint.locate(workdir)[1] == 2


def test_too_few_identities_for_a_batch_are_refused_before_anything_is_written(tmp_path):
    folder = train_worker.make_tiny_folders(str(tmp_path / "one"), ["solo"], images_per_identity=20)
    config = train_worker.tiny_config(folder, max_steps=2)
    config.data.source = "folder"
    with pytest.raises(ValueError, match=r"data\.path=.*one: PK sampling needs at least p=4 identities, labels hold "
                                         r"1 \(train\.batch_size=16, data\.k=4\)"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")



def test_a_missing_occlusion_set_is_refused_before_anything_is_written(data, tmp_path):
    # Without train-time validation nothing else opens the sets: the run itself must, before the workdir.
    config = train_worker.tiny_config(data, max_steps=2, eval_every=-1)
    config.data.occlusion_sets = (str(tmp_path / "no_set"),)
    config.data.occlusion_batch = 4
    with pytest.raises(FileNotFoundError, match=r"data\.occlusion_sets\[0\]: occlusion set folder .*no_set does not "
                                                r"exist"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")

def _folder_config(folder, **overrides):
    config = train_worker.tiny_config(folder, **overrides)
    config.data.source = "folder"
    return config


def test_resuming_on_changed_identity_folders_is_refused_naming_the_change(tmp_path):
    names = [f"id{i}" for i in range(8)]
    data, workdir = str(tmp_path / "faces"), str(tmp_path / "work")
    train_worker.make_tiny_folders(data, names)
    train.train_and_evaluate(_folder_config(data, max_steps=2), workdir)
    # One identity replaced by a name that sorts first: every label below it shifts by one.
    os.rename(os.path.join(data, "id3"), os.path.join(data, "aaa"))
    with pytest.raises(ValueError, match=r"faces is not the data the checkpoint of step 2 was trained on: identities "
                                         r"added: 'aaa'; identities removed: 'id3'; classes renumbered: 'id0' was "
                                         r"class 0, now 1; 'id1' was class 1, now 2; 'id2' was class 2, now 3\. "
                                         r"Resume on that data"):
        train.train_and_evaluate(_folder_config(data, max_steps=4), workdir)
    allowed = _folder_config(data, max_steps=4, allow_data_change=True)
    assert sorted(train.train_and_evaluate(allowed, workdir)["losses"]) == [2, 3]
    # A ninth identity: refused by name, and even when allowed, its label has no row in the class kernel.
    train_worker.make_tiny_folders(data, ["zzz"])
    with pytest.raises(ValueError, match=r"identities added: 'zzz'; records: saved 64, now 72; classes: saved 8, "
                                         r"now 9\. "):
        train.train_and_evaluate(_folder_config(data, max_steps=6), workdir)
    with pytest.raises(ValueError, match=r"holds labels up to 8 but the checkpoint of step 4 has a class kernel of 8 "
                                         r"classes"):
        train.train_and_evaluate(_folder_config(data, max_steps=6, allow_data_change=True), workdir)


def test_a_finished_run_is_not_compiled_again(data, tmp_path, monkeypatch):
    workdir = str(tmp_path / "work")
    warned = []
    monkeypatch.setattr(train.logging, "warning", lambda msg, *args: warned.append(msg % args))
    assert train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)["step"] == 2
    compile_step = train._compile
    monkeypatch.setattr(train, "_compile", lambda *a, **k: pytest.fail("compiled"))
    again = train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)
    assert (again["step"], again["losses"], again["preempted"]) == (2, {}, False)
    config = train_worker.tiny_config(data, max_steps=2)
    config.model.lam_qa = 0.5
    with pytest.raises(ValueError, match=r"model\.lam_qa: saved 0\.9, now 0\.5"):  # the resume checks still hold
        train.train_and_evaluate(config, workdir)
    assert warned == []
    # max_steps past the last epoch's end is said, not silently cut (64 records / 16 = 4 steps per epoch).
    monkeypatch.setattr(train, "_compile", compile_step)
    assert train.train_and_evaluate(train_worker.tiny_config(data, max_steps=9, epochs=1), workdir)["step"] == 4
    assert warned == ["train.max_steps=9 is past the end of train.epochs=1 (4 steps each): the run stops at step 4; "
                      "raise train.epochs to train longer (the learning-rate schedule follows the epochs)"]


def test_a_damaged_latest_checkpoint_stops_the_resume_naming_it(data, tmp_path):
    workdir = str(tmp_path / "work")
    train.train_and_evaluate(train_worker.tiny_config(data, max_steps=4), workdir)
    assert _steps(workdir) == [2, 4]
    state_data = os.path.join(workdir, "checkpoints", "4", "state", "d")
    os.remove(os.path.join(state_data, sorted(os.listdir(state_data))[0]))
    folder = os.path.join(workdir, "checkpoints")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=rf"checkpoint {folder}/4 is damaged \(.*\); the "
                                                                r"newest intact step is 2: pass --step=2 .* \(mv "
                                                                rf"{folder}/4 {folder}/4\.damaged\) to resume"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6), workdir)
    os.rename(os.path.join(folder, "4"), os.path.join(folder, "4.damaged"))
    assert sorted(train.train_and_evaluate(train_worker.tiny_config(data, max_steps=6), workdir)["losses"]) == \
        [2, 3, 4, 5]


def test_a_busy_workdir_on_this_host_promises_no_timeout(data, tmp_path):
    workdir = str(tmp_path / "work")
    _write_lock(workdir, socket.gethostname(), os.getppid())
    with pytest.raises(WorkdirBusyError) as caught:
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)
    assert str(caught.value).endswith(f"choose another --workdir, or process {os.getppid()} on this host is still "
                                      "running: stop it, or wait for it to end (its lock is then taken over at once).")
    assert "120 s" not in str(caught.value) and logs._raised_by_the_project(caught.value)
    _write_lock(workdir, "another-host", 1)
    with pytest.raises(WorkdirBusyError, match=r"a killed run's lock is taken over once its heartbeat is older than "
                                               r"120 s\.$"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), workdir)


def test_a_workdir_that_cannot_be_written_is_one_error(data, tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "mkdir", read_only)
    with pytest.raises(OSError) as caught:
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), str(tmp_path / "work"))
    assert str(caught.value) == (f"workdir {tmp_path}/work cannot be written (Read-only file system): training "
                                 "writes its lock, checkpoints and summaries there; choose a --workdir you can write")
    assert logs._raised_by_the_project(caught.value)
    monkeypatch.undo()
    os.makedirs(tmp_path / "existing")
    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "write_text", read_only)
    with pytest.raises(OSError, match=r"workdir .*existing cannot be written \(Read-only file system\)"):
        train.train_and_evaluate(train_worker.tiny_config(data, max_steps=2), str(tmp_path / "existing"))
