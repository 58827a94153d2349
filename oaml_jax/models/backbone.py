"""IR / IR-SE backbones (the insightface / AdaFace "improved ResNet" family) in Flax linen, NHWC.

Input: float32 `[N, 112, 112, 3]` faces, normalized. Output of `IResNet.__call__`:
`(embeddings [N, E] L2-normalized, norms [N, 1], feature_map [N, h, w, c])`.

Layout of one unit (in -> out channels, stride s):
  residual = BN -> conv3x3(out, 1) -> BN -> PReLU -> conv3x3(out, s) -> BN [-> SE]
  shortcut = x[:, ::s, ::s] if in == out else conv1x1(out, s) -> BN
Stages have widths (64, 128, 256, 512) by default and the first unit of each has stride 2, so a 112x112
input gives maps of 56, 28, 14 and 7 pixels.

Submodule names are fixed (`stem_conv`, `body_{i}`, `output`, ...) so checkpoint paths are stable and
`oaml_jax.convert` can map AdaFace's PyTorch names onto them one to one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from oaml_jax.models.face_input import FACE_SHAPE, NUM_STAGES, grid_size

BN_EPSILON = 1e-5
# Flax's momentum is the weight of the old statistic: PyTorch's momentum 0.1 is Flax's 0.9.
BN_MOMENTUM = 0.9
SE_REDUCTION = 16

# He-normal with fan_out, as the PyTorch originals initialise their convolutions and linear layers.
_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(name: str, train: bool, dtype: Any, affine: bool = True) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    # Explicit symmetric padding: "SAME" with stride 2 on an even size pads only after, unlike PyTorch.
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class PReLU(nn.Module):
    """PReLU with one learned slope per channel (PyTorch's `PReLU(num_parameters=C)`).

    Attributes:
        init_slope: initial negative slope.
    """

    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies max(0, x) + slope * min(0, x) with `slope` of shape `[C]` broadcast over `[..., C]`."""
        slope = self.param(
            "negative_slope", nn.initializers.constant(self.init_slope), (x.shape[-1],), jnp.float32
        )
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: global average pool -> 1x1 conv (C/r) -> ReLU -> 1x1 conv (C) -> sigmoid gate.

    Attributes:
        reduction: channel reduction r of the bottleneck.
        dtype: compute dtype.
    """

    reduction: int = SE_REDUCTION
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Gates `x` `[N, H, W, C]` channel-wise; returns the same shape."""
        channels = x.shape[-1]
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        squeezed = _conv(channels // self.reduction, 1, 1, "fc1", self.dtype)(squeezed)
        squeezed = nn.relu(squeezed)
        squeezed = _conv(channels, 1, 1, "fc2", self.dtype)(squeezed)
        return x * nn.sigmoid(squeezed)


class IRUnit(nn.Module):
    """One IR (or IR-SE) residual unit.

    Attributes:
        features: output channels.
        stride: spatial stride of the unit (applied by the second 3x3 conv and the shortcut).
        use_se: append squeeze-excitation to the residual branch.
        dtype: compute dtype.
    """

    features: int
    stride: int
    use_se: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps `[N, H, W, C_in]` to `[N, H / stride, W / stride, features]`."""
        if x.shape[-1] == self.features:
            shortcut = x[:, :: self.stride, :: self.stride, :]
        else:
            shortcut = _conv(self.features, 1, self.stride, "shortcut_conv", self.dtype)(x)
            shortcut = _batch_norm("shortcut_bn", train, self.dtype)(shortcut)
        y = _batch_norm("bn_in", train, self.dtype)(x)
        y = _conv(self.features, 3, 1, "conv1", self.dtype)(y)
        y = _batch_norm("bn1", train, self.dtype)(y)
        y = PReLU(name="prelu")(y)
        y = _conv(self.features, 3, self.stride, "conv2", self.dtype)(y)
        y = _batch_norm("bn2", train, self.dtype)(y)
        if self.use_se:
            y = SqueezeExcite(dtype=self.dtype, name="se")(y)
        return y + shortcut


class FlattenOutput(nn.Module):
    """AdaFace's output layer: BN -> Dropout -> flatten (NHWC order) -> Dense(E) -> BN(no scale/bias).

    Attributes:
        embedding_size: E.
        dropout: dropout rate on the feature map.
        dtype: compute dtype of the BN/Dense (the last BN always runs in float32).
    """

    embedding_size: int
    dropout: float = 0.4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps `[N, h, w, c]` to float32 `[N, E]`."""
        x = _batch_norm("bn", train, self.dtype)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.embedding_size, kernel_init=_kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
            name="dense",
        )(x)
        return _batch_norm("features_bn", train, jnp.float32, affine=False)(x.astype(jnp.float32))


class GNAPOutput(nn.Module):
    """Global norm-aware pooling (insightface's GNAP): BN -> norm-weighted average pool -> BN.

    Every location is weighted by mean_norm / ||x_loc|| (L2 norm over channels), so each location
    contributes its direction with the same magnitude. The mean norm is taken per image (the originals
    take it over the whole batch, which makes an image's embedding depend on its batch-mates).
    Both BNs have no scale and no bias. The embedding size equals the channel count.

    Attributes:
        dtype: compute dtype of the first BN (pooling and the last BN run in float32).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps `[N, h, w, c]` to float32 `[N, c]`."""
        x = _batch_norm("bn_in", train, self.dtype, affine=False)(x).astype(jnp.float32)
        loc_norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        mean_norm = jnp.mean(loc_norm, axis=(1, 2), keepdims=True)
        x = x * (mean_norm / jnp.maximum(loc_norm, 1e-12))
        x = jnp.mean(x, axis=(1, 2))
        return _batch_norm("bn_out", train, jnp.float32, affine=False)(x)


class GDCOutput(nn.Module):
    """Global depthwise convolution (MobileFaceNet's GDC): depthwise 7x7 valid conv -> BN -> flatten
    -> Dense(E, no bias) -> BN(no scale/bias).

    Attributes:
        embedding_size: E.
        dtype: compute dtype (the last BN always runs in float32).
    """

    embedding_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps `[N, h, w, c]` to float32 `[N, E]`; the depthwise kernel covers the whole h x w map."""
        height, width, channels = x.shape[1:]
        x = nn.Conv(
            channels, (height, width), padding="VALID", use_bias=False, feature_group_count=channels,
            kernel_init=_kernel_init, dtype=self.dtype, param_dtype=jnp.float32, name="dw_conv",
        )(x)
        x = _batch_norm("dw_bn", train, self.dtype)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.embedding_size, use_bias=False, kernel_init=_kernel_init, dtype=self.dtype,
            param_dtype=jnp.float32, name="dense",
        )(x)
        return _batch_norm("features_bn", train, jnp.float32, affine=False)(x.astype(jnp.float32))


_OUTPUT_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "flatten": lambda m: FlattenOutput(m.embedding_size, m.dropout, m.dtype, name="output"),
    "gnap": lambda m: GNAPOutput(m.dtype, name="output"),
    "gdc": lambda m: GDCOutput(m.embedding_size, m.dtype, name="output"),
}
OUTPUT_LAYERS = tuple(_OUTPUT_BUILDERS)


class IResNet(nn.Module):
    """IR / IR-SE backbone for 112x112 faces.

    Attributes:
        stage_sizes: units per stage (4 stages).
        widths: output channels per stage.
        stem_width: channels of the stem conv; None means `widths[0]`.
        use_se: squeeze-excitation in every unit (IR-SE).
        output_layer: "flatten" (AdaFace), "gnap" or "gdc".
        embedding_size: E; with "gnap" it must equal `widths[-1]`.
        feature_stage: which stage's output is returned as the feature map (4 -> `[N, 7, 7, widths[3]]`,
            3 -> `[N, 14, 14, widths[2]]`, ...).
        dropout: dropout rate of the "flatten" output layer.
        dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); parameters and BN statistics are
            float32, embeddings and norms are computed in float32.
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: Optional[int] = None
    use_se: bool = False
    output_layer: str = "flatten"
    embedding_size: int = 512
    feature_stage: int = 4
    dropout: float = 0.4
    dtype: Any = jnp.float32

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        if len(self.stage_sizes) != NUM_STAGES or any(int(n) < 1 for n in self.stage_sizes):
            raise ValueError(
                f"IResNet.stage_sizes must be {NUM_STAGES} positive unit counts, got {tuple(self.stage_sizes)}"
            )
        if len(self.widths) != NUM_STAGES or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"IResNet.widths must be {NUM_STAGES} positive widths, got {tuple(self.widths)}")
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(
                f"IResNet.output_layer {self.output_layer!r} unknown; expected one of {OUTPUT_LAYERS}"
            )
        if self.feature_stage not in range(1, NUM_STAGES + 1):
            raise ValueError(
                f"IResNet.feature_stage must be one of {tuple(range(1, NUM_STAGES + 1))}, got {self.feature_stage}"
            )
        if self.use_se and min(self.widths) < SE_REDUCTION:
            raise ValueError(
                f"IResNet.widths {tuple(self.widths)} too narrow for squeeze-excitation: every width must be "
                f">= the SE reduction {SE_REDUCTION}"
            )
        if self.output_layer == "gnap" and self.embedding_size != self.widths[-1]:
            raise ValueError(
                f"IResNet.embedding_size {self.embedding_size} must equal widths[-1] = {self.widths[-1]} with "
                'output_layer "gnap" (it pools channels, it does not project them)'
            )

    @property
    def resolved_stem_width(self) -> int:
        return self.widths[0] if self.stem_width is None else self.stem_width

    def unit_specs(self) -> list[tuple[int, int, int]]:
        """`(in_channels, out_channels, stride)` of every unit `body_{i}`, in order."""
        specs = []
        channels = self.resolved_stem_width
        for num_units, width in zip(self.stage_sizes, self.widths):
            for u in range(num_units):
                specs.append((channels, width, 2 if u == 0 else 1))
                channels = width
        return specs

    def _output_module(self) -> nn.Module:
        return _OUTPUT_BUILDERS[self.output_layer](self)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Runs the backbone.

        Args:
            images: float `[N, 112, 112, 3]`, normalized.
            train: batch statistics + dropout (needs rngs={"dropout": key} and mutable=["batch_stats"]).

        Returns:
            embeddings float32 `[N, E]` (unit L2 norm), norms float32 `[N, 1]` (norm before normalizing),
            feature_map `[N, h, w, c]` (compute dtype) of stage `feature_stage`.
        """
        expected = FACE_SHAPE
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"IResNet input must have shape [N, 112, 112, 3], got {tuple(images.shape)}")
        x = _conv(self.resolved_stem_width, 3, 1, "stem_conv", self.dtype)(images.astype(self.dtype))
        x = _batch_norm("stem_bn", train, self.dtype)(x)
        x = PReLU(name="stem_prelu")(x)
        stage_ends = list(itertools.accumulate(self.stage_sizes))
        feature_map = None
        for i, (_, width, stride) in enumerate(self.unit_specs()):
            x = IRUnit(width, stride, self.use_se, self.dtype, name=f"body_{i}")(x, train)
            if i + 1 == stage_ends[self.feature_stage - 1]:
                feature_map = x
        out = self._output_module()(x, train).astype(jnp.float32)
        norms = jnp.linalg.norm(out, axis=-1, keepdims=True)
        embeddings = out / jnp.maximum(norms, 1e-12)
        return embeddings, norms, feature_map


_DEPTHS = {
    "18": (2, 2, 2, 2),
    "34": (3, 4, 6, 3),
    "50": (3, 4, 14, 3),
    "100": (3, 13, 30, 3),
}

_PRESETS: dict[str, Callable[..., IResNet]] = {
    "ir_18": functools.partial(IResNet, stage_sizes=_DEPTHS["18"]),
    "ir_34": functools.partial(IResNet, stage_sizes=_DEPTHS["34"]),
    "ir_50": functools.partial(IResNet, stage_sizes=_DEPTHS["50"]),
    "ir_100": functools.partial(IResNet, stage_sizes=_DEPTHS["100"]),
    "ir_se_50": functools.partial(IResNet, stage_sizes=_DEPTHS["50"], use_se=True),
    "ir_se_100": functools.partial(IResNet, stage_sizes=_DEPTHS["100"], use_se=True),
}

ARCHS = tuple(_PRESETS)

OVERRIDES = tuple(
    f.name for f in dataclasses.fields(IResNet) if f.init and f.name not in ("parent", "name")
)


def build_backbone(arch: str, **overrides: Any) -> IResNet:
    """Builds a preset backbone.

    Args:
        arch: one of `ARCHS`.
        **overrides: any of `OVERRIDES` (stage_sizes, widths, stem_width, use_se, output_layer,
            embedding_size, feature_stage, dropout, dtype).

    Returns:
        An unbound `IResNet`.

    Raises:
        ValueError: unknown arch, unknown override or invalid value.
    """
    if arch not in _PRESETS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown backbone override(s) {unknown}; expected some of {OVERRIDES}")
    return _PRESETS[arch](**overrides)


def feature_map_shape(module: IResNet) -> tuple[int, int, int]:
    """`(h, w, c)` of the feature map `module` returns (stride 2 per stage from 112)."""
    side = grid_size(module.feature_stage)
    return side, side, module.widths[module.feature_stage - 1]

