"""Shared pytest set-up: the fake GCS fixture `gcs` (tests/fake_gcs.py), the tiny checkpoint fixtures, the
persistent compilation cache for the whole session (the same tiny programs are compiled by many tests, by
every pytest-xdist worker, and by the subprocesses that get `train_worker.CACHE_ENV`)."""

import pytest

import train_worker
from tiny_checkpoint import write_training_checkpoint

pytest_plugins = ["fake_gcs"]
train_worker.enable_compilation_cache()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One tiny training checkpoint (tests/tiny_checkpoint.py) for the whole session: tests only read it."""
    return write_training_checkpoint(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def face_model(workdir):
    from oaml_jax.evaluation.verdict import CalibratedFaceModel
    return CalibratedFaceModel.from_workdir(workdir, batch_size=4)
