"""configs/*.py: recipes, the test shrink, and that every config passes validation."""

import pytest

from configs import default, demo, ir50_ms1mv2, ir100_ms1mv2
from oaml_jax import run_spec

CONTRACT_DATA_FIELDS = {"source", "path", "sampler", "k", "num_workers", "seed", "on_corrupt", "graph_chunk",
                        "augment", "occlusion", "occlusion_sets", "occlusion_batch", "occlusion_real_share",
                        "occlusion_aligned", "occlusion_holdout", "occlusion_synthetic_head", "occlusion_augment"}


def test_ir50_recipe():
    c = ir50_ms1mv2.get_config()
    assert (c.model.arch, c.model.head, c.train.batch_size, c.train.epochs) == ("ir_50", "adaface", 512, 26)
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert tuple(c.optim.drop_epochs) == (12, 20, 24) and c.optim.drop_factor == 0.1
    assert dict(c.model.head_kwargs) == dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    assert (c.model.lam_ada, c.model.lam_qa, c.model.lam_occ) == (0.1, 0.9, 0.1)
    assert (c.data.source, c.data.sampler, c.data.k) == ("recordio", "pk", 4)


def test_ir100_differs_only_in_arch():
    a, b = ir50_ms1mv2.get_config().to_dict(), ir100_ms1mv2.get_config().to_dict()
    assert b["model"].pop("arch") == "ir_100"
    a["model"].pop("arch")
    assert a == b


def test_data_fields_match_contract():
    assert set(default.get_config().data.keys()) == CONTRACT_DATA_FIELDS


def test_test_variant_is_tiny_and_valid(tmp_path):
    c = default.get_config("test")
    assert tuple(c.model.backbone.stage_sizes) == (1, 1, 1, 1)
    assert tuple(c.model.backbone.widths) == (8, 16, 16, 32)
    assert c.model.backbone.embedding_size == 32 and c.train.batch_size == 16 and c.data.k == 4
    c.data.path = str(tmp_path)
    run_spec.validate_config(c, num_devices=1, process_count=1)


@pytest.mark.parametrize("module", [default, ir50_ms1mv2, ir100_ms1mv2])
def test_full_configs_validate_on_a_pod_slice(module, tmp_path):
    c = module.get_config()
    c.data.path = str(tmp_path)
    run_spec.validate_config(c, num_devices=8, process_count=2)


def test_demo_is_narrow_and_validates_on_this_cpu(tmp_path):
    c = demo.get_config()
    assert c.model.arch == "ir_18" and tuple(c.model.backbone.widths) == (16, 32, 32, 64)
    assert c.eval.bin_names == ("lfw",)
    c.data.path = str(tmp_path)
    run_spec.validate_config(c, num_devices=1, process_count=1)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown config argument 'huge'"):
        default.get_config("huge")
