"""Evaluates a checkpoint: verification tables (clean and occluded pairs, IJB-B/C), ROC plots, summaries.

    python eval.py --config configs/default.py --workdir /tmp/run [--step N] [--checkpoint PATH]
"""

from absl import app, flags
from ml_collections import config_flags

from oaml_jax.evaluation import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config (training config file).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir; results go to <workdir>/eval.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory to evaluate instead of the "
                                  "workdir's (e.g. a converted AdaFace checkpoint).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    result = runner.run(_CONFIG.value, _WORKDIR.value, step=_STEP.value, checkpoint=_CHECKPOINT.value)
    print(result["table"])


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
