"""oaml_jax/checkpoint.py: save/restore round trips, retention, and converted AdaFace checkpoints."""

import gc
import logging
import os
import re
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax import checkpoint, checkpointing, sharding
from oaml_jax.models import factory
from oaml_jax.models.face_input import InputContract
from oaml_jax.train_state import TrainState


def _state(value: float) -> TrainState:
    params = {"backbone": {"conv": {"kernel": jnp.full((3, 3, 2, 4), value)}},
              "head": {"kernel": jnp.full((4, 6), value)}}
    return TrainState(step=jnp.int32(int(value)), params=params,
                      batch_stats={"head": {"batch_mean": jnp.float32(20.0 + value)}},
                      opt_state=({"trace": params},), rng=jax.random.PRNGKey(0))


def _iterator():
    return iter(grain.MapDataset.range(10).to_iter_dataset())


def test_round_trip_with_iterator_meta_and_neighbours(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), every=1, keep=2)
    it = _iterator()
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    neighbours = np.arange(12, dtype=np.int32).reshape(6, 2)
    ckpt.save(3, _state(3.0), data_iter=it, meta={"epoch": 0, "corrupt": 1}, config={"seed": 0},
              neighbours=neighbours)
    ckpt.wait_until_finished()
    mesh = sharding.make_mesh()
    abstract = jax.eval_shape(lambda: _state(0.0))
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = ckpt.restore_state(3, abstract)
    assert int(state.step) == 3 and float(state.params["head"]["kernel"][0, 0]) == 3.0
    assert state.params["head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    meta, got_neighbours = ckpt.restore_extras(3)
    assert meta == {"epoch": 0, "corrupt": 1}
    np.testing.assert_array_equal(got_neighbours, neighbours)
    fresh = _iterator()
    ckpt.restore_data_iter(3, fresh)
    assert next(fresh) == 3
    ckpt.close()


def _abstract_state(mesh):
    abstract = jax.eval_shape(lambda: _state(0.0))
    shardings = sharding.state_shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def test_keeps_latest_and_best(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
    accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None}
    for step, acc in accuracies.items():
        meta = {} if acc is None else {checkpoint.BEST_METRIC: acc}
        ckpt.save(step, _state(float(step)), data_iter=None, meta=meta, config={})
    ckpt.wait_until_finished()
    assert sorted(ckpt.manager.all_steps()) == [2, 4, 5]
    abstract = _abstract_state(sharding.make_mesh())
    assert float(ckpt.restore_state(2, abstract).batch_stats["head"]["batch_mean"]) == 22.0
    ckpt.close()
    assert checkpoint.locate(str(tmp_path)) == (checkpoint.user_path(tmp_path / "checkpoints", "x"), 5)
    assert checkpoint.locate(str(tmp_path / "checkpoints" / "4"))[1] == 4


def _tiny_model_fields():
    from configs import default
    model = default.get_config("test").model
    return {k: model[k] for k in factory.EMBEDDING_FIELDS}


def test_restore_of_converted_backbone_builds_its_model(tmp_path):
    fields = _tiny_model_fields()
    model = factory.build_embedding_model(fields)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), method="embed"))()
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    out = checkpoint.write_converted(backbone, dict(fields, input_channel_order="RGB"), str(tmp_path / "conv"),
                                     source="test.ckpt")
    restored = checkpoint.restore(out)
    assert isinstance(restored.model, factory.EmbeddingModel) and restored.scores == ("adaface",)
    assert restored.contract == InputContract(channel_order="RGB", grid=7) and restored.step == 0
    assert restored.config["converted_from"] == "test.ckpt"
    chex_equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored.variables, variables)
    assert all(jax.tree.leaves(chex_equal))
    with pytest.raises(FileExistsError, match="already holds a checkpoint at step 0"):
        checkpoint.write_converted(backbone, fields, out, source="again")


def test_restore_refuses_variables_that_do_not_match_their_config(tmp_path):
    fields = _tiny_model_fields()
    variables = {"params": {"stem_conv": {"kernel": np.ones((3, 3, 3, 8), np.float32)}},
                 "batch_stats": {"stem_bn": {"mean": np.zeros(8, np.float32)}}}
    out = checkpoint.write_converted(variables, fields, str(tmp_path / "conv"), source="test.ckpt")
    with pytest.raises(ValueError, match=r"conv/0 does not match the model its config describes: missing "
                                         r"\['batch_stats'\]\['backbone'\]\['body_0'\]"):
        checkpoint.restore(out)


def test_write_converted_refuses_missing_or_unrecordable_fields(tmp_path):
    fields = _tiny_model_fields()
    with pytest.raises(ValueError, match=r"model fields \['input_channel_order'\] missing"):
        checkpoint.write_converted({}, {k: v for k, v in fields.items() if k != "input_channel_order"},
                                   str(tmp_path / "a"), "x")
    with pytest.raises(ValueError, match="must be JSON-serializable"):
        widths = np.array(fields["backbone"]["widths"])  # a valid backbone field JSON cannot hold
        checkpoint.write_converted({}, dict(fields, backbone=dict(fields["backbone"], widths=widths)),
                                   str(tmp_path / "b"), "x")


def test_restore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore(str(tmp_path / "absent"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.restore(str(tmp_path / "empty"))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), every=1, keep=2, async_save=False)
    ckpt.save(1, _state(1.0), data_iter=None, meta={}, config={"seed": 0})
    ckpt.close()
    with pytest.raises(FileNotFoundError, match=r"no step 7 .*have \[1\]"):
        checkpoint.restore(str(tmp_path / "run"), step=7)
    with pytest.raises(ValueError, match=r"the saved config has no model field\(s\) \['arch'"):
        checkpoint.restore(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="gs:/bucket.*missing a slash|missing slash"):
        checkpoint.restore("gs:/bucket/run")


def _nan_at(variables, where=("params", "backbone")):
    """`variables` with a NaN in the first leaf under `where` (a copy)."""
    tree = jax.tree.map(np.array, variables)
    node = tree
    for key in where:
        node = node[key]
    path, leaf = jax.tree_util.tree_leaves_with_path(node)[0]
    leaf.reshape(-1)[0] = np.nan
    return tree, jax.tree_util.keystr(path)


def test_restore_refuses_non_finite_variables_naming_the_tensor(tmp_path):
    from test_inference import tiny_variables, write_training_checkpoint
    _, _, variables = tiny_variables()
    poisoned, path = _nan_at(variables)
    workdir = write_training_checkpoint(str(tmp_path / "run"), variables=poisoned)
    with pytest.raises(ValueError, match=r"checkpoint .*run/checkpoints/3 holds NaN or Inf in \['params'\]"
                                         rf"\['backbone'\]{re.escape(path)} \(1 of \d+ values\); refusing to use it"):
        checkpoint.restore(workdir)


def test_check_finite_names_leaves_and_passes_finite_and_integer_trees():
    checkpoint.check_finite({"embeddings": np.ones((3, 4), np.float32), "ids": np.arange(3)}, "x")
    scores = np.array([0.5, np.inf, np.nan], np.float32)
    with pytest.raises(ValueError, match=r"^scores of pairs\.txt holds NaN or Inf in \['scores'\] \(2 of 3 values\)"):
        checkpoint.check_finite({"scores": scores}, "scores of pairs.txt")
    many = {f"t{i}": np.full(2, np.nan) for i in range(7)}
    with pytest.raises(ValueError, match=r"\['t4'\] \(2 of 2 values\) and 2 more; refusing"):
        checkpoint.check_finite(many, "x")


def test_write_converted_refuses_non_finite_weights(tmp_path):
    from test_inference import tiny_variables
    config, _, variables = tiny_variables()
    backbone = {k: v["backbone"] for k, v in variables.items()}
    poisoned, path = _nan_at(backbone, ("batch_stats",))
    with pytest.raises(ValueError, match=r"write_converted: the weights from w\.pt holds NaN or Inf in "
                                         rf"\['batch_stats'\]\['backbone'\]{re.escape(path)}"):
        checkpoint.write_converted(poisoned, config.model, str(tmp_path / "conv"), "w.pt")
    assert not (tmp_path / "conv").exists()


def _damage(step_dir, how):
    """Removes or truncates every data file of the step's "state" item (an interrupted copy)."""
    data = sorted((step_dir / "state" / "d").iterdir())
    assert data
    for path in data:
        if how == "remove":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:20])


@pytest.mark.parametrize("how", ["remove", "truncate"])
def test_a_damaged_latest_step_is_one_error_naming_it_and_the_step_that_reads(tmp_path, how, monkeypatch, caplog):
    from test_inference import write_training_checkpoint
    run = str(tmp_path / "run")
    for step in (1, 2):
        write_training_checkpoint(run, step=step)
    _damage(tmp_path / "run" / "checkpoints" / "2", how)
    folder = f"{tmp_path}/run/checkpoints"
    printed = []  # what would reach stderr as "Exception ignored" tracebacks
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    with pytest.raises(checkpoint.DamagedCheckpointError) as caught:
        checkpoint.restore(run)
    time.sleep(0.5)  # tensorstore's late completions of the failed read
    gc.collect()  # and Orbax's read coroutines that were never finished
    assert printed == []
    # asyncio's report of another array's read error, which nobody collected, is dropped; other reports stay.
    for where in (f"{folder}/2/state/", "/elsewhere/"):
        error = ValueError(f'OUT_OF_RANGE: Error reading "w" in OCDBT database at local file "{where}"')
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=(ValueError, error, None))
    assert [r.exc_info[1].args[0][-12:] for r in caplog.records if "never retrieved" in r.getMessage()] == \
        ['/elsewhere/"']
    message = str(caught.value)
    assert message.startswith(f"checkpoint {folder}/2 is damaged (")
    assert message.endswith(f"the newest intact step is 1: pass --step=1 to evaluate or serve it, or move the "
                            f"damaged folder aside (mv {folder}/2 {folder}/2.damaged) to resume training from "
                            "it; a step is not chosen for you")
    assert "\n" not in message and f"{folder}/2/state/d/" in message
    assert checkpoint.restore(run, step=1).step == 1
    os.rename(f"{folder}/2", f"{folder}/2.damaged")
    assert checkpoint.restore(run).step == 1


def test_a_damaged_only_step_says_no_step_reads(tmp_path):
    from test_inference import write_training_checkpoint
    run = write_training_checkpoint(str(tmp_path / "run"), step=5)
    os.remove(tmp_path / "run" / "checkpoints" / "5" / "config" / "metadata")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"checkpoints/5 is damaged \(.*\); it is the "
                                                                r"folder's only step; restore the folder from a copy"):
        checkpoint.restore(run)
    write_training_checkpoint(run, step=3)
    os.remove(tmp_path / "run" / "checkpoints" / "3" / "config" / "metadata")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"checkpoints/5 is damaged \(.*\); no other step "
                                                                r"in that folder reads either; restore"):
        checkpoint.restore(run)
