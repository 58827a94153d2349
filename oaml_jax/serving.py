"""Serving: face embeddings, occlusion maps and pair scores from any checkpoint oaml_jax writes.

`FaceModel` is the one feature extractor of the project: train-time validation and eval.py run their
protocols through `FaceModel.extract`, so the embeddings a user gets are exactly those that were scored,
and the only code that calls QAConv's scoring is here (`qaconv_pair_scores`, `qaconv_matrix`). Its
serving forward (`FaceModel.forward`: input contract and flip test inside) is also what `oaml_jax.export`
exports. This module sits below evaluation and the command lines: it imports the models, the checkpoint
reader and the device helpers only.

    model = FaceModel.from_checkpoint("/tmp/run")         # latest training checkpoint (any epath)
    emb, norms = model.embed(images)                      # uint8 [N, 112, 112, 3] RGB, aligned
    scores = model.match(probe_images, gallery_images)    # {"adaface", "qaconv"} [p, g]

Images go to the devices as uint8 (a quarter of float32's bytes); the mirror image and the model's input
mapping (`InputContract.preprocess`) are computed there.

Scores (higher = more alike):
- "adaface": cosine of flip-fused embeddings (AdaFace's flip test: `normalize(e n + e_flip n_flip)`).
- "qaconv": QAConv between the channel-normalized feature maps of the unflipped images, each location
  weighted by the model's predicted visibility, mean of both matching directions, BatchNorms in eval mode.
Converted AdaFace checkpoints have no occlusion head and no QAConv: they give "adaface" only, and
"qaconv" is None. The fused score and the decision thresholds are evaluation's
(`oaml_jax.evaluation.verdict.CalibratedFaceModel`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath

from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import sharding as sharding_lib
from oaml_jax.models.face_input import InputContract, check_faces
from oaml_jax.models.oaml import OAML
from oaml_jax.models.qaconv import QAConv, qaconv_pair_scores, qaconv_scores_chunked

# Images per forward pass unless told otherwise; rounded up to a multiple of 2 x the device count so the
# batch splits over the devices and never separates the two images of a pair.
_DEFAULT_BATCH = 64
# `extract` shows progress (with ETA) when it runs more batches than this, redrawn at most this often.
PROGRESS_MIN_STEPS = 4
PROGRESS_INTERVAL_S = 5.0

Forward = Callable[[Mapping[str, Any], jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Features:
    """Per-image outputs of `FaceModel.extract` (host numpy arrays, N = number of images).

    Attributes:
        embeddings: `[N, E]` float32 flip-fused unit embeddings.
        norms: `[N]` float32 norm of the mean un-normalized feature of the two views,
            `||e n + e_flip n_flip|| / 2` (so `embeddings * norms` is that mean feature).
        occlusion: `[N, h, w]` float32 predicted visibility (1 = visible), None without occlusion head.
        feature_maps: `[N, h, w, c]` float32 channel-normalized maps of the unflipped images, when asked.
        pair_qaconv: `[N / 2]` float32 QAConv scores of the pairs (2i, 2i+1), when asked.
    """

    embeddings: np.ndarray
    norms: np.ndarray
    occlusion: Optional[np.ndarray] = None
    feature_maps: Optional[np.ndarray] = None
    pair_qaconv: Optional[np.ndarray] = None


def _host_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """This process's contiguous part of each global batch of `images`, zero-padded at the end.

    Step s covers images `[s * batch_size, (s + 1) * batch_size)`; process p gets
    `[p * b, (p + 1) * b)` of it, `b = batch_size // process_count`, so every process runs
    `ceil(N / batch_size)` steps.
    """
    b = batch_size // jax.process_count()
    num = images.shape[0]
    for step in range(math.ceil(num / batch_size)):
        start = step * batch_size + jax.process_index() * b
        chunk = images[min(start, num):min(start + b, num)]
        batch = np.zeros((b,) + images.shape[1:], np.uint8)
        batch[:chunk.shape[0]] = chunk
        yield batch


class FaceModel:
    """A model ready for feature extraction on all devices (any device count, any process count)."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], contract: InputContract, *,
                 batch_size: Optional[int] = None, step: Optional[int] = None,
                 directory: Optional[epath.Path] = None):
        """Wraps a model and its variables.

        Args:
            model: `OAML` or `factory.EmbeddingModel` (anything with `embed`; see `checkpoint.Restored`).
            variables: {"params", "batch_stats"} of `model`.
            contract: the model's input contract.
            batch_size: global images per forward pass (two passes per batch: the images and their
                mirror images); must be a multiple of 2 x the device count.
            step: the checkpoint step (reported only).
            directory: the checkpoint folder (reported only).

        Raises:
            ValueError: `batch_size` is not a positive multiple of 2 x the device count.
        """
        self.model = model
        self.contract = contract
        self.step = step
        self.directory = directory
        self.mesh = sharding_lib.make_mesh(jax.devices())
        multiple = 2 * jax.device_count()
        if batch_size is None:
            batch_size = -(-_DEFAULT_BATCH // multiple) * multiple
        if batch_size <= 0 or batch_size % multiple:
            raise ValueError(f"eval.batch_size={batch_size} must be a positive multiple of 2 x the "
                             f"{jax.device_count()} devices (pairs are scored within a batch)")
        self.batch_size = batch_size
        # `extract` shows a progress bar on long runs; eval.py reports per evaluator instead.
        self.progress = True
        self.has_qaconv = isinstance(model, OAML)
        self.qaconv = QAConv(dtype=model.dtype) if self.has_qaconv else None
        self.feature_map_shape = (contract.grid, contract.grid,
                                  model.backbone.widths[model.backbone.feature_stage - 1])
        self.set_variables(variables)
        self._steps: dict[tuple[bool, bool], Callable] = {}

    def set_variables(self, variables: Mapping[str, Any]) -> None:
        """Uses new values of the same variables (e.g. a training state's) without recompiling.

        Args:
            variables: {"params", "batch_stats"} with the structure this model was built from.
        """
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        # The class kernel is not needed to embed; leaving it out keeps it off the jitted calls.
        self.variables = {"params": {k: v for k, v in params.items() if k != "head"},
                          "batch_stats": {k: v for k, v in batch_stats.items() if k != "head"}}
        self.qaconv_variables = ({"params": params["qaconv"], "batch_stats": batch_stats.get("qaconv", {})}
                                 if self.has_qaconv else None)

    @classmethod
    def from_restored(cls, restored: checkpoint_lib.Restored, **kwargs: Any) -> FaceModel:
        """A FaceModel of a `checkpoint.restore` result; kwargs go to `__init__`."""
        return cls(restored.model, restored.variables, restored.contract, step=restored.step,
                   directory=restored.directory, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: epath.PathLike, step: Optional[int] = None, **kwargs: Any) -> FaceModel:
        """Restores a training checkpoint, a converted AdaFace checkpoint or one step's directory.

        Args:
            path: workdir, checkpoint directory (`<workdir>/checkpoints`, a `convert` output) or
                `<checkpoints>/<step>` (local or any epath URI).
            step: step to restore; None = the latest (or the one `path` names).
            **kwargs: forwarded to `FaceModel.__init__`.
        """
        return cls.from_restored(checkpoint_lib.restore(path, step), **kwargs)

    def forward(self, *, flip: bool = True, feature_maps: bool = False) -> Forward:
        """The model's one serving forward, a pure function of (variables, uint8 images).

        `FaceModel.extract` jits it and `oaml_jax.export` exports it: the input contract
        (`InputContract.preprocess`) and AdaFace's flip test are inside it.

        Args:
            flip: fuse each image with its mirror image in one pass over the `2N` images:
                `embedding = normalize(e n + e_flip n_flip)`, `norm = ||e n + e_flip n_flip|| / 2`.
                Without it, `embedding = e` and `norm = n` of the images alone.
            feature_maps: also return the feature maps of the (unflipped) images.

        Returns:
            `forward(variables, images)`: `variables` like `FaceModel.variables`, `images` uint8
            `[N, 112, 112, 3]` RGB aligned faces; returns dict(embedding `[N, E]` float32 unit rows,
            norm `[N]` float32, occlusion `[N, h, w]` float32 visibility (1 = visible; only when the model
            has an occlusion head), feature_map `[N, h, w, c]` channel-normalized (when asked)).
        """
        model, contract = self.model, self.contract

        def forward(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
            count = images.shape[0]
            x = contract.preprocess(images)
            views = 2 if flip else 1
            if flip:
                x = jnp.concatenate([x, x[:, :, ::-1]])
            out = model.apply(variables, x, method="embed")
            # Views [2, N, ...] rather than slices at N: jax2onnx mis-sizes a slice that starts at a symbolic N.
            split = lambda value: value.reshape(views, count, *value.shape[1:])
            embedding = split(out["embeddings"].astype(jnp.float32))
            norm = split(out["norms"].astype(jnp.float32).reshape(-1))
            feature = jnp.sum(embedding * norm[..., None], axis=0)
            length = jnp.linalg.norm(feature, axis=-1)
            result = {"embedding": feature / jnp.maximum(length, jnp.finfo(jnp.float32).tiny)[:, None],
                      "norm": length / views}
            if "occlusion" in out:
                result["occlusion"] = split(out["occlusion"].astype(jnp.float32))[0]
            if feature_maps:
                result["feature_map"] = split(out["feature_map"])[0]
            return result

        return forward

    # Feature extraction.

    def _pair_qaconv(self, qaconv_variables, maps_a, maps_b, occ_a, occ_b, chunk_size: int) -> jax.Array:
        """The one QAConv pair-scoring call (eval BN, both directions averaged)."""
        return qaconv_pair_scores(qaconv_variables, maps_a, maps_b, occ_a, occ_b, chunk_size=chunk_size,
                                  module=self.qaconv)

    def _step_fn(self, pair_scores: bool, keep_maps: bool) -> Callable:
        key = (pair_scores, keep_maps)
        if key not in self._steps:
            forward = self.forward(flip=True, feature_maps=pair_scores or keep_maps)

            def step(variables, qaconv_variables, images):
                result = forward(variables, images)
                if pair_scores:
                    fmap, occ = result["feature_map"], result["occlusion"]
                    result["pair_qaconv"] = self._pair_qaconv(qaconv_variables, fmap[0::2], fmap[1::2],
                                                              occ[0::2], occ[1::2], chunk_size=images.shape[0] // 2)
                if not keep_maps:
                    result.pop("feature_map", None)
                return result
            self._steps[key] = jax.jit(step, out_shardings=sharding_lib.replicated(self.mesh))
        return self._steps[key]

    def extract(self, images: np.ndarray, *, pair_scores: bool = False, keep_maps: bool = False) -> Features:
        """Features of a set of images, batched, padded and jitted (one compiled shape for any N).

        Runs of more than `PROGRESS_MIN_STEPS` batches show a progress bar with ETA on process 0 (stderr,
        refreshed at most every `PROGRESS_INTERVAL_S` seconds).

        Args:
            images: uint8 `[N, 112, 112, 3]` RGB aligned faces.
            pair_scores: also score the pairs (2i, 2i+1) with QAConv (N must be even; needs QAConv).
            keep_maps: also return the feature maps.

        Returns:
            `Features`.
        """
        images = check_faces(images)
        n = images.shape[0]
        if pair_scores:
            self._require_qaconv()
        if pair_scores and n % 2:
            raise ValueError(f"images: pair scoring needs pairs (2i, 2i+1), got an odd count {n}")
        step = self._step_fn(pair_scores, keep_maps)
        num_steps = math.ceil(n / self.batch_size)
        parts: dict[str, list[np.ndarray]] = {}
        with tqdm.tqdm(total=n, desc="pairs" if pair_scores else "faces", unit="img",
                       mininterval=PROGRESS_INTERVAL_S,
                       disable=not self.progress or num_steps <= PROGRESS_MIN_STEPS
                       or jax.process_index() > 0) as progress:
            for i, batch in enumerate(_host_batches(images, self.batch_size)):
                out = step(self.variables, self.qaconv_variables,
                           sharding_lib.global_batch({"images": batch}, self.mesh)["images"])
                for name, value in jax.device_get(out).items():
                    parts.setdefault(name, []).append(np.asarray(value))
                progress.update(min(self.batch_size, n - i * self.batch_size))
        out = {name: np.concatenate(values) for name, values in parts.items()}
        return Features(
            embeddings=out["embedding"][:n],
            norms=out["norm"][:n],
            occlusion=out["occlusion"][:n] if "occlusion" in out else None,
            feature_maps=out["feature_map"][:n] if keep_maps else None,
            pair_qaconv=out["pair_qaconv"][:n // 2] if pair_scores else None)

    # User API.

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flip-fused embeddings.

        Args:
            images: uint8 `[N, 112, 112, 3]` RGB aligned faces.

        Returns:
            (embeddings `[N, E]` float32 unit rows, norms `[N]` float32; see `Features`).
        """
        features = self.extract(images)
        return features.embeddings, features.norms

    def occlusion_maps(self, images: np.ndarray) -> np.ndarray:
        """Predicted visibility maps `[N, h, w]` in [0, 1] (1 = visible)."""
        self._require_qaconv()
        return self.extract(images).occlusion

    def _require_qaconv(self) -> None:
        if not self.has_qaconv:
            raise ValueError("this checkpoint has no occlusion head and no QAConv (a converted AdaFace backbone?)")

    def qaconv_pair_scores(self, maps_a: np.ndarray, maps_b: np.ndarray, occ_a: np.ndarray, occ_b: np.ndarray,
                           chunk_size: int = 1024) -> np.ndarray:
        """QAConv scores of aligned pairs (a[i], b[i]) from stored maps (e.g. IJB faces).

        Args:
            maps_a, maps_b: `[n, h, w, c]` channel-normalized feature maps (any float dtype).
            occ_a, occ_b: `[n, h, w]` visibility maps.
            chunk_size: pairs matched at once (bounds the `[chunk, hw, hw]` similarities).

        Returns:
            `[n]` float32 scores, the mean of both matching directions.
        """
        self._require_qaconv()
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return np.asarray(self._pair_qaconv(self.qaconv_variables, f32(maps_a), f32(maps_b), f32(occ_a),
                                            f32(occ_b), chunk_size=chunk_size))

    def qaconv_matrix(self, probe: Features, gallery: Features, chunk_size: int = 256) -> np.ndarray:
        """QAConv scores `[p, g]` (mean of both directions) from features extracted with `keep_maps`."""
        self._require_qaconv()
        if probe.feature_maps is None or gallery.feature_maps is None:
            raise ValueError("qaconv_matrix needs features extracted with keep_maps=True")
        score = lambda a, b: np.asarray(qaconv_scores_chunked(
            self.qaconv_variables, jnp.asarray(a.feature_maps), jnp.asarray(b.feature_maps),
            jnp.asarray(a.occlusion), jnp.asarray(b.occlusion), chunk_size=chunk_size, module=self.qaconv))
        return 0.5 * (score(probe, gallery) + score(gallery, probe).T)

    def match(self, probe_images: np.ndarray, gallery_images: np.ndarray) -> dict[str, Optional[np.ndarray]]:
        """All-pairs scores between two sets of faces.

        Args:
            probe_images: uint8 `[p, 112, 112, 3]` RGB.
            gallery_images: uint8 `[g, 112, 112, 3]` RGB.

        Returns:
            {"adaface": `[p, g]`, "qaconv": `[p, g]` or None without QAConv} float64.
        """
        probe = self.extract(probe_images, keep_maps=self.has_qaconv)
        gallery = self.extract(gallery_images, keep_maps=self.has_qaconv)
        adaface = probe.embeddings.astype(np.float64) @ gallery.embeddings.astype(np.float64).T
        if not self.has_qaconv:
            return {"adaface": adaface, "qaconv": None}
        return {"adaface": adaface, "qaconv": self.qaconv_matrix(probe, gallery).astype(np.float64)}
