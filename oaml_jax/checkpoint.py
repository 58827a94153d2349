"""Checkpoints on disk: their layout, converted AdaFace weights, and the one restore path (the training run's
manager, which writes them, is `oaml_jax.checkpointing`).

A training checkpoint (`<workdir>/checkpoints/<step>/`) holds the items
- "state": the TrainState (step, params, batch_stats, opt_state, rng), saved as is;
- "data_iter": the Grain iterator of the current epoch (one file per process);
- "meta": JSON {"epoch", "corrupt", "num_model_classes", "val_accuracy"?, ...};
- "config": JSON of the run's config;
- "neighbours": the graph sampler's class graph `[C, k]` of the current epoch (graph sampler only), so a
  resumed run rebuilds exactly the same epoch;
- "data": JSON record of the training data (`oaml_jax.data_record`), so a resume on other data is refused.
A converted checkpoint (`oaml_jax.convert`, `write_converted`) is a checkpoint folder with one step (0)
holding "variables" ({"params": {"backbone"}, "batch_stats": {"backbone"}}) and "config" ({"model": the
backbone's model fields, input channel order included, "converted_from": source}).

`restore` reads either kind into a `Restored` (module, variables, input contract, the scores it can
give); eval.py, `FaceModel` and `init_from` all go through it, so the saved model fields (arch, backbone,
feature stage, channel order) are honoured the same way everywhere. Restores go onto the current devices
through ShapeDtypeStruct targets that carry the current shardings, so a checkpoint written on N devices
restores on any device count. Every path is an `etils.epath.Path` (gs:// works).

Two guarantees hold on every read. Variables holding a NaN or Inf are refused, naming the tensor (`check_finite`,
which serving code also calls on what it writes). A step folder that cannot be read (a missing or truncated
file: an interrupted copy, storage without atomic renames) is a `DamagedCheckpointError` naming the step and
the newest step that reads, with what to do: pass `--step=<that step>`, or move the damaged folder aside to
resume from it. Nothing falls back silently: a resume that quietly restarted from an older step would repeat
work and then save over the damaged step number (an interrupted copy can often simply be completed), and an
evaluation of another step than the one asked for would report figures for a model nobody chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import logging as logging_lib
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
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
DATA_ITEM = "data"
_JSON_ITEMS = ("config", "meta", DATA_ITEM)
# How many offending tensors a non-finite refusal names before it counts the rest.
_NAMED = 5
_ORBAX_DIR = os.path.dirname(os.path.dirname(ocp.__file__))  # .../orbax: where Orbax's read coroutines live


class DamagedCheckpointError(OSError):
    """A step folder that cannot be read (missing or truncated file); the message says what to do."""


def check_finite(tree: Any, what: str) -> None:
    """Refuses NaN and Inf in every floating-point leaf of `tree` (arrays, numpy or jax, any shape).

    Args:
        tree: a pytree of arrays: model variables, embeddings `[N, E]`, scores `[N]`. jax arrays are read
            from this process's first shard (restored variables are replicated).
        what: the thing checked, for the message (a checkpoint folder, "embeddings of photos/...").

    Raises:
        ValueError: naming the first few non-finite leaves by tree path, each with its count of bad values.
    """
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        values = np.asarray(leaf)
        if np.issubdtype(values.dtype, np.inexact):
            count = int(values.size - np.count_nonzero(np.isfinite(values)))
            if count:
                bad.append(f"{jax.tree_util.keystr(path) or 'value'} ({count} of {values.size} values)")
    if bad:
        more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        raise ValueError(f"{what} holds NaN or Inf in {', '.join(bad[:_NAMED])}{more}; refusing to use it")


def item_names(step_dir: epath.Path) -> set[str]:
    return {p.name for p in step_dir.iterdir() if not p.name.startswith(("_", "."))}


def _read_item(item_dir: epath.Path) -> None:
    """Reads one item of a step folder completely (arrays as numpy), raising whatever the read raises."""
    if item_dir.name in _JSON_ITEMS:
        ocp.JsonCheckpointHandler().restore(item_dir)
    elif item_dir.name == "data_iter":
        parts = list(item_dir.glob("process_*.json"))
        if not parts:
            raise FileNotFoundError(f"no iterator state in {item_dir}")
        for part in parts:
            json.loads(part.read_text())
    else:
        handler = ocp.PyTreeCheckpointHandler()
        metadata = handler.metadata(item_dir)
        metadata = getattr(metadata, "tree", metadata)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        handler.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _unreadable(directory: epath.Path, step: int) -> Optional[str]:
    """Why step `step` of `directory` cannot be read (None when every item reads completely)."""
    step_dir = directory / str(step)
    try:
        names = item_names(step_dir)
        missing = [n for n in ("config",) if n not in names]
        if missing or not names & {TRAINING_ITEM, CONVERTED_ITEM}:
            return f"item(s) {missing or [TRAINING_ITEM]} missing"
        for name in sorted(names):
            if (step_dir / name).is_dir():
                _read_item(step_dir / name)
    except Exception as e:  # noqa: BLE001 - any failure to read is the damage reported
        return _short_reason(e)
    return None


def _short_reason(error: BaseException) -> str:
    """The file a storage error names and its status code, else the error's first line (tensorstore's are long)."""
    text = str(error)
    files = re.findall(r'(?:local )?file "([^"]+)"', text)
    code = re.match(r"([A-Z_]{4,}):", text)
    if files:
        return f"{code.group(1) if code else type(error).__name__} reading {files[-1]}"
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def damaged_step_error(directory: epath.Path, step: int, reason: str) -> DamagedCheckpointError:
    """The one-line refusal for a damaged step: names it and the newest step that reads, and what to do."""
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    intact = next((s for s in steps if s != step and _unreadable(directory, s) is None), None)
    where = f"{directory}/{step}"
    if intact is None:
        advice = ("no other step in that folder reads either" if len(steps) > 1 else "it is the folder's only step")
        advice += "; restore the folder from a copy or start a new run"
    else:
        advice = (f"the newest intact step is {intact}: pass --step={intact} to evaluate or serve it, or move the "
                  f"damaged folder aside (mv {where} {where}.damaged) to resume training from it; a step is not "
                  "chosen for you")
    return DamagedCheckpointError(f"checkpoint {where} is damaged ({reason}); {advice}")


class _LateReadFilter:
    """A `sys.unraisablehook` that drops what a failed Orbax read leaves behind and passes on everything else.

    When one file of a step is missing or truncated, Orbax's read fails while tensorstore is still reading the
    step's other arrays. Two kinds of leftovers then reach `sys.unraisablehook`, each printed as a traceback
    (dozens to hundreds of them) around the one-line damage report:
    - "RuntimeError: Event loop is closed" from `call_soon_threadsafe`: completions that land on tensorstore's
      threads after Orbax closed its asyncio loop;
    - the exception each of Orbax's unfinished per-array read coroutines raises when it is finalized.
    Only those two are dropped, and any other whose error names the step folder read.
    """

    def __init__(self, previous, step_dir: epath.Path):
        self.previous, self.step_dir = previous, str(step_dir)

    def __call__(self, unraisable) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        late_completion = (isinstance(unraisable.exc_value, RuntimeError)
                           and str(unraisable.exc_value) == "Event loop is closed"
                           and any(frame.name == "call_soon_threadsafe" for frame in frames))
        code = getattr(unraisable.object, "cr_code", None)
        orbax_coroutine = inspect.iscoroutine(unraisable.object) and code.co_filename.startswith(_ORBAX_DIR)
        if not (late_completion or orbax_coroutine or self.step_dir in str(unraisable.exc_value)):
            self.previous(unraisable)


class _LateReadLogFilter(logging_lib.Filter):
    """Drops asyncio's "... exception was never retrieved" records of a failed read's other arrays (Orbax
    gathers one future per array; after the first failure nobody collects the others' errors): those whose
    traceback runs through Orbax or whose error names the step folder read."""

    def __init__(self, step_dir: epath.Path):
        super().__init__()
        self.step_dir = str(step_dir)

    def filter(self, record: logging_lib.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
            return True
        frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
        return not (any(frame.filename.startswith(_ORBAX_DIR) for frame in frames)
                    or self.step_dir in str(record.exc_info[1]))


def _release_frames(error: BaseException) -> None:
    """Clears the local variables of the frames in `error`'s traceback chain (the lines stay printable).

    Orbax's read coroutines are held by those frames; freed here, they are finalized while `_LateReadFilter`
    is installed, not at interpreter exit (where a command line's kept exception would release them and
    Python prints their exceptions with its own hook).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()


@contextlib.contextmanager
def reading(directory: epath.Path, step: int) -> Iterator[None]:
    """Turns a failed read of step `step` into `DamagedCheckpointError` when the step folder itself does not
    read (errors of an intact folder, e.g. a target of other shapes, pass through unchanged).

    While the read runs, and for the rest of the process once it failed (the late completions of a failed
    read arrive on tensorstore's threads after the error), `_LateReadFilter` and `_LateReadLogFilter` keep the
    aftermath of a failed read off stderr.
    """
    previous = sys.unraisablehook
    late = sys.unraisablehook = _LateReadFilter(previous, directory / str(step))
    late_logs = _LateReadLogFilter(directory / str(step))
    logging_lib.getLogger("asyncio").addFilter(late_logs)
    try:
        yield
    except DamagedCheckpointError:
        raise
    except Exception as e:
        reason = _unreadable(directory, step)
        if reason is None:
            raise
        _release_frames(e)
        raise damaged_step_error(directory, step, reason) from e
    logging_lib.getLogger("asyncio").removeFilter(late_logs)
    if sys.unraisablehook is late:
        sys.unraisablehook = previous


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
        ValueError: an unknown arch/override, a model field missing, a field JSON cannot hold, or a NaN or Inf in
            a variable (named).
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
    check_finite(tree, f"write_converted: the weights from {source}")
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
    elif path.name.isdigit() and path.is_dir() and (TRAINING_ITEM in item_names(path)
                                                    or CONVERTED_ITEM in item_names(path)):
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


def _read_variables(directory: epath.Path, step: int) -> tuple[dict, dict, str]:
    """The model variables (replicated on the current devices), the config and the item name of one step."""
    step_dir = directory / str(step)
    names = item_names(step_dir)
    item = TRAINING_ITEM if TRAINING_ITEM in names else CONVERTED_ITEM if CONVERTED_ITEM in names else None
    if item is None:
        raise ValueError(f"{step_dir} holds neither a {TRAINING_ITEM!r} nor a {CONVERTED_ITEM!r} item "
                         f"(found {sorted(names)})")
    # The item handlers themselves (a read-only manager would warn about every item it is not asked for), and
    # only the model variables: the optimizer state (a copy of the params per slot) stays on disk.
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(step_dir / item)
    metadata = getattr(metadata, "tree", metadata)
    replicated = sharding_lib.replicated(sharding_lib.make_mesh())
    targets = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                           {"params": metadata["params"], "batch_stats": metadata.get("batch_stats", {})})
    restored = handler.restore(step_dir / item, args=ocp.args.PyTreeRestore(
        item=targets, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(targets)))
    config = dict(ocp.JsonCheckpointHandler().restore(step_dir / "config"))
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}, config, item


def restore(path: epath.PathLike, step: Optional[int] = None) -> Restored:
    """Restores any checkpoint oaml_jax writes (training or converted) onto the current devices.

    The module is built from the checkpoint's own `model` config (training: the run's config; converted:
    the backbone fields `write_converted` recorded), and the variables are checked against it.

    Args:
        path: see `locate`.
        step: see `locate`.

    Raises:
        FileNotFoundError: see `locate`.
        DamagedCheckpointError: the step folder does not read (names the newest step that does).
        ValueError: the checkpoint holds neither a "state" nor a "variables" item, its config lacks a model
            field, its variables do not match the model its config describes, or hold a NaN or Inf (named).
    """
    directory, step = locate(path, step)
    with reading(directory, step):
        variables, config, item = _read_variables(directory, step)
    check_finite(variables, f"checkpoint {directory}/{step}")
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
