"""OAML on MS1MV2 (faces_emore) with an IR-100 backbone: the IR-50 recipe with a deeper backbone.

    python train.py --config=configs/ir100_ms1mv2.py --workdir=/tmp/ir100 \
        --config.data.path=/data/faces_emore
"""

from typing import Optional

import ml_collections

from configs import ir50_ms1mv2


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Returns the IR-100 MS1MV2 config; `arg="test"` shrinks it like configs/default.py."""
    config = ir50_ms1mv2.get_config(arg)
    if arg != "test":
        config.model.arch = "ir_100"
    return config
