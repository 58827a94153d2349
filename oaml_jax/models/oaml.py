"""OAML: backbone + margin head + occlusion head + QAConv, trained with one multi-task loss.

    L = lam_ada * CE(margin logits) + lam_qa * (L_pair + triplet_weight * L_trip) + lam_occ * MSE(occ, mask)

where `occ_loss="bce"` replaces the MSE by the binary cross-entropy of the occlusion logits.

QAConv matches the channel-normalized feature maps inside matching groups of `qaconv_group_size` consecutive
images of the (global) batch (0 = one group: the whole batch), each location weighted by its predicted
visibility (`qaconv_occlusion_weighting`). A group never spans devices when its size divides the per-device
batch (`check_group_size`): the device then matches only its own images, and the only cross-device traffic
QAConv adds is its two scalar BatchNorms' statistics. Three switches decide where gradients flow: into the
backbone from QAConv (`qaconv_to_backbone`), into the backbone from the occlusion head (not when
`detach_occ_input`), and into the occlusion head from QAConv (not when `detach_qaconv_vis`).
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from oaml_jax.models.heads import AdaFace, ArcFace, CosFace
from oaml_jax.models.occlusion import OcclusionHead
from oaml_jax.models.qaconv import QAConv, qaconv_loss, retrieval_accuracy
from oaml_jax.models.qaconv_matcher import BLOCK_BYTES, l2_normalize_channels

Array = jax.Array

OCC_LOSSES = ("mse", "bce")
HEADS = {"adaface": AdaFace, "arcface": ArcFace, "cosface": CosFace}


def check_group_size(group_size: int, *, global_batch: int, num_devices: int, k: int) -> int:
    """Checks `model.qaconv_group_size` against the batch layout.

    A group must lie inside one device's part of the batch (so no device needs another's feature maps) and
    hold whole identities of the PK / graph batches (K images each), at least two of them (the losses need
    negatives inside the group).

    Args:
        group_size: `model.qaconv_group_size`, images per matching group; 0 = the whole global batch.
        global_batch: `train.batch_size`, images over all devices.
        num_devices: devices the batch is split over.
        k: `data.k`, images per identity in a batch.

    Returns:
        The group size in images (`global_batch` for 0).

    Raises:
        ValueError: naming `model.qaconv_group_size` when it is negative, does not divide the per-device batch,
            is not a multiple of K or holds a single identity (naming `train.batch_size` when the batch does
            not split over the devices).
    """
    if group_size == 0:
        return global_batch
    if num_devices < 1 or global_batch % num_devices:
        raise ValueError(f"train.batch_size={global_batch} must split evenly over the {num_devices} devices")
    per_device = global_batch // num_devices
    if group_size < 0 or per_device % group_size:
        raise ValueError(f"model.qaconv_group_size={group_size} must be 0 (the whole batch) or divide the "
                         f"per-device batch {per_device} (train.batch_size={global_batch} over {num_devices} "
                         f"devices), so that no matching group spans devices")
    if group_size % k or group_size < 2 * k:
        raise ValueError(f"model.qaconv_group_size={group_size} must be a multiple of data.k={k} and at least 2 x "
                         f"{k}, so that every group holds whole identities and negatives for each of them")
    return group_size


class OAML(nn.Module):
    """Occlusion-aware metric learning model.

    Attributes:
        backbone: module with `backbone(images, train=...) -> (embeddings [B, E] L2-normalized,
            norms [B, 1], feature_map [B, h, w, c])`.
        num_classes: number of training identities.
        head: margin head name, a key of `HEADS`.
        head_kwargs: extra head attributes (s, m, h, t_alpha, eps, embedding_size).
        embedding_size: E for the head kernel; None reads `backbone.embedding_size` (512 if it has none).
        lam_ada: weight of the margin-head cross-entropy.
        lam_qa: weight of the QAConv loss.
        lam_occ: weight of the occlusion loss.
        occ_loss: "mse" (the original's: mean squared error of the sigmoid output) or "bce" (binary
            cross-entropy with the visible fraction as soft target; unlike the MSE its gradient does not
            vanish when the sigmoid saturates, so the head cannot get stuck predicting "all visible").
        qaconv_to_backbone: let QAConv gradients reach the backbone.
        detach_occ_input: feed the occlusion head stop_gradient(feature_map).
        detach_qaconv_vis: weight QAConv with stop_gradient(occlusion maps).
        triplet_weight: weight of the hard triplet term inside the QAConv loss.
        triplet_margin: margin of the hard triplet term.
        occ_hidden: hidden width of the occlusion head.
        qaconv_group_size: images per QAConv matching group (0 = the whole batch). Self-matching, the pairwise
            and triplet losses and the retrieval accuracy run inside groups of this many consecutive images
            (scores `[B/G, G, G]`), never across groups; each loss is the mean over the rows of all groups of
            the per-row value (as with one group), so its scale depends on G but not on the number of groups
            or devices. The QAConv BatchNorms' batch statistics are taken over all groups jointly.
        qaconv_occlusion_weighting: weight QAConv's similarities by the occlusion maps; False is the same as
            all-ones maps (and then QAConv gives the occlusion head no gradient).
        qaconv_block_bytes: float32 similarities the QAConv matcher holds at once per group
            (`qaconv_matcher.match_features`); trades memory for speed (results equal up to float rounding).
        dtype: compute dtype of the occlusion head and of the QAConv GEMMs.
    """

    backbone: nn.Module
    num_classes: int
    head: str = "adaface"
    head_kwargs: Mapping[str, Any] | None = None
    embedding_size: int | None = None
    lam_ada: float = 0.1
    lam_qa: float = 0.9
    lam_occ: float = 0.1
    occ_loss: str = "mse"
    qaconv_to_backbone: bool = True
    detach_occ_input: bool = True
    detach_qaconv_vis: bool = True
    triplet_weight: float = 0.5
    triplet_margin: float = 1.0
    occ_hidden: int = 128
    qaconv_group_size: int = 0
    qaconv_occlusion_weighting: bool = True
    qaconv_block_bytes: int = BLOCK_BYTES
    dtype: Any = jnp.float32

    def setup(self):
        head_kwargs = dict(self.head_kwargs or {})
        embedding_size = self.embedding_size or getattr(self.backbone, "embedding_size", 512)
        head_kwargs.setdefault("embedding_size", embedding_size)
        self.margin_head = HEADS[self.head](num_classes=self.num_classes, name="head", **head_kwargs)
        self.occlusion = OcclusionHead(hidden=self.occ_hidden, dtype=self.dtype)
        self.qaconv = QAConv(dtype=self.dtype, block_bytes=self.qaconv_block_bytes)

    def _occlusion_logits(self, feature_map: Array, train: bool) -> Array:
        occ_input = jax.lax.stop_gradient(feature_map) if self.detach_occ_input else feature_map
        return self.occlusion(occ_input, train=train, logits=True)

    def __call__(self, images: Array, labels: Array, masks: Array, train: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        """Multi-task loss of one (global) batch.

        Args:
            images: `[B, 112, 112, 3]` normalized images.
            labels: `[B]` int32 identities.
            masks: `[B, h, w]` float32 ground-truth visibility at the feature-map resolution (1 = visible).
            train: training mode (dropout, batch statistics, AdaFace EMA); pass
                `rngs={"dropout": key}, mutable=["batch_stats"]` to `apply`.

        Returns:
            (scalar loss, metrics dict with "loss", "loss_ada", "acc_ada", "norm_mean", and, for branches
            with a non-zero loss weight, "loss_occ", "occ_mae" (the occlusion head, also computed when
            QAConv needs its maps) and "loss_qa", "loss_pair", "loss_trip", "trip_valid", "acc_qa" (QAConv)).

        Raises:
            ValueError: when the masks do not match the feature map or `qaconv_group_size` does not divide B
                (`init` accepts any B: the variables do not depend on the grouping).
        """
        embeddings, norms, feature_map = self.backbone(images, train=train)
        feature_map = feature_map.astype(jnp.float32)
        if masks.shape != feature_map.shape[:3]:
            raise ValueError(f"oaml_jax/models/oaml.py: masks must be [B, h, w] = {feature_map.shape[:3]} "
                             f"(the occlusion map's size), got shape {tuple(masks.shape)}")

        logits = self.margin_head(embeddings, norms, labels, train=train)
        loss_ada = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss = self.lam_ada * loss_ada
        metrics = dict(loss_ada=loss_ada, norm_mean=jnp.mean(norms.astype(jnp.float32)),
                       acc_ada=jnp.mean((jnp.argmax(self.margin_head.cosine(embeddings), axis=1) == labels)
                                        .astype(jnp.float32)))
        # A branch whose loss weight is 0 is not computed (its metrics are left out); `init` still creates
        # every variable, so all variants of the model share one variable tree.
        initializing = self.is_initializing()
        run_qaconv = initializing or self.lam_qa > 0
        occlusion = None
        if initializing or self.lam_occ > 0 or (run_qaconv and self.qaconv_occlusion_weighting):
            occ_logits = self._occlusion_logits(feature_map, train)
            occlusion = jax.nn.sigmoid(occ_logits)
            if self.occ_loss == "mse":
                loss_occ = jnp.mean(jnp.square(occlusion - masks))
            else:
                loss_occ = jnp.mean(optax.sigmoid_binary_cross_entropy(occ_logits, masks))
            loss = loss + self.lam_occ * loss_occ
            metrics.update(loss_occ=loss_occ, occ_mae=jnp.mean(jnp.abs(occlusion - masks)))
        if run_qaconv:
            loss_qa, qa_metrics = self._qaconv_loss(feature_map, occlusion, labels, train)
            loss = loss + self.lam_qa * loss_qa
            metrics.update(loss_qa=loss_qa, **qa_metrics)
        metrics["loss"] = loss
        return loss, metrics

    def _qaconv_loss(self, feature_map: Array, occlusion: Array | None, labels: Array, train: bool
                     ) -> tuple[Array, dict[str, Array]]:
        """L_qa inside the matching groups, and its metrics (see `qaconv_loss`, `retrieval_accuracy`)."""
        batch = feature_map.shape[0]
        group = self.qaconv_group_size or batch
        if group > 0 and batch % group and self.is_initializing():
            group = batch  # init only creates the variables, whose shapes do not depend on the grouping
        if group < 0 or batch % group:
            raise ValueError(f"oaml_jax/models/oaml.py: model.qaconv_group_size={self.qaconv_group_size} must be "
                             f"0 or divide the batch of {batch} images")
        features = l2_normalize_channels(feature_map)
        if not self.qaconv_to_backbone:
            features = jax.lax.stop_gradient(features)
        features = features.reshape(batch // group, group, *features.shape[1:])
        vis = None
        if self.qaconv_occlusion_weighting:
            vis = jax.lax.stop_gradient(occlusion) if self.detach_qaconv_vis else occlusion
            vis = vis.reshape(features.shape[:-1])
        group_labels = labels.reshape(batch // group, group)
        scores = self.qaconv(features, features, vis, vis, train=train)
        loss_qa, qa_metrics = qaconv_loss(scores, group_labels, self.triplet_weight, self.triplet_margin)
        return loss_qa, dict(qa_metrics, acc_qa=retrieval_accuracy(scores, group_labels))

    def embed(self, images: Array, train: bool = False) -> dict[str, Array]:
        """Features for evaluation.

        Args:
            images: `[N, 112, 112, 3]` normalized images.
            train: forwarded to the backbone and occlusion head (normally False).

        Returns:
            dict(embeddings `[N, E]`, norms `[N, 1]`, feature_map `[N, h, w, c]` float32 L2-normalized over
            channels, occlusion `[N, h, w]` in [0, 1]).
        """
        embeddings, norms, feature_map = self.backbone(images, train=train)
        feature_map = feature_map.astype(jnp.float32)
        return dict(embeddings=embeddings, norms=norms, feature_map=l2_normalize_channels(feature_map),
                    occlusion=jax.nn.sigmoid(self._occlusion_logits(feature_map, train)))
