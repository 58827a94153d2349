"""eval.py's library: evaluate a checkpoint with every evaluator `config.eval.evaluators` declares.

    result = run(config, workdir)             # the latest checkpoint of a training workdir
    result = run(config, out_dir, checkpoint=converted_dir, step=0)

The model comes from the checkpoint itself (`checkpoint.restore`: arch, channel order, feature stage as
saved); `config` gives the evaluation fields (`eval.*`, and `data.path` where the `.bin` sets are). The run is a
loop over the evaluators (`evaluators.from_config`): each evaluates the model, then the table is printed
(`print_table`), then each writes its files. Outputs under `<workdir>/eval/` (process 0): results.txt (the
table), results.json, each evaluator's figures (roc_<set>_<variant>.png, occlusion_grid.png, ijb_<name>.png,
occlusion_sets.png, <folder>_roc.png, <folder>_hist.png, ...), calibration.json (thresholds at FAR 1e-2, 1e-3,
1e-4 of each score and the fused score's statistics, fitted on the clean pairs of every pair set;
`CalibratedFaceModel.from_workdir` and `inference verify` use it), and TensorBoard summaries: one events file
per evaluated checkpoint step (suffix `.step_<N>`), replaced when that step is evaluated again, so no curve
holds a step twice (`config.eval.tensorboard = False` skips them and the tensorflow import).

The output folder is checked writable before anything is loaded: a workdir eval.py cannot write is refused
in one line before any work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from oaml_jax.evaluation import base, calibration, verification
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation.verdict import EVAL_SUBDIR, CalibratedFaceModel as FaceModel
from oaml_jax.paths import user_path

_WRITE_CHECK = ".eval_write_check"
EVENTS_SUFFIX = ".step_{step}"


def check_writable(out_dir: epath.Path) -> None:
    """Creates `out_dir` and writes (then removes) a file in it.

    Raises:
        OSError: `out_dir` cannot be created or written, in one line naming it.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / _WRITE_CHECK
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"eval.py writes its results to {out_dir} and cannot write there ({e.strerror or e}); "
                      "pass a --workdir you can write (with --checkpoint=<the run> to evaluate another's)") from None


def merge_tables(tables: Sequence[base.Table]) -> str:
    """One text table per (corner, columns) layout, in first-appearance order; notes under their table."""
    merged: dict[tuple[str, tuple[str, ...]], tuple[dict, list]] = {}
    for table in tables:
        rows, notes = merged.setdefault((table.corner, table.columns), ({}, []))
        rows.update(table.rows)
        notes.extend(n for n in table.notes if n not in notes)
    return "\n\n".join("\n".join([verification.format_table(rows, columns, corner=corner), *notes])
                       for (corner, columns), (rows, notes) in merged.items() if rows)


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, step: Optional[int] = None,
        checkpoint: Optional[epath.PathLike] = None, *, print_table: bool = False, subdir: str = ""
        ) -> dict[str, Any]:
    """Evaluates the latest (or given) checkpoint of `workdir` (or the checkpoint at `checkpoint`).

    Args:
        config: the eval config (see oaml_jax/configs/default.py: `eval`, `data.path`).
        workdir: where the results go (`<workdir>/eval/`) and, without `checkpoint`, the training run
            whose checkpoint is evaluated (local or any epath URI).
        step: checkpoint step; None = the latest.
        checkpoint: a checkpoint directory (training `checkpoints/`, a converted AdaFace checkpoint, or
            one step's directory) to evaluate instead of the workdir's.
        print_table: print the table on stdout (process 0) before any file is written.
        subdir: write into `<workdir>/eval/<subdir>/` instead (eval.py's one-off sets: the workdir's own
            results, TensorBoard points and calibration.json, which `verify` and export read, stay as they are).

    Returns:
        dict with "step", "table" (the text), "scalars" (evaluator -> name -> value), "results" (evaluator
        -> its result), the merged JSON sections of the evaluators ("rows": row label -> column -> percent,
        "metrics": set -> variant -> method -> metric fractions, "ijb": name -> method -> far -> tar, ...),
        "files" (written paths by name), "has_qaconv".

    Raises:
        OSError: the output folder cannot be written (before any work).
        FileNotFoundError: no checkpoint, or no evaluation set at all.
    """
    evaluators_lib.check_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = user_path(workdir, "workdir")
    out_dir = workdir / EVAL_SUBDIR / subdir if subdir else workdir / EVAL_SUBDIR
    is_main = jax.process_index() == 0
    if is_main:
        check_writable(out_dir)
    evaluators = evaluators_lib.from_config(config, training=False)
    if not evaluators:
        raise FileNotFoundError(f"no eval sets: none of eval.evaluators {list(config.eval.evaluators)} has anything "
                                f"to score (eval.bin_names={tuple(config.eval.bin_names)} in eval.data_dir or "
                                f"data.path={config.data.path}, eval.ijb_root='{config.eval.ijb_root}')")
    model = FaceModel.from_checkpoint(checkpoint or workdir, step, batch_size=config.eval.batch_size,
                                      fusion_weights=evaluators[0].common.fusion_weights)
    model.progress = False
    results = {}
    for i, evaluator in enumerate(evaluators):
        start = time.perf_counter()
        logging.info("eval %d/%d: %s (%s) ...", i + 1, len(evaluators), evaluator.name, evaluator.settings["type"])
        results[evaluator.name] = evaluator.evaluate(model)
        logging.info("eval %d/%d: %s done in %.1f s", i + 1, len(evaluators), evaluator.name,
                     time.perf_counter() - start)
    text = merge_tables([t for ev in evaluators for t in ev.tables(results[ev.name])])
    if is_main and print_table:
        print(text, flush=True)
    scalars = {ev.name: ev.scalars(results[ev.name]) for ev in evaluators}
    sections: dict[str, dict] = {}
    for ev in evaluators:
        for key, value in ev.summary(results[ev.name]).items():
            sections.setdefault(key, {}).update(value)
    files: dict[str, epath.Path] = {}
    if is_main:
        files["results_txt"] = out_dir / "results.txt"
        files["results_txt"].write_text(text + "\n")
        files["results_json"] = out_dir / "results.json"
        files["results_json"].write_text(json.dumps(
            {"step": model.step, "checkpoint": str(user_path(checkpoint or workdir, "checkpoint")),
             "has_qaconv": model.has_qaconv, **sections}, indent=2, default=float))
        for ev in evaluators:
            files.update(ev.write(results[ev.name], out_dir))
        fitted = _calibrate(model, [p for ev in evaluators for p in ev.calibration_pairs(results[ev.name])])
        if fitted is not None:
            files["calibration"] = calibration.save(fitted, out_dir / calibration.CALIBRATION_FILE)
        if config.eval.tensorboard:
            files["events"] = write_summaries(out_dir, model.step or 0, scalars, files)
        logging.info("step %s: results.txt, results.json and %d other files in %s", model.step, len(files) - 2,
                     out_dir)
    return {"step": model.step, "table": text, "scalars": scalars, "results": results, **sections,
            "files": files, "has_qaconv": model.has_qaconv}


def _calibrate(model: FaceModel, clean: Sequence[tuple[str, Mapping[str, np.ndarray], np.ndarray]]
               ) -> Optional[calibration.Calibration]:
    """The calibration fitted on every clean pair set's pairs, or None without any."""
    if not clean:
        return None
    names = list(clean[0][1])
    return calibration.fit({k: np.concatenate([scores[k] for _, scores, _ in clean]) for k in names},
                           np.concatenate([issame for _, _, issame in clean]), step=model.step,
                           checkpoint=str(model.directory), fitted_on=[name for name, _, _ in clean],
                           fusion_weights=model.fusion_weights)


def write_summaries(out_dir: epath.Path, step: int, scalars: Mapping[str, Mapping[str, float]],
                    files: Mapping[str, epath.Path]) -> epath.Path:
    """Scalars ("<evaluator>/<name>") and the PNG figures of step `step` to TensorBoard under `out_dir`.

    One events file per step, named with the suffix `.step_<step>`: an earlier file of the same step is
    removed first, so evaluating a step again replaces its points instead of adding a second copy.

    Returns:
        The events file written.
    """
    import tensorflow as tf  # Only when summaries are written.

    from data_pipelines.images import decode_image

    suffix = EVENTS_SUFFIX.format(step=step)
    for old in out_dir.glob(f"events.out.tfevents.*{suffix}"):
        old.unlink()
    writer = tf.summary.create_file_writer(str(out_dir), filename_suffix=suffix)
    with writer.as_default(step=step):
        for name, values in scalars.items():
            for tag, value in values.items():
                tf.summary.scalar(f"{name}/{tag}", float(value))
        for name, path in files.items():
            if path.suffix == ".png":
                tf.summary.image(name, decode_image(path.read_bytes(), str(path))[None])
    writer.flush()
    writer.close()
    written = list(out_dir.glob(f"events.out.tfevents.*{suffix}"))
    return written[0]
