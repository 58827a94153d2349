"""OAML training: config validation, sharded init, the jitted step, the epoch loop, validation, checkpoints.

    result = train_and_evaluate(config, workdir)

One mesh axis "data" over every device of every process: the batch is split over it, the class kernel is
split along the class axis (see oaml_jax/sharding.py), everything else is replicated. Each process feeds
its contiguous part of every global batch; `jax.make_array_from_process_local_data` assembles them.
Runs resume automatically from the latest checkpoint in `<workdir>/checkpoints`, data order included.
Metrics are fetched every step (a handful of scalars) so a non-finite loss is caught at its own step.
"""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from orbax.checkpoint import multihost

from data_pipelines import bin_pairs, pipeline, samplers
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import metrics as metrics_lib
from oaml_jax import model_factory, optim
from oaml_jax import sharding as sharding_lib
from oaml_jax import verification
from oaml_jax.inference import FaceModel
from oaml_jax.models.backbone import ARCHS, feature_map_shape
from oaml_jax.models.oaml import HEADS, OAML
from oaml_jax.train_state import TrainState

IMAGE_SHAPE = (112, 112, 3)
NONFINITE = ("stop", "skip")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
    """Checks the config before anything is compiled; raises naming the offending field.

    Raises:
        ValueError: an inconsistent or unknown value.
        FileNotFoundError: `data.path` (or `init_from`) does not exist.
    """
    batch = config.train.batch_size
    if batch <= 0:
        raise ValueError(f"train.batch_size={batch} must be positive")
    if batch % num_devices:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {num_devices} devices")
    if batch % process_count:
        raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} processes")
    if config.data.k <= 0 or batch % config.data.k:
        raise ValueError(f"train.batch_size={batch} is not divisible by data.k={config.data.k} "
                         "(P identities x K images per batch)")
    if batch // config.data.k < 2:
        raise ValueError(f"train.batch_size={batch} / data.k={config.data.k} gives fewer than 2 identities "
                         "per batch: QAConv needs negative pairs")
    eval_batch = config.eval.batch_size
    if eval_batch <= 0 or eval_batch % (2 * num_devices) or eval_batch % process_count:
        raise ValueError(f"eval.batch_size={eval_batch} must be a positive multiple of 2 x the {num_devices} "
                         f"devices (pairs are scored within a batch) and of the {process_count} processes")
    if config.model.arch not in ARCHS:
        raise ValueError(f"model.arch={config.model.arch!r} is unknown; expected one of {ARCHS}")
    if config.model.head not in HEADS:
        raise ValueError(f"model.head={config.model.head!r} is unknown; expected one of {sorted(HEADS)}")
    model_factory.compute_dtype(config.model.dtype)
    for lam in ("lam_ada", "lam_qa", "lam_occ"):
        if config.model[lam] < 0:
            raise ValueError(f"model.{lam}={config.model[lam]} must be >= 0")
    if config.model.num_classes < 0:
        raise ValueError(f"model.num_classes={config.model.num_classes} must be >= 0 (0 = from the data)")
    grid = 112 // 2 ** config.model.feature_stage
    if config.data.grid != grid:
        raise ValueError(f"data.grid={config.data.grid} must match the feature map of model.feature_stage="
                         f"{config.model.feature_stage} ({grid}x{grid})")
    if config.optim.name not in optim.OPTIMIZERS:
        raise ValueError(f"optim.name={config.optim.name!r} is unknown; expected one of {optim.OPTIMIZERS}")
    if config.optim.schedule not in optim.SCHEDULES:
        raise ValueError(f"optim.schedule={config.optim.schedule!r} is unknown; expected one of "
                         f"{optim.SCHEDULES}")
    if config.train.nonfinite not in NONFINITE:
        raise ValueError(f"train.nonfinite={config.train.nonfinite!r}; expected one of {NONFINITE}")
    for field in ("epochs", "log_every", "checkpoint_every", "keep"):
        if config.train[field] <= 0:
            raise ValueError(f"train.{field}={config.train[field]} must be positive")
    if config.data.sampler not in pipeline.SAMPLERS:
        raise ValueError(f"data.sampler={config.data.sampler!r} is unknown; expected one of "
                         f"{pipeline.SAMPLERS}")
    if config.data.source not in pipeline.SOURCES:
        raise ValueError(f"data.source={config.data.source!r} is unknown; expected one of {pipeline.SOURCES}")
    if config.data.source != "tfds" and not os.path.isdir(config.data.path):
        raise FileNotFoundError(f"data.path={config.data.path!r}: training data folder does not exist")
    if config.init_from and not os.path.isdir(config.init_from):
        raise FileNotFoundError(f"init_from={config.init_from!r}: checkpoint directory does not exist")


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


def _init_fn(model: OAML, tx: optax.GradientTransformation, grid: int):
    """rng -> fresh TrainState (traced once under eval_shape, then jitted with output shardings)."""
    def init(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        images = jnp.zeros((2,) + IMAGE_SHAPE, jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, images,
                               jnp.zeros((2,), jnp.int32), jnp.ones((2, grid, grid), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=state_rng)
    return init


def preprocess(images: jax.Array, bgr: bool) -> jax.Array:
    """uint8 RGB pixels -> the model's float32 input, on the device.

    The device twin of `data_pipelines.augment.normalize`: channels reversed when `bgr` (AdaFace-compatible
    models take BGR), then `(x / 255 - 0.5) / 0.5`. The train pipeline ships uint8, a quarter of the bytes
    of float32, and XLA fuses this into the first convolution's input.

    Raises:
        TypeError: `images` is not uint8.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"train batch 'image' must be uint8 RGB pixels [B, 112, 112, 3], got {images.dtype}")
    x = images.astype(jnp.float32)
    if bgr:
        x = x[..., ::-1]
    return (x - 127.5) / 127.5


def make_train_step(model: OAML, tx: optax.GradientTransformation, schedule: optax.Schedule, bgr: bool):
    """The pure train step `(state, batch) -> (state, metrics)`.

    `batch` holds global arrays "image" uint8 RGB [B, 112, 112, 3] (normalized here by `preprocess`, in BGR
    order when `bgr`), "label" [B], "mask" [B, g, g], "corrupt" [B].
    A step whose loss or gradient norm is not finite leaves the state unchanged (except the step counter,
    so the data moves on) and reports nonfinite=1: train.nonfinite="skip" carries on from there, "stop"
    raises on the host. Both modes therefore share one compiled step.
    """
    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        images = preprocess(batch["image"], bgr)

        def loss_fn(params):
            (loss, metrics), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, batch["label"],
                batch["mask"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return loss, (metrics, updates["batch_stats"])

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=batch_stats, opt_state=opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        metrics = dict(metrics, lr=schedule(state.step), grad_norm=grad_norm,
                       nonfinite=(~finite).astype(jnp.int32), corrupt=jnp.sum(batch["corrupt"]))
        return new_state, metrics
    return train_step


def _abstract_batch(global_batch: int, grid: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = sharding_lib.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct((global_batch,) + IMAGE_SHAPE, jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((global_batch, grid, grid), jnp.float32, sharding=sharding),
        "corrupt": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
    }


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _load_backbone(state: TrainState, init_from: str, state_sh: TrainState) -> TrainState:
    """Replaces the backbone variables with those of a converted AdaFace checkpoint (exact match only)."""
    variables, _ = checkpoint_lib.restore_variables(init_from)
    new = {}
    for collection in ("params", "batch_stats"):
        current = getattr(state, collection)["backbone"]
        loaded = variables.get(collection, {}).get("backbone")
        if loaded is None:
            raise ValueError(f"init_from={init_from!r}: no {collection}/backbone in the checkpoint")
        want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(current)}
        have = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
        problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
        problems += [f"unused {k}" for k in sorted(set(have) - set(want))]
        problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
                     if tuple(have[k]) != tuple(want[k])]
        if problems:
            raise ValueError(f"init_from={init_from!r}: {collection}/backbone does not match the model: "
                             + "; ".join(problems))
        tree = dict(getattr(state, collection))
        tree["backbone"] = jax.device_put(loaded, getattr(state_sh, collection)["backbone"])
        new[collection] = tree
    logging.info("initialized the backbone from %s", init_from)
    return state.replace(**new)


def _class_graph(state: TrainState, num_classes: int, k: int, chunk: int, mesh) -> np.ndarray:
    """k nearest classes of every class by the cosine of the normalized class-kernel columns."""
    kernel = jax.jit(lambda x: x, out_shardings=sharding_lib.replicated(mesh))(state.params["head"]["kernel"])
    centres = np.asarray(kernel)[:, :num_classes].T
    centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return samplers.knn_classes(centres, k, chunk)


def _load_val_sets(config: ml_collections.ConfigDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = bin_pairs.find_bin_sets(config.data.path, tuple(config.eval.bin_names))
    missing = sorted(set(config.eval.bin_names) - set(found))
    if missing:
        logging.warning("validation sets %s not found in data.path=%s; skipped", missing, config.data.path)
    return {name: bin_pairs.load_bin(path) for name, path in found.items()}


def _validate(validator: FaceModel, state: TrainState, val_sets: dict) -> dict[str, float]:
    """10-fold accuracy of flip-fused AdaFace embeddings on each validation set, and their mean."""
    validator.set_variables(state.variables())
    results = {}
    for name, (images, issame) in val_sets.items():
        scores = verification.cosine_pair_scores(validator.extract(images).embeddings)
        results[f"val/{name}"] = verification.ten_fold_accuracy(scores, issame)["accuracy"]
    if results:
        results[checkpoint_lib.BEST_METRIC] = float(np.mean(list(results.values())))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from `<workdir>/checkpoints` if present) and validates.

    Args:
        config: see configs/default.py.
        workdir: checkpoints, TensorBoard summaries and profiles go here.

    Returns:
        dict with "step" (final step), "metrics" (mean metrics of the last logging interval), "validation"
        (last validation results, possibly empty), "losses" (loss of every step run by this call, by
        step), "num_classes".

    Raises:
        FloatingPointError: non-finite loss with train.nonfinite="stop" (names the step and the last
            complete checkpoint).
    """
    _initialize_distributed(config.distributed)
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    global_batch = config.train.batch_size
    source = pipeline.open_source(config.data)
    num_classes = config.model.num_classes or source.num_classes
    spe = pipeline.steps_per_epoch(len(source), global_batch)
    total_steps = config.train.epochs * spe
    stop_step = min(config.train.max_steps or total_steps, total_steps)
    p_ids = global_batch // config.data.k

    mesh = sharding_lib.make_mesh()
    ckpt = checkpoint_lib.Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep)
    latest = ckpt.latest_step()
    meta, neighbours = ckpt.restore_extras(latest) if latest is not None else ({}, None)
    model_classes = meta.get("num_model_classes") or sharding_lib.padded_num_classes(num_classes, jax.device_count())
    if model_classes % jax.device_count():
        raise ValueError(f"the checkpoint's class kernel ({model_classes} columns) cannot be split over "
                         f"{jax.device_count()} devices; resume on a device count that divides it")
    model = model_factory.build_model(config.model, model_classes)
    grid = feature_map_shape(model.backbone)[0]
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=spe, epochs=config.train.epochs,
                                        global_batch=global_batch)
    init = _init_fn(model, tx, grid)
    rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, rng)
    state_sh = sharding_lib.state_shardings(abstract_state, mesh)
    abstract_state = _with_shardings(abstract_state, state_sh)
    abstract_batch = _abstract_batch(global_batch, grid, mesh)
    batch_sh = jax.tree.map(lambda a: a.sharding, abstract_batch)
    step_fn = jax.jit(make_train_step(model, tx, schedule, config.data.bgr),
                      in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)
    lowered = step_fn.lower(abstract_state, abstract_batch)
    compiled = lowered.compile()
    flops = metrics_lib.jaxpr_flops(step_fn, abstract_state, abstract_batch)
    val_sets = _load_val_sets(config) if config.train.eval_every >= 0 else {}
    logging.info("%d classes (kernel %d), %d records, %d steps/epoch, stop at step %d, %.3g FLOPs/step",
                 num_classes, model_classes, len(source), spe, stop_step, flops)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    config_dict = config.to_dict()
    try:
        if latest is None:
            state = jax.jit(init, out_shardings=state_sh)(rng)
            if config.init_from:
                state = _load_backbone(state, config.init_from, state_sh)
            step = 0
        else:
            state = ckpt.restore_state(latest, abstract_state)
            step = latest
            logging.info("resuming from %s/%d", ckpt.directory, latest)
        # Validation shares eval.py's feature extraction; it is pointed at the state's values each time.
        validator = (FaceModel(state.variables(), config_dict, model_config=config.model,
                               batch_size=config.eval.batch_size) if val_sets else None)
        _sync_processes("oaml_train_ready")
        hooks = [periodic_actions.ReportProgress(num_train_steps=stop_step, writer=writer,
                                                 every_steps=config.train.log_every)]
        if config.train.profile_steps > 0 and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps,
                                                  first_profile=step + 5, logdir=workdir))
        result = {"step": step, "metrics": {}, "validation": {}, "losses": {}, "num_classes": num_classes}
        interval, interval_start = [], time.perf_counter()
        corrupt_total = meta.get("corrupt", 0)
        while step < stop_step:
            epoch, offset = divmod(step, spe)
            if config.data.sampler == "graph" and (offset == 0 or neighbours is None):
                neighbours = _class_graph(state, num_classes, p_ids - 1, config.data.graph_chunk, mesh)
            elif config.data.sampler != "graph":
                neighbours = None
            data_iter = iter(pipeline.train_epoch_dataset(
                source, config.data, epoch, global_batch=global_batch, process_index=jax.process_index(),
                process_count=jax.process_count(), neighbours=neighbours))
            if latest is not None and offset:
                ckpt.restore_data_iter(latest, data_iter)
            latest = None
            for _ in range(offset, min(spe, offset + stop_step - step)):
                local = next(data_iter)
                if step == config.train.inject_nan_step:
                    local = dict(local, mask=np.full_like(local["mask"], np.nan))
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, device_metrics = compiled(state, sharding_lib.global_batch(local, mesh))
                host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
                step += 1
                if host["nonfinite"] and config.train.nonfinite == "stop":
                    ckpt.wait_until_finished()
                    last = ckpt.latest_step()
                    where = f"{ckpt.directory}/{last}" if last is not None else "none (no checkpoint saved yet)"
                    raise FloatingPointError(
                        f"non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at step "
                        f"{step - 1} (epoch {epoch}); last good checkpoint: {where}")
                corrupt_total += int(host["corrupt"])
                result["losses"][step - 1] = host["loss"]
                interval.append(host)
                for hook in hooks:
                    hook(step)
                if step % config.train.log_every == 0 or step == stop_step:
                    seconds = time.perf_counter() - interval_start
                    means = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
                    means["images_per_sec"] = len(interval) * global_batch / seconds
                    means["mfu"] = metrics_lib.mfu(flops * len(interval), seconds, jax.device_count())
                    means["corrupt_total"] = corrupt_total
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    result["metrics"] = means
                    interval, interval_start = [], time.perf_counter()
                step_meta = {"epoch": step // spe, "corrupt": corrupt_total, "num_model_classes": model_classes}
                eval_every = config.train.eval_every
                evaluate = val_sets and ((eval_every > 0 and step % eval_every == 0) or step == stop_step)
                if evaluate:
                    _sync_processes(f"oaml_validate_{step}")
                    validation = _validate(validator, state, val_sets)
                    writer.write_scalars(step, validation)
                    logging.info("step %d validation: %s", step, validation)
                    result["validation"] = validation
                    step_meta[checkpoint_lib.BEST_METRIC] = validation[checkpoint_lib.BEST_METRIC]
                ckpt.save(step, state, data_iter=data_iter if step % spe else None, meta=step_meta,
                          config=config_dict, neighbours=neighbours, force=bool(evaluate) or step == stop_step)
        writer.flush()
    finally:
        # Also on errors: an in-flight async save completes before the exception propagates.
        ckpt.wait_until_finished()
        ckpt.close()
    result["step"] = step
    return result
