"""Demo: a narrow OAML model on the embedded synthetic identities, trained in minutes on a CPU.

`python -m oaml_jax.demo` writes the data, trains with this config and evaluates (its --help; the README's
Quick start shows the same run step by step and the table it prints).
"""

from typing import Optional

import ml_collections

from oaml_jax.configs import default


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Returns the demo config; `arg="test"` shrinks it like configs/default.py."""
    config = default.get_config(arg)
    if arg == "test":
        return config
    config.model.arch = "ir_18"
    config.model.backbone = ml_collections.ConfigDict(dict(
        stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), embedding_size=64))
    config.data.path = "demo_workdir/data"
    config.data.augment.lowres_prob = 0.0
    # Milder crops than AdaFace's 0.2-1 of the area: in a few hundred steps the narrow model cannot learn
    # the faces that heavy crops leave (its held-out accuracy was clearly lower with 0.2-1).
    config.data.augment.crop_scale = (0.6, 1.0)
    # AdaFace's s = 64 is scaled for 512-d embeddings (initial logit spread s / sqrt(512) = 2.8); on this 64-d
    # embedding the spread is 8, the hardest of the 127 wrong classes dominates the loss, and the loss falls
    # fastest by turning every embedding away from all class centres (all cosines ~0, the loss stuck at
    # s m + ln 128 = 30.5), which carries no identity. Held-out accuracy rose as s fell from 64 to 8, about the
    # AdaCos scale for 128 classes (sqrt(2) ln 127 = 6.9).
    config.model.head_kwargs.s = 8.0
    config.optim.lr = 1.6  # per 512 images: 0.1 for the batch of 32
    config.optim.schedule = "cosine"
    config.optim.warmup_epochs = 0.5
    config.train.epochs = 6
    # With SGD and few steps, the MSE on the sigmoid output saturates into "all visible"; the
    # cross-entropy keeps its gradient. The head sees a detached feature map, so its loss weight only sets
    # how fast the head learns.
    config.model.occ_loss = "bce"
    config.model.lam_occ = 1.0
    config.train.batch_size = 32
    # OAML's second stream on the synthetic occlusion set the demo writes (data_pipelines/synthetic_occlusion.py):
    # 8 faces per step, 6 covered and 2 clean; 10% of the set held out to score the head on real coverings.
    config.data.occlusion_sets = ("demo_workdir/data/occlusion",)
    config.data.occlusion_batch = 8
    config.train.log_every = 8
    config.train.checkpoint_every = 64
    config.train.eval_every = 0
    config.eval.bin_names = ("lfw",)
    config.eval.batch_size = 64
    return config
