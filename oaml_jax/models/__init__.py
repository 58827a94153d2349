"""Flax linen models: IR backbones, margin heads, QAConv, the occlusion head and the OAML model."""

from oaml_jax.models.backbone import ARCHS
from oaml_jax.models.backbone import IResNet
from oaml_jax.models.backbone import build_backbone
from oaml_jax.models.heads import AdaFace
from oaml_jax.models.heads import ArcFace
from oaml_jax.models.heads import CosFace
from oaml_jax.models.oaml import HEADS
from oaml_jax.models.oaml import OAML
from oaml_jax.models.occlusion import OcclusionHead
from oaml_jax.models.qaconv import QAConv
from oaml_jax.models.qaconv import qaconv_pair_scores
from oaml_jax.models.qaconv import qaconv_scores_chunked

__all__ = [
    "ARCHS", "AdaFace", "ArcFace", "CosFace", "HEADS", "IResNet", "OAML", "OcclusionHead", "QAConv",
    "build_backbone", "qaconv_pair_scores", "qaconv_scores_chunked",
]
