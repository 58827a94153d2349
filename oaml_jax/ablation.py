"""Does each part of OAML earn its cost? Variants x seeds on the embedded benchmark: mean and std, and paired
confidence intervals for each comparison.

    python -m oaml_jax.ablation --workdir=ablation_workdir --seeds=3
    python -m oaml_jax.ablation --workdir=W --variants=full,adaface_only --seeds=5 [--config.train.epochs=12]

The flags are the demo's (`--config`, `--identities`, `--images`, `--pairs`, `--data_seed`, `--workdir`)
plus `--seeds` and `--variants`.

Every run is train.py + eval.py's own code (`train.train_and_evaluate`, `evaluation.runner.run`) on the
demo's data, steps and schedule (`--config`, default configs/demo.py), one workdir per variant and seed
(`<workdir>/<variant>/seed<k>`); finished runs are reused, so an interrupted ablation continues where it
stopped (a finished run whose saved config differs from the one asked for is refused, naming the fields).
The variants (`VARIANTS`):
- full: OAML as the config has it;
- adaface_only: the global embedding alone (lam_ada = 1, lam_qa = lam_occ = 0: QAConv and the occlusion
  head are not computed), the baseline recipe `ADAFACE_ONLY` (its comment says how it was chosen);
- no_occlusion_weighting: QAConv without the occlusion maps (`model.qaconv_occlusion_weighting=False`);
- qaconv_detached: the occlusion head and QAConv trained, QAConv's gradients kept from the backbone (the
  original OAML code's setting, `model.qaconv_to_backbone=False`), AdaFace at weight 1 as in the baseline.
Seed k sets `config.seed` (initialization, dropout) and `data.seed` (batch order, augmentation, occlusion);
the data itself is the same for every run. Prints mean +- std over seeds per variant x occlusion variant
x score (AdaFace, QAConv, fused 10-fold accuracy), then the paired comparisons, and writes
`<workdir>/ablation.json`, `<workdir>/ablation.txt` and `<workdir>/ablation.png`.

Paired comparisons (`comparisons`): every pair of scores of one variant (e.g. QAConv vs AdaFace of `full`
under `mask`), and every variant against the first one asked for (`full` by default) on each score they
share. Both sides are judged on the same pairs: pair i is correct under a score when the 10-fold protocol's
decision (threshold fitted on the other nine folds, `pair_correct`) matches its label; with several seeds,
seed k of one side is paired with seed k of the other. Each comparison reports the difference in accuracy
(percentage points of pairs, mean over seeds), its 95% paired-bootstrap interval (pairs resampled with
replacement, the same resample for both sides and every seed; the fold thresholds are held fixed), and per
seed McNemar's exact test on the pairs where exactly one side is correct (two-sided binomial p-value).
Each run's per-pair decisions are kept in `<run>/ablation_pairs.npz`, so finished runs are not re-scored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import scipy.stats
from absl import app, flags, logging
from etils import epath

from oaml_jax import checkpointing, demo, logs, resume, train
from oaml_jax.evaluation import fusion, pairs, plots, runner, verification
from oaml_jax.evaluation.verdict import CalibratedFaceModel
from oaml_jax.paths import user_path

# The AdaFace-only baseline on top of the demo config: the AdaFace loss alone at weight 1 (the demo's 0.1
# would only scale its learning rate). It keeps the demo's optimizer, schedule, augmentation and AdaFace
# scale s = 8 (configs/demo.py says why 8 and not 64). The README's ablation section gives the recipes tried
# for it and why none of them is kept.
ADAFACE_ONLY: dict[str, Any] = {"model.lam_ada": 1.0, "model.lam_qa": 0.0, "model.lam_occ": 0.0}

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "adaface_only": ADAFACE_ONLY,
    "no_occlusion_weighting": {"model.qaconv_occlusion_weighting": False},
    # The backbone then gets exactly the baseline's gradient (AdaFace at weight 1): QAConv's columns show what
    # local matching adds on the baseline's own feature maps.
    "qaconv_detached": {"model.qaconv_to_backbone": False, "model.lam_ada": 1.0},
}
SCORES = ("adaface", "qaconv", "fused")

# Scores of a variant whose QAConv is not trained are left out of its summary.
VARIANT_SCORES = {"adaface_only": ("adaface",)}


# Paired comparisons.

CI_LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000
PAIRS_FILE = "ablation_pairs.npz"


def pair_correct(scores: Mapping[str, np.ndarray], issame: np.ndarray,
                 weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Whether the 10-fold protocol decides each pair right, per score (as `pairs.score_metrics` scores them).

    Pair i in fold k is correct when `(score_i > t_k) == issame_i`, `t_k` fitted on the other folds; the fused
    score is the out-of-fold one (each fold fused with the other folds' statistics). With equal folds the
    mean of a score's `[N]` array is its 10-fold accuracy.

    Args:
        scores: name -> `[N]` pair scores ("adaface", optionally "qaconv").
        issame: `[N]` bool.
        weights: fusion weights; "fused" when every weighted score is present.

    Returns:
        method -> `[N]` bool.
    """
    issame = np.asarray(issame, bool)
    folds = verification.fold_indices(issame.size, pairs.N_FOLDS)
    decided = {name: (np.asarray(values, np.float64), verification.ten_fold_accuracy(values, issame, pairs.N_FOLDS))
               for name, values in scores.items()}
    if all(name in scores for name in weights):
        fused = fusion.ten_fold_fused_accuracy(scores, issame, weights, pairs.N_FOLDS)
        out_of_fold = np.empty(issame.size)
        for test_idx, stats in zip(folds, fused["stats"]):
            out_of_fold[test_idx] = fusion.fuse({k: v[test_idx] for k, v in scores.items()}, weights, stats)
        decided["fused"] = (out_of_fold, fused)
    correct = {}
    for name, (values, protocol) in decided.items():
        correct[name] = np.empty(issame.size, bool)
        for test_idx, threshold in zip(folds, protocol["thresholds"]):
            correct[name][test_idx] = (values[test_idx] > threshold) == issame[test_idx]
    return correct


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired decisions.

    Args:
        correct_a, correct_b: `[N]` bool, whether each side decided pair i right.

    Returns:
        (b = pairs only `a` got right, c = pairs only `b` got right, two-sided p-value
        `min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])`; 1 when there is no discordant pair).
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correct_a {correct_a.shape} and correct_b {correct_b.shape}: expected the same pairs")
    b, c = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2.0 * scipy.stats.binom.cdf(min(b, c), b + c, 0.5)))


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                     level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference a - b and its percentile paired-bootstrap interval, in percentage points.

    Args:
        correct_a, correct_b: `[S, N]` bool per seed and pair (row k of each from seed k).
        samples: bootstrap resamples of the N pairs (one resample serves every seed and both sides).
        level: interval coverage.
        seed: resampling seed.

    Returns:
        (difference, lower, upper), the difference being the mean over seeds and pairs.
    """
    correct_a, correct_b = np.atleast_2d(correct_a), np.atleast_2d(correct_b)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correct_a {correct_a.shape} and correct_b {correct_b.shape}: expected the same [S, N]")
    per_pair = (correct_a.astype(np.float64) - correct_b).mean(axis=0)  # [N], averaged over seeds
    rng = np.random.default_rng(seed)
    means = np.array([per_pair[rng.integers(0, per_pair.size, per_pair.size)].mean() for _ in range(samples)])
    lower, upper = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(per_pair.mean()), 100.0 * float(lower), 100.0 * float(upper)


def compare(name_a: str, runs_a: Sequence[np.ndarray], name_b: str,
            runs_b: Sequence[np.ndarray]) -> dict[str, Any]:
    """One comparison of two sides' per-pair decisions (`[N]` bool per seed, paired by position)."""
    seeds = min(len(runs_a), len(runs_b))
    a, b = np.stack(runs_a[:seeds]), np.stack(runs_b[:seeds])
    diff, lower, upper = paired_bootstrap(a, b)
    tests = [mcnemar_exact(x, y) for x, y in zip(a, b)]
    return {"a": name_a, "b": name_b, "seeds": seeds, "pairs": int(a.shape[1]), "diff": diff, "ci": [lower, upper],
            "discordant": [[t[0], t[1]] for t in tests], "mcnemar_p": [t[2] for t in tests]}


def comparisons(correct: Mapping[str, Sequence[Mapping[str, Mapping[str, np.ndarray]]]]) -> list[dict[str, Any]]:
    """Every paired comparison of the ablation (module docstring).

    Args:
        correct: variant -> per seed: occlusion variant -> score -> `[N]` bool (`pair_correct`).

    Returns:
        `compare` dicts, sides named "<variant> <occlusion> <score>": score pairs within each variant, then
        each variant against the first.
    """
    out = []
    variants = list(correct)
    for variant in variants:
        for occlusion in correct[variant][0]:
            present = [s for s in VARIANT_SCORES.get(variant, SCORES) if s in correct[variant][0][occlusion]]
            for i, score_a in enumerate(present):
                for score_b in present[i + 1:]:
                    runs = correct[variant]
                    out.append(compare(f"{variant} {occlusion} {score_b}", [r[occlusion][score_b] for r in runs],
                                       f"{variant} {occlusion} {score_a}", [r[occlusion][score_a] for r in runs]))
    reference = variants[0]
    for variant in variants[1:]:
        for occlusion in correct[variant][0]:
            for score in VARIANT_SCORES.get(variant, SCORES):
                if score in correct[variant][0][occlusion] and score in correct[reference][0].get(occlusion, {}):
                    side = lambda name: (f"{name} {occlusion} {score}", [r[occlusion][score] for r in correct[name]])
                    out.append(compare(*side(variant), *side(reference)))
    return out


def comparisons_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparisons as text: difference and interval in points, McNemar p per seed."""
    header = f"a - b, accuracy points ({CI_LEVEL:.0%} paired bootstrap; McNemar exact p per seed)"
    labels = [f"{r['a']}  vs  {r['b']}" for r in rows]
    width = max([len(label) for label in labels] + [len(header)])
    lines = [header.ljust(width) + "    diff              CI  McNemar p"]
    for label, r in zip(labels, rows):
        ci = f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"
        p_values = ", ".join(f"{p:.3g}" for p in r["mcnemar_p"])
        lines.append(f"{label.ljust(width)}  {r['diff']:+6.2f}  {ci:>14}  {p_values}")
    return "\n".join(lines)


def score_run_pairs(config: ml_collections.ConfigDict, run_dir: epath.Path) -> dict[str, dict[str, np.ndarray]]:
    """Per-pair decisions of a trained run on the ablation's set: occlusion variant -> score -> `[N]` bool.

    Scores the latest checkpoint of `run_dir` with the `.bin` protocol's own functions (`pairs.variant_images`,
    `pairs.pair_scores`) on `eval.bin_names[0]` under every `eval.occlusion_variants`.
    """
    weights = fusion.check_weights(config.eval.fusion_weights)
    field = "eval.data_dir" if config.eval.data_dir else "data.path"
    folder = user_path(config.eval.data_dir or config.data.path, field)
    set_name = config.eval.bin_names[0]
    sets = pairs.load_pair_sets(folder, (set_name,), field)
    if set_name not in sets:
        raise FileNotFoundError(f"{field}={folder}: no {set_name}.bin for the ablation's paired comparisons")
    pair_set = sets[set_name]
    model = CalibratedFaceModel.from_checkpoint(run_dir, batch_size=config.eval.batch_size, fusion_weights=weights)
    correct = {}
    for variant in config.eval.occlusion_variants:
        scores, _ = pairs.pair_scores(model, pairs.variant_images(pair_set.images, variant, model.contract.grid))
        correct[variant] = pair_correct(scores, pair_set.issame, weights)
    return correct


def _save_pairs(path: epath.Path, correct: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    with path.open("wb") as f:
        np.savez(f, **{f"{occlusion}/{score}": values for occlusion, scores in correct.items()
                       for score, values in scores.items()})


def _load_pairs(path: epath.Path) -> dict[str, dict[str, np.ndarray]]:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        correct: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            occlusion, score = key.split("/")
            correct.setdefault(occlusion, {})[score] = data[key]
    return correct


def variant_config(base: ml_collections.ConfigDict, variant: str, seed: int) -> ml_collections.ConfigDict:
    """`base` with the variant's overrides and the seed (config.seed and data.seed).

    Raises:
        ValueError: an unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"--variants: unknown {variant!r}; expected some of {list(VARIANTS)}")
    config = base.copy_and_resolve_references()
    with config.unlocked():
        for field, value in VARIANTS[variant].items():
            section, name = field.split(".")
            config[section][name] = value
        config.seed = seed
        config.data.seed = seed
    return config


def run_one(config: ml_collections.ConfigDict,
            run_dir: epath.Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Trains and evaluates one run (or reads the results of a finished one).

    Returns:
        (eval.py's metrics, the per-pair decisions `score_run_pairs` gives; a finished run without them,
        from before they were kept, is scored once and they are saved).

    Raises:
        ValueError: `run_dir` holds a finished run whose saved config differs from `config` (naming the
            fields), so that a changed flag never reuses results it does not describe.
    """
    results = run_dir / "eval" / "results.json"
    if results.exists() and (run_dir / "ablation_done").exists():
        saved = checkpointing.Checkpointer(run_dir, every=1, keep=1)
        try:
            # The data folder may move with the workdir; what is in it is guarded by demo.ensure_data (and
            # demo.ensure_occlusion_set).
            changed = resume.config_differences(saved.restore_config(saved.latest_step()), config,
                                                ignore=("data.path", "data.occlusion_sets"))
        finally:
            saved.close()
        if changed:
            raise ValueError(f"{run_dir} holds a finished run of another config ({'; '.join(changed)}); use "
                             "another --workdir, or delete that run to train it again")
        if not (run_dir / PAIRS_FILE).exists():
            _save_pairs(run_dir / PAIRS_FILE, score_run_pairs(config, run_dir))
        return json.loads(results.read_text())["metrics"], _load_pairs(run_dir / PAIRS_FILE)
    start = time.perf_counter()
    train.train_and_evaluate(config, run_dir)
    metrics = runner.run(config, run_dir)["metrics"]
    correct = score_run_pairs(config, run_dir)
    _save_pairs(run_dir / PAIRS_FILE, correct)
    (run_dir / "ablation_done").write_text(f"{time.perf_counter() - start:.0f} s\n")
    return metrics, correct


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]], set_name: str) -> dict:
    """variant -> occlusion variant -> score -> (mean, std, n) of the 10-fold accuracy, in percent."""
    summary = {}
    for variant, metrics in runs.items():
        for occlusion in metrics[0][set_name]:
            for score in VARIANT_SCORES.get(variant, SCORES):
                values = [100.0 * m[set_name][occlusion][score]["accuracy"] for m in metrics
                          if score in m[set_name][occlusion]]
                if values:
                    summary.setdefault(variant, {}).setdefault(occlusion, {})[score] = (
                        float(np.mean(values)), float(np.std(values)), len(values))
    return summary


def table(summary: Mapping[str, Any]) -> str:
    """The summary as text: a row per variant x occlusion variant, mean +- std per score."""
    rows = {f"{variant} {occlusion}": {score: f"{m:.2f} +- {s:.2f}" for score, (m, s, _) in scores.items()}
            for variant, occlusions in summary.items() for occlusion, scores in occlusions.items()}
    columns = [f"{label} acc" for label, key in pairs.METHODS if key in SCORES]
    width = max([len(r) for r in rows] + [len("variant occlusion")])
    lines = ["  ".join(["variant occlusion".ljust(width), *(c.rjust(15) for c in columns)])]
    for row, cells in rows.items():
        lines.append("  ".join([row.ljust(width), *(cells.get(score, "-").rjust(15) for score in SCORES)]))
    return "\n".join(lines)


def run_ablation(base: ml_collections.ConfigDict, workdir: epath.Path, variants: Sequence[str],
                 seeds: int) -> dict[str, Any]:
    """Runs (or reuses) every variant x seed on `base` (whose `data.path` is set); writes and returns the summary.

    Returns:
        {"set", "seeds", "summary" (see `summarize`), "comparisons" (see `comparisons`), "wall" (run -> seconds),
        "table" (text: the summary, then the comparisons)}.
    """
    set_name = base.eval.bin_names[0]
    runs, correct, wall = {}, {}, {}
    for variant in variants:
        for seed in range(seeds):
            run_dir = workdir / variant / f"seed{seed}"
            logging.info("ablation: %s seed %d in %s", variant, seed, run_dir)
            metrics, decisions = run_one(variant_config(base, variant, seed), run_dir)
            runs.setdefault(variant, []).append(metrics)
            correct.setdefault(variant, []).append(decisions)
            wall[f"{variant}/seed{seed}"] = (run_dir / "ablation_done").read_text().strip()
    summary = summarize(runs, set_name)
    paired = comparisons(correct)
    text = table(summary) + "\n\n" + comparisons_table(paired)
    (workdir / "ablation.txt").write_text(text + "\n")
    (workdir / "ablation.json").write_text(json.dumps({"set": set_name, "seeds": seeds, "summary": summary,
                                                       "comparisons": paired, "wall": wall}, indent=2))
    plots.plot_ablation(summary, workdir / "ablation.png", title=f"{set_name}: 10-fold accuracy, mean +- std")
    return {"set": set_name, "seeds": seeds, "summary": summary, "comparisons": paired, "wall": wall, "table": text}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    unknown = [v for v in flags.FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    workdir, base = demo.prepare()
    print(run_ablation(base, workdir, flags.FLAGS.variants, flags.FLAGS.seeds)["table"])


def cli() -> None:
    """`python -m oaml_jax.ablation`: the demo's flags (config, data, workdir) plus --seeds and --variants."""
    demo.define_flags(workdir="ablation_workdir")
    flags.DEFINE_integer("seeds", 3, "Seeds per variant (0, 1, ...).")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of {list(VARIANTS)}.")
    logs.run(main)


if __name__ == "__main__":
    cli()
