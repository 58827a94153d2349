"""Occlusion head: predicts, per feature-map cell, the visible fraction of the face (1 = visible)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class OcclusionHead(nn.Module):
    """conv3x3(hidden, no bias) -> BN -> ReLU -> conv1x1(1, bias) -> sigmoid.

    Attributes:
        hidden: width of the hidden 3x3 convolution.
        dtype: compute dtype of the convolutions (params float32, BN statistics float32).
        momentum: BN running-average momentum (flax convention: new = momentum * old + (1 - momentum) * batch).
        epsilon: BN epsilon.
    """

    hidden: int = 128
    dtype: Any = jnp.float32
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, feature_map: Array, train: bool = False, logits: bool = False) -> Array:
        """Predicts the visibility map.

        Args:
            feature_map: `[N, h, w, c]` backbone feature map.
            train: BN uses batch statistics (and updates its running ones) when True.
            logits: return the pre-sigmoid logits instead (for a cross-entropy loss).

        Returns:
            `[N, h, w]` float32 visibility in [0, 1] (or its logits).
        """
        if feature_map.ndim != 4:
            raise ValueError("oaml_jax/models/occlusion.py OcclusionHead: feature_map must be [N, h, w, c], got "
                             f"shape {tuple(feature_map.shape)}")
        x = nn.Conv(self.hidden, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="conv1")(
            feature_map.astype(self.dtype))
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                         dtype=self.dtype, name="bn")(x)
        x = nn.relu(x)
        x = nn.Conv(1, (1, 1), use_bias=True, dtype=self.dtype, name="conv2")(x)[..., 0].astype(jnp.float32)
        return x if logits else jax.nn.sigmoid(x)
