"""Export a face model for serving: TensorFlow SavedModel, ONNX and StableHLO (`jax.export`).

Every artefact takes raw uint8 RGB aligned faces `[N, 112, 112, 3]` (any N) and returns
  embedding  float32 `[N, E]` L2-normalized,
  norm       float32 `[N]`,
  occlusion  float32 `[N, h, w]` predicted visibility (1 = visible).
The model's input contract (channel order, scaling) lives inside `forward`, so it is part of the exported
graph and a server never has to know it:

    def forward(variables, images):                       # pure JAX, images uint8 [N, 112, 112, 3] RGB
        out = model.apply(variables, preprocess(images), method=model.embed)
        return dict(embedding=..., norm=..., occlusion=...)

    export(forward, variables, fmt="onnx", out_dir="/exports/ir50", flip=True)
    run = load(fmt="onnx", out_dir="/exports/ir50")      # numpy in, dict of numpy out, via onnxruntime

Formats and the runtime each is loaded with:
- "saved_model": `jax2tf` (native serialization: the graph is one XlaCallModule op holding StableHLO, the
  weights are tf.Variables), served by TensorFlow / TF Serving, signature "serving_default" with input
  "images". Needs `tensorflow` at export and serving time.
- "onnx": `jax2onnx` from the same jaxpr, weights as initializers, checked with `onnx.checker`; input
  "images", outputs "embedding", "norm", "occlusion". Needs jax2onnx, onnx (and onnxruntime to run).
- "stablehlo": `jax.export` serialized to one file (weights embedded as constants); load with
  `jax.export.deserialize(path.read_bytes())` and `.call(images)` with any JAX of the same or a newer
  release, on one of the platforms it was lowered for.

The batch dimension is symbolic in all three. `flip=True` builds AdaFace's flip test into the graph:
`embedding = normalize(e n + e_flip n_flip)`, `norm = ||e n + e_flip n_flip|| / 2` (as `FaceModel`
reports it), occlusion of the unflipped images.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

FORMATS = ("saved_model", "onnx", "stablehlo")
# File or directory each format writes inside `out_dir`.
ARTEFACTS = {"saved_model": "saved_model", "onnx": "model.onnx", "stablehlo": "model.jax_export"}
INPUT_NAME = "images"
OUTPUT_NAMES = ("embedding", "norm", "occlusion")
IMAGE_SIZE = 112
# Platforms the SavedModel and StableHLO artefacts are lowered for (one module serves each of them).
DEFAULT_PLATFORMS = ("cpu", "cuda")
# ONNX opset: the lowest jax2onnx 0.13 writes correctly here (at 17 it gives ReduceSumSquare the axes input
# that came with opset 18); onnxruntime runs it from 1.14 on.
DEFAULT_ONNX_OPSET = 18
_BATCH = "N"

Forward = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


def flip_fused(forward: Forward) -> Forward:
    """`forward` with AdaFace's flip test inside: one pass over the images and their mirror images.

    Args:
        forward: `forward(variables, images uint8 [N, 112, 112, 3]) -> dict(embedding [N, E] unit,
            norm [N], occlusion [N, h, w])`.

    Returns:
        A forward with the same signature returning `embedding = normalize(e n + e_flip n_flip)`,
        `norm = ||e n + e_flip n_flip|| / 2` and the occlusion maps of the unflipped images.
    """

    def fused(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        count = images.shape[0]
        out = forward(variables, jnp.concatenate([images, images[:, :, ::-1]], axis=0))
        # Views [2, N, ...] rather than slices at N: jax2onnx mis-sizes a slice that starts at a symbolic N.
        views = {name: value.reshape(2, count, *value.shape[1:]) for name, value in out.items()}
        embedding = views["embedding"].astype(jnp.float32)
        feature = jnp.sum(embedding * views["norm"].astype(jnp.float32)[..., None], axis=0)
        length = jnp.linalg.norm(feature, axis=-1)
        return dict(embedding=feature / jnp.maximum(length, jnp.finfo(jnp.float32).tiny)[:, None],
                    norm=length / 2.0, occlusion=views["occlusion"][0])

    return fused


def check_forward(forward: Forward, variables: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Traces `forward` on 2 abstract images and checks its outputs against the export contract.

    Returns:
        The output shapes and dtypes for a batch of 2.

    Raises:
        ValueError: an output is missing, extra, not floating point, or of the wrong rank or batch size.
    """
    images = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
    out = jax.eval_shape(forward, variables, images)
    if not isinstance(out, Mapping) or set(out) != set(OUTPUT_NAMES):
        keys = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(f"forward: expected a dict with keys {OUTPUT_NAMES}, got {keys}")
    for name, rank in zip(OUTPUT_NAMES, (2, 1, 3)):
        spec = out[name]
        if len(spec.shape) != rank or spec.shape[0] != 2 or not jnp.issubdtype(spec.dtype, jnp.floating):
            raise ValueError(f"forward: output {name!r} must be floating [N{', ...' * (rank - 1)}] with "
                             f"rank {rank}; for N=2 images got {spec.dtype} {tuple(spec.shape)}")
    return dict(out)


def _as_float32_tuple(forward: Forward, variables: Any) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    def serve(images: jax.Array) -> tuple[jax.Array, ...]:
        out = forward(variables, images)
        return tuple(out[name].astype(jnp.float32) for name in OUTPUT_NAMES)

    return serve


def _image_spec() -> jax.ShapeDtypeStruct:
    (batch,) = jax.export.symbolic_shape(_BATCH)
    return jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)


def export_stablehlo(forward: Forward, variables: Any, path: epath.PathLike, *,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> epath.Path:
    """Serializes `forward` with its variables embedded as a `jax.export.Exported` file.

    Args:
        forward: see the module docstring.
        variables: the pytree `forward` takes first (becomes constants of the module).
        path: file to write.
        platforms: lowering platforms ("cpu", "cuda", "rocm", "tpu"); the loaded module runs on any of them.

    Returns:
        `path`.
    """
    path = epath.Path(path)
    serve = _as_float32_tuple(forward, variables)
    exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(_image_spec())
    path.write_bytes(exported.serialize())
    return path


def export_saved_model(forward: Forward, variables: Any, directory: epath.PathLike, *,
                       platforms: Sequence[str] = DEFAULT_PLATFORMS) -> epath.Path:
    """Writes a TensorFlow SavedModel through `jax2tf` (weights as tf.Variables, batch polymorphic).

    The serving signature "serving_default" takes `images` uint8 `[None, 112, 112, 3]` and returns the
    dict of `OUTPUT_NAMES`.

    Args:
        forward: see the module docstring.
        variables: the pytree `forward` takes first.
        directory: SavedModel directory to write.
        platforms: lowering platforms of the embedded StableHLO ("cpu", "cuda", "tpu").

    Returns:
        `directory`.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

    directory = epath.Path(directory)
    converted = jax2tf.convert(
        lambda params, images: dict(zip(OUTPUT_NAMES, _as_float32_tuple(forward, params)(images))),
        polymorphic_shapes=[None, f"({_BATCH}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)"],
        with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    # The dtypes JAX computes in (float64 numpy leaves become float32 unless jax_enable_x64 is set).
    host = jax.tree.map(lambda x: np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)),
                        variables)
    module.params = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), host)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name=INPUT_NAME)])
    def serve(images):
        return converted(module.params, images)

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})
    return directory


def export_onnx(forward: Forward, variables: Any, path: epath.PathLike, *,
                opset: int = DEFAULT_ONNX_OPSET) -> epath.Path:
    """Converts `forward` to ONNX with `jax2onnx` (weights as initializers, batch dimension "N").

    Args:
        forward: see the module docstring.
        variables: the pytree `forward` takes first.
        path: `.onnx` file to write (under 2 GB: the whole model is one protobuf).
        opset: ONNX opset version.

    Returns:
        `path`.

    Raises:
        ImportError: jax2onnx or onnx is not installed.
    """
    try:
        import jax2onnx  # pylint: disable=g-import-not-at-top
        import onnx  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("ONNX export needs jax2onnx and onnx (pinned in requirements.txt): "
                          "pip install -r requirements.txt") from e
    path = epath.Path(path)
    # jax2onnx 0.13 prints debugging lines while it traces flax.linen convolutions; keep them off stdout.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        model = jax2onnx.to_onnx(_as_float32_tuple(forward, variables),
                                 [jax.ShapeDtypeStruct((_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)],
                                 model_name="oaml", opset=opset, input_names=[INPUT_NAME],
                                 output_names=list(OUTPUT_NAMES), return_mode="proto")
    logging.debug("jax2onnx: %s", chatter.getvalue())
    # Intermediate shape annotations are optional in ONNX and jax2onnx 0.13 gets some wrong (the batch of
    # the flip test's concatenation is annotated N instead of 2N, which onnxruntime trusts and then fails
    # on); runtimes infer them from the inputs.
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def export(forward: Forward, variables: Any, *, fmt: str, out_dir: epath.PathLike, flip: bool = False,
           platforms: Sequence[str] = DEFAULT_PLATFORMS, opset: int = DEFAULT_ONNX_OPSET) -> epath.Path:
    """Exports `forward` with `variables` to one format under `out_dir`.

    Args:
        forward: `forward(variables, images uint8 [N, 112, 112, 3] RGB) -> dict(embedding [N, E] unit,
            norm [N], occlusion [N, h, w])`, a pure JAX function holding the model's input contract.
        variables: the pytree `forward` takes first (e.g. {"params", "batch_stats"}), host-addressable
            arrays (gather sharded ones first).
        fmt: one of `FORMATS`.
        out_dir: directory (created if needed) that receives `ARTEFACTS[fmt]`, replacing an older one.
        flip: build the flip test into the graph (see `flip_fused`).
        platforms: lowering platforms of "saved_model" and "stablehlo".
        opset: ONNX opset of "onnx".

    Returns:
        The written file or directory.

    Raises:
        ValueError: unknown `fmt`, or `forward` does not meet the contract (see `check_forward`).
        ImportError: the format's converter is not installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    if flip:
        forward = flip_fused(forward)
    check_forward(forward, variables)
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ARTEFACTS[fmt]
    if fmt == "saved_model":
        written = export_saved_model(forward, variables, target, platforms=platforms)
    elif fmt == "onnx":
        written = export_onnx(forward, variables, target, opset=opset)
    else:
        written = export_stablehlo(forward, variables, target, platforms=platforms)
    logging.info("exported %s (flip=%s) to %s", fmt, flip, written)
    return written


def check_images(images: np.ndarray) -> np.ndarray:
    """Validates a batch for the exported models: uint8 RGB `[N, 112, 112, 3]`.

    Raises:
        ValueError: wrong dtype or shape.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] RGB aligned faces, got "
                         f"{images.dtype} {images.shape}")
    return images


def load(*, fmt: str, out_dir: epath.PathLike) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Loads an artefact of `export` with its own runtime (TensorFlow, onnxruntime or `jax.export`).

    Args:
        fmt: one of `FORMATS`.
        out_dir: the `out_dir` given to `export`.

    Returns:
        `run(images uint8 [N, 112, 112, 3] RGB) -> dict(embedding, norm, occlusion)` of numpy arrays.

    Raises:
        ValueError: unknown `fmt`.
        FileNotFoundError: no such artefact in `out_dir`.
        ImportError: the format's runtime is not installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    path = epath.Path(out_dir) / ARTEFACTS[fmt]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {fmt} export there (write one with oaml_jax.export.export)")
    if fmt == "saved_model":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]

        def run_saved_model(images):
            outputs = signature(**{INPUT_NAME: tf.constant(check_images(images))})
            return {name: outputs[name].numpy() for name in OUTPUT_NAMES}

        return run_saved_model
    if fmt == "onnx":
        try:
            import onnxruntime  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError("running ONNX exports needs onnxruntime (pinned in requirements.txt): "
                              "pip install -r requirements.txt") from e
        session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])

        def run_onnx(images):
            outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: check_images(images)})
            return dict(zip(OUTPUT_NAMES, outputs))

        return run_onnx
    exported = jax.export.deserialize(path.read_bytes())

    def run_stablehlo(images):
        return {name: np.asarray(v) for name, v in zip(OUTPUT_NAMES, exported.call(check_images(images)))}

    return run_stablehlo
