"""eval.py's library: evaluate a checkpoint on the `.bin` pair sets (clean and occluded) and IJB-B/C.

    result = run(config, workdir)             # the latest checkpoint of a training workdir
    result = run(config, out_dir, checkpoint=converted_dir, step=0)

The model comes from the checkpoint itself (`checkpoint.restore`: arch, channel order, feature stage as
saved); `config` gives the evaluation fields (`eval.*`, and `data.path` where the `.bin` sets are).
Outputs under `<workdir>/eval/`: results.txt (the table), results.json, roc_<set>_<variant>.png,
occlusion_grid.png, calibration.json (thresholds at FAR 1e-2, 1e-3, 1e-4 of each score and the fused
score's statistics, fitted on all clean pairs of all sets; `CalibratedFaceModel.from_workdir` and `inference verify`
use it), ijb_<name>.png, and TensorBoard summaries (process 0; `config.eval.tensorboard = False` skips them and
the tensorflow import).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation import calibration, fusion, ijb, pairs, plots, verification
from oaml_jax.evaluation.occlusion_sets import OcclusionSetEvaluator
from oaml_jax.evaluation.verdict import EVAL_SUBDIR, CalibratedFaceModel as FaceModel
from oaml_jax.paths import user_path

_GRID_FACES = 8


def _ijb_table(results: Mapping[str, ijb.IJBResult]) -> str:
    rows = {}
    for name, result in results.items():
        for label, key in pairs.METHODS:
            if key in result.tar:
                rows[f"{name} {label}"] = {f"{far:.0e}": 100.0 * tar for far, tar in result.tar[key].items()}
    columns = [f"{far:.0e}" for far in ijb.IJB_FARS]
    return verification.format_table(rows, columns, corner="TAR (%) at FAR")


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, step: Optional[int] = None,
        checkpoint: Optional[epath.PathLike] = None) -> dict[str, Any]:
    """Evaluates the latest (or given) checkpoint of `workdir` (or the checkpoint at `checkpoint`).

    Args:
        config: the eval config (see configs/default.py: `eval`, `data.path`).
        workdir: where the results go (`<workdir>/eval/`) and, without `checkpoint`, the training run
            whose checkpoint is evaluated (local or any epath URI).
        step: checkpoint step; None = the latest.
        checkpoint: a checkpoint directory (training `checkpoints/`, a converted AdaFace checkpoint, or
            one step's directory) to evaluate instead of the workdir's.

    Returns:
        dict with "step", "table" (the printed text), "rows" (row label -> column -> percent), "metrics"
        (set -> variant -> method -> metric fractions), "ijb" (name -> method -> far -> tar), "files"
        (written paths by name), "has_qaconv".

    Raises:
        FileNotFoundError: no checkpoint, or no evaluation set at all.
    """
    evaluators_lib.check_config(config.eval, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = user_path(workdir, "workdir")
    evaluators = evaluators_lib.from_config(config, training=False)
    if not evaluators:
        field, folder = evaluators_lib.pair_sets_folder(config)
        raise FileNotFoundError(f"no eval sets: none of eval.bin_names={tuple(config.eval.bin_names)} in "
                                f"{field}={folder} and no eval.ijb_root")
    model = FaceModel.from_checkpoint(checkpoint or workdir, step, batch_size=config.eval.batch_size,
                                      fusion_weights=fusion.check_weights(config.eval.fusion_weights))
    out_dir = workdir / EVAL_SUBDIR
    is_main = jax.process_index() == 0
    rows, metrics, files = {}, {}, {}
    clean_scores: dict[str, list[np.ndarray]] = {}
    clean_issame: list[np.ndarray] = []
    grid_faces, grid_maps, grid_titles = [], [], []
    pair_evaluator = evaluators.get("pairs")
    pair_results = pair_evaluator.evaluate(model) if pair_evaluator else {}
    first_set = next(iter(pair_evaluator.sets)) if pair_evaluator else None
    for (set_name, variant), result in pair_results.items():
        metrics.setdefault(set_name, {})[variant] = result.metrics
        rows[f"{set_name} {variant}"] = pairs.table_row(result.metrics)
        if variant == "clean":
            for name, values in result.scores.items():
                clean_scores.setdefault(name, []).append(values)
            clean_issame.append(pair_evaluator.sets[set_name].issame)
        if is_main:
            issame = pair_evaluator.sets[set_name].issame
            curves = {label: verification.roc_curve(result.roc_scores[key], issame)[:2]
                      for label, key in pairs.METHODS if key in result.roc_scores}
            files[f"roc_{set_name}_{variant}"] = plots.plot_roc(
                curves, out_dir / f"roc_{set_name}_{variant}.png", title=f"{set_name} {variant}")
        if result.occlusion is not None and set_name == first_set:
            count = min(_GRID_FACES, result.occlusion.shape[0] // 2)
            shown = pairs.variant_images(pair_evaluator.sets[set_name].images[:2 * count], variant,
                                         model.contract.grid)
            grid_faces.append(shown[1::2])
            grid_maps.append(result.occlusion[1:2 * count:2])
            grid_titles += [f"{variant} {m.mean():.2f}" for m in result.occlusion[1:2 * count:2]]

    table = verification.format_table(rows, pairs.COLUMNS, corner="set variant (%)") if rows else ""
    ijb_results = evaluators["ijb"].evaluate(model) if "ijb" in evaluators else {}
    if is_main:
        for name, result in ijb_results.items():
            curves = {label: verification.roc_curve(result.scores[key], result.labels)[:2]
                      for label, key in pairs.METHODS if key in result.scores}
            files[f"ijb_{name}"] = plots.plot_roc(curves, out_dir / f"ijb_{name}.png", title=f"{name.upper()} 1:1")
    occlusion_evaluator = OcclusionSetEvaluator.from_config(config, model.contract.grid) if model.has_qaconv else None
    occlusion_results = occlusion_evaluator.evaluate(model) if occlusion_evaluator else {}
    if occlusion_results:
        table = "\n\n".join(t for t in (table, occlusion_evaluator.table(occlusion_results)) if t)
        if is_main:
            files.update(occlusion_evaluator.report(occlusion_results, out_dir))
    text = "\n\n".join(t for t in (table, _ijb_table(ijb_results) if ijb_results else "") if t)
    ijb_tars = {name: result.tar for name, result in ijb_results.items()}
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        files["results_txt"] = out_dir / "results.txt"
        files["results_txt"].write_text(text + "\n")
        files["results_json"] = out_dir / "results.json"
        files["results_json"].write_text(json.dumps(
            {"step": model.step, "checkpoint": str(user_path(checkpoint or workdir, "checkpoint")),
             "has_qaconv": model.has_qaconv, "rows": rows, "metrics": metrics,
             "ijb": {n: {m: {str(far): t for far, t in v.items()} for m, v in r.items()} for n, r in ijb_tars.items()}},
            indent=2))
        if clean_scores:
            fitted = calibration.fit({k: np.concatenate(v) for k, v in clean_scores.items()},
                                     np.concatenate(clean_issame), step=model.step,
                                     checkpoint=str(model.directory), fitted_on=list(pair_evaluator.sets),
                                     fusion_weights=model.fusion_weights)
            files["calibration"] = calibration.save(fitted, out_dir / calibration.CALIBRATION_FILE)
        if grid_faces:
            files["occlusion_grid"] = plots.plot_occlusion_grid(
                np.concatenate(grid_faces), np.concatenate(grid_maps), out_dir / "occlusion_grid.png",
                titles=grid_titles)
        if config.eval.tensorboard:
            _write_summaries(out_dir, model.step or 0, rows, ijb_tars, files)
    return {"step": model.step, "table": text, "rows": rows, "metrics": metrics, "ijb": ijb_tars,
            "files": files, "has_qaconv": model.has_qaconv}


def _write_summaries(out_dir: epath.Path, step: int, rows: Mapping[str, Mapping[str, float]],
                     ijb_tars: Mapping[str, Any], files: Mapping[str, epath.Path]) -> None:
    """Scalars and figures to TensorBoard under `<workdir>/eval` (process 0 only)."""
    from clu import metric_writers  # imports tensorflow: only when summaries are written.

    from data_pipelines.images import decode_image

    writer = metric_writers.create_default_writer(str(out_dir), just_logging=jax.process_index() > 0)
    scalars = {f"eval/{row.replace(' ', '/')}/{column.replace(' ', '_')}": value
               for row, columns in rows.items() for column, value in columns.items()}
    for name, methods in ijb_tars.items():
        for method, tars in methods.items():
            scalars.update({f"ijb/{name}/{method}/tar@{far:.0e}": 100.0 * tar for far, tar in tars.items()})
    writer.write_scalars(step, scalars)
    images = {name: decode_image(path.read_bytes(), str(path))[None]
              for name, path in files.items() if path.suffix == ".png"}
    if images:
        writer.write_images(step, images)
    writer.flush()
    writer.close()
