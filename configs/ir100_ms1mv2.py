"""OAML on MS1MV2 (faces_emore) with an IR-100 backbone: the IR-50 recipe with a deeper backbone.

    python train.py --config=configs/ir100_ms1mv2.py --workdir=/tmp/ir100 \
        --config.data.path=/data/faces_emore
"""

from typing import Optional

import ml_collections

from oaml_jax.configs import default


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Returns the IR-100 MS1MV2 config; `arg="test"` shrinks it like configs/default.py.

    The IR-50 recipe's overrides (configs/ir50_ms1mv2.py; a recipe read by path cannot import its sibling) and
    the deeper backbone: tests/test_configs.py checks that the two differ in the arch alone.
    """
    config = default.get_config(arg)
    if arg == "test":
        return config
    config.data.num_workers = 8
    config.model.qaconv_group_size = 64
    config.model.arch = "ir_100"
    return config
