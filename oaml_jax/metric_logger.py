"""The train loop's metrics: fetched one step late, a short line for people, every scalar for TensorBoard.

MaxText's metric_logger.py: step N's metrics stay on the device until step N+1 has been dispatched, so the
host never waits for the device just to read a handful of scalars. Each fetched step goes through a check
(the non-finite policy, see oaml_jax/train.py); every `log_every` steps the means of the interval go to
TensorBoard (all of them) and to the log as one short line:

    step 120/2000 (epoch 1.50): loss 12.35 | acc ada 0.125 qa 0.500 | occ mae 0.100 | 35.2 images/s | ETA 1h02m03s

Images/s and the ETA count the loop's wall time less the time spent validating (`paused`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from oaml_jax import metrics as metrics_lib


def duration(seconds: float) -> str:
    """"1h02m03s" / "2m03s"."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def short_line(step: int, stop_step: int, epoch: float, means: Mapping[str, float], eta_s: float) -> str:
    """The line a person reads every `log_every` steps."""
    nan = float("nan")
    return (f"step {step}/{stop_step} (epoch {epoch:.2f}): loss {means['loss']:.4g} | acc ada "
            f"{means.get('acc_ada', nan):.3f} qa {means.get('acc_qa', nan):.3f} | occ mae "
            f"{means.get('occ_mae', nan):.3f} | "
            f"{means['images_per_sec']:.1f} images/s | ETA {duration(eta_s)}")


class MetricLogger:
    """Holds each step's device metrics until the next step is dispatched, then fetches and reports them."""

    def __init__(self, writer: Any, *, log_every: int, stop_step: int, global_batch: int,
                 steps_per_epoch: int, flops_per_step: float, check: Callable[[int, dict[str, float]], None],
                 totals: Callable[[], dict[str, float]]):
        """Args:
            writer: a clu metric writer (TensorBoard).
            log_every: steps per reporting interval.
            stop_step: the run's last step (the ETA and the last interval).
            global_batch: images per step.
            steps_per_epoch: for the epoch shown.
            flops_per_step: for MFU.
            check: called with (step index, host metrics) of every fetched step, in order; may raise.
            totals: run totals added to every interval's scalars (e.g. skipped and corrupt counts).
        """
        self.writer, self.log_every, self.stop_step = writer, log_every, stop_step
        self.global_batch, self.spe, self.flops = global_batch, steps_per_epoch, flops_per_step
        self.check, self.totals = check, totals
        self.losses: dict[int, float] = {}
        self.last: dict[str, float] = {}
        self._pending: Optional[tuple[int, Any]] = None
        self._interval: list[dict[str, float]] = []
        self._clock, self._paused_s = time.perf_counter(), 0.0
        self.train_seconds = 0.0

    def push(self, index: int, device_metrics: Mapping[str, jax.Array]) -> None:
        """Takes the metrics of step `index` (just dispatched) and reports the previous step's."""
        previous, self._pending = self._pending, (index, device_metrics)
        if previous is not None:
            self._report(*previous)

    def flush(self) -> None:
        """Fetches and reports the step held back (before a save, a validation or the end)."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._report(*previous)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside does not count as training time (validation)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - start

    def _report(self, index: int, device_metrics: Mapping[str, jax.Array]) -> None:
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.losses[index] = host["loss"]
        self._interval.append(host)
        self.check(index, host)
        step = index + 1
        if step % self.log_every and step != self.stop_step:
            return
        now = time.perf_counter()
        seconds = max(now - self._clock - self._paused_s, 1e-9)
        self._clock, self._paused_s = now, 0.0
        self.train_seconds += seconds
        steps = len(self._interval)
        means = {k: float(np.mean([m[k] for m in self._interval])) for k in self._interval[0]}
        means["images_per_sec"] = steps * self.global_batch / seconds
        means["mfu"] = metrics_lib.mfu(self.flops * steps, seconds, jax.device_count())
        means.update(self.totals(), epoch=step / self.spe)
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        logging.info("%s", short_line(step, self.stop_step, means["epoch"], means,
                                      (self.stop_step - step) * seconds / steps))
        self.last, self._interval = means, []
