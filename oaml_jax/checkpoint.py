"""Orbax checkpointing of training runs, and restoring model variables for eval / inference.

A training checkpoint (`<workdir>/checkpoints/<step>/`) holds the items
- "state": the TrainState (step, params, batch_stats, opt_state, rng), saved as is;
- "data_iter": the Grain iterator of the current epoch (one file per process);
- "meta": JSON {"epoch", "corrupt", "num_model_classes", "val_accuracy"?};
- "config": JSON of the run's config;
- "neighbours": the graph sampler's class graph `[C, k]` of the current epoch (graph sampler only), so a
  resumed run rebuilds exactly the same epoch.
Saving is asynchronous; the latest `keep` checkpoints and the best one by validation accuracy are kept.
Restores go onto the current devices through ShapeDtypeStruct targets that carry the current shardings,
so a checkpoint written on N devices restores on any device count.
"""

import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from oaml_jax import sharding as sharding_lib

CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC = "val_accuracy"


def checkpoint_dir(workdir_or_ckpt_dir: str) -> str:
    """`<workdir>/checkpoints` when it exists (a training workdir), else the directory itself."""
    path = os.path.abspath(workdir_or_ckpt_dir)
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


class Checkpointer:
    """The run's CheckpointManager: periodic async saves, latest-N plus best-by-validation retention."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        """Opens (creating) `<workdir>/checkpoints`.

        Args:
            workdir: the run's working directory.
            every: save interval in steps (FixedIntervalPolicy); other steps are saved with `force`.
            keep: number of latest checkpoints kept; the best by `val_accuracy` is kept in addition.
            async_save: write in a background thread.
        """
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
        preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(every, 1)),
            preservation_policy=preservation,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iter: Optional[grain.DatasetIterator], meta: dict,
             config: dict, neighbours: Optional[np.ndarray] = None, force: bool = False) -> bool:
        """Saves step `step` when the interval policy (or `force`) says so.

        Args:
            step: the training step the state is at.
            state: TrainState.
            data_iter: the current epoch's iterator (None at an epoch boundary: the next epoch starts fresh).
            meta: JSON-serializable run facts; a "val_accuracy" entry ranks the checkpoint for "best".
            config: the config as a dict.
            neighbours: the graph sampler's class graph of the current epoch.
            force: save regardless of the interval.

        Returns:
            Whether a save was started.
        """
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if neighbours is not None:
            items["neighbours"] = ocp.args.StandardSave({"neighbours": np.asarray(neighbours)})
        metrics = {BEST_METRIC: meta[BEST_METRIC]} if BEST_METRIC in meta else None
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def item_names(self, step: int) -> set[str]:
        return {name for name in os.listdir(os.path.join(self.directory, str(step)))
                if not name.startswith(("_", "."))}

    def restore_extras(self, step: int) -> tuple[dict, Optional[np.ndarray]]:
        """The "meta" item and the graph sampler's neighbours (None when not saved) of step `step`."""
        items = {"meta": ocp.args.JsonRestore()}
        has_neighbours = "neighbours" in self.item_names(step)
        if has_neighbours:
            items["neighbours"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        neighbours = np.asarray(restored["neighbours"]["neighbours"]) if has_neighbours else None
        return dict(restored["meta"]), neighbours

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The TrainState of step `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_data_iter(self, step: int, data_iter: grain.DatasetIterator) -> None:
        """Sets `data_iter` (a fresh iterator of the checkpoint's epoch) to the saved position."""
        if "data_iter" not in self.item_names(step):
            raise ValueError(f"{self.directory}/{step} holds no data_iter item to resume the epoch from")
        self.manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter)))

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resolve_step(workdir_or_ckpt_dir: str, step: Optional[int] = None) -> int:
    """The step `restore_variables(workdir_or_ckpt_dir, step)` restores: `step`, or the latest saved one.

    Raises:
        FileNotFoundError: no checkpoint (or not that step) in the directory.
    """
    directory = checkpoint_dir(workdir_or_ckpt_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no step {step} in {directory}; have {steps}")
    return step


def _replicated_targets(metadata: Any, mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs for every array in a saved tree, replicated over `mesh`."""
    replicated = sharding_lib.replicated(mesh)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), metadata)


def restore_variables(workdir_or_ckpt_dir: str, step: Optional[int] = None) -> tuple[dict, dict]:
    """Model variables of a training checkpoint or a converted AdaFace checkpoint.

    Args:
        workdir_or_ckpt_dir: a training workdir (its `checkpoints/` subfolder is used), a training
            checkpoint directory, or a directory written by `oaml_jax.convert`.
        step: checkpoint step; None = the latest.

    Returns:
        (variables {"params", "batch_stats"} replicated on the current devices, config dict). Converted
        AdaFace checkpoints hold only the backbone ({"params": {"backbone": ...}, ...}).

    Raises:
        FileNotFoundError: no checkpoint (or not that step) in the directory.
        ValueError: the checkpoint holds neither a "state" nor a "variables" item.
    """
    directory = checkpoint_dir(workdir_or_ckpt_dir)
    step = resolve_step(directory, step)
    options = ocp.CheckpointManagerOptions(read_only=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "variables": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
        names = set(os.listdir(os.path.join(directory, str(step))))
        mesh = sharding_lib.make_mesh()
        if "state" in names:
            item = "state"
        elif "variables" in names:
            item = "variables"
        else:
            raise ValueError(f"restore_variables: {directory}/{step} holds neither a 'state' nor a "
                             f"'variables' item (found {sorted(names)})")
        metadata = manager.item_metadata(step)[item]
        metadata = getattr(metadata, "tree", metadata)
        targets = _replicated_targets(metadata, mesh)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.StandardRestore(targets), "config": ocp.args.JsonRestore()}))
    variables = restored[item]
    logging.info("restored variables of step %d from %s (%s)", step, directory, item)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, \
        dict(restored["config"])
