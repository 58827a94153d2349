"""Trains OAML (a thin entry point; the command line is `oaml_jax.cli.train`, also installed as `oaml-train`).

    python train.py --config=configs/ir50_ms1mv2.py --workdir=gs://bucket/ir50 --config.data.path=gs://bucket/faces_emore
    python train.py --config=configs/demo.py --workdir=demo_workdir/train

Exits 0 when the run is complete, 75 after saving a checkpoint on a preemption notice (restart it), 130 after
saving one on Ctrl-C (rerun to resume).
"""

from oaml_jax import cli

if __name__ == "__main__":
    cli.train()
