"""Checkpoints: the training run's Orbax manager, converted AdaFace weights, and the one restore path.

A training checkpoint (`<workdir>/checkpoints/<step>/`) holds the items
- "state": the TrainState (step, params, batch_stats, opt_state, rng), saved as is;
- "data_iter": the Grain iterator of the current epoch (one file per process);
- "meta": JSON {"epoch", "corrupt", "num_model_classes", "val_accuracy"?, ...};
- "config": JSON of the run's config;
- "neighbours": the graph sampler's class graph `[C, k]` of the current epoch (graph sampler only), so a
  resumed run rebuilds exactly the same epoch.
A converted checkpoint (`oaml_jax.convert`, `write_converted`) is a checkpoint folder with one step (0)
holding "variables" ({"params": {"backbone"}, "batch_stats": {"backbone"}}) and "config" ({"model": the
backbone's model fields, input channel order included, "converted_from": source}).

`restore` reads either kind into a `Restored` (module, variables, input contract, the scores it can
give); eval.py, `FaceModel` and `init_from` all go through it, so the saved model fields (arch, backbone,
feature stage, channel order) are honoured the same way everywhere. Restores go onto the current devices
through ShapeDtypeStruct targets that carry the current shardings, so a checkpoint written on N devices
restores on any device count. Every path is an `etils.epath.Path` (gs:// works).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from oaml_jax import sharding as sharding_lib
from oaml_jax.models import factory
from oaml_jax.models.face_input import InputContract
from oaml_jax.paths import user_path

CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC = "val_accuracy"
TRAINING_ITEM, CONVERTED_ITEM = "state", "variables"


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
        self.directory = user_path(workdir, "workdir") / CHECKPOINT_SUBDIR
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
        items = {TRAINING_ITEM: ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if neighbours is not None:
            items["neighbours"] = ocp.args.StandardSave({"neighbours": np.asarray(neighbours)})
        metrics = {BEST_METRIC: meta[BEST_METRIC]} if BEST_METRIC in meta else None
        if not (force or self.manager.should_save(step)):
            return False
        # The save in flight finishes first (Orbax would wait for it too), so an error is told with its step.
        self.wait_until_finished()
        with self._explained(step):
            started = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
        if started:
            self._saving = step
        return started

    def item_names(self, step: int) -> set[str]:
        return _item_names(self.directory / str(step))

    def restore_extras(self, step: int) -> tuple[dict, Optional[np.ndarray]]:
        """The "meta" item and the graph sampler's neighbours (None when not saved) of step `step`."""
        items = {"meta": ocp.args.JsonRestore()}
        has_neighbours = "neighbours" in self.item_names(step)
        if has_neighbours:
            items["neighbours"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        neighbours = np.asarray(restored["neighbours"]["neighbours"]) if has_neighbours else None
        return dict(restored["meta"]), neighbours

    def restore_config(self, step: int) -> dict:
        """The config dict saved with step `step`."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The TrainState of step `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{TRAINING_ITEM: ocp.args.StandardRestore(abstract_state)}))
        return restored[TRAINING_ITEM]

    def restore_data_iter(self, step: int, data_iter: grain.DatasetIterator) -> None:
        """Sets `data_iter` (a fresh iterator of the checkpoint's epoch) to the saved position."""
        if "data_iter" not in self.item_names(step):
            raise ValueError(f"{self.directory}/{step} holds no data_iter item to resume the epoch from")
        self.manager.restore(step, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(data_iter)))

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


def _item_names(step_dir: epath.Path) -> set[str]:
    return {p.name for p in step_dir.iterdir() if not p.name.startswith(("_", "."))}


def write_converted(variables: Mapping[str, Any], model_cfg: Mapping[str, Any], out_dir: epath.PathLike,
                    source: str) -> epath.Path:
    """Writes backbone variables from elsewhere as a checkpoint that `restore` reads (step 0).

    Args:
        variables: `{"params": P, "batch_stats": B}` of the backbone alone (e.g. `convert.adaface_to_flax`).
        model_cfg: the backbone's model fields: arch, backbone (overrides), feature_stage, dtype,
            input_channel_order; checked by building the backbone.
        out_dir: checkpoint directory (created; local or any epath URI).
        source: where the weights came from (recorded as "converted_from").

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: an unknown arch/override, a model field missing, or a field JSON cannot hold.
        FileExistsError: `out_dir` already holds a step 0.
    """
    model_cfg = {k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for k, v in model_cfg.items()}
    missing = [k for k in factory.EMBEDDING_FIELDS if k not in model_cfg]
    if missing:
        raise ValueError(f"write_converted: model fields {missing} missing (need {factory.EMBEDDING_FIELDS})")
    factory.build_backbone_from_config(model_cfg)
    factory.input_contract(model_cfg)
    config = {"model": {k: model_cfg[k] for k in factory.EMBEDDING_FIELDS}, "converted_from": source}
    try:
        json.dumps(config)
    except TypeError as e:
        raise ValueError(f"write_converted: the model fields must be JSON-serializable: {e}") from e
    tree = {"params": {"backbone": variables["params"]}, "batch_stats": {"backbone": variables["batch_stats"]}}
    save_args = ocp.args.Composite(**{CONVERTED_ITEM: ocp.args.StandardSave(tree), "config": ocp.args.JsonSave(config)})
    directory = user_path(out_dir, "out")
    with ocp.CheckpointManager(directory) as manager:
        if 0 in manager.all_steps():
            raise FileExistsError(f"{directory} already holds a checkpoint at step 0")
        manager.save(0, args=save_args)
        manager.wait_until_finished()
    logging.info("wrote converted %s backbone from %s to %s", model_cfg["arch"], source, directory)
    return directory


def locate(path: epath.PathLike, step: Optional[int] = None) -> tuple[epath.Path, int]:
    """The checkpoint folder and step that `path` (and `step`) name.

    Args:
        path: a training workdir (its `checkpoints/` is used), a checkpoint folder (`<workdir>/checkpoints`,
            a converted checkpoint), or one step's folder (`.../checkpoints/1000`).
        step: the step; None = the one `path` names, else the latest.

    Raises:
        FileNotFoundError: no checkpoint folder, no checkpoint in it, or not that step.
        ValueError: `path` names one step and `step` another.
    """
    path = user_path(path, "checkpoint")
    if (path / CHECKPOINT_SUBDIR).is_dir():
        directory = path / CHECKPOINT_SUBDIR
    elif path.name.isdigit() and path.is_dir() and (TRAINING_ITEM in _item_names(path)
                                                    or CONVERTED_ITEM in _item_names(path)):
        if step is not None and step != int(path.name):
            raise ValueError(f"checkpoint {path} is step {path.name} but step={step} was asked for")
        directory, step = path.parent, int(path.name)
    else:
        directory = path
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no step {step} in {directory}; have {steps}")
    return directory, step


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint ready to run.

    Attributes:
        model: the module the variables belong to: `OAML` (training checkpoints) or
            `factory.EmbeddingModel` (converted backbones); both have `embed`.
        variables: {"params", "batch_stats"} replicated on the current devices.
        contract: the model's input contract (channel order, feature-map side).
        scores: the scores it can give: ("adaface",) or ("adaface", "qaconv").
        config: the saved config dict.
        step: the restored step.
        directory: the checkpoint folder.
    """

    model: nn.Module
    variables: dict
    contract: InputContract
    scores: tuple[str, ...]
    config: dict
    step: int
    directory: epath.Path


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_tree(expected: Any, actual: Any, what: str) -> None:
    """Raises ValueError listing every leaf of `actual` missing, unused or mis-shaped against `expected`."""
    want, have = _shapes(expected), _shapes(actual)
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unused {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
                 if have[k] != want[k]]
    if problems:
        raise ValueError(f"{what} does not match the model its config describes: " + "; ".join(problems))


def restore(path: epath.PathLike, step: Optional[int] = None) -> Restored:
    """Restores any checkpoint oaml_jax writes (training or converted) onto the current devices.

    The module is built from the checkpoint's own `model` config (training: the run's config; converted:
    the backbone fields `write_converted` recorded), and the variables are checked against it.

    Args:
        path: see `locate`.
        step: see `locate`.

    Raises:
        FileNotFoundError: see `locate`.
        ValueError: the checkpoint holds neither a "state" nor a "variables" item, its config lacks a model
            field, or its variables do not match the model its config describes.
    """
    directory, step = locate(path, step)
    names = _item_names(directory / str(step))
    item = TRAINING_ITEM if TRAINING_ITEM in names else CONVERTED_ITEM if CONVERTED_ITEM in names else None
    if item is None:
        raise ValueError(f"{directory}/{step} holds neither a {TRAINING_ITEM!r} nor a {CONVERTED_ITEM!r} item "
                         f"(found {sorted(names)})")
    # The item handlers themselves (a read-only manager would warn about every item it is not asked for), and
    # only the model variables: the optimizer state (a copy of the params per slot) stays on disk.
    step_dir = directory / str(step)
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(step_dir / item)
    metadata = getattr(metadata, "tree", metadata)
    replicated = sharding_lib.replicated(sharding_lib.make_mesh())
    targets = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                           {"params": metadata["params"], "batch_stats": metadata.get("batch_stats", {})})
    restored = handler.restore(step_dir / item, args=ocp.args.PyTreeRestore(
        item=targets, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(targets)))
    config = dict(ocp.JsonCheckpointHandler().restore(step_dir / "config"))
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    model_cfg = config.get("model")
    fields = factory.EMBEDDING_FIELDS if item == CONVERTED_ITEM else factory.MODEL_FIELDS
    missing = [k for k in fields if not isinstance(model_cfg, Mapping) or k not in model_cfg]
    if missing:
        raise ValueError(f"{directory}/{step}: the saved config has no model field(s) {missing} (written by "
                         "another version of oaml_jax?)")
    model_cfg = ml_collections.ConfigDict(model_cfg)
    params = variables["params"]
    if "qaconv" in params and "occlusion" in params:
        model = factory.build_model(model_cfg, num_classes=int(params["head"]["kernel"].shape[-1]))
        scores = ("adaface", "qaconv")
    else:
        model = factory.build_embedding_model(model_cfg)
        scores = ("adaface",)
    contract = factory.input_contract(model_cfg)
    check_tree(factory.abstract_variables(model, contract), variables, f"{directory}/{step}")
    logging.info("restored step %d from %s (%s; scores %s)", step, directory, item, scores)
    return Restored(model=model, variables=variables, contract=contract, scores=scores, config=config,
                    step=step, directory=directory)
