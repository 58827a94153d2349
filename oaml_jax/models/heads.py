"""Margin-based classification heads: AdaFace, ArcFace and CosFace.

All heads share one class kernel, the param "kernel" `[E, C]` with the class axis last so that it can be
sharded `P(None, "data")` (model parallel over identities). Its columns are L2-normalized in the forward
pass, so the logits are `s * cos(angle)` with a margin applied only on each sample's target column.
Logits are computed in float32 whatever the compute dtype of the embeddings.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _unit_columns_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Normal init scaled by 1/sqrt(E): columns start with norm close to 1, like the original renorm."""
    return jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])


class _MarginHead(nn.Module):
    """Shared kernel, cosine and margin plumbing; subclasses define `_target_cosine`.

    Attributes:
        num_classes: number of identities C.
        embedding_size: embedding width E; inputs must match it.
        s: logit scale.
        m: margin.
        eps: cosines are clipped to `[-1 + eps, 1 - eps]` so that arccos stays differentiable.
    """

    num_classes: int
    embedding_size: int = 512
    s: float = 64.0
    m: float = 0.4
    eps: float = 1e-3

    def setup(self):
        self.kernel = self.param("kernel", _unit_columns_init, (self.embedding_size, self.num_classes),
                                 jnp.float32)

    def _check_embeddings(self, embeddings: Array) -> None:
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.embedding_size:
            raise ValueError(
                f"oaml_jax/models/heads.py {type(self).__name__}: embeddings must be [N, {self.embedding_size}]"
                f" (embedding_size), got shape {tuple(embeddings.shape)}")

    def cosine(self, embeddings: Array) -> Array:
        """Unmargined cosines between embeddings and the normalized class kernel.

        Args:
            embeddings: `[N, E]` L2-normalized embeddings (any float dtype).

        Returns:
            `[N, C]` float32 cosines.
        """
        self._check_embeddings(embeddings)
        kernel = self.kernel / jnp.linalg.norm(self.kernel, axis=0, keepdims=True)
        return jnp.matmul(embeddings.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)

    def _target_cosine(self, cos_target: Array, norms: Array, train: bool) -> Array:
        raise NotImplementedError

    def __call__(self, embeddings: Array, norms: Array, labels: Array, train: bool = False) -> Array:
        """Scaled logits with the margin on the target column only.

        Args:
            embeddings: `[N, E]` L2-normalized embeddings.
            norms: `[N, 1]` embedding norms before normalization (used by AdaFace only).
            labels: `[N]` int32 target classes.
            train: whether this is a training step (AdaFace updates its norm statistics).

        Returns:
            `[N, C]` float32 logits.
        """
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"oaml_jax/models/heads.py {type(self).__name__}: labels must be [N] = {embeddings.shape[:1]},"
                f" got shape {tuple(labels.shape)}")
        cos = jnp.clip(self.cosine(embeddings), -1.0 + self.eps, 1.0 - self.eps)
        # Only the target column gets a margin: reduce it out of the (possibly class-sharded) matrix once,
        # adjust the [N] vector, and put it back, instead of taking arccos of all N x C entries.
        one_hot = labels[:, None] == jnp.arange(self.num_classes)[None, :]
        cos_target = jnp.sum(jnp.where(one_hot, cos, 0.0), axis=1)
        cos_target = self._target_cosine(cos_target, norms, train)
        return self.s * jnp.where(one_hot, cos_target[:, None], cos)


class ArcFace(_MarginHead):
    """ArcFace: additive angular margin, target cos(clip(theta + m, eps, pi - eps))."""

    m: float = 0.5

    def _target_cosine(self, cos_target: Array, norms: Array, train: bool) -> Array:
        theta = jnp.arccos(cos_target)
        return jnp.cos(jnp.clip(theta + self.m, self.eps, math.pi - self.eps))


class CosFace(_MarginHead):
    """CosFace: additive cosine margin, target cos - m."""

    m: float = 0.35

    def _target_cosine(self, cos_target: Array, norms: Array, train: bool) -> Array:
        return cos_target - self.m


class AdaFace(_MarginHead):
    """AdaFace: margin adapted to the feature norm (an image-quality proxy).

    With n = stop_gradient(clip(norm, 0.001, 100)) and EMA statistics of n over the (global) batch,
    ms = clip(h * (n - mean) / (std + eps), -1, 1); the target angle becomes clip(theta - m * ms, eps,
    pi - eps) and the target cosine is then reduced by m + m * ms. The statistics `batch_mean` (init 20)
    and `batch_std` (init 100, unbiased batch std) live in the "batch_stats" collection: in train mode
    the margin uses this batch's updated values, which are stored only when the collection is mutable.

    Attributes:
        h: scale of the normalized norm before clipping.
        t_alpha: EMA weight of the current batch.
    """

    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01

    def setup(self):
        super().setup()
        self.batch_mean = self.variable("batch_stats", "batch_mean", jnp.full, (), 20.0, jnp.float32)
        self.batch_std = self.variable("batch_stats", "batch_std", jnp.full, (), 100.0, jnp.float32)

    def _target_cosine(self, cos_target: Array, norms: Array, train: bool) -> Array:
        n = cos_target.shape[0]
        if norms.shape not in ((n, 1), (n,)):
            raise ValueError(
                f"oaml_jax/models/heads.py AdaFace: norms must be [N, 1] = ({n}, 1), got {tuple(norms.shape)}")
        safe_norms = jax.lax.stop_gradient(jnp.clip(norms.reshape(n).astype(jnp.float32), 0.001, 100.0))
        mean, std = self.batch_mean.value, self.batch_std.value
        if train:
            if n < 2:
                raise ValueError("oaml_jax/models/heads.py AdaFace: train=True needs a batch of at least 2 to "
                                 f"estimate the unbiased norm std, got N={n}")
            mean = self.t_alpha * jnp.mean(safe_norms) + (1.0 - self.t_alpha) * mean
            std = self.t_alpha * jnp.std(safe_norms, ddof=1) + (1.0 - self.t_alpha) * std
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                self.batch_mean.value = mean
                self.batch_std.value = std
        margin_scaler = jnp.clip(self.h * (safe_norms - mean) / (std + self.eps), -1.0, 1.0)
        g_angular = -self.m * margin_scaler
        g_additive = self.m + self.m * margin_scaler
        theta = jnp.arccos(cos_target)
        return jnp.cos(jnp.clip(theta + g_angular, self.eps, math.pi - self.eps)) - g_additive
