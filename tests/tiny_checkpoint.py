"""A tiny trained-looking checkpoint for the tests: the narrow test config, its variables with BN
statistics moved off their defaults, and the two checkpoint layouts (training, converted backbone).

tests/conftest.py builds one training checkpoint per session from these (the `workdir` fixture).
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import optax

from oaml_jax import checkpoint, checkpointing
from oaml_jax.models import factory
from oaml_jax.train_state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8
STEP = 3


def tiny_config():
    """configs/default.py:test (narrow IR backbone: stages (1,1,1,1), widths (8,16,16,32), E=32)."""
    spec = importlib.util.spec_from_file_location("default_config", os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("test")


@functools.lru_cache(maxsize=None)
def tiny_variables(seed: int = 0):
    """Initialized OAML variables with BN statistics moved off their defaults (so eval-mode BN matters)."""
    config = tiny_config()
    model = factory.build_model(config.model, NUM_CLASSES)

    @jax.jit  # one program: per-leaf random draws outside it would compile one program per shape
    def init(rng, stats_rng):
        variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((2, 112, 112, 3)),
                               jnp.zeros((2,), jnp.int32), jnp.ones((2, 7, 7)), train=False)
        leaves, treedef = jax.tree.flatten(variables["batch_stats"])
        keys = jax.random.split(stats_rng, len(leaves))
        stats = [x + 0.1 * jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys)]
        return {"params": variables["params"], "batch_stats": jax.tree.unflatten(treedef, stats)}

    return config, model, init(jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 1))


def write_training_checkpoint(workdir: str, variables=None, step: int = STEP, config=None):
    """A training checkpoint through `checkpointing.Checkpointer` (the layout train.py writes)."""
    if variables is None:
        config, _, variables = tiny_variables()
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState(step=jnp.int32(step), params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(0))
    ckpt = checkpointing.Checkpointer(workdir, every=1, keep=2, async_save=False)
    ckpt.save(step, state, data_iter=None, meta={"epoch": 0, "num_model_classes": NUM_CLASSES},
              config=(config or tiny_config()).to_dict(), force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    return workdir


def write_converted_checkpoint(out_dir: str):
    """The backbone of `tiny_variables()` written the way `oaml_jax.convert` writes AdaFace weights."""
    config, _, variables = tiny_variables()
    backbone = {k: v["backbone"] for k, v in variables.items()}
    return checkpoint.write_converted(backbone, config.model, out_dir, "test")
