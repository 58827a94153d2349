"""`config.model` -> modules and input contract: its one check, its one builder.

Two kinds of model come out of a config:
- `build_model`: the full `OAML` (backbone, margin head, occlusion head, QAConv) that training uses;
- `build_embedding_model`: the backbone alone, wrapped so its variables sit under "backbone" as in OAML.
  A converted AdaFace checkpoint holds exactly that.
Both take their backbone from `build_backbone_from_config`, so a converted checkpoint and a training run
with the same `model` fields have the same backbone, variable for variable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from oaml_jax.models import face_input
from oaml_jax.models.backbone import ARCHS, OVERRIDES, IResNet, build_backbone
from oaml_jax.models.oaml import HEADS, OCC_LOSSES, OAML
from oaml_jax.models.qaconv_matcher import BLOCK_BYTES, l2_normalize_channels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `model.backbone` overrides; the other backbone fields have model-level config fields of their own.
BACKBONE_OVERRIDES = tuple(k for k in OVERRIDES if k not in ("feature_stage", "dtype"))
LOSS_WEIGHTS = ("lam_ada", "lam_qa", "lam_occ")
SWITCHES = ("qaconv_to_backbone", "detach_occ_input", "detach_qaconv_vis", "qaconv_occlusion_weighting")
# What `build_embedding_model` reads (all a converted backbone records) and what `build_model` needs (it also
# reads the memory setting `qaconv_block_mb` where present).
EMBEDDING_FIELDS = ("arch", "backbone", "feature_stage", "dtype", "input_channel_order")
MODEL_FIELDS = EMBEDDING_FIELDS + ("head", "head_kwargs", "occ_loss", "qaconv_group_size") + LOSS_WEIGHTS + SWITCHES


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.model` before anything is built; raises ValueError naming the field.

    Checks arch, backbone overrides (by building the backbone), feature_stage, dtype, input_channel_order,
    head, loss weights (>= 0), occ_loss, qaconv_block_mb (>= 1) and num_classes (>= 0); ml_collections
    types the switches. The matching group size depends on the batch layout: `oaml.check_group_size` checks
    it with `config.train`.

    Args:
        config: the whole run config; only `config.model` is read.
        num_devices, process_count: unused here (the signature every section check of `run_spec.validate_config`
            shares).
    """
    model_cfg = config["model"]
    if model_cfg["arch"] not in ARCHS:
        raise ValueError(f"model.arch={model_cfg['arch']!r} is unknown; expected one of {ARCHS}")
    unknown = sorted(set(model_cfg["backbone"]) - set(BACKBONE_OVERRIDES))
    if unknown:
        raise ValueError(f"model.backbone: unknown override(s) {unknown}; expected some of {BACKBONE_OVERRIDES}")
    face_input.grid_size(model_cfg["feature_stage"])
    compute_dtype(model_cfg["dtype"])
    input_contract(model_cfg)
    try:
        build_backbone_from_config(model_cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.backbone={dict(model_cfg['backbone'])}: {e}") from e
    if model_cfg["head"] not in HEADS:
        raise ValueError(f"model.head={model_cfg['head']!r} is unknown; expected one of {sorted(HEADS)}")
    for lam in LOSS_WEIGHTS:
        if not model_cfg[lam] >= 0:
            raise ValueError(f"model.{lam}={model_cfg[lam]} must be >= 0")
    if model_cfg["occ_loss"] not in OCC_LOSSES:
        raise ValueError(f"model.occ_loss={model_cfg['occ_loss']!r} is unknown; expected one of {OCC_LOSSES}")
    if not model_cfg["qaconv_block_mb"] >= 1:
        raise ValueError(f"model.qaconv_block_mb={model_cfg['qaconv_block_mb']} must be >= 1 (MiB per matcher block)")
    if model_cfg["num_classes"] < 0:
        raise ValueError(f"model.num_classes={model_cfg['num_classes']} must be >= 0 (0 = from the data)")


def compute_dtype(name: str) -> Any:
    """The jnp dtype of `model.dtype`.

    Raises:
        ValueError: not one of `DTYPES`.
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is unknown; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def input_contract(model_cfg: Mapping[str, Any]) -> face_input.InputContract:
    """The input contract of the model `model_cfg` describes (channel order, feature-map side)."""
    return face_input.InputContract(channel_order=model_cfg["input_channel_order"],
                                    grid=face_input.grid_size(model_cfg["feature_stage"]))


def head_kwargs(model_cfg: Mapping[str, Any]) -> dict:
    """`model.head_kwargs` restricted to the attributes of the chosen head (others logged and dropped,
    so one config can switch between AdaFace and ArcFace/CosFace, which have no h / t_alpha)."""
    fields = {f.name for f in dataclasses.fields(HEADS[model_cfg["head"]])}
    kwargs = dict(model_cfg["head_kwargs"])
    unused = sorted(set(kwargs) - fields)
    if unused:
        logging.warning("model.head_kwargs %s are not attributes of %s; ignored", unused, model_cfg["head"])
    return {k: v for k, v in kwargs.items() if k in fields}


def build_backbone_from_config(model_cfg: Mapping[str, Any]) -> IResNet:
    """The IR backbone of `model.arch` with `model.backbone` overrides, feature stage and compute dtype."""
    return build_backbone(model_cfg["arch"], feature_stage=model_cfg["feature_stage"],
                          dtype=compute_dtype(model_cfg["dtype"]), **dict(model_cfg["backbone"]))


def build_model(model_cfg: Mapping[str, Any], num_classes: int) -> OAML:
    """The OAML module for `num_classes` identities.

    Args:
        model_cfg: `config.model` (see configs/default.py), already checked by `check_config`.
        num_classes: width of the class kernel (possibly padded to the device count, see
            `oaml_jax.sharding.padded_num_classes`).

    Returns:
        An unbound `OAML` module.
    """
    return OAML(
        backbone=build_backbone_from_config(model_cfg),
        num_classes=num_classes,
        head=model_cfg["head"],
        head_kwargs=head_kwargs(model_cfg),
        lam_ada=model_cfg["lam_ada"],
        lam_qa=model_cfg["lam_qa"],
        lam_occ=model_cfg["lam_occ"],
        occ_loss=model_cfg["occ_loss"],
        qaconv_to_backbone=model_cfg["qaconv_to_backbone"],
        detach_occ_input=model_cfg["detach_occ_input"],
        detach_qaconv_vis=model_cfg["detach_qaconv_vis"],
        qaconv_group_size=model_cfg["qaconv_group_size"],
        # A memory/speed setting, not part of the model: checkpoints saved before the field existed lack it.
        qaconv_block_bytes=model_cfg.get("qaconv_block_mb", BLOCK_BYTES // 2**20) * 2**20,
        qaconv_occlusion_weighting=model_cfg["qaconv_occlusion_weighting"],
        dtype=compute_dtype(model_cfg["dtype"]),
    )


class EmbeddingModel(nn.Module):
    """The backbone alone, with OAML's variable layout ("backbone/...") and its `embed` method.

    Attributes:
        backbone: the IR backbone.
    """

    backbone: nn.Module

    def embed(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Same outputs as `OAML.embed` without "occlusion" (no occlusion head).

        Args:
            images: `[N, 112, 112, 3]` float input (see `face_input.InputContract.preprocess`).
            train: forwarded to the backbone.

        Returns:
            dict(embeddings `[N, E]` float32 unit rows, norms `[N, 1]` float32, feature_map `[N, h, w, c]`
            float32 L2-normalized over channels).
        """
        embeddings, norms, feature_map = self.backbone(images, train=train)
        return dict(embeddings=embeddings, norms=norms, feature_map=l2_normalize_channels(feature_map))


def build_embedding_model(model_cfg: Mapping[str, Any]) -> EmbeddingModel:
    """The backbone-only model of `model_cfg` (a converted AdaFace checkpoint)."""
    return EmbeddingModel(backbone=build_backbone_from_config(model_cfg))


def abstract_variables(model: nn.Module, contract: face_input.InputContract) -> dict:
    """ShapeDtypeStructs of the {"params", "batch_stats"} that `model` initializes (nothing is computed)."""
    images = jnp.zeros((2,) + face_input.FACE_SHAPE, jnp.float32)
    if isinstance(model, OAML):
        init = lambda: model.init(jax.random.PRNGKey(0), images, jnp.zeros((2,), jnp.int32),
                                  jnp.ones((2, contract.grid, contract.grid), jnp.float32))
    else:
        init = lambda: model.init(jax.random.PRNGKey(0), images, method="embed")
    variables = jax.eval_shape(init)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
