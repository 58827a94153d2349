"""The demo's config (oaml_jax/configs/demo.py, which `python -m oaml_jax.demo` uses), read by path.

    python train.py --config=configs/demo.py --workdir=demo_workdir/train
"""

from oaml_jax.configs.demo import get_config  # noqa: F401  (config_flags calls get_config)
