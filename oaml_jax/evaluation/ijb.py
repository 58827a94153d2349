"""IJB-B / IJB-C 1:1 template verification of a model (eval.py; too slow for train-time validation).

The set's layout is read by `ijb_layout`; templates are pooled and scored by `ijb_templates`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from absl import logging
from etils import epath

from oaml_jax.evaluation import base, fusion, verification
from oaml_jax.evaluation.ijb_layout import IJB_NAMES, IJBMeta, ijb_folder, iter_aligned_batches, read_ijb_meta
from oaml_jax.evaluation.ijb_templates import (IJB_FARS, ijb_tar_table, template_features,
                                               template_pair_scores_from_pairwise, verify_templates)
from oaml_jax.paths import user_path
from oaml_jax.serving import FaceModel

# Image pairs per QAConv call on IJB: two float16 maps each on the host gather (411 MB at 7x7x512) and
# float32 on the device.
IJB_QACONV_CHUNK = 4096
# Pairs matched at once inside one QAConv call: bounds the [n, hw, hw] similarity temporaries.
_QACONV_INNER_CHUNK = 1024


def extraction_batch(model: FaceModel, batch_size: int) -> int:
    """Faces aligned and extracted per call: `batch_size` (0 = the model's) rounded up to a multiple of the
    model's batch size."""
    multiple = model.batch_size
    return -(-(batch_size or multiple) // multiple) * multiple


def ijb_face_features(model: FaceModel, meta: IJBMeta, batch_size: int, keep_maps: bool
                      ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Per-face features of an IJB set, read, aligned and extracted `batch_size` faces at a time.

    Host memory is preallocated once: `[F, E]` float32 features and, with `keep_maps`, `[F, h, w, c]`
    float16 feature maps (the maps are channel-L2-normalized, so their entries lie in [-1, 1] where
    float16 keeps 11 significant bits; half of float32's 47 GB at 7x7x512 on IJB-C's 469k faces) and
    `[F, h, w]` float32 visibility maps.

    Args:
        model: the restored model.
        meta: the set's metadata.
        batch_size: faces loaded and passed to `model.extract` per call.
        keep_maps: also keep feature and visibility maps (QAConv; needs `model.has_qaconv`).

    Returns:
        (`[F, E]` float32 flip-fused un-normalized features `(e n + e_flip n_flip) / 2`, maps `[F, h, w, c]`
        float16 or None, visibility `[F, h, w]` float32 or None).
    """
    num_faces = meta.image_names.size
    feats, maps, occlusion = None, None, None
    done = 0
    for batch in iter_aligned_batches(meta.root, meta, batch_size):
        part = model.extract(batch, keep_maps=keep_maps)
        if feats is None:
            feats = np.empty((num_faces, part.embeddings.shape[1]), np.float32)
            if keep_maps:
                maps = np.empty((num_faces,) + part.feature_maps.shape[1:], np.float16)
                occlusion = np.empty((num_faces,) + part.occlusion.shape[1:], np.float32)
        end = done + batch.shape[0]
        feats[done:end] = part.embeddings * part.norms[:, None]
        if keep_maps:
            maps[done:end] = part.feature_maps
            occlusion[done:end] = part.occlusion
        done = end
        logging.log_every_n_seconds(logging.INFO, "%s: %d / %d faces extracted", 60, meta.name, done, num_faces)
    return feats, maps, occlusion


def ijb_scores(model: FaceModel, meta: IJBMeta, weights: Mapping[str, float], *, batch_size: int,
               qaconv: bool, qaconv_chunk: int = IJB_QACONV_CHUNK) -> dict[str, np.ndarray]:
    """Template-pair scores of one IJB set (1:1 verification).

    - "adaface": face features `(e n + e_flip n_flip) / 2` (flip-fused, norm-weighted) scaled by the
      detector score, averaged per media, summed per template, L2-normalized; cosine of the two templates
      (insightface's best IJB setting, `template_features`).
    - "qaconv" (when `qaconv` and the model has QAConv): mean over all image pairs (a in T1, b in T2) of
      the symmetric, occlusion-weighted QAConv pair score (`template_pair_scores_from_pairwise`), on
      the float16-stored maps computed in float32.
    - "fused" (with "qaconv"): `sum_k w_k (s_k - mean_k) / std_k`, the statistics fitted on all template
      pairs of the set (label-free, so no label reaches the fusion).

    Cost of "qaconv": `sum_m |T1_m| |T2_m|` QAConv pair scores (billions on IJB-C, whose video templates
    hold hundreds of frames), each moving two float16 maps to the device (2 x 49 KB at 7x7x512) and
    costing about h w h w c multiply-adds (one similarity matrix serves both directions); and
    `F x h x w x c` float16 maps in host memory (23.5 GB on IJB-C). Off by default (`eval.ijb_qaconv`).

    Args:
        model: the restored model.
        meta: the set's metadata.
        weights: fusion weights ("adaface", "qaconv").
        batch_size: faces per extraction call.
        qaconv: compute "qaconv" and "fused" (ignored, with a warning, without QAConv in the model).
        qaconv_chunk: image pairs per QAConv call (all calls are padded to this size: one compilation).

    Returns:
        name -> `[M]` float64 scores of `meta.pairs`.
    """
    if qaconv and not model.has_qaconv:
        logging.warning("eval.ijb_qaconv: the checkpoint has no QAConv (a converted AdaFace backbone?); "
                        "AdaFace scores only")
        qaconv = False
    feats, maps, occlusion = ijb_face_features(model, meta, batch_size, keep_maps=qaconv)
    template_ids, template_feats = template_features(feats, meta.templates, meta.medias, meta.detector_scores)
    scores = {"adaface": verify_templates(template_ids, template_feats, meta.pairs).astype(np.float64)}
    if not qaconv:
        return scores

    def score_fn(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
        n = idx_a.size
        idx_a, idx_b = (np.pad(idx, (0, qaconv_chunk - n)) for idx in (idx_a, idx_b))
        values = model.qaconv_pair_scores(maps[idx_a], maps[idx_b], occlusion[idx_a], occlusion[idx_b],
                                          chunk_size=min(qaconv_chunk, _QACONV_INNER_CHUNK))
        return values[:n]

    scores["qaconv"] = template_pair_scores_from_pairwise(meta.templates, meta.pairs, score_fn, chunk=qaconv_chunk)
    scores["fused"] = fusion.fuse(scores, weights, fusion.FusionStats.fit(scores))
    return scores


@dataclasses.dataclass(frozen=True)
class IJBResult:
    """One IJB set: `scores` method -> `[M]`, `labels` `[M]` bool, `tar` method -> far -> TAR."""

    scores: dict[str, np.ndarray]
    labels: np.ndarray
    tar: dict[str, dict[float, float]]


_METHODS = (("AdaFace", "adaface"), ("QAConv", "qaconv"), ("fused", "fused"))


def _ijb_table(results: Mapping[str, IJBResult]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, result in results.items():
        for label, key in _METHODS:
            if key in result.tar:
                rows[f"{name} {label}"] = {f"{far:.0e}": 100.0 * tar for far, tar in result.tar[key].items()}
    return rows


class IJBEvaluator(base.Evaluator):
    """Type "ijb": IJB-B/C 1:1 verification of every set found under a root, for any `FaceModel`.

    Settings (each defaults to the `eval.ijb_*` field of the same name): `root` ("" = off), `names`,
    `qaconv`, `batch_size`, `qaconv_chunk`. Never run by train-time validation (too slow).
    """

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        """Checks the settings, finds the sets and reads (so checks) their meta files.

        Settings:
            root: `eval.ijb_root` (insightface's `IJB_release` folder or one set's folder; any epath).
            names: sets to look for (`IJB_NAMES`); missing ones are warned about and skipped.
            qaconv: also QAConv and fused template scores (see `ijb_scores` for the cost).
            batch_size: faces aligned and extracted per call (rounded up to the model's batch size);
                0 = the model's batch size.
            qaconv_chunk: image pairs per QAConv call.

        Raises:
            FileNotFoundError: none of the sets is under `root`.
            ValueError: a bad setting or a malformed meta file (naming file and line).
        """
        super().__init__(name, settings, common)
        field = lambda key: settings.get(key, common.eval_config.get(f"ijb_{key}"))
        root, names = field("root"), tuple(field("names"))
        unknown = [n for n in names if n.lower() not in IJB_NAMES]
        if unknown:
            raise ValueError(f"eval.ijb_names: unknown {unknown}; expected names from {IJB_NAMES}")
        self.qaconv = bool(field("qaconv"))
        self.batch_size, self.qaconv_chunk = field("batch_size"), field("qaconv_chunk")
        if self.batch_size < 0:
            raise ValueError(f"eval.ijb_batch_size={self.batch_size}: expected >= 0 (0 = eval.batch_size)")
        if self.qaconv_chunk < 1:
            raise ValueError(f"eval.ijb_qaconv_chunk={self.qaconv_chunk}: expected >= 1")
        self.metas = {}
        if not root or common.training:
            return
        root = user_path(root, "eval.ijb_root")
        for set_name in (n.lower() for n in names):
            folder = ijb_folder(root, set_name)
            if folder is None:
                logging.warning("IJB set %s not found under eval.ijb_root=%s; skipped", set_name, root)
                continue
            meta = self.metas[set_name] = read_ijb_meta(folder, set_name)
            logging.info("%s: %d faces, %d templates, %d template pairs", set_name, meta.image_names.size,
                         np.unique(meta.templates).size, meta.labels.size)
        if not self.metas:
            raise FileNotFoundError(f"eval.ijb_root={root}: no meta/<name>_face_tid_mid.txt for any of "
                                    f"eval.ijb_names={names} (looked in <root>/<NAME>, <root>/<name>, <root>)")

    @property
    def empty(self) -> bool:
        return not self.metas

    def evaluate(self, model: FaceModel) -> dict[str, IJBResult]:
        """name -> `IJBResult` for every set found."""
        batch_size = extraction_batch(model, self.batch_size)
        results = {}
        for name, meta in self.metas.items():
            scores = ijb_scores(model, meta, self.common.fusion_weights, batch_size=batch_size, qaconv=self.qaconv,
                                qaconv_chunk=self.qaconv_chunk)
            results[name] = IJBResult(scores=scores, labels=meta.labels,
                                      tar={method: ijb_tar_table(values, meta.labels)
                                           for method, values in scores.items()})
        return results

    def scalars(self, result: Mapping[str, IJBResult]) -> dict[str, float]:
        """"<set>/<method>/tar@<far>" for every set, method and FAR of `IJB_FARS`."""
        return {f"{name}/{method}/tar@{far:.0e}": tar for name, r in result.items()
                for method, tars in r.tar.items() for far, tar in tars.items()}

    def tables(self, result: Mapping[str, IJBResult]) -> list[base.Table]:
        return [base.Table("TAR (%) at FAR", tuple(f"{far:.0e}" for far in IJB_FARS), _ijb_table(result))]

    def summary(self, result: Mapping[str, IJBResult]) -> dict[str, Any]:
        return {"ijb": {name: {method: dict(tars) for method, tars in r.tar.items()} for name, r in result.items()}}

    def write(self, result: Mapping[str, IJBResult], out_dir: epath.Path) -> dict[str, epath.Path]:
        """ijb_<set>.png: the ROC of each score."""
        from oaml_jax.evaluation import plots  # matplotlib: only where figures are written

        files = {}
        for name, r in result.items():
            curves = {label: verification.roc_curve(r.scores[key], r.labels)[:2]
                      for label, key in _METHODS if key in r.scores}
            files[f"ijb_{name}"] = plots.plot_roc(curves, out_dir / f"ijb_{name}.png", title=f"{name.upper()} 1:1")
        return files
