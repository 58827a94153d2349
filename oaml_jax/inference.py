"""Face embeddings, occlusion maps and pair scores from any checkpoint oaml_jax writes.

`FaceModel` is the one feature extractor of the project: train-time validation and eval.py run their
protocols through `FaceModel.extract`, so the embeddings a user gets here are exactly those that were
scored, and the only code that calls QAConv's scoring is here (`qaconv_pair_scores`, `qaconv_matrix`).

    model = FaceModel.from_workdir("/tmp/run")            # latest training checkpoint (any epath)
    emb, norms = model.embed(images)                      # uint8 [N, 112, 112, 3] RGB, aligned
    scores = model.match(probe_images, gallery_images)    # {"adaface", "qaconv", "fused"} [p, g]

Images go to the devices as uint8 (a quarter of float32's bytes); the mirror image and the model's input
mapping (`InputContract.preprocess`) are computed there.

Scores:
- "adaface": cosine of flip-fused embeddings (AdaFace's flip test: `normalize(e n + e_flip n_flip)`).
- "qaconv": QAConv between the channel-normalized feature maps of the unflipped images, each location
  weighted by the model's predicted visibility, mean of both matching directions, BatchNorms in eval mode.
- "fused": `sum_k w_k (s_k - mean_k) / std_k` over ("adaface", "qaconv"). The z-normalization statistics
  are, in this order: the `stats` argument of `match`; those eval.py fitted on the clean validation pairs
  of the same checkpoint (`<workdir>/eval/fusion_stats.json`, loaded by `from_workdir`); otherwise they
  are fitted on the probe x gallery score matrix itself (needs at least two distinct scores of each kind;
  a single pair gets no fused score).
Converted AdaFace checkpoints have no occlusion head and no QAConv: they give "adaface" only, and
"qaconv" / "fused" are None.

CLI:
    python -m oaml_jax.inference embed --workdir DIR --images FOLDER --out feats.npy
    python -m oaml_jax.inference verify --workdir DIR IMG_A IMG_B --out pair.png
`embed` writes `[N, E]` float32 embeddings of the folder's images (sorted by name) and a
`<out>.txt` list of the file names in row order; `verify` writes a PNG with both faces, their occlusion
maps and the three scores, and prints the scores.
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
from absl import app, flags, logging
from etils import epath

from data_pipelines.images import check_size, decode_image
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import sharding as sharding_lib
from oaml_jax.evaluation import fusion, verification
from oaml_jax.models.face_input import FACE_SIZE, InputContract, check_faces
from oaml_jax.models.oaml import OAML
from oaml_jax.models.qaconv import QAConv, qaconv_pair_scores, qaconv_scores_chunked
from oaml_jax.paths import user_path

EVAL_SUBDIR = "eval"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Images per forward pass unless told otherwise; rounded up to a multiple of 2 x the device count so the
# batch splits over the devices and never separates the two images of a pair.
_DEFAULT_BATCH = 64


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
                 fusion_stats: Optional[fusion.FusionStats] = None,
                 fusion_weights: Mapping[str, float] = fusion.DEFAULT_WEIGHTS):
        """Wraps a model and its variables.

        Args:
            model: `OAML` or `factory.EmbeddingModel` (anything with `embed`; see `checkpoint.Restored`).
            variables: {"params", "batch_stats"} of `model`.
            contract: the model's input contract.
            batch_size: global images per forward pass (two passes per batch: the images and their
                mirror images); must be a multiple of 2 x the device count.
            step: the checkpoint step (reported only).
            fusion_stats: default z-normalization statistics of `match`'s fused score.
            fusion_weights: weights of the fused score.

        Raises:
            ValueError: `batch_size` is not a positive multiple of 2 x the device count.
        """
        self.model = model
        self.contract = contract
        self.step = step
        self.fusion_stats = fusion_stats
        self.fusion_weights = dict(fusion_weights)
        self.mesh = sharding_lib.make_mesh(jax.devices())
        multiple = 2 * jax.device_count()
        if batch_size is None:
            batch_size = -(-_DEFAULT_BATCH // multiple) * multiple
        if batch_size <= 0 or batch_size % multiple:
            raise ValueError(f"eval.batch_size={batch_size} must be a positive multiple of 2 x the "
                             f"{jax.device_count()} devices (pairs are scored within a batch)")
        self.batch_size = batch_size
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
        return cls(restored.model, restored.variables, restored.contract, step=restored.step, **kwargs)

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
        """`from_checkpoint(workdir, step)` plus the fused-score statistics eval.py saved for the same
        step (`<workdir>/eval/fusion_stats.json`), when there are any."""
        model = cls.from_checkpoint(workdir, step, **kwargs)
        if model.fusion_stats is None:
            stats_path = user_path(workdir, "workdir") / EVAL_SUBDIR / fusion.STATS_FILE
            model.fusion_stats = fusion.load_stats(stats_path, model.step)
        return model

    # Feature extraction.

    def _pair_qaconv(self, qaconv_variables, maps_a, maps_b, occ_a, occ_b, chunk_size: int) -> jax.Array:
        """The one QAConv pair-scoring call (eval BN, both directions averaged)."""
        return qaconv_pair_scores(qaconv_variables, maps_a, maps_b, occ_a, occ_b, chunk_size=chunk_size,
                                  module=self.qaconv)

    def _step_fn(self, pair_scores: bool, keep_maps: bool) -> Callable:
        key = (pair_scores, keep_maps)
        if key not in self._steps:
            def step(variables, qaconv_variables, images):
                b = images.shape[0]
                x = self.contract.preprocess(images)
                out = self.model.apply(variables, jnp.concatenate([x, x[:, :, ::-1]]), method="embed")
                emb = out["embeddings"].astype(jnp.float32)
                norms = out["norms"].astype(jnp.float32).reshape(-1)
                result = {"emb": emb[:b], "norms": norms[:b], "emb_flip": emb[b:], "norms_flip": norms[b:]}
                if "occlusion" in out:
                    result["occlusion"] = out["occlusion"][:b].astype(jnp.float32)
                fmap = out["feature_map"][:b]
                if keep_maps:
                    result["feature_maps"] = fmap
                if pair_scores:
                    occ = result["occlusion"]
                    result["pair_qaconv"] = self._pair_qaconv(qaconv_variables, fmap[0::2], fmap[1::2],
                                                              occ[0::2], occ[1::2], chunk_size=b // 2)
                return result
            self._steps[key] = jax.jit(step, out_shardings=sharding_lib.replicated(self.mesh))
        return self._steps[key]

    def extract(self, images: np.ndarray, *, pair_scores: bool = False, keep_maps: bool = False) -> Features:
        """Features of a set of images, batched, padded and jitted (one compiled shape for any N).

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
        parts: dict[str, list[np.ndarray]] = {}
        for batch in _host_batches(images, self.batch_size):
            out = step(self.variables, self.qaconv_variables,
                       sharding_lib.global_batch({"images": batch}, self.mesh)["images"])
            for name, value in jax.device_get(out).items():
                parts.setdefault(name, []).append(np.asarray(value))
        out = {name: np.concatenate(values) for name, values in parts.items()}
        emb, norms = out["emb"][:n], out["norms"][:n, None]
        emb_flip, norms_flip = out["emb_flip"][:n], out["norms_flip"][:n, None]
        mean_feature_norm = np.linalg.norm(emb * norms + emb_flip * norms_flip, axis=1) / 2.0
        return Features(
            embeddings=verification.flip_fused_embeddings(emb, norms, emb_flip, norms_flip),
            norms=mean_feature_norm.astype(np.float32),
            occlusion=out["occlusion"][:n] if "occlusion" in out else None,
            feature_maps=out["feature_maps"][:n] if keep_maps else None,
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


def read_face(path: epath.PathLike) -> np.ndarray:
    """An aligned face file as uint8 `[112, 112, 3]` RGB (errors name the file)."""
    path = user_path(path, "image")
    return check_size(decode_image(path.read_bytes(), where=str(path)), (FACE_SIZE, FACE_SIZE), where=str(path))


def list_images(folder: epath.PathLike) -> list[epath.Path]:
    """Image files directly in `folder`, sorted by name."""
    folder = user_path(folder, "--images")
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: no folder {folder}")
    paths = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"--images: no {IMAGE_EXTENSIONS} files in {folder}")
    return paths


def verify_pair(model: FaceModel, path_a: epath.PathLike, path_b: epath.PathLike,
                out: epath.PathLike) -> dict[str, Optional[float]]:
    """Scores two face files and writes the pair panel PNG to `out`.

    Returns:
        {"adaface", "qaconv", "fused"} scalar scores (None where unavailable).
    """
    from oaml_jax.evaluation import plots  # matplotlib is only needed here.
    path_a, path_b = user_path(path_a, "IMG_A"), user_path(path_b, "IMG_B")
    img_a, img_b = read_face(path_a), read_face(path_b)
    scores = model.match(img_a[None], img_b[None])
    values = {name: (None if s is None else float(s[0, 0])) for name, s in scores.items()}
    if model.has_qaconv:
        maps = model.occlusion_maps(np.stack([img_a, img_b]))
    else:
        maps = np.ones((2,) + model.feature_map_shape[:2], np.float32)
    plots.plot_pair_verification(img_a, img_b, maps[0], maps[1],
                                 {name: v for name, v in values.items() if v is not None}, out,
                                 title=f"{path_a.name} vs {path_b.name}")
    return values


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir or checkpoint directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
    flags.DEFINE_string("images", None, "embed: folder of aligned 112x112 faces.")
    flags.DEFINE_string("out", None, "embed: .npy output; verify: .png output.")
    flags.DEFINE_integer("batch_size", None, "Images per forward pass.")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ("embed", "verify"):
        raise app.UsageError("usage: python -m oaml_jax.inference {embed|verify} --workdir DIR ...")
    f = flags.FLAGS
    if not f.workdir or not f.out:
        raise app.UsageError("--workdir and --out are required")
    model = FaceModel.from_workdir(f.workdir, f.step, batch_size=f.batch_size)
    if argv[1] == "embed":
        if len(argv) != 2 or not f.images:
            raise app.UsageError("usage: python -m oaml_jax.inference embed --workdir DIR --images FOLDER --out F.npy")
        paths = list_images(f.images)
        embeddings, _ = model.embed(np.stack([read_face(p) for p in paths]))
        out = user_path(f.out, "--out")
        with out.open("wb") as fh:
            np.save(fh, embeddings)
        out.with_suffix(".txt").write_text("".join(p.name + "\n" for p in paths))
        logging.info("wrote %s embeddings of %d images to %s", embeddings.shape, len(paths), out)
    else:
        if len(argv) != 4:
            raise app.UsageError("usage: python -m oaml_jax.inference verify --workdir DIR IMG_A IMG_B --out P.png")
        values = verify_pair(model, argv[2], argv[3], f.out)
        print("  ".join(f"{k}: {'-' if v is None else f'{v:.4f}'}" for k, v in values.items()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
