"""The OAML train step and its compilation over a device mesh: what train.py runs and bench/ times.

    step = build_train_step(model, tx, schedule, contract, mesh, global_batch=512)
    state = step.init(jax.random.PRNGKey(0))                 # sharded where it belongs
    state, metrics = step.step(state, batch)                 # batch: global arrays, see `batch_spec`

`train_step` is a pure module-level function bound with `functools.partial` and jitted once with explicit
in/out shardings and the state donated. This module imports only jax, optax and the models, so the
benchmark on an accelerator host compiles exactly the step training compiles.
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


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: OAML, tx: optax.GradientTransformation,
               schedule: optax.Schedule, contract: InputContract) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch.

    Args:
        state: the TrainState.
        batch: "image" uint8 RGB `[B, 112, 112, 3]` (turned into the model's input by
            `contract.preprocess`), "label" int32 `[B]`, "mask" float32 `[B, g, g]`, "corrupt" int32 `[B]`.
        model, tx, schedule, contract: bound with functools.partial.

    Returns:
        (new state, metrics): the model's loss terms plus "lr", "grad_norm", "nonfinite" (1 when the loss
        or the gradient norm is not finite: the state is then left as it was, except the step counter so
        the data moves on) and "corrupt" (replaced records in the batch).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    images = contract.preprocess(batch["image"])

    def loss_fn(params):
        (loss, metrics), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, batch["label"], batch["mask"],
            train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
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


def batch_spec(global_batch: int, grid: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings (batch axis split over the mesh) of a global train batch."""
    sharding = sharding_lib.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct((global_batch,) + FACE_SHAPE, jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((global_batch, grid, grid), jnp.float32, sharding=sharding),
        "corrupt": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
    }


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
                     contract: InputContract, mesh: Mesh, *, global_batch: int) -> TrainStep:
    """Shapes first, then shardings, then one jitted step (STYLE.md 3-4)."""
    init = functools.partial(init_state, model=model, tx=tx, grid=contract.grid)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = sharding_lib.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch = batch_spec(global_batch, contract.grid, mesh)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, contract=contract),
                   in_shardings=(state_sh, jax.tree.map(lambda a: a.sharding, batch)),
                   out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)
    return TrainStep(init=jax.jit(init, out_shardings=state_sh), step=step, abstract_state=abstract,
                     abstract_batch=batch, state_shardings=state_sh)
