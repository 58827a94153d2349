"""Every knob, documented: the library's default config (oaml_jax/configs/default.py), read by path.

    python train.py --config=configs/default.py --workdir=/tmp/run
    python train.py --config=configs/default.py:test --workdir=/tmp/run   # tiny, for tests and laptops
"""

from oaml_jax.configs.default import get_config  # noqa: F401  (config_flags calls get_config)
