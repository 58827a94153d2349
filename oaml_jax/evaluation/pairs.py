"""Verification on pair sets (insightface's `.bin` files, LFW-format pairs files), clean and occluded.

For each set and each variant (`check_variants`):
- "clean": the pairs as they are;
- a kind of `data_pipelines.occlusion.KINDS` ("mask", ...): the SECOND image of pair i occluded with
  `occlude_deterministic(image, kind, seed=i)`;
- "both_<kind>": that, and the first image occluded with the same kind, an independent draw (seed N + i);
- "cross": first image a mask (seed N + i), second sunglasses (seed i).
Scores:
- AdaFace: cosine of flip-fused embeddings;
- QAConv: occlusion-weighted QAConv of the pair's feature maps, mean of both directions (eval-mode BN);
- fused: `w_ada z(ada) + w_qa z(qa)`, the z-normalization fitted on the training folds only;
- gated: OAML's visibility-gated score, z(qa) when the pair's mean predicted visibility is below the gate,
  else z(ada); statistics and gate fitted on the training folds (`fusion.ten_fold_gated_accuracy`).
Each gets 10-fold accuracy (the set's own folds), TAR at FAR 1e-3 and AUC. The fused and gated TAR/AUC are
computed on out-of-fold scores (each fold scored with what the other folds fitted), so nothing sees its own
pairs. Checkpoints without QAConv (converted AdaFace backbones) get the AdaFace columns only.

`PairSetEvaluator` runs the protocol on loaded sets; `BinPairsEvaluator` (type "bin_pairs") loads the
`.bin` sets, `pairs_file.PairsFileEvaluator` (type "pairs_file") an LFW-format pairs file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from absl import logging
from etils import epath

from data_pipelines import bin_pairs
from data_pipelines.occlusion import KINDS, occlude_deterministic
from oaml_jax.evaluation import base, fusion, verification
from oaml_jax.paths import user_path
from oaml_jax.serving import FaceModel

METHODS = (("AdaFace", "adaface"), ("QAConv", "qaconv"), ("fused", "fused"), ("gated", "gated"))
METRICS = (("acc", "accuracy"), ("TAR@1e-3", "tar"), ("AUC", "auc"))
TABLE_FAR = 1e-3
COLUMNS = tuple(f"{label} {metric}" for label, _ in METHODS for metric, _ in METRICS)
CORNER = "set variant (%)"
N_FOLDS = 10
VARIANTS = ("clean", *KINDS, *(f"both_{kind}" for kind in KINDS), "cross")
_GRID_FACES = 8


def check_variants(variants: Sequence[str]) -> tuple[str, ...]:
    """`eval.occlusion_variants`: names of `VARIANTS` ("clean", a kind, "both_<kind>", "cross").

    Raises:
        ValueError: an unknown variant.
    """
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"eval.occlusion_variants: unknown {unknown}; expected 'clean', a kind of {KINDS}, "
                         "'both_<kind>' or 'cross'")
    return variants


@dataclasses.dataclass(frozen=True)
class PairSet:
    """A loaded pair set: uint8 `images` `[2N, 112, 112, 3]` (pairs (2i, 2i+1)), bool `issame` `[N]`.

    `n_folds` contiguous folds of the pairs make the 10-fold protocol (a pairs file's own fold count).
    """

    name: str
    path: epath.Path
    images: np.ndarray
    issame: np.ndarray
    n_folds: int = N_FOLDS


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


def occluded_pairs(images: np.ndarray, variant: str, grid: int = 7) -> np.ndarray:
    """A copy of the pair images with `variant`'s occlusions (see the module docstring for the draws).

    Args:
        images: uint8 `[2N, 112, 112, 3]` RGB, pairs at (2i, 2i+1).
        variant: a variant of `VARIANTS` other than "clean".
        grid: visibility-map side passed to `occlude_deterministic` (the map itself is not used).

    Returns:
        uint8 `[2N, 112, 112, 3]`: image 2i+1 occluded with seed i; image 2i unchanged for a single kind,
        occluded with seed N + i for "both_<kind>" (same kind) and "cross" (a mask; the second gets sunglasses).
    """
    check_variants([variant])
    out = np.array(images, copy=True)
    n = out.shape[0] // 2
    if variant == "cross":
        first, second = "mask", "sunglasses"
    elif variant.startswith("both_"):
        first = second = variant[len("both_"):]
    else:
        first, second = None, variant
    for i in range(n):
        out[2 * i + 1] = occlude_deterministic(images[2 * i + 1], second, seed=i, grid=grid)[0]
        if first is not None:
            out[2 * i] = occlude_deterministic(images[2 * i], first, seed=n + i, grid=grid)[0]
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


def pair_visibility(occlusion: np.ndarray) -> np.ndarray:
    """`[2N, h, w]` visibility maps -> `[N]` float64 mean visibility of each pair's two faces."""
    per_face = np.asarray(occlusion, dtype=np.float64).reshape(occlusion.shape[0], -1).mean(axis=1)
    return 0.5 * (per_face[0::2] + per_face[1::2])


def score_metrics(scores: Mapping[str, np.ndarray], issame: np.ndarray, weights: Mapping[str, float],
                  visibility: Optional[np.ndarray] = None, n_folds: int = N_FOLDS
                  ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """10-fold accuracy, TAR@FAR=1e-3 and AUC of each score, of their fusion and of the gated score.

    Args:
        scores: name -> `[N]` pair scores ("adaface", optionally "qaconv").
        issame: `[N]` bool.
        weights: fusion weights; fusion happens only when every weighted score is present.
        visibility: `[N]` mean predicted visibility of each pair (`pair_visibility`); with both scores it
            adds the gated score.
        n_folds: contiguous folds of the protocol.

    Returns:
        (method -> {"accuracy", "std", "tar", "auc"} (fractions; "gated" adds "gate", the mean fitted gate),
        method -> `[N]` scores used for ROC: for "fused" and "gated" the out-of-fold scores).
    """
    results, roc_scores = {}, dict(scores)
    for name, values in scores.items():
        results[name] = _metrics(verification.ten_fold_accuracy(values, issame, n_folds), values, issame)
    if all(name in scores for name in weights):
        fused = fusion.ten_fold_fused_accuracy(scores, issame, weights, n_folds)
        out_of_fold = np.empty(issame.size)
        for test_idx, stats in zip(verification.fold_indices(issame.size, n_folds), fused["stats"]):
            out_of_fold[test_idx] = fusion.fuse({k: v[test_idx] for k, v in scores.items()}, weights, stats)
        results["fused"] = _metrics(fused, out_of_fold, issame)
        roc_scores["fused"] = out_of_fold
    if visibility is not None and all(name in scores for name in fusion.SCORE_NAMES):
        gated = fusion.ten_fold_gated_accuracy(scores, visibility, issame, n_folds)
        results["gated"] = dict(_metrics(gated, gated["scores"], issame), gate=float(np.mean(gated["gates"])))
        roc_scores["gated"] = gated["scores"]
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
        roc_scores: the scores the ROC uses, method -> `[N]` (out-of-fold for "fused" and "gated").
        occlusion: `[2N, h, w]` predicted visibility of the evaluated images, or None.
    """

    metrics: dict[str, dict[str, float]]
    scores: dict[str, np.ndarray]
    roc_scores: dict[str, np.ndarray]
    occlusion: Optional[np.ndarray]


class PairSetEvaluator(base.Evaluator):
    """The pair verification protocol over loaded sets (`self.sets`), for any `FaceModel`.

    Subclasses load the sets in `__init__`; `grid_name` names the occlusion grid figure.
    """

    grid_name = "occlusion_grid"

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common,
                 sets: Optional[Mapping[str, PairSet]] = None):
        super().__init__(name, settings, common)
        self.sets = dict(sets or {})
        # Its own `variants` setting, else eval.occlusion_variants (checked once, in `common`).
        own = settings.get("variants")
        self.variants = ("clean",) if common.training else check_variants(own) if own else common.variants

    @property
    def empty(self) -> bool:
        return not self.sets

    def evaluate(self, model: FaceModel) -> dict[tuple[str, str], PairResult]:
        """(set, variant) -> `PairResult`, in set then variant order."""
        results = {}
        for name, pair_set in self.sets.items():
            for variant in self.variants:
                images = variant_images(pair_set.images, variant, model.contract.grid)
                scores, occlusion = pair_scores(model, images)
                visibility = pair_visibility(occlusion) if occlusion is not None else None
                metrics, roc_scores = score_metrics(scores, pair_set.issame, self.common.fusion_weights,
                                                    visibility, pair_set.n_folds)
                results[(name, variant)] = PairResult(metrics, scores, roc_scores, occlusion)
        return results

    def scalars(self, result: Mapping[tuple[str, str], PairResult]) -> dict[str, float]:
        """"<set>/<variant>/<method>_<metric>" for every result."""
        return {f"{name}/{variant}/{method}_{metric}": value for (name, variant), r in result.items()
                for method, values in r.metrics.items() for metric, value in values.items()}

    def best_metric(self, scalars: Mapping[str, float]) -> Optional[float]:
        """The mean clean AdaFace 10-fold accuracy over the sets."""
        return float(np.mean([scalars[f"{name}/clean/adaface_accuracy"] for name in self.sets]))

    def tables(self, result: Mapping[tuple[str, str], PairResult]) -> list[base.Table]:
        rows = {f"{name} {variant}": table_row(r.metrics) for (name, variant), r in result.items()}
        return [base.Table(CORNER, COLUMNS, rows)] if rows else []

    def summary(self, result: Mapping[tuple[str, str], PairResult]) -> dict[str, Any]:
        metrics: dict[str, dict[str, Any]] = {}
        for (name, variant), r in result.items():
            metrics.setdefault(name, {})[variant] = r.metrics
        return {"rows": {f"{n} {v}": table_row(r.metrics) for (n, v), r in result.items()}, "metrics": metrics}

    def calibration_pairs(self, result: Mapping[tuple[str, str], PairResult]
                          ) -> list[tuple[str, dict[str, np.ndarray], np.ndarray]]:
        return [(name, r.scores, self.sets[name].issame) for (name, variant), r in result.items()
                if variant == "clean"]

    def write(self, result: Mapping[tuple[str, str], PairResult], out_dir: epath.Path) -> dict[str, epath.Path]:
        """roc_<set>_<variant>.png for every result, and the occlusion grid of the first set's variants."""
        from oaml_jax.evaluation import plots  # matplotlib: only where figures are written

        files = {}
        grid_faces, grid_maps, grid_titles = [], [], []
        first_set = next(iter(self.sets), None)
        for (name, variant), r in result.items():
            issame = self.sets[name].issame
            curves = {label: verification.roc_curve(r.roc_scores[key], issame)[:2]
                      for label, key in METHODS if key in r.roc_scores}
            files[f"roc_{name}_{variant}"] = plots.plot_roc(curves, out_dir / f"roc_{name}_{variant}.png",
                                                            title=f"{name} {variant}")
            if r.occlusion is not None and name == first_set:
                count = min(_GRID_FACES, r.occlusion.shape[0] // 2)
                shown = variant_images(self.sets[name].images[:2 * count], variant, r.occlusion.shape[1])
                grid_faces.append(shown[1::2])
                grid_maps.append(r.occlusion[1:2 * count:2])
                grid_titles += [f"{variant} {m.mean():.2f}" for m in r.occlusion[1:2 * count:2]]
        if grid_faces:
            files[self.grid_name] = plots.plot_occlusion_grid(
                np.concatenate(grid_faces), np.concatenate(grid_maps), out_dir / f"{self.grid_name}.png",
                titles=grid_titles)
        return files


def pair_sets_folder(config_eval: Mapping[str, Any], common: base.Common) -> tuple[str, str]:
    """(field, folder) of the `.bin` sets: `eval.data_dir`, or `data.path` when that is empty."""
    if config_eval["data_dir"]:
        return "eval.data_dir", config_eval["data_dir"]
    return "data.path", common.data_path


class BinPairsEvaluator(PairSetEvaluator):
    """Type "bin_pairs": insightface's `.bin` sets `<folder>/<name>.bin`.

    Settings: `names` (default `eval.bin_names`), `folder` (default `eval.data_dir`, else `data.path`),
    `variants` (default `eval.occlusion_variants`), `validation`.
    """

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        config_eval = common.eval_config
        names = tuple(settings.get("names") or config_eval["bin_names"])
        if not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise ValueError(f"eval.bin_names={names}: expected set names such as 'lfw' (files <name>.bin)")
        if settings.get("folder"):
            field, folder = f"eval.evaluators.{name}.folder", settings["folder"]
        else:
            field, folder = pair_sets_folder(config_eval, common)
        self.field, self.folder, self.names = field, folder, names
        sets = load_pair_sets(user_path(folder, field), names, field) if names else {}
        super().__init__(name, settings, common, sets)
