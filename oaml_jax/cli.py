"""Command lines of training and evaluation (`train.py`, `eval.py`, and the `oaml-train` / `oaml-eval` scripts).

    python train.py --config=configs/ir50_ms1mv2.py --workdir=gs://bucket/ir50 [--config.train.batch_size=1024]
    python eval.py --config=configs/ir50_ms1mv2.py --workdir=gs://bucket/ir50 [--step=N] [--checkpoint=DIR]
    python eval.py --workdir=W --folder=DIR [--aligned]               # identity sub-folders, all pairs
    python eval.py --workdir=W --pairs_file=pairs.txt --images=ROOT   # LFW-format pairs on an image root
    python eval.py --workdir=W --gallery=DIR --probe=DIR              # 1:N identification

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
import ml_collections
from ml_collections import config_flags

from oaml_jax import logs

PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130


def _define_common(config_help: str, default_config: str | None = None) -> None:
    config_flags.DEFINE_config_file("config", default_config, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, "Working directory: local, NFS or any etils.epath URI (gs://...).")
    flags.mark_flags_as_required(["workdir"] if default_config else ["config", "workdir"])


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
    config = _config_value()
    from oaml_jax import train  # After flag parsing: the import pulls in the data stack and TensorFlow.
    result = train.train_and_evaluate(config, flags.FLAGS.workdir)
    if result["preempted"]:
        sys.exit(INTERRUPTED_EXIT_CODE if result["signal"] == "SIGINT" else PREEMPTED_EXIT_CODE)


def shorthand_evaluators(*, folder: str = "", pairs_file: str = "", images: str = "", gallery: str = "",
                         probe: str = "", aligned: bool = False) -> dict[str, dict]:
    """The `config.eval.evaluators` entries eval.py's shorthand flags stand for (empty: none given).

    Each entry is named after its folder (the pairs file's image root, the gallery folder); its `fields` make
    messages about its paths name the flags (`--folder=DIR: not a folder`), not a config field.

    Raises:
        app.UsageError: a flag without its partner (--pairs_file/--images, --gallery/--probe), or --aligned alone.
    """
    name = lambda path, default: epath.Path(path).name or default
    entries = {}
    if folder:
        entries[name(folder, "folder")] = dict(type="folder", path=folder, aligned=aligned,
                                               fields=dict(path="--folder"))
    if bool(pairs_file) != bool(images):
        raise app.UsageError("--pairs_file and --images go together (the pairs file and the image root it names)")
    if pairs_file:
        entries[name(images, "pairs_file")] = dict(type="pairs_file", pairs=pairs_file, images=images, aligned=aligned,
                                                   fields=dict(pairs="--pairs_file", images="--images"))
    if bool(gallery) != bool(probe):
        raise app.UsageError("--gallery and --probe go together (two folders of identity sub-folders)")
    if gallery:
        entries[name(gallery, "gallery")] = dict(type="identification", gallery=gallery, probe=probe, aligned=aligned,
                                                  fields=dict(gallery="--gallery", probe="--probe"))
    if aligned and not entries:
        raise app.UsageError("--aligned applies to --folder, --pairs_file or --gallery/--probe; none is given")
    return entries


def _eval_main(argv: list[str]) -> None:
    del argv
    config = _config_value()
    from oaml_jax.evaluation import runner
    f = flags.FLAGS
    entries = shorthand_evaluators(folder=f.folder, pairs_file=f.pairs_file, images=f.images, gallery=f.gallery,
                                   probe=f.probe, aligned=f.aligned)
    if entries:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.eval.evaluators = ml_collections.ConfigDict(entries)
    runner.run(config, f.workdir, step=f.step, checkpoint=f.checkpoint, print_table=True,
               subdir="+".join(entries))


def train() -> None:
    """`train.py` / `oaml-train`."""
    _define_common("Training config (a configs/*.py file; `file.py:arg` passes an argument).")
    _run(_train_main)


def evaluate() -> None:
    """`eval.py` / `oaml-eval`."""
    _define_common("Eval config (the training config file; default the library's oaml_jax/configs/default.py).",
                   str(epath.resource_path("oaml_jax") / "configs" / "default.py"))
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint directory to evaluate instead of the workdir's (e.g. a "
                        "converted AdaFace checkpoint).")
    flags.DEFINE_string("folder", "", "Verify every pair of a folder of identity sub-folders (instead of the "
                        "config's evaluators).")
    flags.DEFINE_string("pairs_file", "", "An LFW-format pairs.txt to verify (with --images).")
    flags.DEFINE_string("images", "", "The image root the --pairs_file names (<root>/<name>/<name>_<n>.<ext>).")
    flags.DEFINE_string("gallery", "", "1:N identification: gallery folder of identity sub-folders (with --probe).")
    flags.DEFINE_string("probe", "", "1:N identification: probe folder of identity sub-folders (with --gallery).")
    flags.DEFINE_bool("aligned", False, "The shorthand sets' images are aligned 112x112 crops (no detection).")
    _run(_eval_main)
