"""Train-time validation: every `train.eval_every` steps and at the last step, through serving's FaceModel.

    validation = Validation(config, spec, model, state, evaluators, writer, ckpt, stop_step, best=(value, step))
    extra = validation.maybe_run(step, state, logger, items)  # the checkpoint's ranking metric, {} when not due

Tracks the best result; a validation that fails saves the training state of its step before the error goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import ml_collections
from absl import logging

from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import checkpointing
from oaml_jax import metric_logger
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation.base import Evaluator
from oaml_jax.processes import sync_processes
from oaml_jax.run_spec import RunSpec
from oaml_jax.serving import FaceModel
from oaml_jax.train_state import TrainState


class Validation:
    """Train-time validation every `train.eval_every` steps and at the last step; tracks the best result."""

    def __init__(self, config: ml_collections.ConfigDict, spec: RunSpec, model: Any, state: TrainState,
                 evaluator: list[Evaluator], writer: Any, ckpt: checkpointing.Checkpointer,
                 stop_step: int, best: tuple[Optional[float], Optional[int]]):
        self.evaluator, self.writer, self.ckpt, self.stop_step, self.best = evaluator, writer, ckpt, stop_step, best
        self.every = config.train.eval_every
        self.last: dict[str, float] = {}
        # Validation shares eval.py's feature extraction; it is pointed at the state's values each time.
        self.validator = (FaceModel(model, state.variables(), spec.contract, batch_size=config.eval.batch_size)
                          if evaluator else None)
        if self.validator is not None:
            self.validator.progress = False  # the run's log says a validation ran, in one table line

    def maybe_run(self, step: int, state: TrainState, logger: metric_logger.MetricLogger,
                  items: Callable[[int], dict]) -> dict[str, float]:
        """Validates at `step` when due; returns the checkpoint's ranking metric ({} when not run)."""
        if not self.evaluator or (step != self.stop_step and (self.every <= 0 or step % self.every)):
            return {}
        logger.flush()
        with logger.paused():
            self.last = _validate_or_save(self.validator, self.evaluator, state, step, self.ckpt, items(step))
        self.writer.write_scalars(step, self.last)
        logging.info("step %d validation: %s", step, _validation_line(self.last))
        value = self.last[checkpoint_lib.BEST_METRIC]
        if self.best[0] is None or value > self.best[0]:
            self.best = (value, step)
        return {checkpoint_lib.BEST_METRIC: value}


def _validate_or_save(validator: FaceModel, evaluator: list[Evaluator], state: TrainState, step: int,
                      ckpt: checkpointing.Checkpointer, items: dict[str, Any]) -> dict[str, float]:
    """`_validate`; if it fails, the state of `step` is saved before the error goes on (no step is lost)."""
    sync_processes(f"oaml_validate_{step}")
    try:
        return _validate(validator, evaluator, state)
    except Exception as e:
        ckpt.save(step, state, force=True, **items)
        ckpt.wait_until_finished()
        raise RuntimeError(f"validation at step {step} failed ({type(e).__name__}: {e}); the training state of "
                           f"step {step} is saved in {ckpt.directory}/{step}: fix the cause and rerun the same "
                           "command to resume") from e


def _validate(validator: Optional[FaceModel], evaluator: list[Evaluator], state: TrainState) -> dict[str, float]:
    """Train-time validation (the evaluators marked `validation`, clean pairs): every metric under "val/", and
    the checkpoint ranking metric `BEST_METRIC` (`evaluators.validation_metrics`)."""
    if not evaluator:
        return {}
    validator.set_variables(state.variables())
    return evaluators_lib.validation_metrics(evaluator, validator)


def _validation_line(validation: Mapping[str, float]) -> str:
    """One short table line per validation: each pair set's clean AdaFace / QAConv accuracy and the ranking
    metric (every scalar goes to TensorBoard)."""
    cells = []
    for key in validation:
        if key.endswith("/clean/adaface_accuracy"):
            name = key[len("val/"):-len("/clean/adaface_accuracy")]
            accs = [validation.get(f"val/{name}/clean/{score}_accuracy") for score in ("adaface", "qaconv")]
            cells.append(f"{name} " + "/".join("-" if a is None else f"{100 * a:.2f}" for a in accs))
    return (f"{' | '.join(cells)} (% AdaFace/QAConv, clean); ranking metric "
            f"{100 * validation[checkpoint_lib.BEST_METRIC]:.2f}")
