"""Face embeddings, occlusion maps, pair scores and verdicts from any checkpoint oaml_jax writes.

`FaceModel` is the one feature extractor of the project: train-time validation and eval.py run their
protocols through `FaceModel.extract`, so the embeddings a user gets here are exactly those that were
scored, and the only code that calls QAConv's scoring is here (`qaconv_pair_scores`, `qaconv_matrix`).
Its serving forward (`FaceModel.forward`: input contract and flip test inside) is also what
`oaml_jax.export` exports.

    model = FaceModel.from_workdir("/tmp/run")            # latest training checkpoint (any epath)
    emb, norms = model.embed(images)                      # uint8 [N, 112, 112, 3] RGB, aligned
    scores = model.match(probe_images, gallery_images)    # {"adaface", "qaconv", "fused"} [p, g]
    verdict = verify_faces(model, face_a, face_b, far=1e-3)

Images go to the devices as uint8 (a quarter of float32's bytes); the mirror image and the model's input
mapping (`InputContract.preprocess`) are computed there.

Scores (higher = more alike):
- "adaface": cosine of flip-fused embeddings (AdaFace's flip test: `normalize(e n + e_flip n_flip)`).
- "qaconv": QAConv between the channel-normalized feature maps of the unflipped images, each location
  weighted by the model's predicted visibility, mean of both matching directions, BatchNorms in eval mode.
- "fused": `sum_k w_k (s_k - mean_k) / std_k` over ("adaface", "qaconv"). The z-normalization statistics
  are, in this order: the `stats` argument of `match`; those of the calibration eval.py fitted on the
  clean validation pairs of the same checkpoint (`<workdir>/eval/calibration.json`, loaded by
  `from_workdir`); otherwise they are fitted on the probe x gallery score matrix itself (needs at least
  two distinct scores of each kind; a single pair gets no fused score).
Converted AdaFace checkpoints have no occlusion head and no QAConv: they give "adaface" only, and
"qaconv" / "fused" are None.

Verdicts: a pair is the same person under a score when the score is above that score's threshold at the
chosen false accept rate, from the calibration (`oaml_jax.evaluation.calibration`); the overall verdict is
the fused score's when it has a threshold, else AdaFace's. Without a calibration there are scores only.

Command line (`cli()`, console script `oaml-inference`); photos are detected and aligned
(`align.detect_and_align`) unless they are 112x112 (taken as aligned) or `--aligned` is given:
    python -m oaml_jax.inference align --images=PHOTOS --out=CROPS [--mode=largest|all]
    python -m oaml_jax.inference embed --workdir=W --images=PHOTOS --out=feats.npy
    python -m oaml_jax.inference verify --workdir=W A.jpg B.jpg [--far=1e-3] [--out=pair.png]
Folders are listed by `data_pipelines.folders.list_images` (hidden and AppleDouble files skipped); a
photo without a face (or an undecodable one) is reported by name and counted in the summary line that
ends every command, never fatal.
- `align` writes `<stem>.png` per photo (`<stem>_<k>.png`, k = 0 for the largest face, with `--mode=all`).
- `embed` writes `[F, E]` float32 flip-fused embeddings of the F faces to `--out` and `<out>.txt`, one
  line per row: `<photo name>\\t<face index>` (faces of a photo largest first).
- `verify` compares the largest face of each photo: prints each score with its threshold and decision at
  `--far` (1e-2, 1e-3 or 1e-4), the overall verdict, or says that the workdir has no calibration yet; with
  `--out` it writes a PNG of both faces, their occlusion maps, the scores and the verdict.
Exit status 0, except 1 when there is nothing to do: no face to embed, or no face in a photo to verify.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from etils import epath

from data_pipelines.folders import IMAGE_EXTENSIONS, list_images
from data_pipelines.images import CorruptImageError, decode_image, encode_png
from oaml_jax import align
from oaml_jax import logs
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import sharding as sharding_lib
from oaml_jax.evaluation import calibration as calibration_lib
from oaml_jax.evaluation import fusion
from oaml_jax.models.face_input import FACE_SIZE, InputContract, check_faces
from oaml_jax.models.oaml import OAML
from oaml_jax.models.qaconv import QAConv, qaconv_pair_scores, qaconv_scores_chunked
from oaml_jax.paths import user_path

EVAL_SUBDIR = "eval"
# Images per forward pass unless told otherwise; rounded up to a multiple of 2 x the device count so the
# batch splits over the devices and never separates the two images of a pair.
_DEFAULT_BATCH = 64
# `extract` shows progress (with ETA) when it runs more batches than this, redrawn at most this often.
PROGRESS_MIN_STEPS = 4
PROGRESS_INTERVAL_S = 5.0
# Photo folders show detection progress from this many photos on (MTCNN takes about 0.1-1 s a photo).
PROGRESS_MIN_PHOTOS = 20
DEFAULT_FAR = 1e-3
COMMANDS = ("align", "embed", "verify")

Forward = Callable[[Mapping[str, Any], jax.Array], dict[str, jax.Array]]


def calibration_path(workdir: epath.PathLike) -> epath.Path:
    """`<workdir>/eval/calibration.json`: where eval.py writes the calibration of a workdir's checkpoints."""
    return user_path(workdir, "workdir") / EVAL_SUBDIR / calibration_lib.CALIBRATION_FILE


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
                 directory: Optional[epath.Path] = None,
                 fusion_stats: Optional[fusion.FusionStats] = None,
                 fusion_weights: Mapping[str, float] = fusion.DEFAULT_WEIGHTS,
                 calibration: Optional[calibration_lib.Calibration] = None):
        """Wraps a model and its variables.

        Args:
            model: `OAML` or `factory.EmbeddingModel` (anything with `embed`; see `checkpoint.Restored`).
            variables: {"params", "batch_stats"} of `model`.
            contract: the model's input contract.
            batch_size: global images per forward pass (two passes per batch: the images and their
                mirror images); must be a multiple of 2 x the device count.
            step: the checkpoint step (reported only).
            directory: the checkpoint folder (reported only).
            fusion_stats: default z-normalization statistics of `match`'s fused score.
            fusion_weights: weights of the fused score.
            calibration: decision thresholds of this checkpoint's scores (see `verify_faces`).

        Raises:
            ValueError: `batch_size` is not a positive multiple of 2 x the device count.
        """
        self.model = model
        self.contract = contract
        self.step = step
        self.directory = directory
        self.fusion_stats = fusion_stats
        self.fusion_weights = dict(fusion_weights)
        self.calibration = calibration
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

    @classmethod
    def from_workdir(cls, workdir: epath.PathLike, step: Optional[int] = None, **kwargs: Any) -> FaceModel:
        """`from_checkpoint(workdir, step)` with the calibration eval.py wrote for the same step.

        The calibration (`calibration_path(workdir)`; absent or fitted for another step: none, the
        latter warned about; a `calibration` argument: that one) gives the decision thresholds, and the
        fused score's statistics and weights unless `fusion_stats` / `fusion_weights` are passed: then the
        fused thresholds, fitted on another fused score, are dropped (warned).
        """
        model = cls.from_checkpoint(workdir, step, **kwargs)
        if model.calibration is not None:
            return model
        calibration = calibration_lib.load(calibration_path(workdir), model.step)
        if calibration is None:
            return model
        if calibration.fusion_stats is not None:
            if "fusion_weights" not in kwargs:
                model.fusion_weights = dict(calibration.fusion_weights)
            if model.fusion_stats is None:
                model.fusion_stats = calibration.fusion_stats
            if (model.fusion_weights != calibration.fusion_weights
                    or model.fusion_stats != calibration.fusion_stats):
                logging.warning("the fused score uses weights %s and statistics %s, the calibration was fitted with "
                                "%s and %s: no fused threshold", model.fusion_weights, model.fusion_stats,
                                calibration.fusion_weights, calibration.fusion_stats)
                calibration = calibration.without_fused()
        model.calibration = calibration
        return model

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

    def match(self, probe_images: np.ndarray, gallery_images: np.ndarray,
              stats: Optional[fusion.FusionStats] = None) -> dict[str, Optional[np.ndarray]]:
        """All-pairs scores between two sets of faces.

        Args:
            probe_images: uint8 `[p, 112, 112, 3]` RGB.
            gallery_images: uint8 `[g, 112, 112, 3]` RGB.
            stats: z-normalization statistics of the fused score (see the module docstring for the
                fallbacks when None).

        Returns:
            {"adaface": `[p, g]`, "qaconv": `[p, g]` or None, "fused": `[p, g]` or None} float64.
        """
        probe = self.extract(probe_images, keep_maps=self.has_qaconv)
        gallery = self.extract(gallery_images, keep_maps=self.has_qaconv)
        adaface = probe.embeddings.astype(np.float64) @ gallery.embeddings.astype(np.float64).T
        if not self.has_qaconv:
            return {"adaface": adaface, "qaconv": None, "fused": None}
        qaconv = self.qaconv_matrix(probe, gallery).astype(np.float64)
        scores = {"adaface": adaface, "qaconv": qaconv}
        stats = stats or self.fusion_stats
        if stats is None:
            if min(np.unique(s).size for s in scores.values()) < 2:
                logging.warning("no fusion statistics and too few scores to fit them: no fused score")
                return dict(scores, fused=None)
            stats = fusion.FusionStats.fit({k: v.reshape(-1) for k, v in scores.items()})
        fused = fusion.fuse({k: v.reshape(-1) for k, v in scores.items()}, self.fusion_weights, stats)
        return dict(scores, fused=fused.reshape(adaface.shape))


# Photos -> aligned faces.


@dataclasses.dataclass(frozen=True)
class PhotoFaces:
    """The aligned faces found in a list of photos, and what was found in each.

    Attributes:
        faces: uint8 `[F, 112, 112, 3]` RGB aligned faces (F may be 0).
        sources: F (photo name, face index) in the order of `faces`; index 0 is a photo's largest face.
        photos: number of image files read.
        without_face: names of the photos in which no face passed the detection thresholds.
        unreadable: (name, reason) of the files that are not decodable images, or (with `aligned`) not
            112x112 crops.
        skipped: entries of the folder that are not listed as images (hidden, AppleDouble, other extensions,
            folders).
    """

    faces: np.ndarray
    sources: list[tuple[str, int]]
    photos: int
    without_face: list[str]
    unreadable: list[tuple[str, str]]
    skipped: int = 0

    def summary(self) -> str:
        """One line: photos, faces, photos without a face and unreadable files by name, skipped entries."""
        count = lambda n, noun: f"{n} {noun}{'' if n == 1 else 's'}"
        text = (f"{count(self.photos, 'photo')}, {count(len(self.sources), 'face')}, "
                f"{len(self.without_face)} without a face")
        if self.without_face:
            text += f" ({', '.join(self.without_face)})"
        if self.unreadable:
            text += f", {len(self.unreadable)} unreadable ({'; '.join(f'{n}: {r}' for n, r in self.unreadable)})"
        if self.skipped:
            entries = "1 other entry" if self.skipped == 1 else f"{self.skipped} other entries"
            text += f", {entries} skipped (hidden, AppleDouble or not {'/'.join(IMAGE_EXTENSIONS)})"
        return text


def faces_from_photos(paths: Sequence[epath.PathLike], *, aligned: bool = False, mode: str = "largest",
                      min_face_size: float = align.DEFAULT_MIN_FACE_SIZE,
                      min_score: float = align.DEFAULT_MIN_SCORE) -> PhotoFaces:
    """Reads photos and aligns their faces: a 112x112 photo is taken as aligned, any other is detected.

    Args:
        paths: image files (local or any epath URI).
        aligned: every photo is an aligned 112x112 crop; other sizes are reported as unreadable.
        mode: "largest" (one face per photo) or "all" (every face, largest first); see `align.detect_and_align`.
        min_face_size: smallest face box side kept, in photo pixels.
        min_score: smallest MTCNN face probability kept.

    Returns:
        `PhotoFaces`; photos without a face and undecodable files are counted there (and warned about),
        never raised. More than `PROGRESS_MIN_PHOTOS` photos show a progress bar with ETA (stderr).

    Raises:
        ValueError: unknown `mode`, or a threshold out of range.
        OSError: a file cannot be read at all.
    """
    if mode not in align.DETECTION_MODES:
        raise ValueError(f"mode: expected one of {align.DETECTION_MODES}, got {mode!r}")
    if not (min_face_size > 0 and 0.0 <= min_score <= 1.0):
        raise ValueError(f"min_face_size={min_face_size} (> 0 px) and min_score={min_score} (in [0, 1]) out of range")
    faces, sources, without_face, unreadable = [], [], [], []
    for path in tqdm.tqdm(paths, desc="photos", unit="photo", mininterval=PROGRESS_INTERVAL_S,
                          disable=len(paths) <= PROGRESS_MIN_PHOTOS):
        path = epath.Path(path)
        try:
            image = decode_image(path.read_bytes(), where=str(path))
        except CorruptImageError as e:
            logging.warning("%s: not a readable image (%s)", path, e.reason)
            unreadable.append((path.name, e.reason))
            continue
        if image.shape[:2] == (FACE_SIZE, FACE_SIZE):
            found = [image]
        elif aligned:
            reason = f"{image.shape[1]}x{image.shape[0]}, not a {FACE_SIZE}x{FACE_SIZE} aligned face (--aligned)"
            logging.warning("%s: %s", path, reason)
            unreadable.append((path.name, reason))
            continue
        else:
            found = [f.face for f in align.detect_and_align(image, mode=mode, min_face_size=min_face_size,
                                                             min_score=min_score)]
        if not found:
            logging.warning("%s: no face (min_face_size %g px, min_score %g)", path, min_face_size, min_score)
            without_face.append(path.name)
        faces.extend(found)
        sources.extend((path.name, k) for k in range(len(found)))
    return PhotoFaces(faces=np.stack(faces) if faces else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8),
                      sources=sources, photos=len(paths), without_face=without_face, unreadable=unreadable)


def faces_from_folder(folder: epath.PathLike, **options: Any) -> PhotoFaces:
    """`faces_from_photos` of the images directly in `folder` (`data_pipelines.folders.list_images`).

    Raises:
        FileNotFoundError: `folder` is not a folder, or holds no image file.
    """
    folder = user_path(folder, "--images")
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"--images={folder}: no image files ({'/'.join(IMAGE_EXTENSIONS)}) in it")
    skipped = sum(1 for _ in folder.iterdir()) - len(paths)
    return dataclasses.replace(faces_from_photos(paths, **options), skipped=skipped)


# Verdicts.


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Scores of one pair of faces and, with a calibration, the decisions at one false accept rate.

    Attributes:
        scores: "adaface", "qaconv", "fused" -> score (None where the model or the statistics cannot give it).
        far: the false accept rate of the thresholds.
        thresholds: score name -> threshold at `far`, for the scores that have one (none without calibration).
        calibration: where the thresholds come from, None without calibration.
    """

    scores: Mapping[str, Optional[float]]
    far: float
    thresholds: Mapping[str, float]
    calibration: Optional[calibration_lib.Calibration]

    def same(self, name: str) -> bool:
        """Score `name`'s decision: above its threshold (see `calibration.fit`)."""
        return self.scores[name] > self.thresholds[name]

    @property
    def decided_by(self) -> Optional[str]:
        """The score of the overall verdict: "fused" when it has a threshold, else "adaface", else None."""
        return next((name for name in ("fused", "adaface") if name in self.thresholds), None)

    @property
    def is_same(self) -> Optional[bool]:
        """The overall verdict (None without calibration)."""
        return None if self.decided_by is None else self.same(self.decided_by)

    def lines(self) -> list[str]:
        """One line per score: value, and with a threshold the comparison and its decision."""
        lines = []
        for name, value in self.scores.items():
            if value is None:
                lines.append(f"{name:<8} {'-':>8}")
            elif name in self.thresholds:
                same = self.same(name)
                lines.append(f"{name:<8} {value:8.4f} {'>' if same else '<='} {self.thresholds[name]:.4f}: "
                             f"{'same' if same else 'different'}")
            else:
                lines.append(f"{name:<8} {value:8.4f}")
        return lines

    def headline(self) -> str:
        """The overall verdict in words, e.g. "same person (fused score at FAR 0.001)"."""
        if self.decided_by is None:
            return "no verdict: no calibration, scores only"
        return (f"{'same person' if self.is_same else 'different people'} "
                f"({self.decided_by} score at FAR {self.far:g})")


def verify_faces(model: FaceModel, face_a: np.ndarray, face_b: np.ndarray, far: float = DEFAULT_FAR) -> Verdict:
    """Scores two aligned faces and decides at `far` with the model's calibration.

    Args:
        model: a FaceModel, with `calibration` for decisions (`FaceModel.from_workdir` loads it).
        face_a, face_b: uint8 `[112, 112, 3]` RGB aligned faces.
        far: false accept rate; one the calibration was fitted at (`calibration.FARS`).

    Returns:
        The `Verdict`.

    Raises:
        ValueError: `far` is not a calibrated rate, or a face is not a 112x112 uint8 RGB crop.
    """
    scores = model.match(face_a[None], face_b[None])
    values = {name: None if s is None else float(s[0, 0]) for name, s in scores.items()}
    cal = model.calibration
    thresholds = {}
    if cal is not None:
        key = cal.far_key(far)
        thresholds = {name: t[key] for name, t in cal.thresholds.items() if values.get(name) is not None}
    return Verdict(scores=values, far=far, thresholds=thresholds, calibration=cal)


def describe_calibration(verdict: Verdict) -> str:
    """Where the verdict's thresholds come from, and whether its FAR is measured on that many impostors."""
    cal = verdict.calibration
    text = (f"thresholds at FAR {verdict.far:g} fitted on the clean pairs of {', '.join(cal.fitted_on)} "
            f"({cal.num_pairs} pairs, {cal.num_impostors} impostors) at step {cal.step}; "
            "same when the score is above its threshold")
    if not cal.resolved(verdict.far):
        text += (f"\nnote: {cal.num_impostors} impostor pairs measure FAR down to {1.0 / cal.num_impostors:.1e} "
                 f"only; at {verdict.far:g} each threshold is the highest impostor score")
    return text


def plot_verdict(verdict: Verdict, face_a: np.ndarray, face_b: np.ndarray, maps: Optional[np.ndarray],
                 out: epath.PathLike, title: str) -> epath.Path:
    """Writes the pair PNG: both faces, their occlusion maps (all visible when None), scores and verdict."""
    from oaml_jax.evaluation import plots  # pylint: disable=g-import-not-at-top  (matplotlib only here)
    if maps is None:
        maps = np.ones((2, 1, 1), np.float32)
    return plots.plot_pair_verification(face_a, face_b, maps[0], maps[1], verdict.lines(),
                                        user_path(out, "--out"), title=title, verdict=verdict.headline())


# Command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command line's flags (in `flag_values`; `cli()` uses the global ones)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "embed, verify: training workdir or checkpoint directory (any epath).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.", **fv)
    flags.DEFINE_integer("batch_size", None, "Images per forward pass.", **fv)
    flags.DEFINE_string("images", None, "align, embed: folder of photos (or aligned 112x112 crops).", **fv)
    flags.DEFINE_string("out", None, "align: folder of aligned crops; embed: .npy file (+ .txt row names); "
                        "verify: optional pair PNG.", **fv)
    flags.DEFINE_bool("aligned", False, "The inputs are aligned 112x112 crops: no detection (other sizes are "
                      "reported). Without it 112x112 inputs are taken as aligned and the others detected.", **fv)
    flags.DEFINE_enum("mode", "largest", align.DETECTION_MODES, "Faces kept per photo: the largest, or all "
                      "(align, embed).", **fv)
    flags.DEFINE_float("min_face_size", align.DEFAULT_MIN_FACE_SIZE, "Smallest face box side kept, in photo "
                       "pixels.", lower_bound=1.0, **fv)
    flags.DEFINE_float("min_score", align.DEFAULT_MIN_SCORE, "Smallest MTCNN face probability kept.",
                       lower_bound=0.0, upper_bound=1.0, **fv)
    flags.DEFINE_float("far", DEFAULT_FAR, "verify: false accept rate of the decision (one of "
                       f"{', '.join(f'{f:g}' for f in calibration_lib.FARS)}).", lower_bound=0.0, upper_bound=1.0,
                       **fv)


_USAGE = """usage:
  python -m oaml_jax.inference align --images=PHOTOS --out=CROPS [--mode=largest|all] [--aligned]
  python -m oaml_jax.inference embed --workdir=W --images=PHOTOS --out=F.npy [--mode=largest|all] [--aligned]
  python -m oaml_jax.inference verify --workdir=W A.jpg B.jpg [--far=0.001] [--out=P.png] [--aligned]"""


def _require(flag_values: flags.FlagValues, command: str, *names: str) -> None:
    missing = [f"--{n}" for n in names if not flag_values[n].value]
    if missing:
        raise app.UsageError(f"{command}: {' and '.join(missing)} required\n{_USAGE}")


def _crop_names(faces: PhotoFaces, mode: str) -> list[str]:
    names = [f"{epath.Path(name).stem}{f'_{k}' if mode == 'all' else ''}.png" for name, k in faces.sources]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise app.UsageError(f"align: photos with the same name but another extension would both be written as "
                             f"{', '.join(clashes)}; rename one of them")
    return names


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Runs `argv[1]` (align, embed or verify) with the parsed `flag_values`; see the module docstring.

    Raises:
        app.UsageError: an unknown command, missing or conflicting flags.
        SystemExit: status 1 when there is nothing to do (no face to embed, no face in a photo to verify).
    """
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(_USAGE)
    command, args, f = argv[1], list(argv[2:]), flag_values
    detection = {"aligned": f.aligned, "mode": f.mode, "min_face_size": f.min_face_size, "min_score": f.min_score}
    if command == "verify":
        if len(args) != 2:
            raise app.UsageError(f"verify: expected two photos, got {args}\n{_USAGE}")
        if f.mode != "largest":
            raise app.UsageError("verify compares the largest face of each photo; --mode=all is for align and embed")
        _require(f, command, "workdir")
        _verify(f, args, detection)
        return
    if args:
        raise app.UsageError(f"{command}: unexpected arguments {args}\n{_USAGE}")
    _require(f, command, "images", "out", *(("workdir",) if command == "embed" else ()))
    if command == "embed":
        checkpoint_lib.locate(f.workdir, f.step)  # a wrong --workdir is refused before detection runs
    try:
        photo_faces = faces_from_folder(f.images, **detection)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    model = FaceModel.from_workdir(f.workdir, f.step, batch_size=f.batch_size) if command == "embed" else None
    out = user_path(f.out, "--out")
    if command == "align":
        names = _crop_names(photo_faces, f.mode)
        out.mkdir(parents=True, exist_ok=True)
        for name, face in zip(names, photo_faces.faces):
            (out / name).write_bytes(encode_png(face))
        logging.info("wrote %d aligned faces to %s", len(names), out)
        print(photo_faces.summary())
        return
    print(photo_faces.summary())
    if not photo_faces.sources:
        sys.exit(f"embed: no face in {f.images}; nothing written")
    embeddings, _ = model.embed(photo_faces.faces)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        np.save(fh, embeddings)
    out.with_suffix(".txt").write_text("".join(f"{name}\t{k}\n" for name, k in photo_faces.sources))
    logging.info("wrote %s embeddings to %s (row names in %s)", embeddings.shape, out, out.with_suffix(".txt"))


def _verify(f: flags.FlagValues, photos: Sequence[str], detection: Mapping[str, Any]) -> None:
    paths = [user_path(p, "photo") for p in photos]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"verify: no photo file {', '.join(missing)}")
    model = FaceModel.from_workdir(f.workdir, f.step, batch_size=f.batch_size)
    if model.calibration is not None:
        try:
            model.calibration.far_key(f.far)
        except ValueError as e:
            raise app.UsageError(f"--far: {e}") from e
    photo_faces = faces_from_photos(paths, **detection)
    print(photo_faces.summary())
    if len(photo_faces.sources) != 2:
        problems = [f"no face in {name}" for name in photo_faces.without_face]
        problems += [f"{name} unreadable" for name, _ in photo_faces.unreadable]
        sys.exit(f"verify: no verdict, {', '.join(problems)}")
    face_a, face_b = photo_faces.faces
    verdict = verify_faces(model, face_a, face_b, f.far)
    if verdict.calibration is None:
        print(f"no calibration for step {model.step} ({calibration_path(f.workdir)} absent or fitted for another "
              f"step): raw scores only, higher = more alike; `python eval.py --config=<the run's config> "
              f"--workdir={f.workdir}` writes one")
    else:
        print(describe_calibration(verdict))
    for line in verdict.lines():
        print(f"  {line}")
    print(f"verdict: {verdict.headline()}")
    if f.out:
        maps = model.occlusion_maps(photo_faces.faces) if model.has_qaconv else None
        written = plot_verdict(verdict, face_a, face_b, maps, f.out, title=f"{paths[0].name} vs {paths[1].name}")
        logging.info("wrote %s", written)


def cli() -> None:
    """The `oaml-inference` console script: defines the flags and runs `main`."""
    define_flags()
    logs.run(main)


if __name__ == "__main__":
    cli()
