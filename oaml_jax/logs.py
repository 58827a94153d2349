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
from collections.abc import Callable, Sequence

from absl import app, flags, logging

LOG_LIBRARIES = "log_libraries"

_QUIET_PACKAGES = ("orbax", "grain", "jax", "jaxlib", "tensorflow", "etils", "tensorstore", "absl")


class _LibraryInfoFilter(std_logging.Filter):
    """Drops records below WARNING that come from `_QUIET_PACKAGES`."""

    def __init__(self):
        super().__init__()
        self._markers = tuple(f"{os.sep}{name}{os.sep}" for name in _QUIET_PACKAGES)

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(m in record.pathname for m in self._markers)


def run(main: Callable[[Sequence[str]], None]) -> None:
    """`app.run(main)` for every command line of the project, with `--log_libraries` (default off: the
    libraries' INFO records are filtered out before `main` runs)."""
    if LOG_LIBRARIES not in flags.FLAGS:
        flags.DEFINE_bool(LOG_LIBRARIES, False, "Keep the INFO logs of Orbax, Grain, JAX and TensorFlow.")

    def wrapped(argv: Sequence[str]) -> None:
        if not flags.FLAGS[LOG_LIBRARIES].value:
            quiet_libraries()
        main(argv)

    app.run(wrapped)


def quiet_libraries() -> None:
    """Installs the filter on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
