"""Device mesh and partition rules.

One mesh axis, "data", over every device of every process. The batch is split over it; the margin head's
class kernel `[E, C]` is split over it along the class axis (model parallel, like Partial FC, so the number
of identities scales with the devices); every other leaf is replicated.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Path suffix of the class kernel; optimizer states holding a copy of the params tree (momentum, Adam
# moments) end with the same keys, so they follow the kernel's sharding.
CLASS_KERNEL_PATH = ("head", "kernel")


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes).

    The axis type is Auto: QAConv's all-pairs einsum over two batch-sharded operands needs the compiler to
    choose the collectives (Explicit axes raise a ShardingTypeError there).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def padded_num_classes(num_classes: int, num_devices: int) -> int:
    """Classes rounded up to a multiple of the device count so the class kernel splits evenly.

    The extra columns are never a label: they only add negatives to the softmax denominator, which
    training pushes away from every embedding (the padding is at most num_devices - 1 columns).
    """
    return -(-num_classes // num_devices) * num_devices


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def partition_spec(path, leaf) -> P:
    """Partition rule: the class kernel (and its optimizer slots) by class, the rest replicated."""
    keys = _path_keys(path)
    if keys[-len(CLASS_KERNEL_PATH):] == CLASS_KERNEL_PATH and np.ndim(leaf) == 2:
        return P(None, DATA_AXIS)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `abstract_state` (a pytree of ShapeDtypeStructs or arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, partition_spec(path, leaf)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded P("data")."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
