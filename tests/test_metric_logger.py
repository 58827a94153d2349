"""oaml_jax/metric_logger.py: metrics fetched one step late, the short log line, the TensorBoard scalars."""

import jax.numpy as jnp
import pytest

from oaml_jax import metric_logger


class _Writer:
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, scalars))


def _metrics(loss):
    return {"loss": jnp.float32(loss), "acc_ada": jnp.float32(0.5), "acc_qa": jnp.float32(0.25),
            "occ_mae": jnp.float32(0.125), "corrupt": jnp.float32(0.0), "nonfinite": jnp.float32(0.0)}


def test_a_step_is_fetched_after_the_next_is_pushed_and_flush_fetches_the_last():
    checked, writer = [], _Writer()
    logger = metric_logger.MetricLogger(writer, log_every=2, stop_step=3, global_batch=16, steps_per_epoch=4,
                                        flops_per_step=1.0, check=lambda i, host: checked.append((i, host["loss"])),
                                        totals=lambda: {"skipped_total": 0})
    logger.push(0, _metrics(3.0))
    assert checked == []
    logger.push(1, _metrics(1.0))
    assert checked == [(0, 3.0)] and writer.scalars == []
    logger.push(2, _metrics(5.0))
    assert checked == [(0, 3.0), (1, 1.0)]
    assert [s for s, _ in writer.scalars] == [2]  # steps 0 and 1 make the first interval
    step, scalars = writer.scalars[0]
    assert scalars["train/loss"] == 2.0 and scalars["train/epoch"] == 0.5 and scalars["train/skipped_total"] == 0
    assert scalars["train/images_per_sec"] > 0
    logger.flush()
    assert checked[-1] == (2, 5.0) and [s for s, _ in writer.scalars] == [2, 3]  # the last step closes one
    assert logger.losses == {0: 3.0, 1: 1.0, 2: 5.0} and logger.last["loss"] == 5.0
    logger.flush()
    assert len(checked) == 3


def test_a_failing_check_stops_before_the_step_is_reported():
    def check(index, host):
        raise FloatingPointError(f"step {index}")

    logger = metric_logger.MetricLogger(_Writer(), log_every=1, stop_step=9, global_batch=16, steps_per_epoch=4,
                                        flops_per_step=1.0, check=check, totals=dict)
    logger.push(0, _metrics(1.0))
    with pytest.raises(FloatingPointError, match="step 0"):
        logger.push(1, _metrics(1.0))
    assert logger.last == {}


def test_the_short_line():
    means = {"loss": 12.3456, "acc_ada": 0.125, "acc_qa": 0.5, "occ_mae": 0.1, "images_per_sec": 35.24}
    assert metric_logger.short_line(120, 2000, 1.5, means, 3723.0) == (
        "step 120/2000 (epoch 1.50): loss 12.35 | acc ada 0.125 qa 0.500 | occ mae 0.100 | 35.2 images/s | "
        "ETA 1h02m03s")
    assert metric_logger.duration(125) == "2m05s"
