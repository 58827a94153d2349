"""eval.py's command line: the shorthand flags, one table on stdout, and a workdir it cannot write refused first."""

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import app

import train_worker
from oaml_jax import cli
from oaml_jax.evaluation import evaluators

from test_eval_folder import write_aligned_folder
from tiny_checkpoint import tiny_config

REPO = train_worker.ROOT


def _eval(*args):
    env = dict(os.environ, **train_worker.CACHE_ENV)
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_shorthands_make_evaluator_entries():
    assert cli.shorthand_evaluators() == {}
    assert cli.shorthand_evaluators(folder="/data/niqab/", aligned=True) == {
        "niqab": dict(type="folder", path="/data/niqab/", aligned=True, fields=dict(path="--folder"))}
    assert cli.shorthand_evaluators(pairs_file="/d/mfr2/pairs.txt", images="/d/mfr2") == {
        "mfr2": dict(type="pairs_file", pairs="/d/mfr2/pairs.txt", images="/d/mfr2", aligned=False,
                     fields=dict(pairs="--pairs_file", images="--images"))}
    assert cli.shorthand_evaluators(gallery="/d/ar/gallery", probe="/d/ar/probe") == {
        "gallery": dict(type="identification", gallery="/d/ar/gallery", probe="/d/ar/probe", aligned=False,
                        fields=dict(gallery="--gallery", probe="--probe"))}
    with pytest.raises(app.UsageError, match="--pairs_file and --images go together"):
        cli.shorthand_evaluators(pairs_file="pairs.txt")
    with pytest.raises(app.UsageError, match="--gallery and --probe go together"):
        cli.shorthand_evaluators(probe="/d/probe")
    with pytest.raises(app.UsageError, match="--aligned applies to"):
        cli.shorthand_evaluators(aligned=True)


@pytest.mark.parametrize("flags,message", [
    (dict(folder="{d}/nothere"), "--folder={d}/nothere: not a folder"),
    (dict(pairs_file="{d}/nothere.txt", images="{d}"), "--pairs_file={d}/nothere.txt: no such file"),
    (dict(pairs_file="{d}/pairs.txt", images="gs:/b/x"), "--images='gs:/b/x': looks like a URI with a missing slash"),
    (dict(gallery="{d}/nothere", probe="{d}"), "--gallery={d}/nothere: no such folder or list file"),
    (dict(gallery="{d}/faces", probe="{d}/nothere"), "--probe={d}/nothere: no such folder or list file"),
])
def test_shorthand_errors_name_the_flag_and_config_entries_their_field(tmp_path, flags, message):
    (tmp_path / "pairs.txt").write_text("")
    write_aligned_folder(str(tmp_path / "faces"), identities=2, images=1)
    config = tiny_config()
    config.eval.evaluators = ml_collections.ConfigDict(
        cli.shorthand_evaluators(**{k: v.format(d=tmp_path) for k, v in flags.items()}))
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        evaluators.from_config(config, training=False)
    assert str(raised.value).startswith(message.format(d=tmp_path))
    # The same entry declared in the config (no `fields`) names its config field.
    name, entry = next(iter(config.eval.evaluators.items()))
    del entry["fields"]
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        evaluators.from_config(config, training=False)
    key = {"folder": "path", "pairs_file": "pairs", "images": "images", "gallery": "gallery", "probe": "probe"}[
        message.split("=")[0][2:]]
    assert str(raised.value).startswith(f"eval.evaluators.{name}.{key}=")


def test_workdir_it_cannot_write_is_refused_in_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # A workdir below a file cannot be created (root writes through permissions, not through files).
    done = _eval(f"--workdir={blocker}/run", f"--folder={tmp_path}/no_such_folder")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    out = f"{blocker}/run/eval/no_such_folder"  # a one-off set's own folder
    assert errors == [f"error: eval.py writes its results to {out} and cannot write there (Not a directory); pass a "
                      "--workdir you can write (with --checkpoint=<the run> to evaluate another's) "
                      "[traceback: --verbosity=1]"]
    assert "Traceback" not in done.stderr and "not a folder" not in done.stderr and done.stdout == ""


def test_folder_shorthand_prints_one_table(tmp_path, workdir):
    faces = write_aligned_folder(str(tmp_path / "niqab"), identities=3, images=2)
    done = _eval(f"--workdir={tmp_path / 'out'}", f"--checkpoint={workdir}", f"--folder={faces}", "--aligned",
                 "--config.eval.batch_size=16", "--config.eval.tensorboard=False")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["folder", "variant", "score", "(%)"]
    assert [line.split()[:3] for line in lines[2:6]] == [["niqab", "clean", m] for m in ("AdaFace", "QAConv", "fused",
                                                                                          "gated")]
    assert lines[6] == ("niqab: 6 faces of 3 identities from 6 photos (0 without a face; 0 unreadable; 0 other "
                        "entries skipped); 3 genuine and 12 impostor pairs")
    assert "%|" not in done.stderr and "Got images" not in done.stderr + done.stdout
    # A one-off set's files go to eval/<its name>/: the workdir's own results and calibration stay as they are.
    with open(tmp_path / "out" / "eval" / "niqab" / "results.txt") as f:
        assert f.read() == done.stdout
    assert sorted(os.listdir(tmp_path / "out" / "eval")) == ["niqab"]
