"""Logs a person can read: the libraries' INFO chatter off, the run's own lines kept.

Orbax logs every save phase at INFO (most of a short run's log), Grain its worker start-up, JAX its
compilation cache; `quiet_libraries` drops INFO (and DEBUG) records whose source file lives in those
packages, keeping their warnings and errors and every record of oaml_jax, data_pipelines and clu (the
metric and progress lines). `--log_libraries` on the command lines turns it off. (TensorFlow's C++
runtime prints two start-up lines before any filter can act; TF 2.21 ignores TF_CPP_MIN_LOG_LEVEL there.)

`run` is how every command line starts: `--help` shows the command's description and all of its own flags
(also for the console scripts, whose `__main__` is a generated wrapper), and an input the project's own code
refuses (a ValueError or OSError raised in oaml_jax, data_pipelines or configs: a config field, a missing
file, a busy workdir) ends in one line naming it (ending in where its traceback is: `--verbosity=1`), exit
status 1.
So do a flag or a `--config.field=value` override that cannot be parsed (a misspelt field with its "did you
mean" hint) and a command's usage error (`app.UsageError`: a wrong `--config` path, a missing argument):
one line, not the help text. Errors raised inside libraries keep their whole traceback.
"""

from __future__ import annotations

import ast
import importlib.util
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

LOG_LIBRARIES = "log_libraries"

_QUIET_PACKAGES = ("orbax", "grain", "jax", "jaxlib", "tensorflow", "etils", "tensorstore", "absl")
# The project's packages: their flags are what a command's --help lists, their refusals end in one line.
_OWN_PACKAGES = ("oaml_jax", "data_pipelines", "configs")
# What a command reports in one line when the project's code raises it: a refused config field or input, a
# missing or unreadable path.
_INPUT_ERRORS = (ValueError, OSError)


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
    _describe_in_help(sys.modules[main.__module__].__doc__)

    def wrapped(argv: Sequence[str]) -> None:
        if not flags.FLAGS[LOG_LIBRARIES].value:
            quiet_libraries()
        try:
            main(argv)
        except app.UsageError as e:
            sys.exit(f"error: {e}")
        except _INPUT_ERRORS as e:
            if not _raised_by_the_project(e):
                raise
            if logging.level_debug():
                logging.debug("traceback of the error below", exc_info=True)
                sys.exit(f"error: {e}")
            sys.exit(f"error: {e} [traceback: --verbosity=1]")

    app.run(wrapped, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """`flags.FLAGS(argv)`, a flag or config override it cannot parse ending the program in one line.

    Returns:
        The arguments left after the flags (what `main` gets).

    Raises:
        SystemExit: with "error: <what is wrong>" (exit status 1); `--help` exits as absl makes it.
    """
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as e:
        sys.exit(f"error: {_one_line(str(e))} (--helpshort lists the flags)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections' config_flags raise these from a `--config.a.b=v` override (a KeyError's text
        # quoted once more inside an AttributeError for an unknown field).
        sys.exit(f"error: {_override_problem(argv, e)}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _override_problem(argv: Sequence[str], error: Exception) -> str:
    """One line naming the `--config.` override that `error` refuses, e.g. "--config.train.batchsize:
    no field 'batchsize'; did you mean "batch_size" instead of "batchsize"?"."""
    text = str(error)
    for _ in range(2):  # unquote what KeyError and AttributeError quoted, down to "'field'[\nhint]"
        if re.match(r"'[^'\\]+'(\n|$)", text) or text[:1] not in "'\"":
            break
        try:
            text = str(ast.literal_eval(text))
        except (SyntaxError, ValueError):
            break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    field = re.fullmatch(r"'([^']+)'", lines[0]) if lines else None
    overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    if field:
        named = [arg for arg in overrides if field.group(1) in arg[len("--config."):].split(".")]
        hint = "".join(f"; {line[0].lower()}{line[1:]}" for line in lines[1:])
        return f"{named[0] if named else '--config'}: no field {lines[0]}{hint}"
    return f"{overrides[0] if len(overrides) == 1 else '--config'}: {_one_line(text)}"


def _raised_by_the_project(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is in one of `_OWN_PACKAGES`."""
    specs = [importlib.util.find_spec(name) for name in _OWN_PACKAGES]  # "configs" only in a checkout
    folders = tuple(os.path.join(folder, "") for spec in specs if spec is not None
                    for folder in (spec.submodule_search_locations or ()))
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(folders)


def _describe_in_help(doc: str | None) -> None:
    """Makes absl's --help print `doc` (when `__main__` has no docstring) and every flag the project defines."""
    main_module = sys.modules["__main__"]
    if not main_module.__doc__ and doc:
        main_module.__doc__ = doc
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.split(".")[0] in _OWN_PACKAGES:
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def quiet_libraries() -> None:
    """Installs the filter on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
