"""oaml_jax/checkpoint.py: save/restore round trips, retention, and converted AdaFace checkpoints."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oaml_jax import checkpoint, convert, sharding
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
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2)
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


def test_keeps_latest_and_best(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
    accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None}
    for step, acc in accuracies.items():
        meta = {} if acc is None else {checkpoint.BEST_METRIC: acc}
        ckpt.save(step, _state(float(step)), data_iter=None, meta=meta, config={})
    ckpt.wait_until_finished()
    assert sorted(ckpt.manager.all_steps()) == [2, 4, 5]
    ckpt.close()
    variables, config = checkpoint.restore_variables(str(tmp_path), step=2)
    assert config == {} and float(variables["batch_stats"]["head"]["batch_mean"]) == 22.0
    latest, _ = checkpoint.restore_variables(str(tmp_path))
    assert float(latest["params"]["head"]["kernel"][0, 0]) == 5.0


def test_restore_variables_of_converted_adaface(tmp_path):
    variables = {"params": {"stem_conv": {"kernel": np.ones((3, 3, 3, 8), np.float32)}},
                 "batch_stats": {"stem_bn": {"mean": np.zeros(8, np.float32)}}}
    out = convert.write_converted_checkpoint(variables, "ir_18", str(tmp_path / "conv"), source="test.ckpt")
    restored, config = checkpoint.restore_variables(out)
    np.testing.assert_array_equal(restored["params"]["backbone"]["stem_conv"]["kernel"], 1.0)
    assert config["model"]["arch"] == "ir_18" and config["input_channel_order"] == "BGR"


def test_restore_variables_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore_variables(str(tmp_path / "absent"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.restore_variables(str(tmp_path / "empty"))
