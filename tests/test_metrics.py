"""Tests for oaml_jax.metrics: FLOPs counted from jaxprs against hand-computed answers, MFU arithmetic."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from oaml_jax import metrics
from oaml_jax.models.backbone import build_backbone


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _conv(x, w, strides, padding="SAME", groups=1):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def test_dense_layer_is_two_b_i_o():
    dense = nn.Dense(5)
    params = jax.eval_shape(dense.init, jax.random.key(0), _spec(1, 7))
    assert metrics.jaxpr_flops(dense.apply, params, _spec(3, 7)) == 2 * 3 * 7 * 5


def test_conv3x3_stride1_same():
    # Output [2, 8, 8, 16]; each output element sums 3*3 taps x 4 input channels.
    assert metrics.jaxpr_flops(functools.partial(_conv, strides=(1, 1)), _spec(2, 8, 8, 4),
                               _spec(3, 3, 4, 16)) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)


def test_conv3x3_stride2_same():
    # 'SAME' with stride 2 on 9x9: output ceil(9/2) = 5x5.
    fn = functools.partial(_conv, strides=(2, 2))
    assert jax.eval_shape(fn, _spec(2, 9, 9, 4), _spec(3, 3, 4, 16)).shape == (2, 5, 5, 16)
    assert metrics.jaxpr_flops(fn, _spec(2, 9, 9, 4), _spec(3, 3, 4, 16)) == 2 * (2 * 5 * 5 * 16) * (3 * 3 * 4)


def test_depthwise_conv_counts_one_input_channel_per_output():
    # feature_group_count = C = 8: kernel [3, 3, 1, 8], one input channel per output channel.
    fn = functools.partial(_conv, strides=(1, 1), groups=8)
    assert metrics.jaxpr_flops(fn, _spec(2, 6, 6, 8), _spec(3, 3, 1, 8)) == 2 * (2 * 6 * 6 * 8) * (3 * 3)


def test_scan_inside_jit_counts_every_iteration():
    def fn(x, w):
        def body(carry, _):
            return jnp.tanh(carry @ w), None
        return jax.lax.scan(body, x, None, length=5)[0]

    # jit around a jit around the scan: nested jaxprs count once each, the body 5 times.
    nested = jax.jit(lambda x, w: jax.jit(fn)(x, w))
    assert metrics.jaxpr_flops(nested, _spec(4, 6), _spec(6, 6)) == 5 * 2 * 4 * 6 * 6


def test_cond_counts_the_most_expensive_branch_and_while_its_body_once():
    def fn(x, w, flag):
        y = jax.lax.cond(flag, lambda a: a @ w @ w, lambda a: a @ w, x)
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, y))[1]

    one = 2 * 4 * 6 * 6
    assert metrics.jaxpr_flops(fn, _spec(4, 6), _spec(6, 6), jnp.bool_(True)) == 2 * one + one


def test_dense_forward_and_backward_is_three_forwards():
    dense = nn.Dense(5, use_bias=False)
    params = jax.eval_shape(dense.init, jax.random.key(0), _spec(1, 7))

    def step(params, x):
        # Gradient w.r.t. both params and input: two backward matmuls of the forward's size.
        return jax.value_and_grad(lambda p, x: jnp.sum(dense.apply(p, x) ** 2), argnums=(0, 1))(params, x)

    assert metrics.jaxpr_flops(step, params, _spec(3, 7)) == 3 * (2 * 3 * 7 * 5)


def test_strided_conv_backward_counts_taps_on_data_only():
    # The input gradient of a stride-2 conv is a conv over the 2x-dilated cotangent. By hand for one axis,
    # 8 -> 4 with 'SAME' pads (0, 1): the forward has 4 outputs x 3 taps = 12 pairs, one of them on padding,
    # so 11 (output, tap, input) triples touch data. The input gradient convolves the dilated cotangent
    # (length 7, padded (2, 2)) to 8 outputs; of its 8 x 3 taps exactly those 11 land on a cotangent element
    # (the rest hit inserted zeros or padding). The weight gradient is a plain (rhs-dilated) conv of the
    # forward's size, and jax.grad runs the forward too.
    def loss(x, w):
        return jnp.sum(_conv(x, w, strides=(2, 2)))

    x, w = _spec(2, 8, 8, 4), _spec(3, 3, 4, 4)
    forward = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 4)
    assert metrics.jaxpr_flops(functools.partial(_conv, strides=(2, 2)), x, w) == forward
    input_grad = 2 * 2 * 4 * 4 * (11 * 11)
    assert metrics.jaxpr_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 2 * forward + input_grad


def _ir_forward_macs(stage_sizes, widths, side=112):
    """MACs of an IR backbone's convolutions and embedding Dense at batch 1, layer by layer (DESIGN §2)."""
    macs = side * side * 3 * 3 * 3 * widths[0]  # stem conv3x3 3 -> 64
    cin = widths[0]
    for n, cout in zip(stage_sizes, widths):
        for unit in range(n):
            out_side = side // 2 if unit == 0 else side
            macs += side * side * 9 * cin * cout  # conv3x3 stride 1, at the unit's input resolution
            macs += out_side * out_side * 9 * cout * cout  # conv3x3 with the unit's stride
            if cin != cout:
                macs += out_side * out_side * cin * cout  # conv1x1 shortcut
            cin, side = cout, out_side
    return macs + side * side * cin * 512  # flatten 7x7x512 -> Dense(512)


def test_ir50_forward_matches_design_cost():
    # The hand count gives 6.2965 GMAC (12.593 GFLOP), DESIGN §4's "6.3 GMAC" rounded; the counter must
    # match the hand count exactly and therefore DESIGN's figure to its rounding (0.06%), so 0.1% is the
    # tolerance. Elementwise work (BN, PReLU, residual adds), not counted, is under 0.5% of this.
    backbone = build_backbone("ir_50")
    images = _spec(1, 112, 112, 3)
    variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
    flops = metrics.jaxpr_flops(functools.partial(backbone.apply, train=False), variables, images)
    assert flops == 2 * _ir_forward_macs((3, 4, 14, 3), (64, 128, 256, 512))
    assert flops == pytest.approx(2 * 6.3e9, rel=1e-3)


def test_mfu_arithmetic_and_unknown_device():
    class FakeDevice:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert metrics.peak_flops(FakeDevice()) == 989e12
    assert metrics.mfu(989e12, 2.0, num_devices=2, device=FakeDevice()) == pytest.approx(0.25)
    FakeDevice.device_kind = "mystery accelerator"
    assert metrics.mfu(1e12, 1.0, device=FakeDevice()) == 0.0
