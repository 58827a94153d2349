"""1:N identification of probe faces against a gallery: readers, chunked search and the evaluator.

Metrics and their definitions: `identification_metrics` (rank-N, CMC, open-set TPIR at FPIR).

Memory: gallery scores are computed `gallery_chunk` entries at a time (AdaFace as one matrix product,
QAConv with the model's blocked matcher); per probe only the best mated score and the K highest non-mated
scores are kept (`TopScores`), so host memory is about P (E + h w c) floats for the probes, one chunk's
features and P x K per method, independent of the gallery size.

Layouts (`read_entries`): a folder of identity sub-folders (`<dir>/<identity>/<image>`), or a list file
with one `<identity> <image path>` per line (paths relative to the list file's folder, or absolute/URIs).
Raw photos are detected and aligned (`inference.faces_from_photos`) unless `aligned` is set; photos
without a face or unreadable are counted and named in the result, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.folders import list_images
from oaml_jax.evaluation import base, fusion
from oaml_jax.evaluation.identification_metrics import (
    MethodResult,
    TopScoreAccumulator,
    TopScores,
    identity_ids,
    method_result,
)
from oaml_jax.evaluation.verdict import CalibratedFaceModel
from oaml_jax.paths import user_path
from oaml_jax.photos import faces_from_photos
from oaml_jax.serving import FaceModel, Features

RANKS = (1, 5, 10)
FPIRS = (1e-2, 1e-1)
CMC_LENGTH = 20
GALLERY_CHUNK = 1024
METHOD_LABELS = {"adaface": "AdaFace", "qaconv": "QAConv", "fused": "fused"}
# Keys of a `config.eval.evaluators` entry that belong to the framework building the evaluators, not to it.
FRAMEWORK_SETTINGS = ("type", "validation", "fields")


# Readers.


@dataclasses.dataclass(frozen=True)
class Entries:
    """Image files and their identities (`None` = a distractor, nobody's mate), and how many other entries of
    the folders were skipped (hidden, not images, files beside the identity folders)."""

    paths: list[epath.Path]
    labels: list[Optional[str]]
    skipped: int = 0


def read_entries(spec: epath.PathLike, field: str) -> Entries:
    """A gallery or probe set: a folder of identity sub-folders, or a list file (module docstring).

    Raises:
        FileNotFoundError: `spec` does not exist.
        ValueError: no image, or a malformed list line (naming file and line).
    """
    path = user_path(spec, field)
    if path.is_dir():
        paths, labels = [], []
        entries = list(path.iterdir())
        identities = sorted(p.name for p in entries if not p.name.startswith(".") and p.is_dir())
        skipped = len(entries) - len(identities)
        for identity in identities:
            files = list_images(path / identity)
            paths += files
            labels += [identity] * len(files)
            skipped += sum(1 for _ in (path / identity).iterdir()) - len(files)
        if not paths:
            raise ValueError(f"{field}={path}: no images in identity sub-folders (expected <dir>/<identity>/<image>)")
        if skipped:
            logging.warning("%s=%s: %d entries that are not images in identity folders skipped", field, path, skipped)
        return Entries(paths, labels, skipped)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={path}: no such folder or list file")
    paths, labels = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.strip().split(maxsplit=1)
        if len(fields) != 2:
            raise ValueError(f"{path}:{line_no}: expected '<identity> <image path>', got {line.strip()!r}")
        name = fields[1]
        paths.append(epath.Path(name) if "://" in name or name.startswith("/") else path.parent / name)
        labels.append(fields[0])
    if not paths:
        raise ValueError(f"{path}: no '<identity> <image path>' lines")
    return Entries(paths, labels)


@dataclasses.dataclass
class _Faces:
    """Faces read from entries: `faces` uint8 `[n, 112, 112, 3]`, `rows` `[n]` index into the entries."""

    faces: np.ndarray
    rows: np.ndarray
    failed: list[tuple[str, str]]


def read_faces(entries: Entries, rows: Sequence[int], aligned: bool) -> _Faces:
    """The largest face of each entry in `rows`; photos without a face or unreadable go to `failed`."""
    faces, kept, failed = [], [], []
    for row in rows:
        found = faces_from_photos([entries.paths[row]], aligned=aligned)
        if found.sources:
            faces.append(found.faces[0])
            kept.append(row)
        else:
            reason = found.unreadable[0][1] if found.unreadable else "no face"
            failed.append((str(entries.paths[row]), reason))
    stacked = np.stack(faces) if faces else np.zeros((0, 112, 112, 3), np.uint8)
    return _Faces(stacked, np.asarray(kept, np.int64), failed)


# Scoring.


def _chunk_scores(model: FaceModel, probe: Features, gallery: Features, qaconv: bool) -> dict[str, np.ndarray]:
    scores = {"adaface": probe.embeddings.astype(np.float64) @ gallery.embeddings.astype(np.float64).T}
    if qaconv:
        scores["qaconv"] = model.qaconv_matrix(probe, gallery).astype(np.float64)
    return scores


def search(model: FaceModel, probe_faces: np.ndarray, probe_ids: np.ndarray,
           gallery_chunks: Iterator[tuple[np.ndarray, np.ndarray]], *, k: int, qaconv: bool,
           fusion_weights: Mapping[str, float]) -> dict[str, TopScores]:
    """Searches every probe against a gallery given chunk by chunk.

    AdaFace: cosine of flip-fused embeddings. QAConv (with `qaconv`): the model's occlusion-weighted
    matcher, mean of both directions. Fused (with QAConv): `fusion.fuse` with the model's statistics
    (`CalibratedFaceModel.fusion_stats`, e.g. eval.py's calibration), else statistics fitted, label-free, on all
    probes against the first gallery chunk.

    Args:
        model: the model.
        probe_faces: uint8 `[P, 112, 112, 3]` aligned faces.
        probe_ids: `[P]` int identity ids (`identity_ids`).
        gallery_chunks: yields (uint8 `[g, 112, 112, 3]` faces, `[g]` int ids).
        k: non-mated scores kept per probe (the CMC length).
        qaconv: also QAConv and fused scores (needs `model.has_qaconv`).
        fusion_weights: weights of the fused score.

    Returns:
        method -> `TopScores`.
    """
    probe = model.extract(probe_faces, keep_maps=qaconv)
    accumulators: dict[str, TopScoreAccumulator] = {}
    stats = model.fusion_stats if isinstance(model, CalibratedFaceModel) else None
    for faces, ids in gallery_chunks:
        if faces.shape[0] == 0:
            continue
        scores = _chunk_scores(model, probe, model.extract(faces, keep_maps=qaconv), qaconv)
        if qaconv:
            if stats is None:
                stats = fusion.FusionStats.fit({name: s.reshape(-1) for name, s in scores.items()})
            flat = {name: s.reshape(-1) for name, s in scores.items()}
            scores["fused"] = fusion.fuse(flat, fusion_weights, stats).reshape(scores["adaface"].shape)
        same = probe_ids[:, None] == ids[None, :]
        for name, values in scores.items():
            accumulators.setdefault(name, TopScoreAccumulator(len(probe_ids), k)).update(values, same)
    if not accumulators:
        raise ValueError("the gallery has no face to search")
    return {name: acc.result() for name, acc in accumulators.items()}


# Results and the evaluator.


@dataclasses.dataclass(frozen=True)
class IdentificationResult:
    """One gallery/probe set.

    Attributes:
        name: the evaluator's name.
        methods: score name -> `MethodResult`.
        gallery: gallery faces searched.
        mated, non_mated: probes with and without a gallery mate.
        failed: (file, reason) of the gallery and probe photos without a usable face.
        skipped: entries of the gallery and probe folders that are not images (`Entries.skipped`).
    """

    name: str
    methods: dict[str, MethodResult]
    gallery: int
    mated: int
    non_mated: int
    failed: list[tuple[str, str]]
    skipped: int = 0

    def resolved(self, fpir: float) -> bool:
        """Whether the non-mated probes can measure `fpir` (at least 1 / fpir of them)."""
        return self.non_mated * fpir >= 1.0


def check_settings(settings: Mapping[str, Any], known: Sequence[str], field: str) -> None:
    """Raises ValueError naming the settings under `field` (e.g. "eval.evaluators.ar") not in `known`."""
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{field}: unknown settings {unknown}; expected some of {sorted(known)}")


def ranks_and_fpirs(settings: Mapping[str, Any], field: str, default_ranks: Sequence[int] = RANKS
                    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The `ranks` (CMC points, >= 1) and `fpirs` (open-set false positive identification rates, in (0, 1))
    of an identification evaluator's settings, defaults filled in.

    Raises:
        ValueError: naming `<field>.ranks` or `<field>.fpirs` and what was expected.
    """
    ranks = tuple(int(r) for r in settings.get("ranks", default_ranks))
    fpirs = tuple(float(f) for f in settings.get("fpirs", FPIRS))
    if not ranks or min(ranks) < 1:
        raise ValueError(f"{field}.ranks={ranks}: expected ranks >= 1")
    if not all(0.0 < f < 1.0 for f in fpirs):
        raise ValueError(f"{field}.fpirs={fpirs}: expected rates in (0, 1)")
    return ranks, fpirs


CORNER = "identification (%)"


class IdentificationEvaluator(base.Evaluator):
    """Closed- and open-set identification of probe faces against a gallery (type "identification").

    Settings: `gallery`, `probe` (folders or list files, `read_entries`); optional `aligned` (False: photos
    detected and aligned unless 112x112), `ranks` ((1, 5, 10)), `fpirs` ((1e-2, 1e-1)), `qaconv` (True: QAConv
    and fused, with `eval.fusion_weights`, when the model has QAConv), `gallery_chunk` (1024 faces scored at a
    time), `validation` (also run by train-time validation, which reads the faces again each time).

    Scalars: "<score>/rank<r>" and "<score>/tpir@fpir<f>" (fractions); table rows "<name> <score>"; file
    cmc_<name>.png.
    """

    SETTINGS = ("gallery", "probe", "aligned", "ranks", "fpirs", "qaconv", "gallery_chunk", *FRAMEWORK_SETTINGS)
    DEFAULT_RANKS = RANKS

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        """Checks the settings and lists (so checks) the gallery and probe sets.

        Raises:
            ValueError: an unknown or bad setting, or a set without images (naming the field).
            FileNotFoundError: a gallery or probe folder or list file that does not exist.
        """
        super().__init__(name, settings, common)
        self.field = f"eval.evaluators.{name}"
        check_settings(settings, self.SETTINGS, self.field)
        self.aligned = bool(settings.get("aligned", False))
        self.ranks, self.fpirs = ranks_and_fpirs(settings, self.field, self.DEFAULT_RANKS)
        self.qaconv = bool(settings.get("qaconv", True))
        self.gallery_chunk = int(settings.get("gallery_chunk", GALLERY_CHUNK))
        if self.gallery_chunk < 1:
            raise ValueError(f"{self.field}.gallery_chunk={self.gallery_chunk}: expected >= 1")
        self.gallery, self.probe = self.read_sets(settings)
        logging.info("%s: %d gallery and %d probe images", name, len(self.gallery.paths), len(self.probe.paths))

    def read_sets(self, settings: Mapping[str, Any]) -> tuple[Entries, Entries]:
        """(gallery, probe) entries from the settings; subclasses read their own layouts."""
        missing = [key for key in ("gallery", "probe") if not settings.get(key)]
        if missing:
            raise ValueError(f"{self.field}: {missing} required (folders of identity sub-folders or list files)")
        return (read_entries(settings["gallery"], base.setting_field(self.name, settings, "gallery")),
                read_entries(settings["probe"], base.setting_field(self.name, settings, "probe")))

    def evaluate(self, model: FaceModel) -> IdentificationResult:
        """Reads and aligns the faces, searches every probe, returns the metrics of each score."""
        probe = read_faces(self.probe, range(len(self.probe.paths)), self.aligned)
        failed = list(probe.failed)
        probe_labels = [self.probe.labels[i] for i in probe.rows]
        probe_ids, gallery_ids = identity_ids(probe_labels, self.gallery.labels)
        if probe.faces.shape[0] == 0:
            raise ValueError(f"{self.name}: no probe face ({len(failed)} photos without a usable face)")
        gallery_faces = 0

        def chunks():
            nonlocal gallery_faces
            for start in range(0, len(self.gallery.paths), self.gallery_chunk):
                part = read_faces(self.gallery, range(start, min(start + self.gallery_chunk, len(self.gallery.paths))),
                                  self.aligned)
                failed.extend(part.failed)
                gallery_faces += part.rows.size
                yield part.faces, gallery_ids[part.rows]

        k = min(max(max(self.ranks), CMC_LENGTH), len(self.gallery.paths))
        qaconv = self.qaconv and model.has_qaconv
        tops = search(model, probe.faces, probe_ids, chunks(), k=k, qaconv=qaconv,
                      fusion_weights=self.common.fusion_weights)
        for name, reason in failed:
            logging.warning("%s: %s: %s; left out", self.name, name, reason)
        return self.result(tops, gallery_faces, failed)

    def result(self, tops: Mapping[str, TopScores], gallery: int,
               failed: list[tuple[str, str]]) -> IdentificationResult:
        """The metrics of each score (ranks beyond the K kept are left out)."""
        first = next(iter(tops.values()))
        mated = first.mated
        ranks = [r for r in self.ranks if r <= first.nonmate.shape[1]]
        return IdentificationResult(
            name=self.name, methods={m: method_result(t, ranks, self.fpirs) for m, t in tops.items()},
            gallery=gallery, mated=int(mated.sum()), non_mated=int((~mated).sum()), failed=failed,
            skipped=self.gallery.skipped + self.probe.skipped)

    def scalars(self, result: IdentificationResult) -> dict[str, float]:
        """"<score>/rank<r>" and "<score>/tpir@fpir<f>" (fractions)."""
        out = {}
        for method, values in result.methods.items():
            out.update({f"{method}/rank{rank}": value for rank, value in values.ranks.items()})
            out.update({f"{method}/tpir@fpir{fpir:.0e}": value for fpir, value in values.tpir.items()})
        return out

    def best_metric(self, scalars: Mapping[str, float]) -> Optional[float]:
        """AdaFace rank-1 (None when rank 1 is not among `ranks`)."""
        return scalars.get("adaface/rank1")

    def tables(self, result: IdentificationResult) -> list[base.Table]:
        """Rank-r and TPIR at each FPIR per score, in percent, then the counts and what was left out."""
        rows, columns = {}, []
        for method, values in result.methods.items():
            row = {f"rank-{r}": 100.0 * v for r, v in values.ranks.items()}
            row.update({f"TPIR@FPIR{f:.0e}": 100.0 * v for f, v in values.tpir.items()})
            rows[f"{result.name} {METHOD_LABELS[method]}"] = row
            columns += [c for c in row if c not in columns]
        return [base.Table(CORNER, tuple(columns), rows, tuple(notes(result)))]

    def summary(self, result: IdentificationResult) -> dict[str, Any]:
        """{"identification": {name: counts, photos left out, and per score ranks, TPIR, thresholds, CMC}}."""
        return {"identification": {result.name: summary_entry(result)}}

    def write(self, result: IdentificationResult, out_dir: epath.Path) -> dict[str, epath.Path]:
        """cmc_<name>.png: the CMC curve of each score."""
        from oaml_jax.evaluation import plots  # matplotlib only here
        path = plots.plot_cmc({METHOD_LABELS[m]: r.cmc for m, r in result.methods.items()},
                              out_dir / f"cmc_{result.name}.png", title=f"{result.name}: CMC")
        return {f"cmc_{result.name}": path}


def notes(result: IdentificationResult) -> list[str]:
    """The table's notes: gallery and probe counts, unmeasurable FPIRs, entries skipped, photos left out."""
    lines = [f"{result.name}: {result.gallery} gallery faces, {result.mated} mated and {result.non_mated} "
             "non-mated probes"]
    unresolved = [f for values in result.methods.values() for f in values.tpir if not result.resolved(f)]
    if unresolved:
        lines.append(f"{result.name}: FPIR {', '.join(f'{f:.0e}' for f in sorted(set(unresolved)))}: fewer than "
                     "1/FPIR non-mated probes, threshold = their highest score (no false alarm allowed)")
    if result.skipped:
        lines.append(f"{result.name}: {result.skipped} folder entries that are not images skipped")
    if result.failed:
        shown = "; ".join(f"{n}: {r}" for n, r in result.failed[:5])
        lines.append(f"{result.name}: {len(result.failed)} photos without a usable face left out ({shown}"
                     f"{', ...' if len(result.failed) > 5 else ''})")
    return lines


def summary_entry(result: IdentificationResult) -> dict[str, Any]:
    """One result as JSON-ready data (rates as fractions; FPIR keys as "1e-02")."""
    return {"gallery": result.gallery, "mated": result.mated, "non_mated": result.non_mated,
            "skipped": result.skipped, "failed": [list(f) for f in result.failed],
            "scores": {m: {"ranks": {str(r): v for r, v in values.ranks.items()},
                           "tpir": {f"{f:.0e}": v for f, v in values.tpir.items()},
                           "thresholds": {f"{f:.0e}": v for f, v in values.thresholds.items()},
                           "cmc": values.cmc.tolist()} for m, values in result.methods.items()}}
