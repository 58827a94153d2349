"""Shared pytest set-up: the fake GCS fixture `gcs` (tests/fake_gcs.py) and the tiny checkpoint fixtures."""

import pytest

pytest_plugins = ["fake_gcs"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny training checkpoint (tests/test_inference.py's `write_training_checkpoint`)."""
    from test_inference import write_training_checkpoint
    return write_training_checkpoint(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def face_model(workdir):
    from oaml_jax.evaluation.verdict import CalibratedFaceModel
    return CalibratedFaceModel.from_workdir(workdir, batch_size=4)
