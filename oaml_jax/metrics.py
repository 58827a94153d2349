"""Throughput and model-FLOPs-utilization estimates.

FLOPs per step are counted from the program itself, not from a backend: `jaxpr_flops` traces the function
with `jax.make_jaxpr` (nothing is compiled or run) and adds up 2 x multiply-accumulates of every matrix
multiply (`dot_general`) and convolution (`conv_general_dilated`), descending into nested jaxprs (jit,
custom_jvp/custom_vjp, remat, scan, while, cond, shard_map). XLA's own cost analysis is not used because on
GPU it leaves out library calls such as cuDNN convolutions (an IR-50 step on an H200 showed 0.31 instead of
about 38 GFLOP per image). Elementwise ops, reductions, normalizations and the optimizer update are
ignored: in a convolutional face model they are well under 1% of the arithmetic. Traced on the global
(unpartitioned) step, the count is the whole program's, so it is the same on CPU, GPU and TPU.

MFU = step FLOPs / devices / seconds / peak FLOP/s of one device, with peaks taken from the table below:
dense bfloat16 tensor-core figures for accelerators (float32 steps therefore show a low MFU there, which is
the honest comparison) and a nominal figure for CPUs, where the number is only a rough guide. Unknown
devices report MFU as 0.
"""

import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.extend import core as jax_core

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


def _conv_taps(out_size: int, kernel: int, stride: int, pad_lo: int, in_size: int, lhs_dilation: int,
               rhs_dilation: int) -> int:
    """Number of (output position, kernel tap) pairs of one spatial dimension that count as work.

    Without input (lhs) dilation this is out_size * kernel, taps on padding included (the usual convention
    for a 'SAME' convolution). An lhs-dilated convolution is a transposed one (e.g. the input gradient of a
    strided convolution): its taps on the zeros inserted between input elements and on its padding multiply
    nothing from the data, so only taps that land on an input element count, as on real kernels; the input
    gradient of a strided convolution then costs what its forward does, less the forward's padded taps.
    """
    if lhs_dilation == 1:
        return out_size * kernel
    pos = (np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dilation - pad_lo)
    on_input = (pos >= 0) & (pos <= (in_size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
    return int(on_input.sum())


def _dot_general_flops(eqn: Any) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn: Any) -> float:
    """2 x MACs: each output element sums kernel taps x input features per group (the kernel's in-feature
    dimension, already divided by feature_group_count; with batch_group_count the kernel's out-feature
    dimension covers the groups, so the same product holds)."""
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    macs = out_shape[out_spec[0]] * out_shape[out_spec[1]] * rhs_shape[rhs_spec[1]]
    for i in range(len(out_spec) - 2):
        macs *= _conv_taps(out_shape[out_spec[2 + i]], rhs_shape[rhs_spec[2 + i]], p["window_strides"][i],
                           p["padding"][i][0], lhs_shape[lhs_spec[2 + i]], p["lhs_dilation"][i],
                           p["rhs_dilation"][i])
    return 2.0 * macs


def _sub_jaxpr_flops(value: Any) -> float:
    if isinstance(value, jax_core.ClosedJaxpr):
        return _count(value.jaxpr)
    if isinstance(value, jax_core.Jaxpr):
        return _count(value)
    if isinstance(value, (tuple, list)):
        return sum(_sub_jaxpr_flops(v) for v in value)
    return 0.0


def _count(jaxpr: Any) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _sub_jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(_sub_jaxpr_flops(b) for b in eqn.params["branches"])
        elif name == "shard_map":
            # The body sees one shard's shapes and runs once per device of the manual axes.
            mesh = eqn.params["mesh"]
            copies = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
            total += copies * _sub_jaxpr_flops(eqn.params["jaxpr"])
        else:
            # jit, closed_call, custom_jvp_call, custom_vjp_call, remat, while (cond_jaxpr and body_jaxpr,
            # each counted once: the trip count is not known when tracing), ...
            total += sum(_sub_jaxpr_flops(v) for v in eqn.params.values())
    return total


def jaxpr_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs of one call `fn(*args, **kwargs)`, counted from its jaxpr (traced, never compiled or run).

    Counts 2 x multiply-accumulates of `dot_general` and `conv_general_dilated` (output elements x
    contracted size; for convolutions output elements x kernel taps x input features per group), so it
    covers matmuls, einsums, dense layers and convolutions of any stride, dilation or grouping. Scan bodies
    count once per iteration, `cond` its most expensive branch, `while` its body once. Other primitives
    are ignored. Recomputation under `jax.checkpoint` counts, since it runs. For a training step, pass the
    whole step (value_and_grad included) so the backward pass is counted.

    Args:
        fn: any JAX-traceable function, jitted or not.
        *args: its arguments: arrays or `jax.ShapeDtypeStruct`s.
        **kwargs: its keyword arguments (traced too; use functools.partial for static ones).

    Returns:
        FLOPs of one call, a float.
    """
    return _count(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int = 1,
        device: Optional[jax.Device] = None) -> float:
    """Model FLOPs utilization in [0, 1] of `num_devices` devices (0 when the peak or FLOPs are unknown)."""
    peak = peak_flops(device)
    if peak <= 0 or seconds_per_step <= 0:
        return 0.0
    return flops_per_step / num_devices / seconds_per_step / peak
