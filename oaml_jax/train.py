"""OAML training: config validation, mesh, sharded init, the epoch loop, validation, checkpoints.

    result = train_and_evaluate(config, workdir)

One mesh axis "data" over every device of every process: the batch is split over it, the class kernel is
split along the class axis (see oaml_jax/sharding.py), everything else is replicated. Each process feeds
its contiguous part of every global batch; `jax.make_array_from_process_local_data` assembles them.
The step itself lives in oaml_jax/step.py. Runs resume automatically from the latest checkpoint in
`<workdir>/checkpoints`, data order included. Metrics are fetched every step (a handful of scalars) so a
non-finite loss is caught at its own step.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost

from data_pipelines import occlusion_sets, pipeline, samplers
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax.configs import default as default_config
from oaml_jax import metrics as metrics_lib
from oaml_jax import optim
from oaml_jax import sharding as sharding_lib
from oaml_jax import step as step_lib
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation.base import Evaluator
from oaml_jax.evaluation.occlusion_sets import OcclusionSetEvaluator
from oaml_jax.serving import FaceModel
from oaml_jax.models import factory
from oaml_jax.models.oaml import check_group_size
from oaml_jax.paths import user_path
from oaml_jax.train_state import TrainState
from oaml_jax.workdir_lock import WorkdirBusyError, WorkdirLock

NONFINITE = ("stop", "skip")


def check_train_config(train_cfg: Mapping[str, Any], *, num_devices: int, process_count: int, k: int) -> None:
    """Checks `config.train`; raises ValueError naming the field."""
    batch = train_cfg["batch_size"]
    if batch <= 0:
        raise ValueError(f"train.batch_size={batch} must be positive")
    if batch % num_devices:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {num_devices} devices")
    if batch % process_count:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} processes")
    if k <= 0 or batch % k:
        raise ValueError(f"train.batch_size={batch} is not divisible by data.k={k} (P identities x K images per "
                         "batch)")
    if batch // k < 2:
        raise ValueError(f"train.batch_size={batch} / data.k={k} gives fewer than 2 identities per batch: QAConv "
                         "needs negative pairs")
    for field in ("epochs", "log_every", "checkpoint_every", "keep"):
        if train_cfg[field] <= 0:
            raise ValueError(f"train.{field}={train_cfg[field]} must be positive")
    for field in ("max_steps", "profile_steps"):
        if train_cfg[field] < 0:
            raise ValueError(f"train.{field}={train_cfg[field]} must be >= 0")
    if train_cfg["eval_every"] < -1:
        raise ValueError(f"train.eval_every={train_cfg['eval_every']} must be >= -1 (-1 = never, 0 = at the end)")
    if train_cfg["nonfinite"] not in NONFINITE:
        raise ValueError(f"train.nonfinite={train_cfg['nonfinite']!r}; expected one of {NONFINITE}")
    if not 0 <= train_cfg["max_skipped_share"] < 1:
        raise ValueError(f"train.max_skipped_share={train_cfg['max_skipped_share']} must be in [0, 1)")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
    """Checks the whole config before anything is compiled: each section by the code that consumes it.

    Raises:
        ValueError: an inconsistent or unknown value, naming the field.
    """
    check_train_config(config.train, num_devices=num_devices, process_count=process_count, k=config.data.k)
    factory.check_config(config.model)
    check_group_size(config.model.qaconv_group_size, global_batch=config.train.batch_size,
                     num_devices=num_devices, k=config.data.k)
    optim.check_config(config.optim)
    pipeline.check_config(config.data)
    occlusion_sets.check_config(config.data, num_devices=num_devices, process_count=process_count)
    evaluators_lib.check_config(config)


def _initialize_distributed(dist_cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize from `config.distributed` (gloo collectives for CPU processes)."""
    if not dist_cfg.initialize or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs = dict(coordinator_address=dist_cfg.coordinator_address,
                      num_processes=dist_cfg.num_processes, process_id=dist_cfg.process_id)
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def _sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches `name` (the coordination service's barrier, not a collective).

    Hosts compile and restore at different speeds; without this, the first collective of the train step
    waits on the slowest host and can time out (gloo's CPU collectives give up after 30 s).
    """
    if jax.process_count() > 1:
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def _load_backbone(state: TrainState, config: ml_collections.ConfigDict, state_sh: TrainState) -> TrainState:
    """Replaces the backbone variables with those of `config.init_from` (any checkpoint `restore` reads).

    Raises:
        ValueError: the checkpoint's backbone or input channel order differs from this run's model.
    """
    restored = checkpoint_lib.restore(config.init_from)
    what = f"init_from={config.init_from!r}"
    wanted = factory.input_contract(config.model).channel_order
    if restored.contract.channel_order != wanted:
        raise ValueError(f"{what}: the checkpoint's model takes {restored.contract.channel_order} input, this run's "
                         f"model.input_channel_order={wanted!r}")
    current = {c: getattr(state, c)["backbone"] for c in ("params", "batch_stats")}
    loaded = {c: restored.variables[c]["backbone"] for c in ("params", "batch_stats")}
    checkpoint_lib.check_tree(current, loaded, f"{what} (backbone)")
    new = {}
    for collection in ("params", "batch_stats"):
        tree = dict(getattr(state, collection))
        tree["backbone"] = jax.device_put(loaded[collection], getattr(state_sh, collection)["backbone"])
        new[collection] = tree
    logging.info("initialized the backbone from %s", restored.directory)
    return state.replace(**new)


def _class_graph(state: TrainState, num_classes: int, k: int, chunk: int, mesh) -> np.ndarray:
    """k nearest classes of every class by the cosine of the normalized class-kernel columns."""
    kernel = jax.jit(lambda x: x, out_shardings=sharding_lib.replicated(mesh))(state.params["head"]["kernel"])
    centres = np.asarray(kernel)[:, :num_classes].T
    centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return samplers.knn_classes(centres, k, chunk)


def _validate(validator: Optional[FaceModel], evaluator: list[Evaluator], state: TrainState) -> dict[str, float]:
    """Train-time validation (the evaluators marked `validation`, clean pairs): every metric under "val/", and
    the checkpoint ranking metric `BEST_METRIC` (`evaluators.validation_metrics`)."""
    if not evaluator:
        return {}
    validator.set_variables(state.variables())
    return evaluators_lib.validation_metrics(evaluator, validator)


def _num_classes(config: ml_collections.ConfigDict, source: Any) -> int:
    """`model.num_classes`, or the data's; labels past the class kernel are refused before compiling
    (they would index past it and turn the loss into NaN at step 0)."""
    labels = source.labels()
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"data.path={config.data.path}: label {low} is negative; labels must be 0..C-1")
    if config.model.num_classes and high >= config.model.num_classes:
        raise ValueError(f"model.num_classes={config.model.num_classes} but data.path={config.data.path} holds "
                         f"labels up to {high}: it needs at least {high + 1} classes (0 = take it from the data)")
    return config.model.num_classes or source.num_classes


# Fields whose change between a checkpoint and its resumed run changes the model or the data order.
_RESUME_FIELDS = ("seed", "model", "data.source", "data.sampler", "data.k", "data.seed", "data.augment",
                  "data.occlusion", "train.batch_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                       fields: Optional[tuple[str, ...]] = None, ignore: tuple[str, ...] = ()) -> list[str]:
    """Lists "field: saved X, now Y" for each leaf field where the two configs differ, of those under `fields` (all when
    None) and not under `ignore`.

    Both sides are compared as JSON (tuples and lists alike), as the checkpoint stores the config. A field the
    saved config lacks (one added to configs/default.py since it was saved) counts as its default value.
    """
    flat_json = lambda tree: _flatten(json.loads(json.dumps(tree)))
    current = flat_json(config.to_dict())
    saved = {**flat_json(default_config.get_config().to_dict()), **flat_json(saved)}
    under = lambda key, prefixes: any(key == f or key.startswith(f + ".") for f in prefixes)
    relevant = lambda key: (fields is None or under(key, fields)) and not under(key, ignore)
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if relevant(key) and saved.get(key) != current.get(key)]


def check_resumed_config(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a checkpoint with a config that changes the model or the data order.

    Raises:
        ValueError: listing each changed field with its saved and new value, unless
            `train.allow_config_change` is set (then it is logged as a warning).
    """
    changed = config_differences(saved, config, _RESUME_FIELDS)
    if not changed:
        return
    message = ("the config differs from the one the checkpoint was trained with in fields that change the model or "
               "the data order: " + "; ".join(changed))
    if not config.train.allow_config_change:
        raise ValueError(message + ". Use another --workdir for a new run, or resume as it was; "
                         "--config.train.allow_config_change=True resumes anyway.")
    logging.warning("%s (train.allow_config_change=True: resuming anyway)", message)


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path) -> Iterator[Optional[WorkdirLock]]:
    """Holds the workdir's lock on process 0 for the run; every process stops when it cannot be taken."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirBusyError as e:
            error = e
    if jax.process_count() > 1 and not bool(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        raise error or WorkdirBusyError(f"{workdir} is in use by another training run (see process 0's log)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


class _Preemption:
    """The preemption notice: an agreed step at which every process saves and stops.

    Multi-process jobs use JAX's preemption service (`multihost_utils.reached_preemption_sync_point`: the
    coordination service turns a SIGTERM on any host into one step for all). A single process handles
    SIGTERM itself (TPU maintenance, spot VMs and SLURM send it, then wait seconds to minutes).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains (resuming from `<workdir>/checkpoints` if present) and validates.

    Args:
        config: see configs/default.py.
        workdir: checkpoints, TensorBoard summaries and profiles go here (local or any epath URI).

    Returns:
        dict with "step" (final step), "metrics" (mean metrics of the last logging interval), "validation"
        (last validation results, possibly empty), "losses" (loss of every step run by this call, by
        step), "num_classes", "preempted" (True when a preemption notice stopped the run after saving).

    Raises:
        FloatingPointError: a non-finite loss with train.nonfinite="stop", or more than
            train.max_skipped_share of the steps skipped with "skip" (names the step and the last
            complete checkpoint).
        WorkdirBusyError: another live run holds the workdir.
        ValueError: a bad config (named), labels past `model.num_classes`, or a resumed checkpoint whose
            config differs in a field that changes the model or the data order.
        RuntimeError: validation failed (the training state of that step is saved first).
    """
    _initialize_distributed(config.distributed)
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = user_path(workdir, "workdir")
    source = pipeline.open_source(config.data)
    num_classes = _num_classes(config, source)
    evaluators = evaluators_lib.from_config(config, training=True) if config.train.eval_every >= 0 else []
    workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir) as lock:
        preemption = _Preemption()
        try:
            return _train(config, workdir, source, num_classes, evaluators, lock, preemption)
        finally:
            preemption.close()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, source: Any, num_classes: int,
           evaluator: list[Evaluator], lock: Optional[WorkdirLock], preemption: _Preemption
           ) -> dict[str, Any]:
    """The run itself, with the workdir held (see `train_and_evaluate`)."""
    global_batch = config.train.batch_size
    spe = pipeline.steps_per_epoch(len(source), global_batch)
    total_steps = config.train.epochs * spe
    stop_step = min(config.train.max_steps or total_steps, total_steps)
    group_size = config.model.qaconv_group_size
    # The graph sampler's neighbourhoods fill one matching group each: a seed class and its nearest ones.
    graph_k = (group_size or global_batch) // config.data.k - 1
    mesh = sharding_lib.make_mesh()
    ckpt = checkpoint_lib.Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep)
    latest = ckpt.latest_step()
    if latest is not None:
        check_resumed_config(ckpt.restore_config(latest), config)
    meta, neighbours = ckpt.restore_extras(latest) if latest is not None else ({}, None)
    model_classes = meta.get("num_model_classes") or sharding_lib.padded_num_classes(num_classes, jax.device_count())
    if model_classes % jax.device_count():
        raise ValueError(f"the checkpoint's class kernel ({model_classes} columns) cannot be split over "
                         f"{jax.device_count()} devices; resume on a device count that divides it")
    model = factory.build_model(config.model, model_classes)
    contract = factory.input_contract(config.model)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=spe, epochs=config.train.epochs,
                                        global_batch=global_batch)
    logging.info("compiling the train step: %s, global batch %d over %d devices (%d processes), %d classes "
                 "(kernel %d), %d records, %d steps/epoch, stop at step %d", config.model.arch, global_batch,
                 jax.device_count(), jax.process_count(), num_classes, model_classes, len(source), spe, stop_step)
    compile_start = time.perf_counter()
    pipeline.occlusion_items(config.data, contract.grid)  # a missing or empty occlusion set stops here
    train_step = step_lib.build_train_step(model, tx, schedule, contract, mesh, global_batch=global_batch,
                                           **step_lib.occlusion_options(config))
    compiled = train_step.step.lower(train_step.abstract_state, train_step.abstract_batch).compile()
    flops = metrics_lib.jaxpr_flops(train_step.step, train_step.abstract_state, train_step.abstract_batch)
    logging.info("compiled in %.1f s (%.3g FLOPs per step)", time.perf_counter() - compile_start, flops)

    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    config_dict = config.to_dict()
    try:
        if latest is None:
            state = train_step.init(jax.random.PRNGKey(config.seed))
            if config.init_from:
                state = _load_backbone(state, config, train_step.state_shardings)
            step = 0
        else:
            state = ckpt.restore_state(latest, train_step.abstract_state)
            step = latest
            logging.info("resuming from %s/%d", ckpt.directory, latest)
        # Validation shares eval.py's feature extraction; it is pointed at the state's values each time.
        validator = (FaceModel(model, state.variables(), contract, batch_size=config.eval.batch_size)
                     if evaluator else None)
        occlusion_evaluator = OcclusionSetEvaluator.from_config(config, contract.grid) if evaluator else None
        _sync_processes("oaml_train_ready")
        # The progress report's clock counts training time only, so its ETA ignores validation and saving.
        progress = periodic_actions.ReportProgress(num_train_steps=stop_step, every_steps=config.train.log_every)
        hooks = []
        if config.train.profile_steps > 0 and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps,
                                                  first_profile=step + 5, logdir=str(workdir)))
        result = {"step": step, "metrics": {}, "validation": {}, "losses": {}, "num_classes": num_classes,
                  "preempted": False}
        first_step, run_start, train_seconds = step, time.perf_counter(), 0.0
        interval, interval_seconds = [], 0.0
        corrupt_total, skipped_total = meta.get("corrupt", 0), meta.get("skipped", 0)
        best = (meta.get(checkpoint_lib.BEST_METRIC), latest)
        while step < stop_step and not result["preempted"]:
            epoch, offset = divmod(step, spe)
            if config.data.sampler == "graph" and (offset == 0 or neighbours is None):
                neighbours = _class_graph(state, num_classes, graph_k, config.data.graph_chunk, mesh)
            elif config.data.sampler != "graph":
                neighbours = None
            data_iter = iter(pipeline.train_epoch_dataset(
                source, config.data, epoch, global_batch=global_batch, process_index=jax.process_index(),
                process_count=jax.process_count(), grid=contract.grid, neighbours=neighbours,
                group_size=group_size))
            if latest is not None and offset:
                ckpt.restore_data_iter(latest, data_iter)
            latest = None
            for _ in range(offset, min(spe, offset + stop_step - step)):
                step_start = time.perf_counter()
                local = next(data_iter)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, device_metrics = compiled(state, sharding_lib.global_batch(local, mesh))
                host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
                seconds = time.perf_counter() - step_start
                train_seconds += seconds
                interval_seconds += seconds
                step += 1
                if host["nonfinite"]:
                    skipped_total += 1
                    _check_nonfinite(config.train, host, step, epoch, skipped_total, ckpt)
                corrupt_total += int(host["corrupt"])
                result["losses"][step - 1] = host["loss"]
                interval.append(host)
                progress(step, t=run_start + train_seconds)
                for hook in hooks:
                    hook(step)
                if lock is not None:
                    lock.refresh()
                if step % config.train.log_every == 0 or step == stop_step:
                    means = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
                    means["images_per_sec"] = len(interval) * global_batch / interval_seconds
                    means["mfu"] = metrics_lib.mfu(flops * len(interval), interval_seconds, jax.device_count())
                    means.update(corrupt_total=corrupt_total, skipped_total=skipped_total, epoch=step / spe)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    result["metrics"] = means
                    interval, interval_seconds = [], 0.0
                step_meta = {"epoch": step // spe, "corrupt": corrupt_total, "skipped": skipped_total,
                             "num_model_classes": model_classes}
                eval_every = config.train.eval_every
                evaluate = evaluator and ((eval_every > 0 and step % eval_every == 0) or step == stop_step)
                preempted = preemption.reached(step)
                if evaluate:
                    validation = _validate_or_save(validator, evaluator, state, step, ckpt, data_iter, spe,
                                                   step_meta, config_dict, neighbours)
                    if occlusion_evaluator is not None:
                        validation.update({f"val/{k}": v for k, v in occlusion_evaluator.run(validator)})
                    writer.write_scalars(step, validation)
                    logging.info("step %d validation: %s", step, validation)
                    result["validation"] = validation
                    step_meta[checkpoint_lib.BEST_METRIC] = validation[checkpoint_lib.BEST_METRIC]
                    if best[0] is None or validation[checkpoint_lib.BEST_METRIC] > best[0]:
                        best = (validation[checkpoint_lib.BEST_METRIC], step)
                ckpt.save(step, state, data_iter=data_iter if step % spe else None, meta=step_meta,
                          config=config_dict, neighbours=neighbours,
                          force=bool(evaluate) or step == stop_step or preempted)
                if preempted:
                    ckpt.wait_until_finished()
                    logging.warning("preemption notice: saved step %d to %s; exiting for a restart", step,
                                    ckpt.directory)
                    result["preempted"] = True
                    break
        writer.flush()
    finally:
        # Also on errors: an in-flight async save completes before the exception propagates.
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    result["step"] = step
    steps_run = step - first_step
    logging.info("%s: steps %d-%d in %s, %.0f images/s while training; best validation %s; checkpoints in %s",
                 "stopped for preemption" if result["preempted"] else "done", first_step, step,
                 _duration(time.perf_counter() - run_start),
                 steps_run * global_batch / train_seconds if train_seconds else 0.0,
                 "none" if best[0] is None else f"{best[0]:.4f} at step {best[1]}", ckpt.directory)
    return result


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# Share of skipped steps is judged over at least this many steps (one early skip is not a trend).
_MIN_STEPS_FOR_SHARE = 10


def _check_nonfinite(train_cfg: ml_collections.ConfigDict, host: Mapping[str, float], step: int, epoch: int,
                     skipped_total: int, ckpt: checkpoint_lib.Checkpointer) -> None:
    """Raises FloatingPointError for a non-finite step under "stop", or too many of them under "skip"."""
    stop = train_cfg.nonfinite == "stop"
    if not stop and skipped_total <= train_cfg.max_skipped_share * max(step, _MIN_STEPS_FOR_SHARE):
        return
    ckpt.wait_until_finished()
    where = ckpt.last_complete()
    reason = (f"non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at step {step - 1} "
              f"(epoch {epoch})" if stop else
              f"{skipped_total} of the {step} steps so far had a non-finite loss or gradient norm, more than "
              f"train.max_skipped_share={train_cfg.max_skipped_share}")
    raise FloatingPointError(f"{reason}; last good checkpoint: {where}")


def _validate_or_save(validator: FaceModel, evaluator: list[Evaluator], state: TrainState, step: int,
                      ckpt: checkpoint_lib.Checkpointer, data_iter: Any, spe: int, meta: dict, config_dict: dict,
                      neighbours: Optional[np.ndarray]) -> dict[str, float]:
    """`_validate`; if it fails, the state of `step` is saved before the error goes on (no step is lost)."""
    _sync_processes(f"oaml_validate_{step}")
    try:
        return _validate(validator, evaluator, state)
    except Exception as e:
        ckpt.save(step, state, data_iter=data_iter if step % spe else None, meta=meta, config=config_dict,
                  neighbours=neighbours, force=True)
        ckpt.wait_until_finished()
        raise RuntimeError(f"validation at step {step} failed ({type(e).__name__}: {e}); the training state of "
                           f"step {step} is saved in {ckpt.directory}/{step}: fix the cause and rerun the same "
                           "command to resume") from e
