"""Export a face model for serving: TensorFlow SavedModel, ONNX and StableHLO (`jax.export`).

    python -m oaml_jax.export --workdir=W [--step=N] --format=savedmodel|onnx|stablehlo --out=D [--noflip]

Every artefact takes raw uint8 RGB aligned faces `[N, 112, 112, 3]` (any N: the batch dimension is
symbolic) and returns
  embedding  float32 `[N, E]` L2-normalized,
  norm       float32 `[N]`,
  occlusion  float32 `[N, h, w]` predicted visibility (1 = visible); only models with an occlusion head
             have it: a converted AdaFace backbone is exported with the first two outputs only.
The model's input contract (channel order, scaling) is inside the graph, so a server never has to know
it. What is exported is `FaceModel.forward` (the forward `FaceModel.extract` runs) with the checkpoint's
variables (`export_checkpoint`), by default with AdaFace's flip test built in (`embedding = normalize(e n +
e_flip n_flip)`, `norm = ||e n + e_flip n_flip|| / 2`): exactly the embeddings `FaceModel.embed` returns and
eval.py calibrated its thresholds on, so the thresholds of `<workdir>/eval/calibration.json` hold for the
cosine of two exported embeddings and are copied into `export.<format>.json`. `--noflip` exports the
images alone at half the compute; its embeddings are not the calibrated ones, and it carries no
thresholds. `export` takes any such forward:

    def forward(variables, images):                       # pure JAX, images uint8 [N, 112, 112, 3] RGB
        ...
        return dict(embedding=..., norm=..., occlusion=...)
    export(forward, variables, fmt="onnx", out_dir="/exports/ir50")
    run = load(fmt="onnx", out_dir="/exports/ir50")      # numpy in, dict of numpy out, via onnxruntime

Formats, what each writes in `out_dir`, and the runtime it is loaded with:
- "savedmodel" -> `saved_model/`: `jax2tf` (native serialization: the graph is one XlaCallModule op holding
  StableHLO, the weights are tf.Variables), served by TensorFlow / TF Serving, signature
  "serving_default" with input "images". Needs `tensorflow` at export and serving time.
- "onnx" -> `model.onnx`: `jax2onnx` from the same jaxpr, weights as initializers, checked with
  `onnx.checker`; input "images", outputs named as above. Needs jax2onnx, onnx (and onnxruntime to run).
- "stablehlo" -> `model.jax_export`: `jax.export` serialized to one file (weights embedded as constants);
  load with `jax.export.deserialize(path.read_bytes())` and `.call(images)` (a dict of outputs) with any
  JAX of the same or a newer release, on one of the platforms it was lowered for.
`export_checkpoint` also writes `export.<format>.json` beside the artefact (so the three formats can share
one folder): format, artefact, checkpoint, step, flip, outputs, and "calibration": the AdaFace thresholds
of the workdir's calibration for the same step, by FAR, for the cosine of two `embedding` outputs ("same"
above the threshold); null for a `--noflip` export or without a calibration.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging as std_logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from oaml_jax import logs
from oaml_jax.models.face_input import FACE_SIZE, check_faces

FORMATS = ("savedmodel", "onnx", "stablehlo")
# File or directory each format writes inside `out_dir`.
ARTEFACTS = {"savedmodel": "saved_model", "onnx": "model.onnx", "stablehlo": "model.jax_export"}
# The metadata file `export_checkpoint` writes beside each format's artefact.
METADATA_FILES = {fmt: f"export.{fmt}.json" for fmt in FORMATS}
INPUT_NAME = "images"
# Outputs in their order (ONNX output order); "occlusion" only for models with an occlusion head.
OUTPUT_NAMES = ("embedding", "norm", "occlusion")
REQUIRED_OUTPUTS = ("embedding", "norm")
_OUTPUT_RANKS = {"embedding": 2, "norm": 1, "occlusion": 3}
# Platforms the SavedModel and StableHLO artefacts are lowered for (one module serves each of them).
DEFAULT_PLATFORMS = ("cpu", "cuda")
# ONNX opset: the lowest jax2onnx 0.13 writes correctly here (at 17 it gives ReduceSumSquare the axes input
# that came with opset 18); onnxruntime runs it from 1.14 on.
DEFAULT_ONNX_OPSET = 18
_BATCH = "N"
# Warnings jax2onnx 0.13 logs on every conversion: tracebacks of its dm_pix plugins, which fail to import
# against this JAX (unused here), and onnx_ir notes on the intermediate shapes that `_export_onnx` drops.
_ONNX_CHATTER = ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")

Forward = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


def check_forward(forward: Forward, variables: Any) -> tuple[str, ...]:
    """Traces `forward` on 2 abstract images and checks its outputs against the export contract.

    Returns:
        The names of its outputs, in `OUTPUT_NAMES` order.

    Raises:
        ValueError: an output is missing or unknown, not floating point, or of the wrong rank or batch size.
    """
    images = jax.ShapeDtypeStruct((2, FACE_SIZE, FACE_SIZE, 3), jnp.uint8)
    out = jax.eval_shape(forward, variables, images)
    if (not isinstance(out, Mapping) or not set(REQUIRED_OUTPUTS) <= set(out)
            or not set(out) <= set(OUTPUT_NAMES)):
        keys = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(f"forward: expected a dict with keys {REQUIRED_OUTPUTS} and optionally 'occlusion', "
                         f"got {keys}")
    for name in out:
        spec, rank = out[name], _OUTPUT_RANKS[name]
        if len(spec.shape) != rank or spec.shape[0] != 2 or not jnp.issubdtype(spec.dtype, jnp.floating):
            raise ValueError(f"forward: output {name!r} must be floating [N{', ...' * (rank - 1)}] with "
                             f"rank {rank}; for N=2 images got {spec.dtype} {tuple(spec.shape)}")
    return tuple(name for name in OUTPUT_NAMES if name in out)


def _serving(forward: Forward, variables: Any, names: Sequence[str]) -> Callable[[jax.Array], dict[str, jax.Array]]:
    def serve(images: jax.Array) -> dict[str, jax.Array]:
        out = forward(variables, images)
        return {name: out[name].astype(jnp.float32) for name in names}

    return serve


def _image_spec() -> jax.ShapeDtypeStruct:
    (batch,) = jax.export.symbolic_shape(_BATCH)
    return jax.ShapeDtypeStruct((batch, FACE_SIZE, FACE_SIZE, 3), jnp.uint8)


def _export_stablehlo(forward: Forward, variables: Any, names: Sequence[str], path: epath.Path, *,
                      platforms: Sequence[str]) -> None:
    """`forward` with its variables embedded as constants, as a serialized `jax.export.Exported` file.

    `platforms` ("cpu", "cuda", "rocm", "tpu"): the loaded module runs on any of them.
    """
    serve = _serving(forward, variables, names)
    exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(_image_spec())
    path.write_bytes(exported.serialize())


def _export_saved_model(forward: Forward, variables: Any, names: Sequence[str], directory: epath.Path, *,
                        platforms: Sequence[str]) -> None:
    """A TensorFlow SavedModel through `jax2tf` (weights as tf.Variables, batch polymorphic).

    The signature "serving_default" takes `images` uint8 `[None, 112, 112, 3]` and returns the dict of the
    outputs `names`; `platforms`: lowering platforms of the embedded StableHLO ("cpu", "cuda", "tpu").
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

    converted = jax2tf.convert(
        lambda params, images: _serving(forward, params, names)(images),
        polymorphic_shapes=[None, f"({_BATCH}, {FACE_SIZE}, {FACE_SIZE}, 3)"],
        with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    # The dtypes JAX computes in (float64 numpy leaves become float32 unless jax_enable_x64 is set).
    host = jax.tree.map(lambda x: np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)),
                        variables)
    module.params = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), host)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, FACE_SIZE, FACE_SIZE, 3], tf.uint8, name=INPUT_NAME)])
    def serve(images):
        return converted(module.params, images)

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})


@contextlib.contextmanager
def _quiet(logger_names: Sequence[str]) -> Iterator[None]:
    """Only errors from these Python loggers while the block runs."""
    loggers = [std_logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_onnx(forward: Forward, variables: Any, names: Sequence[str], path: epath.Path, *, opset: int) -> None:
    """ONNX through `jax2onnx` (weights as initializers, batch dimension "N"), checked by `onnx.checker`.

    The whole model is one protobuf: under 2 GB.

    Raises:
        ImportError: jax2onnx or onnx is not installed.
    """
    try:
        import jax2onnx  # pylint: disable=g-import-not-at-top
        import onnx  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("ONNX export needs jax2onnx and onnx (pinned in requirements.txt): "
                          "pip install -r requirements.txt") from e
    serve = _serving(forward, variables, names)
    # jax2onnx 0.13 prints debugging lines while it traces flax.linen convolutions; keep them off stdout.
    with contextlib.redirect_stdout(io.StringIO()) as chatter, _quiet(_ONNX_CHATTER):
        model = jax2onnx.to_onnx(lambda images: tuple(serve(images)[name] for name in names),
                                 [jax.ShapeDtypeStruct((_BATCH, FACE_SIZE, FACE_SIZE, 3), jnp.uint8)],
                                 model_name="oaml", opset=opset, input_names=[INPUT_NAME],
                                 output_names=list(names), return_mode="proto")
    logging.debug("jax2onnx: %s", chatter.getvalue())
    # Intermediate shape annotations are optional in ONNX and jax2onnx 0.13 gets some wrong (the batch of
    # the flip test's concatenation is annotated N instead of 2N, which onnxruntime trusts and then fails
    # on); runtimes infer them from the inputs.
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def export(forward: Forward, variables: Any, *, fmt: str, out_dir: epath.PathLike,
           platforms: Sequence[str] = DEFAULT_PLATFORMS, opset: int = DEFAULT_ONNX_OPSET) -> epath.Path:
    """Exports `forward` with `variables` to one format under `out_dir`.

    Args:
        forward: `forward(variables, images uint8 [N, 112, 112, 3] RGB) -> dict(embedding [N, E] unit,
            norm [N], and optionally occlusion [N, h, w])`, a pure JAX function holding the model's input
            contract (e.g. `FaceModel.forward`).
        variables: the pytree `forward` takes first (e.g. {"params", "batch_stats"}), host-addressable
            arrays (gather sharded ones first).
        fmt: one of `FORMATS`.
        out_dir: directory (created if needed) that receives `ARTEFACTS[fmt]`, replacing an older one.
        platforms: lowering platforms of "savedmodel" and "stablehlo".
        opset: ONNX opset of "onnx".

    Returns:
        The written file or directory.

    Raises:
        ValueError: unknown `fmt`, or `forward` does not meet the contract (see `check_forward`).
        ImportError: the format's converter is not installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    names = check_forward(forward, variables)
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ARTEFACTS[fmt]
    if fmt == "savedmodel":
        _export_saved_model(forward, variables, names, target, platforms=platforms)
    elif fmt == "onnx":
        _export_onnx(forward, variables, names, target, opset=opset)
    else:
        _export_stablehlo(forward, variables, names, target, platforms=platforms)
    logging.info("exported %s (outputs %s) to %s", fmt, ", ".join(names), target)
    return target


def export_checkpoint(path: epath.PathLike, step: Optional[int] = None, *, fmt: str, out_dir: epath.PathLike,
                      flip: bool = True, **kwargs: Any) -> epath.Path:
    """Exports the embedding model of a checkpoint (training or converted) with its input contract.

    Args:
        path: workdir, checkpoint directory or one step's directory (see `checkpoint.locate`; any epath).
        step: the step; None = the latest (or the one `path` names).
        fmt: one of `FORMATS`.
        out_dir: where the artefact and `export.<fmt>.json` go (any epath).
        flip: build AdaFace's flip test into the graph (what `FaceModel.embed` computes and eval.py
            calibrates); without it the calibration's thresholds are not written (they do not hold).
        **kwargs: `platforms` / `opset`, see `export`.

    Returns:
        The written artefact.

    Raises:
        FileNotFoundError / ValueError: see `checkpoint.restore`; ValueError: unknown `fmt`.
    """
    # pylint: disable=g-import-not-at-top  (restoring needs Orbax)
    from oaml_jax.evaluation import calibration as calibration_lib
    from oaml_jax.evaluation.verdict import calibration_path
    from oaml_jax.paths import user_path
    from oaml_jax.serving import FaceModel

    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    model = FaceModel.from_checkpoint(path, step)
    forward = model.forward(flip=flip)
    out_dir = user_path(out_dir, "out")
    calibration = calibration_lib.load(calibration_path(path), model.step)
    if calibration is not None and not flip:
        logging.warning("an export without the flip test gives other embeddings than eval.py calibrated on: "
                        "the thresholds of %s are not written into %s", calibration_path(path), METADATA_FILES[fmt])
    written = export(forward, model.variables, fmt=fmt, out_dir=out_dir, **kwargs)
    (out_dir / METADATA_FILES[fmt]).write_text(json.dumps(
        {"format": fmt, "artefact": ARTEFACTS[fmt], "checkpoint": str(model.directory), "step": model.step,
         "flip": flip, "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [_BATCH, FACE_SIZE, FACE_SIZE, 3],
                                 "channels": "RGB"},
         "outputs": list(check_forward(forward, model.variables)),
         "calibration": _cosine_thresholds(calibration) if flip and calibration is not None else None}, indent=2))
    return written


def _cosine_thresholds(calibration: Any) -> dict[str, Any]:
    """The AdaFace thresholds of a `calibration.Calibration`, for `export.<format>.json`."""
    return {"score": "cosine of two embedding outputs; same person when above the threshold",
            "thresholds": {repr(far): threshold for far, threshold in calibration.thresholds["adaface"].items()},
            "step": calibration.step, "fitted_on": list(calibration.fitted_on),
            "num_pairs": calibration.num_pairs, "num_impostors": calibration.num_impostors}


def load(*, fmt: str, out_dir: epath.PathLike) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Loads an artefact of `export` with its own runtime (TensorFlow, onnxruntime or `jax.export`).

    Args:
        fmt: one of `FORMATS`.
        out_dir: the `out_dir` given to `export`.

    Returns:
        `run(images uint8 [N, 112, 112, 3] RGB) -> dict(embedding, norm[, occlusion])` of numpy arrays.

    Raises:
        ValueError: unknown `fmt`.
        FileNotFoundError: no such artefact in `out_dir`.
        ImportError: the format's runtime is not installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    path = epath.Path(out_dir) / ARTEFACTS[fmt]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {fmt} export there (write one with python -m oaml_jax.export)")
    if fmt == "savedmodel":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]

        def run_saved_model(images):
            outputs = signature(**{INPUT_NAME: tf.constant(check_faces(images))})
            return {name: value.numpy() for name, value in outputs.items()}

        return run_saved_model
    if fmt == "onnx":
        try:
            import onnxruntime  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError("running ONNX exports needs onnxruntime (pinned in requirements.txt): "
                              "pip install -r requirements.txt") from e
        session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def run_onnx(images):
            return dict(zip(names, session.run(names, {INPUT_NAME: check_faces(images)})))

        return run_onnx
    exported = jax.export.deserialize(path.read_bytes())

    def run_stablehlo(images):
        return {name: np.asarray(value) for name, value in exported.call(check_faces(images)).items()}

    return run_stablehlo


# Command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command line's flags (in `flag_values`; `cli()` uses the global ones)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "Training workdir, checkpoint directory or one step's directory.", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", **fv)
    flags.DEFINE_enum("format", None, FORMATS, "Artefact format.", **fv)
    flags.DEFINE_string("out", None, "Output directory (any epath).", **fv)
    flags.DEFINE_bool("flip", True, "Build the flip test into the graph: what FaceModel.embed returns and eval.py "
                      "calibrated its thresholds on (copied into export.<format>.json). --noflip halves the compute; "
                      "its embeddings are not the calibrated ones and carry no thresholds.", **fv)
    flags.mark_flags_as_required(["workdir", "format", "out"], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Exports `--workdir`'s checkpoint with the parsed `flag_values`.

    Raises:
        app.UsageError: positional arguments.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    f = flag_values
    written = export_checkpoint(f.workdir, f.step, fmt=f.format, out_dir=f.out, flip=f.flip)
    print(written)


def cli() -> None:
    """The `oaml-export` console script: defines the flags and runs `main`."""
    define_flags()
    logs.run(main)


if __name__ == "__main__":
    cli()
