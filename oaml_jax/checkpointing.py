"""The training run's checkpoints: the Orbax manager that writes them and the decision to save or stop.

    ckpt = Checkpointer(workdir, every=1000, keep=3)
    with StopRequests() as stop:                      # SIGTERM, a preemption notice, Ctrl-C
        ...
        if ckpt.maybe_save(step, state, stop=stop, items=lambda: {...}):
            break                                      # saved at the agreed step: exit for a restart

The layout of what it writes, and how any checkpoint is read back, is `oaml_jax.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from oaml_jax import checkpoint
from oaml_jax.paths import user_path


class StopRequests:
    """SIGTERM and Ctrl-C (SIGINT) as a step at which every process saves and stops (use as a context manager).

    A preemption notice (SIGTERM: TPU maintenance, spot VMs, SLURM) and a first Ctrl-C are handled alike: the
    run saves at the next step and stops (`train.py` exits 75 after SIGTERM, 130 after Ctrl-C, see
    oaml_jax/cli.py). A second Ctrl-C raises KeyboardInterrupt at once. Multi-process jobs agree on the step
    through JAX's preemption service (`multihost_utils.reached_preemption_sync_point`), which listens for
    SIGTERM: a Ctrl-C there is passed on to it as a SIGTERM to this process.

    Attributes:
        signal: "SIGTERM" or "SIGINT" once one arrived (None before).
    """

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if jax.process_count() == 1:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.signal = self.signal or "SIGTERM"

    def _on_sigint(self, signum: int, frame: Any) -> None:
        del signum, frame
        if self.signal == "SIGINT":
            raise KeyboardInterrupt("second Ctrl-C: stopping without saving")
        logging.warning("Ctrl-C: saving at the next step, then stopping (press Ctrl-C again to stop at once)")
        self.signal = "SIGINT"
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether the run saves and stops at `step` (every process must call it at every step)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None


class Checkpointer:
    """The run's CheckpointManager: periodic async saves, latest-N plus best-by-validation retention."""

    def __init__(self, workdir: epath.PathLike, *, every: int, keep: int, async_save: bool = True):
        """Opens (creating) `<workdir>/checkpoints`.

        Args:
            workdir: the run's working directory (local or any epath URI).
            every: save interval in steps (FixedIntervalPolicy); other steps are saved with `force`.
            keep: number of latest checkpoints kept; the best by `val_accuracy` is kept in addition.
            async_save: write in a background thread.
        """
        self.directory = user_path(workdir, "workdir") / checkpoint.CHECKPOINT_SUBDIR
        preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[checkpoint.BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(every, 1)),
            preservation_policy=preservation,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: Optional[int] = None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def last_complete(self) -> str:
        """`<directory>/<step>` of the newest finished checkpoint, for messages."""
        self.manager.reload()
        step = self.manager.latest_step()
        return f"{self.directory}/{step}" if step is not None else "none (no checkpoint saved yet)"

    @contextlib.contextmanager
    def _explained(self, step: Optional[int]) -> Iterator[None]:
        """A full disk becomes one clear error naming the step, the folder and the last good checkpoint."""
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            raise OSError(errno.ENOSPC, f"no space left on device while saving step {step} in {self.directory}; "
                          f"the last complete checkpoint is {self.last_complete()}") from e

    def save(self, step: int, state: Any, *, data_iter: Optional[grain.DatasetIterator], meta: dict,
             config: dict, neighbours: Optional[np.ndarray] = None, data: Optional[dict] = None,
             force: bool = False) -> bool:
        """Saves step `step` when the interval policy (or `force`) says so.

        Args:
            step: the training step the state is at.
            state: TrainState.
            data_iter: the current epoch's iterator (None at an epoch boundary: the next epoch starts fresh).
            meta: JSON-serializable run facts; a "val_accuracy" entry ranks the checkpoint for "best".
            config: the config as a dict.
            neighbours: the graph sampler's class graph of the current epoch.
            data: the record of the training data (`oaml_jax.data_record.describe`).
            force: save regardless of the interval.

        Returns:
            Whether a save was started.
        """
        items = {checkpoint.TRAINING_ITEM: ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if data is not None:
            items[checkpoint.DATA_ITEM] = ocp.args.JsonSave(data)
        if neighbours is not None:
            items["neighbours"] = ocp.args.StandardSave({"neighbours": np.asarray(neighbours)})
        metrics = {checkpoint.BEST_METRIC: meta[checkpoint.BEST_METRIC]} if checkpoint.BEST_METRIC in meta else None
        if not (force or self.manager.should_save(step)):
            return False
        # The save in flight finishes first (Orbax would wait for it too), so an error is told with its step.
        self.wait_until_finished()
        with self._explained(step):
            started = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
        if started:
            self._saving = step
        return started

    def maybe_save(self, step: int, state: Any, *, stop: StopRequests, force: bool = False,
                   before_save: Callable[[], None] = lambda: None, items: Callable[[], dict]) -> bool:
        """The save-or-stop decision of one step (MaxText `maybe_save_checkpoint`): saves when the interval
        policy, `force` or a stop request says so.

        Args:
            step, state, force: as for `save`.
            stop: the run's stop requests; a request reached at `step` forces the save and waits for it.
            before_save: called before a save starts (the train loop checks the step's metrics there, so a
                checkpoint never follows an unchecked step); it may raise, and then nothing is saved.
            items: returns `save`'s keyword items (data_iter, meta, config, neighbours, data), built only
                when a save happens (after `before_save`).

        Returns:
            Whether the run stops here (the state of `step` is saved and written).
        """
        stopping = stop.reached(step)
        if not (force or stopping or self.manager.should_save(step)):
            return False
        before_save()
        self.save(step, state, force=True, **items())
        if stopping:
            self.wait_until_finished()
            logging.warning("%s: saved step %d to %s; exiting (rerun the same command to resume)",
                            "Ctrl-C" if stop.signal == "SIGINT" else "preemption notice", step, self.directory)
        return stopping

    def item_names(self, step: int) -> set[str]:
        return checkpoint.item_names(self.directory / str(step))

    def restore_extras(self, step: int) -> tuple[dict, Optional[np.ndarray]]:
        """The "meta" item and the graph sampler's neighbours (None when not saved) of step `step`."""
        items = {"meta": ocp.args.JsonRestore()}
        has_neighbours = "neighbours" in self.item_names(step)
        if has_neighbours:
            items["neighbours"] = ocp.args.StandardRestore()
        with checkpoint.reading(self.directory, step):
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        neighbours = np.asarray(restored["neighbours"]["neighbours"]) if has_neighbours else None
        return dict(restored["meta"]), neighbours

    def restore_config(self, step: int) -> dict:
        """The config dict saved with step `step`."""
        with checkpoint.reading(self.directory, step):
            return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def restore_data_record(self, step: int) -> Optional[dict]:
        """The record of the training data saved with step `step` (None for checkpoints written before it was)."""
        if checkpoint.DATA_ITEM not in self.item_names(step):
            return None
        with checkpoint.reading(self.directory, step):
            return dict(self.manager.restore(step, args=ocp.args.Composite(
                **{checkpoint.DATA_ITEM: ocp.args.JsonRestore()}))[checkpoint.DATA_ITEM])

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The TrainState of step `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        with checkpoint.reading(self.directory, step):
            restored = self.manager.restore(
                step, args=ocp.args.Composite(**{checkpoint.TRAINING_ITEM: ocp.args.StandardRestore(abstract_state)}))
        return restored[checkpoint.TRAINING_ITEM]

    def restore_data_iter(self, step: int, data_iter: grain.DatasetIterator) -> None:
        """Sets `data_iter` (a fresh iterator of the checkpoint's epoch) to the saved position."""
        if "data_iter" not in self.item_names(step):
            raise ValueError(f"{self.directory}/{step} holds no data_iter item to resume the epoch from")
        with checkpoint.reading(self.directory, step):
            self.manager.restore(step, args=ocp.args.Composite(
                data_iter=grain.checkpoint.CheckpointRestore(data_iter)))

    def wait_until_finished(self) -> None:
        """Blocks until the async save in flight is written (a full disk is reported here or at `save`)."""
        with self._explained(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        self.manager.close()


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error`, its causes or its group members are "no space left on device"."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False
