"""Shared pytest set-up: the fake GCS fixture `gcs` (tests/fake_gcs.py) for every test file."""

pytest_plugins = ["fake_gcs"]
