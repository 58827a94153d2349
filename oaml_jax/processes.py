"""The processes of a run: `jax.distributed` start-up and named barriers between them.

Shared by the train loop (oaml_jax/train.py) and train-time validation (oaml_jax/train_validation.py).
"""

import jax
import ml_collections
from absl import logging
from orbax.checkpoint import multihost


def initialize_distributed(dist_cfg: ml_collections.ConfigDict) -> None:
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


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches `name` (the coordination service's barrier, not a collective).

    Hosts compile and restore at different speeds; without this, the first collective of the train step
    waits on the slowest host and can time out (gloo's CPU collectives give up after 30 s).
    """
    if jax.process_count() > 1:
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
