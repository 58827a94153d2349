"""oaml_jax/logs.py: which errors a command reports in one line."""

import json

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
