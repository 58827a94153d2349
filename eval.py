"""Evaluates a checkpoint (a thin entry point; the command line is `oaml_jax.cli.evaluate`, also `oaml-eval`).

    python eval.py --config=configs/default.py --workdir=/tmp/run [--step=N] [--checkpoint=PATH]
"""

from oaml_jax import cli

if __name__ == "__main__":
    cli.evaluate()
