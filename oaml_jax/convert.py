"""AdaFace (PyTorch) <-> oaml_jax IR backbone weight conversion.

AdaFace's published IR models (mk-minchul/AdaFace, `net.py`) take BGR input normalized as
(x / 255 - 0.5) / 0.5; checkpoints converted here record `model.input_channel_order = "BGR"` in their
config, which `oaml_jax.checkpoint.restore` honours.

Name mapping (PyTorch `net.py` -> Flax `IResNet`; a Lightning `.ckpt` prefixes every name with "model."):
  input_layer.{0,1,2}              -> stem_conv, stem_bn, stem_prelu
  body.{i}.res_layer.{0..5}        -> body_{i}/bn_in, conv1, bn1, prelu, conv2, bn2
  body.{i}.res_layer.se_block.fc{1,2} -> body_{i}/se/fc{1,2}
  body.{i}.shortcut_layer.{0,1}    -> body_{i}/shortcut_conv, shortcut_bn (only where in != out channels)
  output_layer.{0,3,4}             -> output/bn, output/dense, output/features_bn   ("flatten")
  output_layer.bn{1,2}             -> output/bn_in, output/bn_out                    ("gnap")
  output_layer.conv_6_dw.{conv,bn}, output_layer.linear, output_layer.bn
                                   -> output/dw_conv, dw_bn, dense, features_bn      ("gdc")
Leaves: weight -> kernel (conv OIHW -> HWIO; linear [out, in] -> [in, out]) or scale (BN) or
negative_slope (PReLU); bias -> bias; running_mean / running_var -> batch_stats mean / var.
The "flatten" Dense kernel is also permuted from PyTorch's NCHW flatten order to our NHWC order.

Keys that are ignored on purpose: every `*.num_batches_tracked` (PyTorch's BN step counter, not used at
inference) and every key outside `input_layer`, `body` and `output_layer` (the margin head's `head.*`,
OAML's `qaconv.*` and `occlusion_head.*`, ...). Anything else that does not match the backbone exactly
(missing, unused or mis-shaped) fails with one ValueError that lists every problem.

CLI:
  python -m oaml_jax.convert --ckpt adaface_ir50_ms1mv2.ckpt --arch ir_50 --out /tmp/ir50_orbax
  (`--ckpt weights.npz`: the same names in a numpy archive, read without torch and without unpickling)
writes a checkpoint through `oaml_jax.checkpoint.write_converted` (step 0: the backbone's variables and
its model fields, channel order included) that eval.py, `FaceModel` and `--config.init_from` restore.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import traverse_util

from oaml_jax import checkpoint
from oaml_jax import logs
from oaml_jax.models.backbone import IResNet, build_backbone
from oaml_jax.models.face_input import FACE_SHAPE
from oaml_jax.paths import user_path

BACKBONE_PREFIXES = ("input_layer", "body", "output_layer")
CHECKPOINT_PREFIXES = ("model.", "module.")
IGNORED_SUFFIX = "num_batches_tracked"
# What AdaFace's published models are: BGR input, the 7x7 stage-4 map, float32.
ADAFACE_MODEL_FIELDS = {"feature_stage": 4, "dtype": "float32", "input_channel_order": "BGR"}

_STEM = {"stem_conv": "input_layer.0", "stem_bn": "input_layer.1", "stem_prelu": "input_layer.2"}
_UNIT = {
    ("bn_in",): "res_layer.0",
    ("conv1",): "res_layer.1",
    ("bn1",): "res_layer.2",
    ("prelu",): "res_layer.3",
    ("conv2",): "res_layer.4",
    ("bn2",): "res_layer.5",
    ("se", "fc1"): "res_layer.se_block.fc1",
    ("se", "fc2"): "res_layer.se_block.fc2",
    ("shortcut_conv",): "shortcut_layer.0",
    ("shortcut_bn",): "shortcut_layer.1",
}
_OUTPUT = {
    "flatten": {"bn": "output_layer.0", "dense": "output_layer.3", "features_bn": "output_layer.4"},
    "gnap": {"bn_in": "output_layer.bn1", "bn_out": "output_layer.bn2"},
    "gdc": {
        "dw_conv": "output_layer.conv_6_dw.conv",
        "dw_bn": "output_layer.conv_6_dw.bn",
        "dense": "output_layer.linear",
        "features_bn": "output_layer.bn",
    },
}
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "negative_slope": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor: its PyTorch name and shape, its Flax location and the layout changes between them."""

    torch_key: str
    collection: str
    flax_path: tuple[str, ...]
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return k.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def _flatten_dense(channels: int, spatial: int) -> tuple[Callable, Callable]:
    """Layout changes of the Dense after the flatten of a `[spatial, spatial, channels]` map.

    PyTorch's Linear weight is `[E, C*H*W]` with input index c*H*W + y*W + x (NCHW flatten);
    our kernel is `[H*W*C, E]` with input index (y*W + x)*C + c (NHWC flatten).
    """

    def to_flax(w: np.ndarray) -> np.ndarray:
        e = w.shape[0]
        return w.reshape(e, channels, spatial, spatial).transpose(2, 3, 1, 0).reshape(-1, e)

    def to_torch(k: np.ndarray) -> np.ndarray:
        e = k.shape[1]
        return k.reshape(spatial, spatial, channels, e).transpose(3, 2, 0, 1).reshape(e, -1)

    return to_flax, to_torch


def _torch_module(modules: tuple[str, ...], output_layer: str) -> str:
    """PyTorch module name of the Flax module path `modules` (without the leaf)."""
    head = modules[0]
    if head in _STEM and len(modules) == 1:
        return _STEM[head]
    if head.startswith("body_") and modules[1:] in _UNIT:
        return f"body.{int(head[len('body_'):])}.{_UNIT[modules[1:]]}"
    if head == "output" and len(modules) == 2 and modules[1] in _OUTPUT[output_layer]:
        return _OUTPUT[output_layer][modules[1]]
    raise ValueError(f"no AdaFace name for Flax module {'/'.join(modules)}")


def _plan(module: IResNet) -> list[_Entry]:
    """Every tensor of `module`'s variables with its AdaFace name, from `jax.eval_shape` of the init."""
    images = jax.ShapeDtypeStruct((1,) + FACE_SHAPE, jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
    channels = module.widths[-1]
    entries = []
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(shapes.get(collection, {})).items():
            shape = tuple(leaf.shape)
            torch_key = f"{_torch_module(path[:-1], module.output_layer)}.{_LEAVES[path[-1]]}"
            if path[-1] != "kernel":
                to_flax, to_torch, torch_shape = _identity, _identity, shape
            elif len(shape) == 4:
                to_flax, to_torch = _conv_to_flax, _conv_to_torch
                torch_shape = (shape[3], shape[2], shape[0], shape[1])
            elif module.output_layer == "flatten":
                spatial = int(round((shape[0] // channels) ** 0.5))
                to_flax, to_torch = _flatten_dense(channels, spatial)
                torch_shape = (shape[1], shape[0])
            else:
                to_flax, to_torch, torch_shape = np.transpose, np.transpose, (shape[1], shape[0])
            entries.append(_Entry(torch_key, collection, path, torch_shape, to_flax, to_torch))
    return entries


def _strip_prefix(key: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _describe(arch: str, overrides: Mapping[str, Any]) -> str:
    extra = ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
    return f"{arch}({extra})" if extra else arch


def adaface_to_flax(state_dict: Mapping[str, np.ndarray], arch: str, **overrides: Any) -> dict:
    """Maps an AdaFace backbone state_dict onto `build_backbone(arch, **overrides)`'s variables.

    Args:
        state_dict: PyTorch names -> arrays (numpy or anything `np.asarray` accepts), with or without a
            leading "model." (Lightning) or "module." (DataParallel). `num_batches_tracked` and keys
            outside input_layer/body/output_layer are ignored.
        arch: one of `oaml_jax.models.backbone.ARCHS`.
        **overrides: backbone overrides, as for `build_backbone`.

    Returns:
        `{"params": ..., "batch_stats": ...}` of float32 numpy arrays for the backbone.

    Raises:
        ValueError: listing every missing, unused, mis-shaped and non-finite (NaN or Inf) tensor (name, expected,
            got shape).
    """
    module = build_backbone(arch, **overrides)
    entries = _plan(module)
    tensors: dict[str, np.ndarray] = {}
    problems: list[str] = []
    ignored = 0
    for key, value in state_dict.items():
        name = _strip_prefix(key)
        if name.endswith(IGNORED_SUFFIX) or name.split(".", 1)[0] not in BACKBONE_PREFIXES:
            ignored += 1
            continue
        if name in tensors:
            problems.append(f"duplicate: {name} (given with and without a checkpoint prefix)")
            continue
        tensors[name] = value
    if ignored:
        logging.info("adaface_to_flax: ignored %d num_batches_tracked / non-backbone keys", ignored)

    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for entry in entries:
        if entry.torch_key not in tensors:
            problems.append(f"missing: {entry.torch_key} expected shape {entry.torch_shape}")
            continue
        value = np.asarray(tensors.pop(entry.torch_key), dtype=np.float32)
        if value.shape != entry.torch_shape:
            problems.append(
                f"mis-shaped: {entry.torch_key} expected shape {entry.torch_shape}, got {tuple(value.shape)}"
            )
            continue
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            problems.append(f"non-finite: {entry.torch_key} holds {bad} NaN or Inf values of {value.size}")
            continue
        flat[entry.collection][entry.flax_path] = np.ascontiguousarray(entry.to_flax(value))
    for name, value in sorted(tensors.items()):
        problems.append(f"unused: {name} shape {tuple(np.shape(value))}")
    if problems:
        raise ValueError(
            f"AdaFace state_dict does not match backbone {_describe(arch, overrides)} "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}


def flax_to_adaface(variables: Mapping[str, Any], arch: str, **overrides: Any) -> dict[str, np.ndarray]:
    """Inverse of `adaface_to_flax`: backbone variables -> AdaFace-named PyTorch-layout arrays.

    Args:
        variables: `{"params": ..., "batch_stats": ...}` of the backbone (or of a model whose backbone
            sits under the key "backbone" in both collections).
        arch: one of `ARCHS`.
        **overrides: backbone overrides, as for `build_backbone`.

    Returns:
        name -> numpy array (no "model." prefix), float32, plus an int64 zero `num_batches_tracked` for
        every BatchNorm so that `torch.nn.Module.load_state_dict(strict=True)` accepts it.

    Raises:
        ValueError: listing every missing, unused and mis-shaped leaf of `variables`.
    """
    module = build_backbone(arch, **overrides)
    flat = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        if "backbone" in tree:
            tree = tree["backbone"]
        flat.update({(collection, *p): v for p, v in traverse_util.flatten_dict(dict(tree)).items()})
    state_dict: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for entry in _plan(module):
        where = "/".join((entry.collection, *entry.flax_path))
        leaf = flat.pop((entry.collection, *entry.flax_path), None)
        if leaf is None:
            problems.append(f"missing: {where}")
            continue
        value = entry.to_torch(np.asarray(leaf, dtype=np.float32))
        if value.shape != entry.torch_shape:
            problems.append(f"mis-shaped: {where} expected shape {entry.torch_shape}, got {value.shape}")
            continue
        state_dict[entry.torch_key] = np.ascontiguousarray(value)
        if entry.torch_key.endswith(".running_mean"):
            bn = entry.torch_key[: -len("running_mean")]
            state_dict[bn + IGNORED_SUFFIX] = np.zeros((), np.int64)
    for path, leaf in sorted(flat.items()):
        problems.append(f"unused: {'/'.join(path)} shape {tuple(np.shape(leaf))}")
    if problems:
        raise ValueError(
            f"variables do not match backbone {_describe(arch, overrides)} ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )
    return state_dict


def load_state_dict(path: epath.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads AdaFace weights: a `.npz` of name -> array (numpy only, no code can run), or a PyTorch
    state_dict / Lightning `.ckpt` (`load_torch_checkpoint`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a `.npz` that holds pickled objects or no arrays; see `load_torch_checkpoint`.
    """
    path = user_path(path, "--ckpt")
    if path.suffix != ".npz":
        return load_torch_checkpoint(path, allow_pickle)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as e:
        raise ValueError(f"{path}: not a numpy .npz of plain arrays ({e})") from e
    if not arrays:
        raise ValueError(f"{path}: the .npz holds no arrays")
    return arrays


def load_torch_checkpoint(path: epath.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a PyTorch state_dict or Lightning `.ckpt` (`{"state_dict": ...}`) into numpy arrays.

    Args:
        path: the `.ckpt` / `.pt` / `.pth` file (local or any epath URI).
        allow_pickle: let torch unpickle arbitrary objects (Lightning stores hyper-parameters that the
            safe `weights_only` loader refuses). Only for files you trust: unpickling runs code.

    Returns:
        name -> numpy array, names exactly as stored.

    Raises:
        ImportError: torch is not installed.
        FileNotFoundError: `path` does not exist.
        ValueError: the file holds no state_dict, or needs `allow_pickle`.
    """
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install -r requirements-torch.txt"
        ) from e
    path = user_path(path, "--ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise
        raise ValueError(
            f"{path}: the safe loader (weights_only) refused it ({e}); if you trust the file, pass "
            "allow_pickle=True (CLI: --allow_pickle)"
        ) from e
    state_dict = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: expected a state_dict or a Lightning checkpoint, got {type(obj).__name__}")
    arrays = {k: v.detach().cpu().numpy() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not arrays:
        raise ValueError(f"{path}: the state_dict holds no tensors")
    return arrays


def _define_flags() -> None:
    flags.DEFINE_string("ckpt", None, "AdaFace weights: PyTorch .ckpt / .pt / .pth, or a .npz of name -> array.",
                        required=True)
    flags.DEFINE_string("arch", "ir_50", "Backbone arch (oaml_jax.models.backbone.ARCHS).")
    flags.DEFINE_string("out", None, "Output checkpoint directory (local or gs://...).", required=True)
    flags.DEFINE_bool("allow_pickle", False, "Unpickle arbitrary objects in --ckpt (trusted files only).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    state_dict = load_state_dict(f.ckpt, allow_pickle=f.allow_pickle)
    variables = adaface_to_flax(state_dict, f.arch)
    checkpoint.write_converted(variables, dict(ADAFACE_MODEL_FIELDS, arch=f.arch, backbone={}), f.out, f.ckpt)


def cli() -> None:
    """`python -m oaml_jax.convert` / `oaml-convert`."""
    _define_flags()
    logs.run(main)


if __name__ == "__main__":
    cli()
