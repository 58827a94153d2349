"""Throughput and model-FLOPs-utilization estimates.

FLOPs per step come from XLA's cost analysis of the lowered (not yet compiled) train step,
`jit(f).lower(...).cost_analysis()`: the whole global program (forward, backward and optimizer, including
QAConv's all-pairs matching) before partitioning; where that analysis is empty, the compiled program's
is used. Caveat: on GPU (seen with jax 0.11.2 on an H200) the lowered analysis is empty and the compiled
one leaves out library calls (cuDNN convolutions), so MFU is underestimated there; on CPU both count.
MFU = step FLOPs / devices / seconds / peak FLOP/s of one device, with peaks taken from
the table below: dense bfloat16 tensor-core figures for accelerators (float32 steps therefore show a low
MFU there, which is the honest comparison) and a nominal figure for CPUs, where the number is only a
rough guide. Unknown devices report MFU as 0.
"""

from typing import Any, Optional

import jax
import numpy as np

# device_kind substring (lower case) -> peak dense FLOP/s of one device.
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("v100", 125e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
    ("cpu", 50e9),
)


def peak_flops(device: Optional[jax.Device] = None) -> float:
    """Peak FLOP/s of one device of this kind (0 when the kind is not in the table)."""
    device = device or jax.devices()[0]
    kind = f"{device.platform} {device.device_kind}".lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return 0.0


def _flops(analysis: Any) -> float:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def step_flops(lowered: Any, compiled: Any) -> float:
    """FLOPs of one call of `jax.jit(f).lower(...)` (global), else of its compiled form; 0 when unknown."""
    return _flops(lowered.cost_analysis()) or _flops(compiled.cost_analysis())


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int = 1,
        device: Optional[jax.Device] = None) -> float:
    """Model FLOPs utilization in [0, 1] of `num_devices` devices (0 when the peak or FLOPs are unknown)."""
    peak = peak_flops(device)
    if peak <= 0 or seconds_per_step <= 0:
        return 0.0
    return flops_per_step / num_devices / seconds_per_step / peak


def mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each scalar metric over a list of per-step metric dicts (device arrays fetched once)."""
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
