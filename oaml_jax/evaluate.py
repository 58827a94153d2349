"""Evaluation of a checkpoint: verification on the `.bin` pair sets (clean and synthetically occluded) and
IJB-B/C, with AdaFace, QAConv and fused scores.

For each set in `config.eval.bin_names` found in `config.eval.data_dir` (default `config.data.path`) and
each variant of `config.eval.occlusion_variants` ("clean", or an occlusion kind applied to the SECOND
image of every pair with `occlude_deterministic(image, kind, seed=pair_index)`):
- AdaFace: cosine of flip-fused embeddings;
- QAConv: occlusion-weighted QAConv of the pair's feature maps, mean of both directions (eval-mode BN);
- fused: `w_ada z(ada) + w_qa z(qa)`, the z-normalization fitted on the training folds only.
Each gets 10-fold accuracy, TAR at FAR 1e-3 and AUC. The fused TAR/AUC are computed on out-of-fold fused
scores (each fold fused with the statistics of the other nine folds), so no statistic sees its own pairs.
Converted AdaFace checkpoints (no QAConv/occlusion variables) get the AdaFace columns only ("-").

IJB-B/C 1:1 verification (`config.eval.ijb_root` set; see `ijb_settings` for the fields) runs on every
set of `eval.ijb_names` found there: TAR at FAR 1e-6..1e-1 of AdaFace template scores and, with
`eval.ijb_qaconv` (off by default: billions of image pairs on IJB-C, see `ijb_scores`), of QAConv and
fused template scores.

Outputs under `<workdir>/eval/`: results.txt (the table), results.json, roc_<set>_<variant>.png,
occlusion_grid.png, fusion_stats.json (statistics over all clean pairs, used by `oaml_jax.inference`),
ijb_<name>.png, and TensorBoard summaries (process 0; `config.eval.tensorboard = False` skips them and
the tensorflow import).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import bin_pairs
from data_pipelines.occlusion import KINDS, occlude_deterministic
from oaml_jax import ijb, plots, verification
from oaml_jax.inference import FaceModel, fusion_stats_to_json, FUSION_STATS_FILE, SCORE_NAMES
from oaml_jax.models.qaconv import qaconv_pair_scores

METHODS = (("AdaFace", "adaface"), ("QAConv", "qaconv"), ("fused", "fused"))
METRICS = (("acc", "accuracy"), ("TAR@1e-3", "tar"), ("AUC", "auc"))
TABLE_FAR = 1e-3
COLUMNS = tuple(f"{label} {metric}" for label, _ in METHODS for metric, _ in METRICS)
_GRID_FACES = 8
# Image pairs per QAConv call on IJB: two float16 maps each on the host gather (411 MB at 7x7x512) and
# float32 on the device.
IJB_QACONV_CHUNK = 4096
# Pairs matched at once inside one QAConv call: bounds the [n, hw, hw] similarity temporaries.
_QACONV_INNER_CHUNK = 1024


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


def fusion_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """`config.eval.fusion_weights` (w_adaface, w_qaconv) as a name -> weight dict."""
    weights = tuple(config.eval.fusion_weights)
    if len(weights) != len(SCORE_NAMES):
        raise ValueError(f"eval.fusion_weights={weights}: expected {len(SCORE_NAMES)} weights for {SCORE_NAMES}")
    return dict(zip(SCORE_NAMES, (float(w) for w in weights)))


def pair_scores(model: FaceModel, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
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
        results[name] = _metrics(verification.ten_fold_accuracy(values, issame), values, issame)
    if all(name in scores for name in weights):
        fused = verification.ten_fold_fused_accuracy(scores, issame, weights)
        out_of_fold = np.empty(issame.size)
        for test_idx, stats in zip(verification.fold_indices(issame.size), fused["stats"]):
            out_of_fold[test_idx] = verification.fuse({k: v[test_idx] for k, v in scores.items()}, weights, stats)
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


def _bin_sets(config: ml_collections.ConfigDict) -> dict[str, str]:
    folder = config.eval.get("data_dir", "") or config.data.path
    names = tuple(config.eval.bin_names)
    found = bin_pairs.find_bin_sets(folder, names)
    missing = [n for n in names if n not in found]
    if missing:
        logging.warning("eval sets %s not found in %s (eval.data_dir / data.path); skipped", missing, folder)
    return found


def _variants(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    variants = tuple(config.eval.occlusion_variants)
    unknown = [v for v in variants if v != "clean" and v not in KINDS]
    if unknown:
        raise ValueError(f"eval.occlusion_variants: unknown {unknown}; expected 'clean' or one of {KINDS}")
    return variants


def ijb_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The IJB fields of `config.eval`, read with `.get` so configs without them still evaluate.

    Fields (defaults): `ijb_root` ("" = no IJB evaluation), `ijb_names` (`ijb.IJB_NAMES`),
    `ijb_qaconv` (False), `ijb_batch_size` (faces aligned and extracted per call, rounded up to a multiple
    of `eval.batch_size`; 0 = `eval.batch_size`), `ijb_qaconv_chunk` (image pairs per QAConv call, 4096).

    Returns:
        dict with keys "root", "names", "qaconv", "batch_size", "qaconv_chunk" and "folders" (name ->
        dataset folder of each set found, see `ijb_folder`; sets not found are skipped with a warning, and
        a root holding none of them raises FileNotFoundError).
    """
    settings = {"root": str(config.eval.get("ijb_root", "") or ""),
                "names": tuple(str(n).lower() for n in config.eval.get("ijb_names", ijb.IJB_NAMES)),
                "qaconv": bool(config.eval.get("ijb_qaconv", False)),
                "batch_size": int(config.eval.get("ijb_batch_size", 0) or 0),
                "qaconv_chunk": int(config.eval.get("ijb_qaconv_chunk", IJB_QACONV_CHUNK))}
    unknown = [n for n in settings["names"] if n not in ijb.IJB_NAMES]
    if unknown:
        raise ValueError(f"eval.ijb_names: unknown {unknown}; expected names from {ijb.IJB_NAMES}")
    if settings["batch_size"] < 0:
        raise ValueError(f"eval.ijb_batch_size={settings['batch_size']}: expected >= 0 (0 = eval.batch_size)")
    if settings["qaconv_chunk"] < 1:
        raise ValueError(f"eval.ijb_qaconv_chunk={settings['qaconv_chunk']}: expected >= 1")
    settings["folders"] = {}
    if not settings["root"]:
        return settings
    for name in settings["names"]:
        folder = ijb_folder(settings["root"], name)
        if folder is None:
            logging.warning("IJB set %s not found under eval.ijb_root=%s; skipped", name, settings["root"])
        else:
            settings["folders"][name] = folder
    if not settings["folders"]:
        raise FileNotFoundError(f"eval.ijb_root={settings['root']}: no meta/<name>_face_tid_mid.txt for any of "
                                f"eval.ijb_names={settings['names']} (looked in <root>/<NAME>, <root>/<name>, "
                                f"<root>)")
    return settings


def ijb_folder(root: str, name: str) -> Optional[str]:
    """The folder of IJB set `name` under `eval.ijb_root`, or None when it is not there.

    Accepts insightface's `IJB_release` layout (`<root>/IJBB`, `<root>/IJBC`, each with `meta/` and
    `loose_crop/`) and a root that is itself one set's folder.
    """
    for folder in (os.path.join(root, name.upper()), os.path.join(root, name), root):
        if os.path.isfile(os.path.join(folder, "meta", f"{name}_face_tid_mid.txt")):
            return folder
    return None


def ijb_face_features(model: FaceModel, meta: ijb.IJBMeta, batch_size: int, keep_maps: bool
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
    for batch in ijb.iter_aligned_batches(meta.root, meta, batch_size):
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


def ijb_scores(model: FaceModel, meta: ijb.IJBMeta, weights: Mapping[str, float], *, batch_size: int,
               qaconv: bool, qaconv_chunk: int = IJB_QACONV_CHUNK) -> dict[str, np.ndarray]:
    """Template-pair scores of one IJB set (1:1 verification).

    - "adaface": face features `(e n + e_flip n_flip) / 2` (flip-fused, norm-weighted) scaled by the
      detector score, averaged per media, summed per template, L2-normalized; cosine of the two templates
      (insightface's best IJB setting, `ijb.template_features`).
    - "qaconv" (when `qaconv` and the model has QAConv): mean over all image pairs (a in T1, b in T2) of
      the symmetric, occlusion-weighted QAConv pair score (`ijb.template_pair_scores_from_pairwise`), on
      the float16-stored maps computed in float32.
    - "fused" (with "qaconv"): `sum_k w_k (s_k - mean_k) / std_k`, the statistics fitted on all template
      pairs of the set (label-free, so no label reaches the fusion).

    Cost of "qaconv": `sum_m |T1_m| |T2_m|` QAConv pair scores (billions on IJB-C, whose video templates
    hold hundreds of frames), each moving two float16 maps to the device (2 x 49 KB at 7x7x512) and
    costing about h w h w c multiply-adds (one similarity matrix serves both directions); and `F x h x w x c` float16 maps in host memory (23.5 GB on
    IJB-C). Off by default (`eval.ijb_qaconv`).

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
    template_ids, template_feats = ijb.template_features(feats, meta.templates, meta.medias,
                                                         meta.detector_scores)
    scores = {"adaface": ijb.verify_templates(template_ids, template_feats, meta.pairs).astype(np.float64)}
    if not qaconv:
        return scores

    def score_fn(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
        n = idx_a.size
        idx_a, idx_b = (np.pad(idx, (0, qaconv_chunk - n)) for idx in (idx_a, idx_b))
        values = qaconv_pair_scores(model.qaconv_variables, maps[idx_a], maps[idx_b], occlusion[idx_a],
                                    occlusion[idx_b], chunk_size=min(qaconv_chunk, _QACONV_INNER_CHUNK),
                                    module=model.qaconv_module)
        return np.asarray(values)[:n]

    scores["qaconv"] = ijb.template_pair_scores_from_pairwise(meta.templates, meta.pairs, score_fn,
                                                              chunk=qaconv_chunk)
    scores["fused"] = verification.fuse(scores, weights, verification.FusionStats.fit(scores))
    return scores


def _ijb(model: FaceModel, settings: Mapping[str, Any], weights: Mapping[str, float], out_dir: str,
         write_files: bool) -> tuple[dict[str, dict[str, dict[float, float]]], dict[str, str]]:
    """IJB-B/C 1:1 verification of every set of `eval.ijb_names` found under `eval.ijb_root`.

    Args:
        model: the restored model.
        settings: `ijb_settings(config)`.
        weights: fusion weights.
        out_dir: where the ROC PNGs go.
        write_files: write the PNGs (process 0).

    Returns:
        (name -> method -> far -> tar at `ijb.IJB_FARS`, {"ijb_<name>": ROC PNG path} when `write_files`).
    """
    results, files = {}, {}
    multiple = model.batch_size
    batch_size = -(-(settings["batch_size"] or multiple) // multiple) * multiple
    for name, folder in settings["folders"].items():
        meta = ijb.read_ijb_meta(folder, name)
        logging.info("%s: %d faces, %d templates, %d template pairs", name, meta.image_names.size,
                     np.unique(meta.templates).size, meta.labels.size)
        scores = ijb_scores(model, meta, weights, batch_size=batch_size, qaconv=settings["qaconv"],
                            qaconv_chunk=settings["qaconv_chunk"])
        results[name] = {method: ijb.ijb_tar_table(values, meta.labels) for method, values in scores.items()}
        if write_files:
            curves = {label: verification.roc_curve(scores[key], meta.labels)[:2]
                      for label, key in METHODS if key in scores}
            files[f"ijb_{name}"] = plots.plot_roc(curves, os.path.join(out_dir, f"ijb_{name}.png"),
                                                  title=f"{name.upper()} 1:1")
    return results, files


def _ijb_table(results: Mapping[str, Mapping[str, Mapping[float, float]]]) -> str:
    rows = {}
    for name, methods in results.items():
        for label, key in METHODS:
            if key in methods:
                rows[f"{name} {label}"] = {f"{far:.0e}": 100.0 * tar for far, tar in methods[key].items()}
    columns = [f"{far:.0e}" for far in ijb.IJB_FARS]
    return verification.format_table(rows, columns, corner="TAR (%) at FAR")


def run(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None,
        checkpoint: Optional[str] = None) -> dict[str, Any]:
    """Evaluates the latest (or given) checkpoint of `workdir` (or the checkpoint at `checkpoint`).

    Args:
        config: the eval config (see configs/default.py: `eval`, `data.path`); the model architecture
            comes from the checkpoint's own config, missing fields from `config.model`.
        workdir: where the results go (`<workdir>/eval/`) and, without `checkpoint`, the training run
            whose checkpoint is evaluated.
        step: checkpoint step; None = the latest.
        checkpoint: a checkpoint directory (training `checkpoints/`, a converted AdaFace checkpoint, or
            one step's directory) to evaluate instead of the workdir's.

    Returns:
        dict with "step", "table" (the printed text), "rows" (row label -> column -> percent), "metrics"
        (set -> variant -> method -> metric fractions), "ijb" (name -> method -> far -> tar), "files"
        (written paths by name), "has_qaconv".
    """
    weights = fusion_weights(config)
    variants = _variants(config)
    ijb_config = ijb_settings(config)
    model = FaceModel.from_checkpoint(checkpoint or workdir, step, model_config=config.model,
                                      batch_size=config.eval.batch_size, fusion_weights=weights)
    out_dir = os.path.join(workdir, "eval")
    is_main = jax.process_index() == 0
    os.makedirs(out_dir, exist_ok=True)
    sets = _bin_sets(config)
    if not sets and not ijb_config["root"]:
        raise FileNotFoundError(f"no eval sets: none of eval.bin_names={tuple(config.eval.bin_names)} in "
                                f"{config.eval.get('data_dir', '') or config.data.path} and no eval.ijb_root")
    grid = model.feature_map_shape[0]
    rows, metrics, files = {}, {}, {}
    clean_scores: dict[str, list[np.ndarray]] = {}
    grid_faces, grid_maps, grid_titles = [], [], []
    for set_name, path in sets.items():
        images, issame = bin_pairs.load_bin(path)
        metrics[set_name] = {}
        for variant in variants:
            pair_images = images if variant == "clean" else occluded_pairs(images, variant, grid)
            scores, occlusion = pair_scores(model, pair_images)
            results, roc_scores = score_metrics(scores, issame, weights)
            metrics[set_name][variant] = results
            rows[f"{set_name} {variant}"] = table_row(results)
            logging.info("%s %s: %s", set_name, variant,
                         {k: round(v["accuracy"], 4) for k, v in results.items()})
            if variant == "clean":
                for name, values in scores.items():
                    clean_scores.setdefault(name, []).append(values)
            curves = {label: verification.roc_curve(roc_scores[key], issame)[:2]
                      for label, key in METHODS if key in roc_scores}
            if is_main:
                files[f"roc_{set_name}_{variant}"] = plots.plot_roc(
                    curves, os.path.join(out_dir, f"roc_{set_name}_{variant}.png"), title=f"{set_name} {variant}")
            if occlusion is not None and set_name == next(iter(sets)):
                count = min(_GRID_FACES, issame.size)
                grid_faces.append(pair_images[1:2 * count:2])
                grid_maps.append(occlusion[1:2 * count:2])
                grid_titles += [f"{variant} {m.mean():.2f}" for m in occlusion[1:2 * count:2]]

    table = verification.format_table(rows, COLUMNS, corner="set variant (%)") if rows else ""
    ijb_results, ijb_files = _ijb(model, ijb_config, weights, out_dir, is_main)
    files.update(ijb_files)
    text = "\n\n".join(t for t in (table, _ijb_table(ijb_results) if ijb_results else "") if t)
    if is_main:
        files["results_txt"] = os.path.join(out_dir, "results.txt")
        with open(files["results_txt"], "w", encoding="utf-8") as f:
            f.write(text + "\n")
        files["results_json"] = os.path.join(out_dir, "results.json")
        with open(files["results_json"], "w", encoding="utf-8") as f:
            json.dump({"step": model.step, "checkpoint": os.path.abspath(checkpoint or workdir),
                       "has_qaconv": model.has_qaconv, "rows": rows, "metrics": metrics,
                       "ijb": {n: {m: {str(far): t for far, t in v.items()} for m, v in r.items()}
                               for n, r in ijb_results.items()}}, f, indent=2)
        if model.has_qaconv and clean_scores:
            stats = verification.FusionStats.fit({k: np.concatenate(v) for k, v in clean_scores.items()})
            files["fusion_stats"] = os.path.join(workdir, FUSION_STATS_FILE)
            with open(files["fusion_stats"], "w", encoding="utf-8") as f:
                json.dump(fusion_stats_to_json(stats, model.step, list(sets)), f, indent=2)
        if grid_faces:
            files["occlusion_grid"] = plots.plot_occlusion_grid(
                np.concatenate(grid_faces), np.concatenate(grid_maps), os.path.join(out_dir, "occlusion_grid.png"),
                titles=grid_titles)
        if config.eval.get("tensorboard", True):
            _write_summaries(out_dir, model.step or 0, rows, ijb_results, files)
    return {"step": model.step, "table": text, "rows": rows, "metrics": metrics, "ijb": ijb_results,
            "files": files, "has_qaconv": model.has_qaconv}


def _write_summaries(out_dir: str, step: int, rows: Mapping[str, Mapping[str, float]],
                     ijb_results: Mapping[str, Any], files: Mapping[str, str]) -> None:
    """Scalars and figures to TensorBoard under `<workdir>/eval` (process 0 only)."""
    from clu import metric_writers  # imports tensorflow: only when summaries are written.
    import cv2

    writer = metric_writers.create_default_writer(out_dir, just_logging=jax.process_index() > 0)
    scalars = {f"eval/{row.replace(' ', '/')}/{column.replace(' ', '_')}": value
               for row, columns in rows.items() for column, value in columns.items()}
    for name, methods in ijb_results.items():
        for method, tars in methods.items():
            scalars.update({f"ijb/{name}/{method}/tar@{far:.0e}": 100.0 * tar for far, tar in tars.items()})
    writer.write_scalars(step, scalars)
    images = {}
    for name, path in files.items():
        if path.endswith(".png"):
            images[name] = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)[None]
    if images:
        writer.write_images(step, images)
    writer.flush()
    writer.close()
