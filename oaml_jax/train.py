"""OAML training: mesh, sharded init, the epoch loop, validation, checkpoints.

    result = train_and_evaluate(config, workdir)

One mesh axis "data" over every device of every process: the batch is split over it, the class kernel is
split along the class axis (see oaml_jax/sharding.py), everything else is replicated. Each process feeds
its contiguous part of every global batch; `jax.make_array_from_process_local_data` assembles them.
The step itself lives in oaml_jax/step.py, the config checks and the run's description (`RunSpec`) in
oaml_jax/run_spec.py, train-time validation in oaml_jax/train_validation.py. Runs resume automatically from
the latest checkpoint in `<workdir>/checkpoints`, data order included.

The host never waits for the device inside the loop: the next global batch is read and put on the devices
while the current step runs, and a step's metrics are fetched after the next step is dispatched
(oaml_jax/metric_logger.py). The non-finite policy keeps its guarantees: the step itself never applies a
non-finite update (oaml_jax/step.py), a checkpoint is only written after the metrics of its last step were
checked (the logger is flushed before every save and every validation), and under "stop" the run stops
naming the offending step, at most one step after it (that next step may run, its state is never saved).
Whether to save or stop at a step is the checkpointer's decision (`Checkpointer.maybe_save`).
"""

from __future__ import annotations

import contextlib
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

from data_pipelines import pipeline, samplers
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import checkpointing
from oaml_jax import metric_logger
from oaml_jax import metrics as metrics_lib
from oaml_jax import optim
from oaml_jax import resume
from oaml_jax import sharding as sharding_lib
from oaml_jax import step as step_lib
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation.base import Evaluator
from oaml_jax.models import factory
from oaml_jax.models.face_input import InputContract
from oaml_jax.paths import user_path
from oaml_jax.processes import initialize_distributed, sync_processes
from oaml_jax.run_spec import RunSpec, validate_config
from oaml_jax.train_state import TrainState
from oaml_jax.train_validation import Validation
from oaml_jax.workdir_lock import WorkdirBusyError, WorkdirLock, not_writable


def _load_backbone(state: TrainState, config: ml_collections.ConfigDict, contract: InputContract,
                   state_sh: TrainState) -> TrainState:
    """Replaces the backbone variables with those of `config.init_from` (any checkpoint `restore` reads).

    Raises:
        ValueError: the checkpoint's backbone or input channel order differs from this run's model.
    """
    restored = checkpoint_lib.restore(config.init_from)
    what = f"init_from={config.init_from!r}"
    wanted = contract.channel_order
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


def _check_data(config: ml_collections.ConfigDict, spec: RunSpec, source: Any) -> tuple[int, np.ndarray, dict]:
    """Whatever the index tells about the data, checked before anything is written or compiled.

    Returns:
        (num_classes: `model.num_classes` or the data's, labels int `[N]`, the data record of
        `oaml_jax.resume.describe_data`).

    Raises:
        ValueError: a negative label, labels past `model.num_classes` (they would index past the class kernel
            and turn the loss into NaN at step 0), or too few identities or records for one batch of the
            sampler (e.g. a folder with one identity), naming `data.path`.
    """
    labels = source.labels()
    low, high = int(labels.min()), int(labels.max())
    where = f"data.path={config.data.path}"
    if low < 0:
        raise ValueError(f"{where}: label {low} is negative; labels must be 0..C-1")
    if config.model.num_classes and high >= config.model.num_classes:
        raise ValueError(f"model.num_classes={config.model.num_classes} but {where} holds "
                         f"labels up to {high}: it needs at least {high + 1} classes (0 = take it from the data)")
    sampler = samplers.PKSampler if config.data.sampler == "pk" else samplers.GraphSampler
    try:
        sampler(labels, spec.identities_per_batch, config.data.k, config.data.seed, spec.group_size)
    except ValueError as e:
        raise ValueError(f"{where}: {e} (train.batch_size={spec.global_batch}, data.k={config.data.k})") from e
    num_classes = config.model.num_classes or source.num_classes
    if config.data.sampler == "graph" and spec.graph_k > num_classes - 1:
        raise ValueError(f"{where} holds {num_classes} classes; the graph sampler needs {spec.graph_k} neighbours "
                         "per class (model.qaconv_group_size / data.k - 1)")
    return num_classes, labels, resume.describe_data(source, labels)


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path) -> Iterator[Optional[WorkdirLock]]:
    """Creates the workdir and holds its lock on process 0 for the run; every process stops when it cannot be
    taken (busy, or the workdir cannot be written)."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise not_writable(workdir, e) from e
            lock.acquire()
        except OSError as e:
            error = e
    if jax.process_count() > 1 and not bool(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        raise error or WorkdirBusyError(f"{workdir} cannot be used (see process 0's log)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    """Trains (resuming from `<workdir>/checkpoints` if present) and validates.

    Args:
        config: see oaml_jax/configs/default.py.
        workdir: checkpoints, TensorBoard summaries and profiles go here (local or any epath URI).

    Returns:
        dict with "step" (final step), "metrics" (mean metrics of the last logging interval), "validation"
        (last validation results, possibly empty), "losses" (loss of every step run by this call, by
        step), "num_classes", "preempted" (True when SIGTERM, JAX's preemption service or a Ctrl-C stopped
        the run after saving), "signal" ("SIGTERM", "SIGINT" or None).

    Raises:
        FloatingPointError: a non-finite loss with train.nonfinite="stop", or more than
            train.max_skipped_share of the steps skipped with "skip" (names the step and the last
            complete checkpoint).
        WorkdirBusyError: another live run holds the workdir.
        OSError: the workdir cannot be written (named).
        ValueError: a bad config (named), labels past `model.num_classes`, too few identities for a batch,
            or a resumed checkpoint whose config or data differs (named).
        DamagedCheckpointError: the checkpoint to resume from does not read (names the step and what to do).
        RuntimeError: validation failed (the training state of that step is saved first).
        KeyboardInterrupt: a second Ctrl-C.
    """
    initialize_distributed(config.distributed)
    spec = validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = user_path(workdir, "workdir")
    source = pipeline.open_source(config.data)
    num_classes, labels, record = _check_data(config, spec, source)
    pipeline.occlusion_items(config.data, spec.contract.grid)  # a missing or empty occlusion set stops here
    evaluators = evaluators_lib.from_config(config, training=True) if config.train.eval_every >= 0 else []
    with _workdir_lock(workdir) as lock, checkpointing.StopRequests() as stop:
        return _train(config, spec, workdir, source, (num_classes, labels, record), evaluators, lock,
                      stop)


class _Batches:
    """The run's global batches, epoch by epoch, each put on the devices while the step before it runs
    (big_vision's prefetch). The graph sampler's class graph is rebuilt from the state at each epoch start."""

    def __init__(self, config: ml_collections.ConfigDict, spec: RunSpec, source: Any, num_classes: int, mesh,
                 steps_per_epoch: int, neighbours: Optional[np.ndarray]):
        self.config, self.spec, self.source, self.num_classes, self.mesh = config, spec, source, num_classes, mesh
        self.spe, self.neighbours = steps_per_epoch, neighbours
        self.data_iter: Any = None

    def open(self, step: int, state: TrainState, resume: Optional[tuple[checkpointing.Checkpointer, int]] = None
             ) -> dict[str, jax.Array]:
        """Opens the epoch of `step` (at its position when `resume` = (checkpointer, step) names a mid-epoch
        checkpoint) and returns the batch of `step` on the devices."""
        epoch, offset = divmod(step, self.spe)
        if self.config.data.sampler != "graph":
            self.neighbours = None
        elif offset == 0 or self.neighbours is None:
            self.neighbours = _class_graph(state, self.num_classes, self.spec.graph_k, self.config.data.graph_chunk,
                                           self.mesh)
        self.data_iter = iter(pipeline.train_epoch_dataset(
            self.source, self.config.data, epoch, global_batch=self.spec.global_batch,
            process_index=jax.process_index(), process_count=jax.process_count(), grid=self.spec.contract.grid,
            neighbours=self.neighbours, group_size=self.spec.group_size))
        if resume is not None and offset:
            resume[0].restore_data_iter(resume[1], self.data_iter)
        return self.next_on_devices()

    def next(self, step: int, state: TrainState) -> dict[str, jax.Array]:
        """The batch of `step`, put on the devices (asynchronously); a new epoch opens at its first step."""
        return self.open(step, state) if step % self.spe == 0 else self.next_on_devices()

    def next_on_devices(self) -> dict[str, jax.Array]:
        return sharding_lib.global_batch(next(self.data_iter), self.mesh)

    def iterator_to_save(self, step: int) -> Any:
        """The iterator a checkpoint of `step` saves (None at an epoch boundary: the next epoch starts fresh)."""
        return self.data_iter if step % self.spe else None


def _train(config: ml_collections.ConfigDict, spec: RunSpec, workdir: epath.Path, source: Any,
           data: tuple[int, np.ndarray, dict], evaluator: list[Evaluator], lock: Optional[WorkdirLock],
           stop: checkpointing.StopRequests) -> dict[str, Any]:
    """The run itself, with the workdir held (see `train_and_evaluate`)."""
    num_classes, labels, record = data
    spe = pipeline.steps_per_epoch(len(source), spec.global_batch)
    stop_step = min(config.train.max_steps or config.train.epochs * spe, config.train.epochs * spe)
    if config.train.max_steps > stop_step:
        logging.warning("train.max_steps=%d is past the end of train.epochs=%d (%d steps each): the run stops at step "
                        "%d; raise train.epochs to train longer (the learning-rate schedule follows the epochs)",
                        config.train.max_steps, config.train.epochs, spe, stop_step)
    mesh = sharding_lib.make_mesh()
    ckpt = checkpointing.Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep)
    try:
        latest = ckpt.latest_step()
        meta, neighbours = _resume_checks(config, ckpt, latest, num_classes, labels, record)
        if latest is not None and latest >= stop_step:
            logging.info("nothing to train: the checkpoint of step %d in %s reaches the run's last step %d",
                         latest, ckpt.directory, stop_step)
            ckpt.close()
            return {"num_classes": num_classes, "preempted": False, "signal": None, "step": latest, "metrics": {},
                    "losses": {}, "validation": {}}
        model_classes = meta["num_model_classes"]
        logging.info("compiling the train step: %s, global batch %d over %d devices (%d processes), %d classes "
                     "(kernel %d), %d records, %d steps/epoch, stop at step %d", config.model.arch,
                     spec.global_batch, jax.device_count(), jax.process_count(), num_classes, model_classes,
                     len(source), spe, stop_step)
        model, train_step, compiled, flops = _compile(config, spec, model_classes, spe, mesh)
    except BaseException:
        ckpt.close()  # a refused resume or failed compile closes the manager (its threads) before the error goes on
        raise

    writer = _writer(workdir)
    config_dict = config.to_dict()
    try:
        state, step = _initial_state(config, spec, ckpt, latest, train_step)
        validation = Validation(config, spec, model, state, evaluator, writer, ckpt, stop_step,
                                best=(meta.get(checkpoint_lib.BEST_METRIC), latest))
        sync_processes("oaml_train_ready")
        profile = (periodic_actions.Profile(num_profile_steps=config.train.profile_steps, first_profile=step + 5,
                                            logdir=str(workdir))
                   if config.train.profile_steps > 0 and jax.process_index() == 0 else None)
        totals = {"corrupt_total": meta.get("corrupt", 0), "skipped_total": meta.get("skipped", 0)}

        def check(index: int, host: dict[str, float]) -> None:
            totals["corrupt_total"] += int(host["corrupt"])
            if host["nonfinite"]:
                totals["skipped_total"] += 1
                _check_nonfinite(config.train, host, index + 1, index // spe, totals["skipped_total"], ckpt)

        logger = metric_logger.MetricLogger(
            writer, log_every=config.train.log_every, stop_step=stop_step,
            global_batch=spec.global_batch, steps_per_epoch=spe, flops_per_step=flops, check=check,
            totals=lambda: dict(totals))
        batches = _Batches(config, spec, source, num_classes, mesh, spe, neighbours)
        result = {"num_classes": num_classes, "preempted": False, "signal": None}
        first_step, run_start = step, time.perf_counter()

        def items(step: int, extra: Optional[dict] = None) -> dict[str, Any]:
            step_meta = {"epoch": step // spe, "corrupt": totals["corrupt_total"],
                         "skipped": totals["skipped_total"], "num_model_classes": model_classes, **(extra or {})}
            return dict(data_iter=batches.iterator_to_save(step), meta=step_meta, config=config_dict,
                        neighbours=batches.neighbours, data=record)

        batch = batches.open(step, state, resume=(ckpt, latest) if latest is not None else None) \
            if step < stop_step else None
        while step < stop_step:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, device_metrics = compiled(state, batch)
            logger.push(step, device_metrics)
            step += 1
            if profile is not None:
                profile(step)
            if lock is not None:
                lock.refresh()
            extra = validation.maybe_run(step, state, logger, items)
            if ckpt.maybe_save(step, state, stop=stop, force=bool(extra) or step == stop_step,
                               before_save=logger.flush, items=lambda: items(step, extra)):
                result["preempted"], result["signal"] = True, stop.signal or "SIGTERM"
                break
            if step < stop_step:
                batch = batches.next(step, state)
        logger.flush()
        writer.flush()
    finally:
        # Also on errors: an in-flight async save completes before the exception propagates.
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    result.update(step=step, metrics=logger.last, losses=logger.losses, validation=validation.last)
    best = validation.best
    seconds = logger.train_seconds
    logging.info("%s: steps %d-%d in %s, %.0f images/s while training; best validation %s; checkpoints in %s",
                 ("stopped by Ctrl-C" if result["signal"] == "SIGINT" else "stopped for preemption")
                 if result["preempted"] else "done", first_step, step,
                 metric_logger.duration(time.perf_counter() - run_start),
                 (step - first_step) * spec.global_batch / seconds if seconds else 0.0,
                 "none" if best[0] is None else f"{best[0]:.4f} at step {best[1]}", ckpt.directory)
    return result


def _compile(config: ml_collections.ConfigDict, spec: RunSpec, model_classes: int, spe: int, mesh
             ) -> tuple[Any, step_lib.TrainStep, Any, float]:
    """The model, the train step (oaml_jax/step.py), its compiled program and its FLOPs per step."""
    model = factory.build_model(config.model, model_classes)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=spe, epochs=config.train.epochs,
                                        global_batch=spec.global_batch)
    start = time.perf_counter()
    train_step = step_lib.build_train_step(model, tx, schedule, spec.contract, mesh, global_batch=spec.global_batch,
                                           **step_lib.occlusion_options(config))
    compiled = train_step.step.lower(train_step.abstract_state, train_step.abstract_batch).compile()
    flops = metrics_lib.jaxpr_flops(train_step.step, train_step.abstract_state, train_step.abstract_batch)
    logging.info("compiled in %.1f s (%.3g FLOPs per step)", time.perf_counter() - start, flops)
    return model, train_step, compiled, flops


def _writer(workdir: epath.Path) -> Any:
    """TensorBoard summaries from process 0 (the log gets the metric logger's short lines instead)."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))


def _resume_checks(config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer, latest: Optional[int],
                   num_classes: int, labels: np.ndarray, record: dict) -> tuple[dict, Optional[np.ndarray]]:
    """The checkpoint's meta and class graph, after refusing a resume whose config or data changed."""
    if latest is None:
        padded = sharding_lib.padded_num_classes(num_classes, jax.device_count())
        return {"num_model_classes": padded}, None
    resume.check_resumed_config(ckpt.restore_config(latest), config)
    meta, neighbours = ckpt.restore_extras(latest)
    meta.setdefault("num_model_classes", sharding_lib.padded_num_classes(num_classes, jax.device_count()))
    if meta["num_model_classes"] % jax.device_count():
        raise ValueError(f"the checkpoint's class kernel ({meta['num_model_classes']} columns) cannot be split over "
                         f"{jax.device_count()} devices; resume on a device count that divides it")
    resume.check_resumed_data(ckpt.restore_data_record(latest), record, data_path=str(config.data.path),
                                   allow=config.train.allow_data_change, step=latest,
                                   num_model_classes=meta["num_model_classes"], max_label=int(labels.max()))
    return meta, neighbours


def _initial_state(config: ml_collections.ConfigDict, spec: RunSpec, ckpt: checkpointing.Checkpointer,
                   latest: Optional[int], train_step: Any) -> tuple[TrainState, int]:
    """The state to start from and its step: the latest checkpoint's, else a fresh (or `init_from`) one."""
    if latest is not None:
        logging.info("resuming from %s/%d", ckpt.directory, latest)
        return ckpt.restore_state(latest, train_step.abstract_state), latest
    state = train_step.init(jax.random.PRNGKey(config.seed))
    if config.init_from:
        state = _load_backbone(state, config, spec.contract, train_step.state_shardings)
    return state, 0


# Share of skipped steps is judged over at least this many steps (one early skip is not a trend).
_MIN_STEPS_FOR_SHARE = 10


def _check_nonfinite(train_cfg: ml_collections.ConfigDict, host: Mapping[str, float], step: int, epoch: int,
                     skipped_total: int, ckpt: checkpointing.Checkpointer) -> None:
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
