"""Verification on insightface's `.bin` pair sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW), clean and occluded.

For each set and each variant ("clean", or an occlusion kind applied to the SECOND image of every pair
with `occlude_deterministic(image, kind, seed=pair_index)`):
- AdaFace: cosine of flip-fused embeddings;
- QAConv: occlusion-weighted QAConv of the pair's feature maps, mean of both directions (eval-mode BN);
- fused: `w_ada z(ada) + w_qa z(qa)`, the z-normalization fitted on the training folds only.
Each gets 10-fold accuracy, TAR at FAR 1e-3 and AUC. The fused TAR/AUC are computed on out-of-fold fused
scores (each fold fused with the statistics of the other nine folds), so no statistic sees its own pairs.
Checkpoints without QAConv (converted AdaFace backbones) get the AdaFace columns only.

`PairSetEvaluator` runs the protocol; train-time validation (clean pairs) and eval.py (every variant)
share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import numpy as np
from absl import logging
from etils import epath

from data_pipelines import bin_pairs
from data_pipelines.occlusion import KINDS, occlude_deterministic
from oaml_jax.evaluation import fusion, verification
from oaml_jax.serving import FaceModel

METHODS = (("AdaFace", "adaface"), ("QAConv", "qaconv"), ("fused", "fused"))
METRICS = (("acc", "accuracy"), ("TAR@1e-3", "tar"), ("AUC", "auc"))
TABLE_FAR = 1e-3
COLUMNS = tuple(f"{label} {metric}" for label, _ in METHODS for metric, _ in METRICS)
N_FOLDS = 10


def check_variants(variants: Sequence[str]) -> tuple[str, ...]:
    """`eval.occlusion_variants`: "clean" or kinds of `data_pipelines.occlusion.KINDS`.

    Raises:
        ValueError: an unknown variant.
    """
    variants = tuple(variants)
    unknown = [v for v in variants if v != "clean" and v not in KINDS]
    if unknown:
        raise ValueError(f"eval.occlusion_variants: unknown {unknown}; expected 'clean' or one of {KINDS}")
    return variants


@dataclasses.dataclass(frozen=True)
class PairSet:
    """A loaded pair set: uint8 `images` `[2N, 112, 112, 3]` (pairs (2i, 2i+1)), bool `issame` `[N]`."""

    name: str
    path: epath.Path
    images: np.ndarray
    issame: np.ndarray


def load_pair_sets(folder: epath.PathLike, names: Sequence[str], field: str) -> dict[str, PairSet]:
    """Loads `<folder>/<name>.bin` for every name present (missing ones are warned about and skipped).

    Args:
        folder: where the sets are (local or any epath URI).
        names: set names, e.g. ("lfw", "cfp_fp").
        field: the config field `folder` came from, named in messages.

    Raises:
        ValueError: a set has fewer pairs than the 10 folds of the protocol, or is malformed (naming the file).
    """
    found = bin_pairs.find_bin_sets(folder, tuple(names))
    missing = [n for n in names if n not in found]
    if missing:
        logging.warning("pair sets %s not found in %s=%s; skipped", missing, field, folder)
    sets = {}
    for name, path in found.items():
        images, issame = bin_pairs.load_bin(path)
        if issame.size < N_FOLDS:
            raise ValueError(f"{path}: {issame.size} pairs cannot be split into the {N_FOLDS} folds of the "
                             f"verification protocol (need at least {N_FOLDS})")
        sets[name] = PairSet(name=name, path=epath.Path(path), images=images, issame=issame)
    return sets


def occluded_pairs(images: np.ndarray, kind: str, grid: int = 7) -> np.ndarray:
    """The occluded protocol: a copy of the pair images with the second image of pair i occluded.

    Args:
        images: uint8 `[2N, 112, 112, 3]` RGB, pairs at (2i, 2i+1).
        kind: an occlusion kind of `data_pipelines.occlusion.KINDS`.
        grid: visibility-map side passed to `occlude_deterministic` (the map itself is not used).

    Returns:
        uint8 `[2N, 112, 112, 3]`: image 2i unchanged, image 2i+1 = occlude_deterministic(image 2i+1,
        kind, seed=i).
    """
    out = np.array(images, copy=True)
    for i in range(out.shape[0] // 2):
        out[2 * i + 1] = occlude_deterministic(images[2 * i + 1], kind, seed=i, grid=grid)[0]
    return out


def variant_images(images: np.ndarray, variant: str, grid: int = 7) -> np.ndarray:
    """The images the protocol scores for `variant`: `images` for "clean", else `occluded_pairs`."""
    return images if variant == "clean" else occluded_pairs(images, variant, grid)


def pair_scores(model: FaceModel, images: np.ndarray) -> tuple[dict[str, np.ndarray], Optional[np.ndarray]]:
    """AdaFace (and QAConv when the model has it) scores of the pairs (2i, 2i+1).

    Returns:
        ({"adaface": [N], "qaconv"?: [N]} float64, occlusion maps [2N, h, w] or None).
    """
    features = model.extract(images, pair_scores=model.has_qaconv)
    scores = {"adaface": verification.cosine_pair_scores(features.embeddings)}
    if model.has_qaconv:
        scores["qaconv"] = features.pair_qaconv.astype(np.float64)
    return scores, features.occlusion


def score_metrics(scores: Mapping[str, np.ndarray], issame: np.ndarray,
                  weights: Mapping[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """10-fold accuracy, TAR@FAR=1e-3 and AUC of each score and of their fusion.

    Args:
        scores: name -> `[N]` pair scores ("adaface", optionally "qaconv").
        issame: `[N]` bool.
        weights: fusion weights; fusion happens only when every weighted score is present.

    Returns:
        (method -> {"accuracy", "std", "tar", "auc"} (fractions), method -> `[N]` scores used for ROC:
        for "fused" the out-of-fold fused scores).
    """
    results, roc_scores = {}, dict(scores)
    for name, values in scores.items():
        results[name] = _metrics(verification.ten_fold_accuracy(values, issame, N_FOLDS), values, issame)
    if all(name in scores for name in weights):
        fused = fusion.ten_fold_fused_accuracy(scores, issame, weights, N_FOLDS)
        out_of_fold = np.empty(issame.size)
        for test_idx, stats in zip(verification.fold_indices(issame.size, N_FOLDS), fused["stats"]):
            out_of_fold[test_idx] = fusion.fuse({k: v[test_idx] for k, v in scores.items()}, weights, stats)
        results["fused"] = _metrics(fused, out_of_fold, issame)
        roc_scores["fused"] = out_of_fold
    return results, roc_scores


def _metrics(ten_fold: dict, values: np.ndarray, issame: np.ndarray) -> dict[str, float]:
    return {"accuracy": ten_fold["accuracy"], "std": ten_fold["std"],
            "tar": verification.tar_at_far(values, issame, [TABLE_FAR])[TABLE_FAR],
            "auc": verification.roc_auc(values, issame)}


def table_row(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Method metrics -> the table's cells in percent (missing methods are left out and show "-")."""
    row = {}
    for label, name in METHODS:
        if name in results:
            for metric, key in METRICS:
                row[f"{label} {metric}"] = 100.0 * results[name][key]
    return row


@dataclasses.dataclass(frozen=True)
class PairResult:
    """One set x variant.

    Attributes:
        metrics: method -> {"accuracy", "std", "tar", "auc"} (fractions).
        scores: raw pair scores, name -> `[N]` float64 ("adaface", "qaconv"?).
        roc_scores: the scores the ROC uses, method -> `[N]` (out-of-fold for "fused").
        occlusion: `[2N, h, w]` predicted visibility of the evaluated images, or None.
    """

    metrics: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]
    roc_scores: dict[str, np.ndarray]
    occlusion: Optional[np.ndarray]


class PairSetEvaluator:
    """The `.bin` verification protocol over loaded sets, for any `FaceModel`."""

    def __init__(self, sets: Mapping[str, PairSet], variants: Sequence[str] = ("clean",),
                 fusion_weights: Mapping[str, float] = fusion.DEFAULT_WEIGHTS):
        """Args:
            sets: name -> loaded set (`load_pair_sets`).
            variants: "clean" and/or occlusion kinds (see `check_variants`).
            fusion_weights: weights of the fused score.
        """
        self.sets = dict(sets)
        self.variants = check_variants(variants)
        self.fusion_weights = dict(fusion_weights)

    def evaluate(self, model: FaceModel) -> dict[tuple[str, str], PairResult]:
        """(set, variant) -> `PairResult`, in set then variant order."""
        results = {}
        for name, pair_set in self.sets.items():
            for variant in self.variants:
                images = variant_images(pair_set.images, variant, model.contract.grid)
                scores, occlusion = pair_scores(model, images)
                metrics, roc_scores = score_metrics(scores, pair_set.issame, self.fusion_weights)
                results[(name, variant)] = PairResult(metrics, scores, roc_scores, occlusion)
                logging.info("%s %s: %s", name, variant, {k: round(v["accuracy"], 4) for k, v in metrics.items()})
        return results

    def run(self, model: FaceModel) -> Iterator[tuple[str, float]]:
        """Yields ("<set>/<variant>/<method>_<metric>", value) for every result of `evaluate`."""
        for (name, variant), result in self.evaluate(model).items():
            for method, values in result.metrics.items():
                for metric, value in values.items():
                    yield f"{name}/{variant}/{method}_{metric}", value
