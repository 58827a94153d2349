"""1:N identification benchmarks with their own layouts: TinyFace and IJB-B/C 1:N.

Both report the metrics of `identification` (rank-N, CMC, open-set TPIR at FPIR; definitions there).

TinyFace (Cheng et al., 2018; AdaFace's low-resolution benchmark, `validation_lq/` of its code):
`Probe/`, `Gallery_Match/`, `Gallery_Distractor/`; the identity of a probe or gallery-match image is the
number before the first '_' of its file name; distractors are nobody's mate. Rank-1/5/20, closed set.

IJB-B/C 1:N (insightface's `IJB_release` layout, the faces, landmarks and templates of `ijb_layout`):
`meta/<name>_1N_gallery_G1.csv` and `_G2.csv` (IJB-B: `_S1`, `_S2`) and `meta/<name>_1N_probe_mixed.csv`,
comma-separated with a header line naming `TEMPLATE_ID` and `SUBJECT_ID` (otherwise, as insightface reads
them, the first two columns), one row per face of a template. Templates are pooled as in 1:1 (`ijb_templates`:
flip-fused norm-weighted features scaled by the detector score, media mean, template sum, L2 norm). The
two galleries hold disjoint subjects: each probe template is mated in one and non-mated in the other, so
each gallery gives closed-set rank-N over its mated probes and open-set TPIR at FPIR with the others;
reported per gallery and as the mean of the two, as AdaFace and the IJB papers report them. (insightface's
and AdaFace's scripts also search G1 + G2 together and threshold probe-gallery pairs: not reproduced.)
AdaFace scores only: QAConv between templates would match every face pair of every probe x gallery
template pair (billions on IJB-C).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.folders import list_images
from oaml_jax.evaluation import base, identification, identification_metrics, ijb, ijb_layout, ijb_templates
from oaml_jax.evaluation.identification import Entries, IdentificationEvaluator
from oaml_jax.paths import user_path
from oaml_jax.serving import FaceModel

# TinyFace.

TINYFACE_FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")
# Where the three folders are under `root`: itself, AdaFace's aligned release, the original test split.
TINYFACE_LAYOUTS = (".", "aligned_pad_0.1_pad_high", "tinyface/Testing_Set")


def tinyface_folder(root: epath.PathLike) -> epath.Path:
    """The folder holding `Probe/`, `Gallery_Match/` and `Gallery_Distractor/` under `root` (`TINYFACE_LAYOUTS`).

    Raises:
        FileNotFoundError: none of the layouts is there.
    """
    root = user_path(root, "tinyface.root")
    for sub in TINYFACE_LAYOUTS:
        folder = root if sub == "." else root / sub
        if all((folder / name).is_dir() for name in TINYFACE_FOLDERS):
            return folder
    raise FileNotFoundError(f"tinyface.root={root}: no {'/, '.join(TINYFACE_FOLDERS)}/ folders in it or in "
                            f"{', '.join(s for s in TINYFACE_LAYOUTS if s != '.')} under it")


def _tinyface_label(path: epath.Path) -> str:
    label = path.stem.split("_")[0]
    if not label.isdigit():
        raise ValueError(f"{path}: TinyFace probe and gallery-match names start with the identity number "
                         "('<id>_<n>.<ext>')")
    return str(int(label))


def read_tinyface(root: epath.PathLike) -> tuple[Entries, Entries]:
    """(gallery, probe) of TinyFace's test split: gallery = Gallery_Match (identity = the number before the
    first '_' of the file name) + Gallery_Distractor (nobody's mate); probes = Probe, all mated.

    Raises:
        FileNotFoundError / ValueError: missing folders, or a file name without its identity number.
    """
    folder = tinyface_folder(root)
    probe, match, distractor = (list_images(folder / name) for name in TINYFACE_FOLDERS)
    if not probe or not match:
        raise ValueError(f"{folder}: no images in Probe/ or Gallery_Match/")
    gallery = Entries(match + distractor, [_tinyface_label(p) for p in match] + [None] * len(distractor))
    return gallery, Entries(probe, [_tinyface_label(p) for p in probe])


class TinyFaceEvaluator(IdentificationEvaluator):
    """TinyFace's protocol (type "tinyface"): rank-1/5/20 of the probes against the matches plus distractors.

    Settings: `root` (`TINYFACE_LAYOUTS`); optional `aligned` (True for AdaFace's aligned release; False
    detects and aligns the original low-resolution crops), `ranks` ((1, 5, 20)), `qaconv`, `gallery_chunk`,
    `validation` as for "identification".
    """

    SETTINGS = ("root", "aligned", "ranks", "fpirs", "qaconv", "gallery_chunk", *identification.FRAMEWORK_SETTINGS)
    DEFAULT_RANKS = (1, 5, 20)

    def read_sets(self, settings: Mapping[str, Any]) -> tuple[Entries, Entries]:
        if not settings.get("root"):
            raise ValueError(f"{self.field}.root: expected TinyFace's folder (Probe/, Gallery_Match/, "
                             "Gallery_Distractor/)")
        return read_tinyface(settings["root"])


# IJB-B/C 1:N.

# Gallery file suffixes per set (insightface's meta names); the probe file is `<name>_1N_probe_mixed.csv`.
IJB_GALLERIES = {"ijbb": ("S1", "S2"), "ijbc": ("G1", "G2")}
# Probe templates x gallery templates scored at once (bounds the [P, chunk] score block).
IJB_GALLERY_CHUNK = 4096


def read_1n_csv(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Templates and their subjects from one 1:N meta file (module docstring).

    Returns:
        (`[T]` int64 template ids in first-seen order, `[T]` int64 subject id of each).

    Raises:
        FileNotFoundError: no such file.
        ValueError: no header or no rows, a non-integer id, or a template listed with two subjects (naming
            file and line).
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IJB 1:N meta file not found: {path}")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if not rows or not any(c.strip() for c in rows[0]):
        raise ValueError(f"{path}:1: expected a header line (TEMPLATE_ID,SUBJECT_ID,...)")
    header = [c.strip().upper() for c in rows[0]]
    if header[0].lstrip("-").isdigit():
        raise ValueError(f"{path}:1: expected a header line (TEMPLATE_ID,SUBJECT_ID,...), got {','.join(rows[0])!r}")
    columns = ((header.index("TEMPLATE_ID"), header.index("SUBJECT_ID"))
               if {"TEMPLATE_ID", "SUBJECT_ID"} <= set(header) else (0, 1))
    subject_of: dict[int, tuple[int, int]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            template, subject = (int(row[c]) for c in columns)
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{line_no}: expected integer template and subject ids in columns "
                             f"{columns[0] + 1} and {columns[1] + 1}, got {','.join(row)!r}") from None
        seen = subject_of.setdefault(template, (subject, line_no))
        if seen[0] != subject:
            raise ValueError(f"{path}:{line_no}: template {template} has subject {subject}, but {seen[0]} on line "
                             f"{seen[1]}")
    if not subject_of:
        raise ValueError(f"{path}: no template rows after the header")
    return (np.fromiter(subject_of, np.int64, len(subject_of)),
            np.array([s for s, _ in subject_of.values()], np.int64))


@dataclasses.dataclass(frozen=True)
class IJB1NSet:
    """One IJB set's 1:N protocol: `meta` (faces, `ijb_layout.IJBMeta`), `probe` and `galleries` (name -> ids),
    each (`[T]` template ids, `[T]` subject ids)."""

    meta: ijb_layout.IJBMeta
    probe: tuple[np.ndarray, np.ndarray]
    galleries: dict[str, tuple[np.ndarray, np.ndarray]]


def read_ijb_1n(folder: epath.PathLike, name: str) -> IJB1NSet:
    """Reads one set's face meta files (`ijb_layout.read_ijb_meta`, which also reads and checks the 1:1 pair file that
    insightface's layout ships beside them) and its 1:N files; every template must have faces.

    Raises:
        FileNotFoundError / ValueError: missing or malformed files (naming file and line).
    """
    meta = ijb_layout.read_ijb_meta(folder, name)
    meta_dir = epath.Path(folder) / "meta"
    files = {g: meta_dir / f"{meta.name}_1N_gallery_{g}.csv" for g in IJB_GALLERIES[meta.name]}
    files["probe"] = meta_dir / f"{meta.name}_1N_probe_mixed.csv"
    read = {key: read_1n_csv(path) for key, path in files.items()}
    for key, (templates, _) in read.items():
        missing = templates[~np.isin(templates, meta.templates)]
        if missing.size:
            raise ValueError(f"{files[key]}: template {missing[0]} has no faces in "
                             f"{meta_dir / f'{meta.name}_face_tid_mid.txt'}")
    probe = read.pop("probe")
    return IJB1NSet(meta=meta, probe=probe, galleries=read)


def gallery_search(probe_feats: np.ndarray, probe_ids: np.ndarray, gallery_feats: np.ndarray,
                   gallery_ids: np.ndarray, k: int, chunk: int = IJB_GALLERY_CHUNK) -> identification_metrics.TopScores:
    """`TopScores` of cosine scores between unit template features, `chunk` gallery templates at a time."""
    acc = identification_metrics.TopScoreAccumulator(len(probe_ids), k)
    for lo in range(0, gallery_feats.shape[0], chunk):
        block = probe_feats.astype(np.float64) @ gallery_feats[lo:lo + chunk].astype(np.float64).T
        acc.update(block, probe_ids[:, None] == gallery_ids[None, lo:lo + chunk])
    return acc.result()


@dataclasses.dataclass(frozen=True)
class IJB1NResult:
    """One IJB set: `galleries` name -> `IdentificationResult` (AdaFace), `mean` metric -> mean over galleries."""

    name: str
    galleries: dict[str, identification.IdentificationResult]
    mean: dict[str, float]


def _rows(result: identification.IdentificationResult) -> dict[str, float]:
    values = result.methods["adaface"]
    row = {f"rank-{r}": v for r, v in values.ranks.items()}
    row.update({f"TPIR@FPIR{f:.0e}": v for f, v in values.tpir.items()})
    return row


class IJB1NEvaluator(base.Evaluator):
    """IJB-B/C 1:N identification of every set found under a root (type "ijb_1n").

    Settings: `root` (default `eval.ijb_root`: insightface's `IJB_release` folder or one set's folder, as
    `ijb_layout.ijb_folder`); optional `names` (default `eval.ijb_names`; missing sets are warned about and
    skipped), `ranks` ((1, 5, 10)), `fpirs` ((1e-2, 1e-1)), `batch_size` (faces per extraction call; default
    `eval.ijb_batch_size`, 0 = the model's). Never run by train-time validation (too slow).

    Scalars: "<set>/<gallery>/adaface/rank<r>", ".../tpir@fpir<f>", and "<set>/mean/adaface/..." (fractions);
    file cmc_<set>_1n.png.
    """

    SETTINGS = ("root", "names", "ranks", "fpirs", "batch_size", *identification.FRAMEWORK_SETTINGS)

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        """Checks the settings, finds the sets and reads (so checks) their meta files.

        Raises:
            FileNotFoundError: no root, or none of the sets under it.
            ValueError: an unknown or bad setting, or a malformed meta file (naming file and line).
        """
        super().__init__(name, settings, common)
        field = f"eval.evaluators.{name}"
        identification.check_settings(settings, self.SETTINGS, field)
        setting = lambda key, default: settings.get(key, common.eval_config.get(f"ijb_{key}", default))
        self.ranks, self.fpirs = identification.ranks_and_fpirs(settings, field)
        self.batch_size = int(setting("batch_size", 0))
        if self.batch_size < 0:
            raise ValueError(f"{field}.batch_size={self.batch_size}: expected >= 0 (0 = the model's)")
        names = tuple(n.lower() for n in setting("names", ijb_layout.IJB_NAMES))
        unknown = [n for n in names if n not in IJB_GALLERIES]
        if unknown:
            raise ValueError(f"{field}.names: unknown {unknown}; expected names from {tuple(IJB_GALLERIES)}")
        self.sets = {}
        if common.training:
            return
        if not setting("root", ""):
            raise FileNotFoundError(f"{field}.root: expected insightface's IJB_release folder (or eval.ijb_root)")
        root = user_path(setting("root", ""), f"{field}.root")
        for set_name in names:
            folder = ijb_layout.ijb_folder(root, set_name)
            if folder is None:
                logging.warning("IJB set %s not found under %s.root=%s; skipped", set_name, field, root)
                continue
            self.sets[set_name] = read_ijb_1n(folder, set_name)
        if not self.sets:
            raise FileNotFoundError(f"{field}.root={root}: no meta/<name>_face_tid_mid.txt for any of {names}")

    @property
    def empty(self) -> bool:
        return not self.sets

    def evaluate(self, model: FaceModel) -> dict[str, IJB1NResult]:
        """set name -> `IJB1NResult`."""
        batch_size = ijb.extraction_batch(model, self.batch_size)
        results = {}
        for name, protocol in self.sets.items():
            meta = protocol.meta
            feats, _, _ = ijb.ijb_face_features(model, meta, batch_size, keep_maps=False)
            template_ids, template_feats = ijb_templates.template_features(feats, meta.templates, meta.medias,
                                                                           meta.detector_scores)

            def rows(ids: np.ndarray) -> np.ndarray:
                return np.searchsorted(template_ids, ids)

            probe_templates, probe_subjects = protocol.probe
            galleries = {}
            for gallery, (templates, subjects) in protocol.galleries.items():
                probe_ids, gallery_ids = identification_metrics.identity_ids(probe_subjects.tolist(), subjects.tolist())
                k = min(max(max(self.ranks), identification.CMC_LENGTH), templates.size)
                top = gallery_search(template_feats[rows(probe_templates)], probe_ids,
                                     template_feats[rows(templates)], gallery_ids, k)
                ranks = [r for r in self.ranks if r <= k]
                metrics = identification_metrics.method_result(top, ranks, self.fpirs)
                galleries[gallery] = identification.IdentificationResult(
                    name=f"{name} {gallery}", methods={"adaface": metrics},
                    gallery=templates.size, mated=int(top.mated.sum()), non_mated=int((~top.mated).sum()), failed=[])
            per_gallery = [_rows(r) for r in galleries.values()]
            mean = {key: float(np.mean([row[key] for row in per_gallery]))
                    for key in per_gallery[0] if all(key in row for row in per_gallery)}
            results[name] = IJB1NResult(name=name, galleries=galleries, mean=mean)
        return results

    def scalars(self, results: Mapping[str, IJB1NResult]) -> dict[str, float]:
        """"<set>/<gallery>/adaface/rank<r>", ".../tpir@fpir<f>" per gallery and "<set>/mean/adaface/..."."""
        out = {}
        for name, result in results.items():
            for gallery, values in result.galleries.items():
                out.update({f"{name}/{gallery}/adaface/{_scalar_key(k)}": v for k, v in _rows(values).items()})
            out.update({f"{name}/mean/adaface/{_scalar_key(k)}": v for k, v in result.mean.items()})
        return out

    def tables(self, results: Mapping[str, IJB1NResult]) -> list[base.Table]:
        """Rows "<set> <gallery> AdaFace" and "<set> mean AdaFace" in percent; notes: the template counts."""
        rows, notes = {}, []
        for name, result in results.items():
            for gallery, values in result.galleries.items():
                rows[f"{name} {gallery} AdaFace"] = {k: 100.0 * v for k, v in _rows(values).items()}
                notes.append(f"{name} {gallery}: {values.gallery} gallery templates, {values.mated} mated and "
                             f"{values.non_mated} non-mated probe templates")
            rows[f"{name} mean AdaFace"] = {k: 100.0 * v for k, v in result.mean.items()}
        columns = tuple(dict.fromkeys(c for row in rows.values() for c in row))
        return [base.Table(CORNER, columns, rows, tuple(notes))]

    def summary(self, results: Mapping[str, IJB1NResult]) -> dict[str, Any]:
        """{"ijb_1n": {set: {gallery: `identification.summary_entry`, "mean": metric -> fraction}}}."""
        return {"ijb_1n": {name: {**{g: identification.summary_entry(r) for g, r in result.galleries.items()},
                                  "mean": result.mean} for name, result in results.items()}}

    def write(self, results: Mapping[str, IJB1NResult], out_dir: epath.Path) -> dict[str, epath.Path]:
        """cmc_<set>_1n.png: the CMC curve of each gallery."""
        from oaml_jax.evaluation import plots  # matplotlib only here
        return {f"cmc_{name}_1n": plots.plot_cmc(
            {gallery: r.methods["adaface"].cmc for gallery, r in result.galleries.items()},
            out_dir / f"cmc_{name}_1n.png", title=f"{name.upper()} 1:N: CMC (AdaFace)")
            for name, result in results.items()}


CORNER = "IJB 1:N (%)"


def _scalar_key(column: str) -> str:
    """"rank-1" -> "rank1", "TPIR@FPIR1e-02" -> "tpir@fpir1e-02"."""
    return column.replace("-", "", 1).lower() if column.startswith("rank-") else column.lower()
