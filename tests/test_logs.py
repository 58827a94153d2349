"""oaml_jax/logs.py: which errors a command reports in one line."""

import json
import os
import subprocess
import sys

import pytest

from oaml_jax import checkpoint, logs


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def test_only_the_projects_own_refusals_are_shortened(tmp_path):
    assert logs._raised_by_the_project(_raised(lambda: checkpoint.locate(str(tmp_path / "absent"))))
    assert not logs._raised_by_the_project(_raised(lambda: json.loads("{")))  # a library's error: traceback kept
    assert not logs._raised_by_the_project(_raised(lambda: int("x")))  # raised in this (test) file


def test_a_config_override_that_cannot_be_parsed_is_named_in_one_line():
    """Known answers for the exceptions ml_collections raises (an unknown field: a KeyError's text quoted
    inside an AttributeError, with the "did you mean" hint)."""
    argv = ["train.py", "--config=c.py", "--config.train.batchsize=3", "--workdir=w"]
    typo = AttributeError(str(KeyError("'batchsize'\nDid you mean \"batch_size\" instead of \"batchsize\"?")))
    assert logs._override_problem(argv, typo) == (
        "--config.train.batchsize: no field 'batchsize'; did you mean \"batch_size\" instead of \"batchsize\"?")
    assert logs._override_problem(["t", "--config.nope=1"], AttributeError(str(KeyError("'nope'")))) == (
        "--config.nope: no field 'nope'")
    assert logs._override_problem(["t", "--config.a=x"], ValueError("bad\n  value")) == "--config.a: bad value"


def _train_py(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "train.py", *args], cwd=repo, capture_output=True, text=True,
                          timeout=300)


def test_refusals_of_the_command_line_are_one_line_not_the_help(tmp_path):
    for args, line in [
            (("--config=configs/default.py:test", f"--workdir={tmp_path}", "--config.train.batchsize=3"),
             "error: --config.train.batchsize: no field 'batchsize'; did you mean \"batch_size\" instead of "
             "\"batchsize\"?"),
            (("--config=configs/nope.py", f"--workdir={tmp_path}"),
             "error: --config=configs/nope.py: no such config file"),
            (("--config=configs/default.py:test", f"--workdir={tmp_path}", "--config.train.batch_size=x"),
             "error: flag --config.train.batch_size=x: invalid literal for int() with base 10: 'x' (--helpshort lists "
             "the flags)"),
            (("--config=configs/default.py:test", f"--workdir={tmp_path}", "extra"),
             "error: unexpected arguments ['extra']")]:
        proc = _train_py(*args)
        assert (proc.returncode, proc.stderr.splitlines()) == (1, [line]), proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []
