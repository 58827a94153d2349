"""oaml_jax/models/factory.py: the one check of config.model, the builders, the input contract."""

import jax
import jax.numpy as jnp
import pytest

from configs import default
from oaml_jax.models import factory
from oaml_jax.models.face_input import InputContract
from oaml_jax.models.oaml import OAML


def _model(**overrides):
    model = default.get_config("test").model
    model.update(overrides)
    return model


@pytest.mark.parametrize("field,value,match", [
    ("arch", "ir_7", r"model\.arch='ir_7' is unknown"),
    ("backbone", {"depth": 3}, r"model\.backbone: unknown override\(s\) \['depth'\]"),
    ("backbone", {"widths": (8, 16)}, r"model\.backbone=.*'widths': \(8, 16\)\}: IResNet\.widths must be 4"),
    ("feature_stage", 5, r"model\.feature_stage=5"),
    ("dtype", "float16", r"model\.dtype='float16' is unknown"),
    ("input_channel_order", "BRG", r"model\.input_channel_order='BRG'"),
    ("head", "sphereface", r"model\.head='sphereface' is unknown"),
    ("lam_qa", -1.0, r"model\.lam_qa=-1\.0 must be >= 0"),
    ("lam_ada", float("nan"), r"model\.lam_ada=nan must be >= 0"),
    ("occ_loss", "l1", r"model\.occ_loss='l1' is unknown"),
    ("num_classes", -2, r"model\.num_classes=-2 must be >= 0"),
    ("qaconv_block_mb", 0, r"model\.qaconv_block_mb=0 must be >= 1"),
])
def test_check_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        factory.check_config({"model": _model(**{field: value})}, num_devices=1, process_count=1)


def test_defaults_and_recipes_pass():
    factory.check_config(default.get_config(), num_devices=1, process_count=1)
    factory.check_config({"model": _model()}, num_devices=1, process_count=1)


def test_contract_follows_channel_order_and_feature_stage():
    assert factory.input_contract(_model()) == InputContract(channel_order="BGR", grid=7)
    assert factory.input_contract(_model(feature_stage=3, input_channel_order="RGB")) == InputContract("RGB", 14)


def test_full_and_embedding_models_share_the_backbone_layout():
    cfg = _model()
    full = factory.abstract_variables(factory.build_model(cfg, 8), factory.input_contract(cfg))
    embedding = factory.abstract_variables(factory.build_embedding_model(cfg), factory.input_contract(cfg))
    assert set(full["params"]) == {"backbone", "head", "occlusion", "qaconv"}
    assert set(embedding["params"]) == {"backbone"}
    assert jax.tree.map(lambda a: a.shape, full["params"]["backbone"]) == \
        jax.tree.map(lambda a: a.shape, embedding["params"]["backbone"])
    assert full["params"]["head"]["kernel"].shape == (32, 8)


def test_build_model_passes_every_field():
    cfg = _model(lam_ada=0.3, occ_loss="bce", detach_occ_input=False, dtype="bfloat16", qaconv_block_mb=3)
    model = factory.build_model(cfg, 8)
    assert isinstance(model, OAML) and model.num_classes == 8
    assert (model.lam_ada, model.occ_loss, model.detach_occ_input) == (0.3, "bce", False)
    assert model.qaconv_block_bytes == 3 * 2**20
    assert model.dtype == jnp.bfloat16 and model.backbone.dtype == jnp.bfloat16
    assert tuple(model.backbone.widths) == (8, 16, 16, 32)
