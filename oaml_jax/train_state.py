"""The training state: one pytree that the train step donates and Orbax saves as is."""

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
        step: int32 scalar, optimizer steps taken.
        params: model parameters (`OAML` variable collection "params").
        batch_stats: BatchNorm running statistics and the AdaFace norm EMA ("batch_stats").
        opt_state: optax state.
        rng: base PRNG key of the run; each step uses `fold_in(rng, step)`.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """The model variables {"params", "batch_stats"} for `model.apply`."""
        return {"params": self.params, "batch_stats": self.batch_stats}
