"""Logs a person can read: the libraries' INFO chatter off, the run's own lines kept.

Orbax logs every save phase at INFO (most of a short run's log), Grain its worker start-up, JAX its
compilation cache; `quiet_libraries` drops INFO (and DEBUG) records whose source file lives in those
packages, keeping their warnings and errors and every record of oaml_jax, data_pipelines and clu (the
metric and progress lines). `--log_libraries` on the command lines turns it off. (TensorFlow's C++
runtime prints two start-up lines before any filter can act; TF 2.21 ignores TF_CPP_MIN_LOG_LEVEL there.)
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

_QUIET_PACKAGES = ("orbax", "grain", "jax", "jaxlib", "tensorflow", "etils", "tensorstore", "absl")


class _LibraryInfoFilter(std_logging.Filter):
    """Drops records below WARNING that come from `_QUIET_PACKAGES`."""

    def __init__(self):
        super().__init__()
        self._markers = tuple(f"{os.sep}{name}{os.sep}" for name in _QUIET_PACKAGES)

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(m in record.pathname for m in self._markers)


def quiet_libraries() -> None:
    """Installs the filter on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
