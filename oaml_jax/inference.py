"""Face embeddings, occlusion maps and pair scores from a trained (or converted AdaFace) checkpoint.

`FaceModel` is the one feature extractor of the project: `oaml_jax.evaluate` runs the verification
protocols through `FaceModel.extract`, so the embeddings a user gets here are exactly those the evaluation
scores.

    model = FaceModel.from_workdir("/tmp/run")            # latest training checkpoint
    emb, norms = model.embed(images)                      # uint8 [N, 112, 112, 3] RGB
    scores = model.match(probe_images, gallery_images)    # {"adaface", "qaconv", "fused"} [p, g]

Scores:
- "adaface": cosine of flip-fused embeddings (AdaFace's flip test: `normalize(e n + e_flip n_flip)`).
- "qaconv": QAConv between the channel-normalized feature maps of the unflipped images, each location
  weighted by the model's predicted visibility, mean of both matching directions, BatchNorms in eval mode.
- "fused": `sum_k w_k (s_k - mean_k) / std_k` over ("adaface", "qaconv"). The z-normalization statistics
  are, in this order: the `stats` argument of `match`; those `oaml_jax.evaluate` fitted on the clean
  validation pairs of the same checkpoint (`<workdir>/eval/fusion_stats.json`, loaded by `from_workdir`);
  otherwise they are fitted on the probe x gallery score matrix itself (needs at least two distinct
  scores of each kind; a single pair gets no fused score).
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
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from data_pipelines import pipeline
from data_pipelines.images import check_size, decode_image
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax import sharding as sharding_lib
from oaml_jax import verification
from oaml_jax.models.backbone import build_backbone, feature_map_shape
from oaml_jax.models.oaml import OAML
from oaml_jax.models.qaconv import QAConv, l2_normalize_channels, qaconv_pair_scores, qaconv_scores_chunked

SCORE_NAMES = ("adaface", "qaconv")
DEFAULT_FUSION_WEIGHTS = {"adaface": 0.5, "qaconv": 0.5}
FUSION_STATS_FILE = os.path.join("eval", "fusion_stats.json")
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


def split_checkpoint_path(path: str, step: Optional[int] = None) -> tuple[str, Optional[int]]:
    """Accepts a workdir, a checkpoint directory, or one step's directory (`.../checkpoints/1000`).

    Returns:
        (directory for `checkpoint.restore_variables`, step or None for the latest).
    """
    path = os.path.abspath(path)
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(path) and not os.path.isdir(os.path.join(path, checkpoint_lib.CHECKPOINT_SUBDIR)):
        if step is not None and step != int(base):
            raise ValueError(f"checkpoint {path} is step {base} but step={step} was asked for")
        return os.path.dirname(path), int(base)
    return path, step


def _model_config(saved: Mapping[str, Any], fallback: Optional[ml_collections.ConfigDict]
                  ) -> ml_collections.ConfigDict:
    """The checkpoint's `model` config, missing fields taken from `fallback` (the caller's config.model)."""
    model = ml_collections.ConfigDict(fallback.to_dict() if fallback is not None else {})
    saved_model = saved.get("model")
    if saved_model is None and fallback is None:
        raise ValueError("the checkpoint's config has no 'model' section and no config.model was given")
    for key, value in (saved_model or {}).items():
        if key in model and isinstance(model[key], ml_collections.ConfigDict):
            model[key] = ml_collections.ConfigDict(value)
        else:
            model[key] = value
    return model


def _tree_without(tree: Mapping[str, Any], key: str) -> dict:
    return {k: v for k, v in tree.items() if k != key}


class FaceModel:
    """A restored model ready for feature extraction, on all local devices (any device count)."""

    def __init__(self, variables: Mapping[str, Any], saved_config: Mapping[str, Any], *,
                 model_config: Optional[ml_collections.ConfigDict] = None,
                 batch_size: Optional[int] = None, step: Optional[int] = None,
                 fusion_stats: Optional[verification.FusionStats] = None,
                 fusion_weights: Mapping[str, float] = DEFAULT_FUSION_WEIGHTS):
        """Builds the network the variables belong to.

        Args:
            variables: {"params", "batch_stats"} from `checkpoint.restore_variables`; a full OAML tree
                (backbone, head, occlusion, qaconv) or a converted backbone ({"backbone"} only).
            saved_config: the checkpoint's config dict (a training config, or a converted checkpoint's
                {"model": {"arch", overrides...}, "input_channel_order"}).
            model_config: fields the saved model config lacks (e.g. the caller's `config.model`).
            batch_size: global images per forward pass (two passes per batch: the images and their
                mirror images); must be a multiple of 2 x the device count.
            step: the checkpoint step (reported only).
            fusion_stats: default z-normalization statistics of `match`'s fused score.
            fusion_weights: weights of the fused score.
        """
        self.config = dict(saved_config)
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
        self.converted = "converted_from" in self.config
        data_cfg = self.config.get("data") or {}
        if "bgr" in data_cfg:
            self.bgr = bool(data_cfg["bgr"])
        else:
            self.bgr = self.config.get("input_channel_order", "BGR").upper() == "BGR"

        params = variables["params"]
        self.has_qaconv = "qaconv" in params and "occlusion" in params
        model_cfg = _model_config(self.config, model_config)
        if self.has_qaconv:
            from oaml_jax import model_factory  # builds the full OAML from config.model
            num_classes = int(params["head"]["kernel"].shape[-1]) if "head" in params else 1
            self.model = model_factory.build_model(model_cfg, num_classes)
            self.backbone = self.model.backbone
            self.qaconv_module = QAConv(dtype=self.model.dtype)
        else:
            overrides = {k: v for k, v in model_cfg.to_dict().items()
                         if k in ("stage_sizes", "widths", "stem_width", "use_se", "output_layer",
                                  "embedding_size", "feature_stage", "dropout")}
            overrides.update(model_cfg.to_dict().get("backbone", {}) or {})
            self.model = None
            self.backbone = build_backbone(model_cfg.arch, **overrides)
            self.qaconv_module = None
        self.set_variables(variables)
        self.feature_map_shape = feature_map_shape(self.backbone)
        self._steps: dict[tuple[bool, bool], Callable] = {}

    def set_variables(self, variables: Mapping[str, Any]) -> None:
        """Uses new values of the same variables (e.g. a training state's) without recompiling.

        Args:
            variables: {"params", "batch_stats"} with the structure this model was built from.
        """
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        if self.has_qaconv:
            # The class kernel is not needed to embed; leaving it out keeps it off the jitted calls.
            self.variables = {"params": _tree_without(params, "head"),
                              "batch_stats": _tree_without(batch_stats, "head")}
            self.qaconv_variables = {"params": params["qaconv"], "batch_stats": batch_stats.get("qaconv", {})}
        else:
            self.variables = {"params": {"backbone": params["backbone"]},
                              "batch_stats": {"backbone": batch_stats.get("backbone", {})}}
            self.qaconv_variables = None

    @classmethod
    def from_checkpoint(cls, path: str, step: Optional[int] = None, **kwargs: Any) -> FaceModel:
        """Restores a training checkpoint, a converted AdaFace checkpoint or one step's directory.

        Args:
            path: workdir, checkpoint directory (`<workdir>/checkpoints`, a `convert` output) or
                `<checkpoints>/<step>`.
            step: step to restore; None = the latest (or the one `path` names).
            **kwargs: forwarded to `FaceModel.__init__`.
        """
        directory, step = split_checkpoint_path(path, step)
        step = checkpoint_lib.resolve_step(directory, step)
        variables, saved = checkpoint_lib.restore_variables(directory, step)
        return cls(variables, saved, step=step, **kwargs)

    @classmethod
    def from_workdir(cls, workdir: str, step: Optional[int] = None, **kwargs: Any) -> FaceModel:
        """`from_checkpoint(workdir, step)` plus the fused-score statistics `oaml_jax.evaluate` saved for
        the same step (`<workdir>/eval/fusion_stats.json`), when there are any."""
        model = cls.from_checkpoint(workdir, step, **kwargs)
        if model.fusion_stats is None:
            model.fusion_stats = load_fusion_stats(workdir, model.step)
        return model

    # Feature extraction.

    def _forward(self, variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        if self.model is not None:
            return self.model.apply(variables, images, method=OAML.embed)
        sub = {k: v["backbone"] for k, v in variables.items()}
        embeddings, norms, feature_map = self.backbone.apply(sub, images, train=False)
        return dict(embeddings=embeddings, norms=norms, feature_map=l2_normalize_channels(feature_map))

    def _step_fn(self, pair_scores: bool, keep_maps: bool) -> Callable:
        key = (pair_scores, keep_maps)
        if key not in self._steps:
            def step(variables, qaconv_variables, images, images_flip):
                b = images.shape[0]
                out = self._forward(variables, jnp.concatenate([images, images_flip]))
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
                    result["pair_qaconv"] = qaconv_pair_scores(
                        qaconv_variables, fmap[0::2], fmap[1::2], occ[0::2], occ[1::2],
                        chunk_size=b // 2, module=self.qaconv_module)
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
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (112, 112, 3):
            raise ValueError(f"images: expected uint8 [N, 112, 112, 3] RGB, got {images.dtype} {images.shape}")
        n = images.shape[0]
        if n == 0:
            raise ValueError("images: expected at least one image")
        if pair_scores and not self.has_qaconv:
            raise ValueError("this checkpoint has no QAConv / occlusion head (a converted AdaFace backbone?): "
                             "no QAConv scores")
        if pair_scores and n % 2:
            raise ValueError(f"images: pair scoring needs pairs (2i, 2i+1), got an odd count {n}")
        step = self._step_fn(pair_scores, keep_maps)
        batches = zip(*(pipeline.eval_batches(images, self.batch_size, bgr=self.bgr, flip=flip,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
                        for flip in (False, True)))
        parts: dict[str, list[np.ndarray]] = {}
        for plain, flipped in batches:
            arrays = sharding_lib.global_batch({"images": plain["image"], "flipped": flipped["image"]}, self.mesh)
            out = step(self.variables, self.qaconv_variables, arrays["images"], arrays["flipped"])
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
        if not self.has_qaconv:
            raise ValueError("this checkpoint has no occlusion head (a converted AdaFace backbone?)")
        return self.extract(images).occlusion

    def qaconv_matrix(self, probe: Features, gallery: Features, chunk_size: int = 256) -> np.ndarray:
        """QAConv scores `[p, g]` (mean of both directions) from features extracted with `keep_maps`."""
        if not self.has_qaconv:
            raise ValueError("this checkpoint has no QAConv (a converted AdaFace backbone?)")
        if probe.feature_maps is None or gallery.feature_maps is None:
            raise ValueError("qaconv_matrix needs features extracted with keep_maps=True")
        score = lambda a, b: np.asarray(qaconv_scores_chunked(
            self.qaconv_variables, jnp.asarray(a.feature_maps), jnp.asarray(b.feature_maps),
            jnp.asarray(a.occlusion), jnp.asarray(b.occlusion), chunk_size=chunk_size,
            module=self.qaconv_module))
        return 0.5 * (score(probe, gallery) + score(gallery, probe).T)

    def match(self, probe_images: np.ndarray, gallery_images: np.ndarray,
              stats: Optional[verification.FusionStats] = None) -> dict[str, Optional[np.ndarray]]:
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
            stats = verification.FusionStats.fit({k: v.reshape(-1) for k, v in scores.items()})
        fused = verification.fuse({k: v.reshape(-1) for k, v in scores.items()}, self.fusion_weights, stats)
        return dict(scores, fused=fused.reshape(adaface.shape))


def fusion_stats_to_json(stats: verification.FusionStats, step: Optional[int],
                         fitted_on: Sequence[str]) -> dict:
    return {"step": step, "fitted_on": list(fitted_on), "mean": dict(stats.mean), "std": dict(stats.std)}


def load_fusion_stats(workdir: str, step: Optional[int]) -> Optional[verification.FusionStats]:
    """Statistics in `<workdir>/eval/fusion_stats.json` when they were fitted for checkpoint `step`."""
    path = os.path.join(workdir, FUSION_STATS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("step") != step:
        logging.warning("%s was fitted for step %s, not %s: ignored", path, saved.get("step"), step)
        return None
    return verification.FusionStats(mean=saved["mean"], std=saved["std"])


def read_face(path: str) -> np.ndarray:
    """An aligned face file as uint8 `[112, 112, 3]` RGB (errors name the file)."""
    with open(path, "rb") as f:
        data = f.read()
    return check_size(decode_image(data, where=path), (112, 112), where=path)


def list_images(folder: str) -> list[str]:
    """Image files directly in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images: no folder {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"--images: no {IMAGE_EXTENSIONS} files in {folder}")
    return [os.path.join(folder, n) for n in names]


def verify_pair(model: FaceModel, path_a: str, path_b: str, out: str) -> dict[str, Optional[float]]:
    """Scores two face files and writes the pair panel PNG to `out`.

    Returns:
        {"adaface", "qaconv", "fused"} scalar scores (None where unavailable).
    """
    from oaml_jax import plots  # matplotlib is only needed here.
    img_a, img_b = read_face(path_a), read_face(path_b)
    scores = model.match(img_a[None], img_b[None])
    values = {name: (None if s is None else float(s[0, 0])) for name, s in scores.items()}
    if model.has_qaconv:
        maps = model.occlusion_maps(np.stack([img_a, img_b]))
    else:
        maps = np.ones((2,) + model.feature_map_shape[:2], np.float32)
    plots.plot_pair_verification(img_a, img_b, maps[0], maps[1],
                                 {name: v for name, v in values.items() if v is not None}, out,
                                 title=f"{os.path.basename(path_a)} vs {os.path.basename(path_b)}")
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
        np.save(f.out, embeddings)
        with open(os.path.splitext(f.out)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write("".join(os.path.basename(p) + "\n" for p in paths))
        logging.info("wrote %s embeddings of %d images to %s", embeddings.shape, len(paths), f.out)
    else:
        if len(argv) != 4:
            raise app.UsageError("usage: python -m oaml_jax.inference verify --workdir DIR IMG_A IMG_B --out P.png")
        values = verify_pair(model, argv[2], argv[3], f.out)
        print("  ".join(f"{k}: {'-' if v is None else f'{v:.4f}'}" for k, v in values.items()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
