"""Command lines of training and evaluation (`train.py`, `eval.py`, and the `oaml-train` / `oaml-eval` scripts).

    python train.py --config=configs/ir50_ms1mv2.py --workdir=gs://bucket/ir50 [--config.train.batch_size=1024]
    python eval.py --config=configs/ir50_ms1mv2.py --workdir=gs://bucket/ir50 [--step=N] [--checkpoint=DIR]

Exit status of training: 0 when the run reached its last step, `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL:
"try again") when it saved a checkpoint and stopped on a preemption notice (SIGTERM, or JAX's preemption
service on multi-host jobs) so a requeue script can restart it, `INTERRUPTED_EXIT_CODE` (130, the shell's
code for Ctrl-C) when a Ctrl-C made it save and stop the same way (a requeue script does not restart what
a person stopped; rerun the command to resume); anything else is a failure.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from oaml_jax import logs

PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130


def _define_common(config_help: str) -> None:
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, "Working directory: local, NFS or any etils.epath URI (gs://...).")
    flags.mark_flags_as_required(["config", "workdir"])


def _config_value():
    """The parsed `--config`, with a missing file reported as itself (not as a later load failure)."""
    # "file.py:arg" passes an argument to get_config; the file is the part before it.
    path = re.sub(r":[^/]*$", "", config_flags.get_config_filename(flags.FLAGS["config"]))
    if not epath.Path(path).is_file():
        raise app.UsageError(f"--config={path}: no such config file")
    return flags.FLAGS.config


def _run(main: Callable[[list[str]], None]) -> None:
    def checked(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        main(argv)
    logs.run(checked)


def _train_main(argv: list[str]) -> None:
    del argv
    from oaml_jax import train  # After flag parsing: the import pulls in the data stack and TensorFlow.
    result = train.train_and_evaluate(_config_value(), flags.FLAGS.workdir)
    if result["preempted"]:
        sys.exit(INTERRUPTED_EXIT_CODE if result["signal"] == "SIGINT" else PREEMPTED_EXIT_CODE)


def _eval_main(argv: list[str]) -> None:
    del argv
    from oaml_jax.evaluation import runner
    f = flags.FLAGS
    result = runner.run(_config_value(), f.workdir, step=f.step, checkpoint=f.checkpoint)
    print(result["table"])


def train() -> None:
    """`train.py` / `oaml-train`."""
    _define_common("Training config (a configs/*.py file; `file.py:arg` passes an argument).")
    _run(_train_main)


def evaluate() -> None:
    """`eval.py` / `oaml-eval`."""
    _define_common("Eval config (the training config file).")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint directory to evaluate instead of the workdir's (e.g. a "
                        "converted AdaFace checkpoint).")
    _run(_eval_main)
