"""Evaluates a checkpoint (a thin entry point; the command line is `oaml_jax.cli.evaluate`, also `oaml-eval`).

    python eval.py --config=configs/default.py --workdir=/tmp/run [--step=N] [--checkpoint=PATH]
    python eval.py --workdir=/tmp/run --folder=DIR | --pairs_file=FILE --images=ROOT | --gallery=DIR --probe=DIR
"""

from oaml_jax import cli

if __name__ == "__main__":
    cli.evaluate()
