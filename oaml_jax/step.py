"""The OAML train step and its compilation over a device mesh: what train.py runs and bench/ times.

    step = build_train_step(model, tx, schedule, contract, mesh, global_batch=512)
    state = step.init(jax.random.PRNGKey(0))                 # sharded where it belongs
    state, metrics = step.step(state, batch)                 # batch: global arrays, see `batch_spec`

`train_step` is a pure module-level function bound with `functools.partial` and jitted once with explicit
in/out shardings and the state donated.

With an occlusion batch (OAML's second stream: real occluded faces with drawn masks and clean faces, keys
"occ_image" / "occ_target", see `data_pipelines.occlusion_sets`) the step adds `lam_occ * L_occ_set`, the
occlusion loss (`model.occ_loss`) of the head on that batch. The backbone runs on it in inference mode:
its BatchNorms normalize with their running statistics and are not updated (the recognition statistics
stay those of the main batch), and the feature map is detached, so L_occ_set trains the occlusion head
only and costs one forward pass of the backbone per occlusion image. The head itself runs in training
mode, and its BatchNorm's running statistics are taken from the occlusion batch (the main batch's update of
them is dropped): at evaluation the head sees inference-mode feature maps, as it does on that batch.

This module imports only jax, optax and the models, so the benchmark on an accelerator host compiles exactly
the step training compiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from oaml_jax import sharding as sharding_lib
from oaml_jax.models.face_input import FACE_SHAPE, InputContract
from oaml_jax.models.oaml import OAML
from oaml_jax.train_state import TrainState


def init_state(rng: jax.Array, *, model: OAML, tx: optax.GradientTransformation, grid: int) -> TrainState:
    """A fresh TrainState (traced under `jax.eval_shape`, then jitted with the state's shardings)."""
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    images = jnp.zeros((2,) + FACE_SHAPE, jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, images,
                           jnp.zeros((2,), jnp.int32), jnp.ones((2, grid, grid), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params), rng=state_rng)


OCCLUSION_HEAD = "occlusion"  # the occlusion head's name in OAML's variable tree


def occlusion_set_logits(module: OAML, images: jax.Array) -> jax.Array:
    """The occlusion head's logits `[N, g, g]` on the occlusion batch (`model.apply(..., method=...)`).

    The backbone runs with its running BatchNorm statistics (no update, see the module docstring) and its
    feature map is detached; the head runs in training mode.
    """
    _, _, feature_map = module.backbone(images, train=False)
    feature_map = jax.lax.stop_gradient(feature_map.astype(jnp.float32))
    return module.occlusion(feature_map, train=True, logits=True)


def occlusion_loss(logits: jax.Array, targets: jax.Array, kind: str) -> jax.Array:
    """`model.occ_loss` of logits against visible fractions: "mse" on the sigmoid, or "bce"."""
    if kind == "mse":
        return jnp.mean(jnp.square(jax.nn.sigmoid(logits) - targets))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: OAML, tx: optax.GradientTransformation,
               schedule: optax.Schedule, contract: InputContract, synthetic_head: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch.

    Args:
        state: the TrainState.
        batch: "image" uint8 RGB `[B, 112, 112, 3]` (turned into the model's input by
            `contract.preprocess`), "label" int32 `[B]`, "mask" float32 `[B, g, g]`, "corrupt" int32 `[B]`;
            optionally the occlusion batch: "occ_image" uint8 RGB `[B_occ, 112, 112, 3]` (the same
            `contract.preprocess`), "occ_target" float32 `[B_occ, g, g]`, "occ_corrupt" int32 `[B_occ]`.
        model, tx, schedule, contract: bound with functools.partial.
        synthetic_head: with an occlusion batch, whether the main batch's synthetic ground truth still
            trains the occlusion head (`data.occlusion_synthetic_head`); False runs the main batch with
            lam_occ = 0.

    Returns:
        (new state, metrics): the model's loss terms plus "lr", "grad_norm", "nonfinite" (1 when the loss
        or the gradient norm is not finite: the state is then left as it was, except the step counter so
        the data moves on) and "corrupt" (replaced records in the batch); with an occlusion batch also
        "loss_occ_set" and "occ_set_mae" (its occlusion loss and mean absolute error).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    images = contract.preprocess(batch["image"])
    occ_stream = "occ_image" in batch
    main_model = model if synthetic_head or not occ_stream else model.clone(lam_occ=0.0)

    def loss_fn(params):
        (loss, metrics), updates = main_model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, batch["label"], batch["mask"],
            train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
        if occ_stream:
            logits, occ_updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, contract.preprocess(batch["occ_image"]),
                method=occlusion_set_logits, mutable=["batch_stats"])
            loss_set = occlusion_loss(logits, batch["occ_target"], model.occ_loss)
            loss = loss + model.lam_occ * loss_set
            metrics = dict(metrics, loss=loss, loss_occ_set=loss_set,
                           occ_set_mae=jnp.mean(jnp.abs(jax.nn.sigmoid(logits) - batch["occ_target"])))
            batch_stats = dict(batch_stats, **{OCCLUSION_HEAD: occ_updates["batch_stats"][OCCLUSION_HEAD]})
        return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = state.replace(step=state.step + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    metrics = dict(metrics, lr=schedule(state.step), grad_norm=grad_norm,
                   nonfinite=(~finite).astype(jnp.int32),
                   corrupt=jnp.sum(batch["corrupt"]) + jnp.sum(batch.get("occ_corrupt", jnp.zeros((), jnp.int32))))
    return new_state, metrics


def batch_spec(global_batch: int, grid: int, mesh: Mesh, occlusion_batch: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings (batch axis split over the mesh) of a global train batch, with the
    occlusion batch's keys when `occlusion_batch` > 0."""
    sharding = sharding_lib.batch_sharding(mesh)
    spec = {
        "image": jax.ShapeDtypeStruct((global_batch,) + FACE_SHAPE, jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((global_batch, grid, grid), jnp.float32, sharding=sharding),
        "corrupt": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
    }
    if occlusion_batch:
        spec.update(
            occ_image=jax.ShapeDtypeStruct((occlusion_batch,) + FACE_SHAPE, jnp.uint8, sharding=sharding),
            occ_target=jax.ShapeDtypeStruct((occlusion_batch, grid, grid), jnp.float32, sharding=sharding),
            occ_corrupt=jax.ShapeDtypeStruct((occlusion_batch,), jnp.int32, sharding=sharding))
    return spec


def occlusion_options(config: Any) -> dict[str, Any]:
    """`build_train_step`'s occlusion keywords from a run's config (`data.occlusion_batch`, ...)."""
    return {"occlusion_batch": int(config.data.get("occlusion_batch", 0)),
            "synthetic_head": bool(config.data.get("occlusion_synthetic_head", True))}


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted init and step of one run, with the abstract arguments they were built for.

    Attributes:
        init: rng -> TrainState, laid out with `state_shardings`.
        step: (state, batch) -> (state, metrics), state donated, metrics replicated.
        abstract_state: TrainState of ShapeDtypeStructs carrying the shardings (Orbax restore targets).
        abstract_batch: `batch_spec` of the run.
        state_shardings: NamedShardings of the state.
    """

    init: Callable[[jax.Array], TrainState]
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    abstract_state: Any
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    state_shardings: Any


def build_train_step(model: OAML, tx: optax.GradientTransformation, schedule: optax.Schedule,
                     contract: InputContract, mesh: Mesh, *, global_batch: int, occlusion_batch: int = 0,
                     synthetic_head: bool = True) -> TrainStep:
    """Shapes first, then shardings, then one jitted step (STYLE.md 3-4).

    `occlusion_batch` > 0 adds the occlusion batch to the batch spec (`batch_spec`); `synthetic_head` is
    `train_step`'s.
    """
    init = functools.partial(init_state, model=model, tx=tx, grid=contract.grid)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = sharding_lib.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch = batch_spec(global_batch, contract.grid, mesh, occlusion_batch)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, contract=contract,
                                     synthetic_head=synthetic_head),
                   in_shardings=(state_sh, jax.tree.map(lambda a: a.sharding, batch)),
                   out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)
    return TrainStep(init=jax.jit(init, out_shardings=state_sh), step=step, abstract_state=abstract,
                     abstract_batch=batch, state_shardings=state_sh)
