"""OAML on MS1MV2 (faces_emore) with an IR-50 backbone: the AdaFace/OAML recipe.

Global batch 512, SGD momentum 0.9, lr 0.1, x0.1 at epochs 12, 20 and 24 of 26, weight decay 5e-4,
AdaFace m 0.4 h 0.333 s 64 t_alpha 0.01, loss weights 0.1 / 0.9 / 0.1, PK sampling with K = 4.
QAConv matches inside groups of 64 images (16 identities: 60 negatives per row), so its cost per device
stays the same from 1 to 8 devices at batch 512 and on pods at larger batches (the per-device batch must
be a multiple of 64); `--config.model.qaconv_group_size=0` matches the whole batch as the original did.

    python train.py --config=configs/ir50_ms1mv2.py --workdir=/tmp/ir50 \
        --config.data.path=/data/faces_emore
"""

from typing import Optional

import ml_collections

from oaml_jax.configs import default


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Returns the IR-50 MS1MV2 config; `arg="test"` shrinks it like configs/default.py.

    configs/default.py already holds this recipe's model, optimizer and schedule; only what differs is set.
    """
    config = default.get_config(arg)
    if arg == "test":
        return config
    config.data.num_workers = 8
    config.model.qaconv_group_size = 64
    return config
