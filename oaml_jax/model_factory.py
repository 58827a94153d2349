"""Builds the OAML model from `config.model`."""

import dataclasses

import jax.numpy as jnp
import ml_collections
from absl import logging

from oaml_jax.models.backbone import build_backbone
from oaml_jax.models.oaml import HEADS, OAML

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype of `model.dtype`."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def head_kwargs(model_cfg: ml_collections.ConfigDict) -> dict:
    """`model.head_kwargs` restricted to the attributes of the chosen head (others logged and dropped)."""
    if model_cfg.head not in HEADS:
        raise ValueError(f"model.head={model_cfg.head!r}; expected one of {sorted(HEADS)}")
    fields = {f.name for f in dataclasses.fields(HEADS[model_cfg.head])}
    kwargs = dict(model_cfg.head_kwargs)
    unused = sorted(set(kwargs) - fields)
    if unused:
        logging.warning("model.head_kwargs %s are not attributes of %s; ignored", unused, model_cfg.head)
    return {k: v for k, v in kwargs.items() if k in fields}


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> OAML:
    """The OAML module for `num_classes` identities.

    Args:
        model_cfg: `config.model` (arch, backbone overrides, feature_stage, dtype, head, head_kwargs,
            lam_*, switches).
        num_classes: width of the class kernel (possibly padded to the device count, see
            `oaml_jax.sharding.padded_num_classes`).

    Returns:
        An unbound `OAML` module.
    """
    dtype = compute_dtype(model_cfg.dtype)
    backbone = build_backbone(model_cfg.arch, feature_stage=model_cfg.feature_stage, dtype=dtype,
                              **dict(model_cfg.backbone))
    return OAML(
        backbone=backbone,
        num_classes=num_classes,
        head=model_cfg.head,
        head_kwargs=head_kwargs(model_cfg),
        lam_ada=model_cfg.lam_ada,
        lam_qa=model_cfg.lam_qa,
        lam_occ=model_cfg.lam_occ,
        occ_loss=model_cfg.get("occ_loss", "mse"),
        qaconv_to_backbone=model_cfg.qaconv_to_backbone,
        detach_occ_input=model_cfg.detach_occ_input,
        detach_qaconv_vis=model_cfg.detach_qaconv_vis,
        dtype=dtype,
    )
