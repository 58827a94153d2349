"""Type "folder": all-versus-all verification on a folder of faces (OAML's `main_eval.py` protocol, done right).

Layout: `<path>/<identity>/<photo>` (identity sub-folders), or with `identity_pattern` photos directly in
`<path>` whose identity is the regex's first group (or group `id`) of the file name, e.g. `(.+)_\\d+\\.\\w+`.
Photos of any size and format the decoder reads, grayscale included, are detected and aligned
(`inference.faces_from_photos`; a 112x112 photo is taken as aligned) unless `aligned` (then every photo must be
a 112x112 crop); unreadable files, photos without a face and other entries are skipped and counted, and the
counts are printed under the table with the faces used and the genuine and impostor pair counts.

Every unordered pair of distinct faces is scored once (`allpairs.verify_all_pairs`: exact TAR at FAR
1e-2..1e-6 where the impostor count allows, AUC, ROC; host memory bounded, see there). Scores: AdaFace
(cosine, matrix products per tile), and with QAConv: QAConv (the blocked matcher per tile, both directions),
fused, and the visibility-gated score with `eval.gate_threshold` (no training folds here); fused and gated
statistics from a label-free sample of pairs.

Variants (`variants`, default ("clean",)): as for pair sets, on the two sides of pair (i, j), i < j: a kind =
face j occluded (seed j), "both_<kind>" = both (face i with seed N + i), "cross" = face i a mask, face j
sunglasses. Faces, feature maps (float16, `N x h x w x c`) and embeddings are held on the host.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import tqdm
from absl import logging
from etils import epath

from data_pipelines.folders import is_image_name, list_images
from data_pipelines.occlusion import occlude_deterministic
from oaml_jax.evaluation import allpairs, base, pairs
from oaml_jax.paths import user_path
from oaml_jax.photos import faces_from_photos
from oaml_jax.serving import FaceModel, Features

_LABELS = dict((key, label) for label, key in pairs.METHODS)
_PAIR_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Listing:
    """The photos of a folder set: `paths` with their identity `names`, and the entries left out."""

    paths: list[epath.Path]
    names: list[str]
    skipped: list[str]


def list_folder(root: epath.Path, identity_pattern: str = "", field: str = "path") -> Listing:
    """The photos of `root` and their identities (sub-folders, or `identity_pattern` on the file names).

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: a pattern without a group, or fewer than two identities.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{field}={root}: not a folder")
    paths, names, skipped = [], [], []
    if identity_pattern:
        pattern = re.compile(identity_pattern)
        if pattern.groups < 1:
            raise ValueError(f"identity_pattern={identity_pattern!r}: expected a group that captures the identity")
        for entry in sorted(root.iterdir()):
            match = pattern.fullmatch(entry.name) if is_image_name(entry.name) else None
            if match is None or entry.is_dir():
                skipped.append(entry.name)
                continue
            paths.append(entry)
            names.append(match.group("id") if "id" in pattern.groupindex else match.group(1))
    else:
        for entry in sorted(root.iterdir()):
            if not entry.is_dir():
                skipped.append(entry.name)
                continue
            images = list_images(entry)
            listed = {p.name for p in images}
            skipped += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir()) if e.name not in listed]
            paths += images
            names += [entry.name] * len(images)
    if len(set(names)) < 2:
        raise ValueError(f"{field}={root}: {len(set(names))} identities with photos; verification needs at least 2 "
                         + ("(identity_pattern matched no file)" if identity_pattern and not names else
                            "(one sub-folder of photos per identity)"))
    return Listing(paths=paths, names=names, skipped=skipped)


@dataclasses.dataclass(frozen=True)
class FolderFaces:
    """Aligned faces `[F, 112, 112, 3]` with `labels` `[F]`, and what was left out (relative names)."""

    faces: np.ndarray
    labels: np.ndarray
    identities: int
    photos: int
    without_face: list[str]
    unreadable: list[str]
    skipped: list[str]

    def summary(self, name: str) -> str:
        """One line: faces, identities, photos, and what was left out (counts, the first few names)."""
        named = lambda names: f": {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" if names else ""
        skipped = f"{len(self.skipped)} other {'entry' if len(self.skipped) == 1 else 'entries'} skipped"
        return (f"{name}: {self.faces.shape[0]} faces of {self.identities} identities from {self.photos} photos "
                f"({len(self.without_face)} without a face{named(self.without_face)}; {len(self.unreadable)} "
                f"unreadable{named(self.unreadable)}; {skipped}{named(self.skipped)})")


def load_faces(listing: Listing, root: epath.Path, aligned: bool) -> FolderFaces:
    """One face per photo (the largest), aligned; the photos that give none are counted by kind."""
    faces, labels, without, unreadable = [], [], [], []
    ids = {name: k for k, name in enumerate(sorted(set(listing.names)))}
    for path, name in tqdm.tqdm(list(zip(listing.paths, listing.names)), desc="photos", unit="photo",
                                mininterval=5.0, disable=len(listing.paths) <= 20):
        found = faces_from_photos([path], aligned=aligned)
        relative = str(path)[len(str(root)) + 1:]
        if found.unreadable:
            unreadable.append(relative)
        elif not found.sources:
            without.append(relative)
        else:
            faces.append(found.faces[0])
            labels.append(ids[name])
    labels = np.asarray(labels, np.int64)
    return FolderFaces(faces=np.stack(faces) if faces else np.zeros((0, 112, 112, 3), np.uint8), labels=labels,
                       identities=int(np.unique(labels).size), photos=len(listing.paths), without_face=without,
                       unreadable=unreadable, skipped=listing.skipped)


def side_images(faces: np.ndarray, kind: Optional[str], seed_offset: int, grid: int) -> np.ndarray:
    """`faces` with `kind` drawn on face k with seed `seed_offset + k` (None: unchanged)."""
    if kind is None:
        return faces
    return np.stack([occlude_deterministic(face, kind, seed=seed_offset + k, grid=grid)[0]
                     for k, face in enumerate(faces)])


def variant_sides(variant: str) -> tuple[Optional[str], Optional[str]]:
    """(kind on the first face of a pair, kind on the second) of a variant of `pairs.VARIANTS`."""
    if variant == "clean":
        return None, None
    if variant == "cross":
        return "mask", "sunglasses"
    if variant.startswith("both_"):
        return variant[len("both_"):], variant[len("both_"):]
    return None, variant


@dataclasses.dataclass(frozen=True)
class _Side:
    embeddings: np.ndarray  # [F, E] float64
    maps: Optional[np.ndarray]  # [F, h, w, c] float16
    occlusion: Optional[np.ndarray]  # [F, h, w] float32
    visibility: Optional[np.ndarray]  # [F] float64


def _extract(model: FaceModel, images: np.ndarray) -> _Side:
    step = 8 * model.batch_size
    parts = [model.extract(images[k:k + step], keep_maps=model.has_qaconv) for k in range(0, len(images), step)]
    embeddings = np.concatenate([p.embeddings for p in parts]).astype(np.float64)
    if not model.has_qaconv:
        return _Side(embeddings, None, None, None)
    occlusion = np.concatenate([p.occlusion for p in parts])
    return _Side(embeddings, np.concatenate([p.feature_maps.astype(np.float16) for p in parts]), occlusion,
                 occlusion.reshape(occlusion.shape[0], -1).mean(axis=1).astype(np.float64))


def _scorers(model: FaceModel, a: _Side, b: _Side, tile: int) -> tuple[allpairs.ScoreFn, allpairs.ScoreFn]:
    """(pair_fn, tile_fn) of `allpairs.verify_all_pairs` for faces a_i against b_j; one compiled shape each."""

    def pad(x: np.ndarray, size: int) -> np.ndarray:
        return np.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)).astype(np.float32)

    def pair_fn(i: np.ndarray, j: np.ndarray) -> dict[str, np.ndarray]:
        out = {"adaface": np.sum(a.embeddings[i] * b.embeddings[j], axis=1)}
        if model.has_qaconv:
            # Calls padded to a power of two up to _PAIR_CHUNK: a few compiled shapes, little padding.
            chunk = min(_PAIR_CHUNK, 1 << max(i.size - 1, 0).bit_length())
            qaconv = []
            for k in range(0, i.size, chunk):
                ik, jk = i[k:k + chunk], j[k:k + chunk]
                scores = model.qaconv_pair_scores(pad(a.maps[ik], chunk), pad(b.maps[jk], chunk),
                                                  pad(a.occlusion[ik], chunk), pad(b.occlusion[jk], chunk))
                qaconv.append(scores[:ik.size])
            out["qaconv"] = np.concatenate(qaconv) if qaconv else np.zeros(0)
            out["visibility"] = 0.5 * (a.visibility[i] + b.visibility[j])
        return out

    def tile_fn(rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
        out = {"adaface": a.embeddings[rows] @ b.embeddings[cols].T}
        if model.has_qaconv:
            side = lambda s, idx: Features(embeddings=np.zeros((tile, 1)), norms=np.zeros(tile),
                                           occlusion=pad(s.occlusion[idx], tile), feature_maps=pad(s.maps[idx], tile))
            out["qaconv"] = model.qaconv_matrix(side(a, rows), side(b, cols))[:rows.size, :cols.size]
            out["visibility"] = 0.5 * (a.visibility[rows][:, None] + b.visibility[cols][None, :])
        return out

    return pair_fn, tile_fn


@dataclasses.dataclass(frozen=True)
class FolderResult:
    """The faces used, the pair counts, and variant -> score -> `allpairs.ScoreResult`; pairs scored per second."""

    faces: FolderFaces
    num_genuine: int
    num_impostors: int
    scores: dict[str, dict[str, allpairs.ScoreResult]]
    pairs_per_s: float


class FolderEvaluator(base.Evaluator):
    """Type "folder". Settings: `path`, `identity_pattern` (""), `aligned` (False), `variants` (("clean",)),
    `fars` (`allpairs.FARS`), `tile` (256 faces per tile side), `validation` (clean only)."""

    def __init__(self, name: str, settings: Mapping[str, Any], common: base.Common):
        super().__init__(name, settings, common)
        field = base.setting_field(name, settings, "path")
        if not settings.get("path"):
            raise ValueError(f"{field}: expected the folder of faces")
        self.root = user_path(settings["path"], field)
        self.aligned = bool(settings.get("aligned", False))
        self.variants = ("clean",) if common.training else pairs.check_variants(settings.get("variants", ("clean",)))
        self.fars = tuple(float(f) for f in settings.get("fars", allpairs.FARS))
        if not all(0.0 < f < 1.0 for f in self.fars):
            raise ValueError(f"eval.evaluators.{name}.fars={self.fars}: expected rates in (0, 1)")
        self.tile = int(settings.get("tile", 256))
        if self.tile < 1:
            raise ValueError(f"eval.evaluators.{name}.tile={self.tile}: expected >= 1")
        self.listing = list_folder(self.root, settings.get("identity_pattern", ""), field)
        self._faces: Optional[FolderFaces] = None

    def faces(self) -> FolderFaces:
        """The aligned faces (read and detected once, then kept: train-time validation reuses them)."""
        if self._faces is None:
            self._faces = load_faces(self.listing, self.root, self.aligned)
            logging.info("%s", self._faces.summary(self.name))
        return self._faces

    def evaluate(self, model: FaceModel) -> FolderResult:
        faces = self.faces()
        num_genuine, num_impostors = allpairs.pair_counts(faces.labels)
        n = faces.labels.size
        scores, seconds = {}, 0.0
        for variant in self.variants:
            first, second = variant_sides(variant)
            grid = model.contract.grid
            side_b = _extract(model, side_images(faces.faces, second, 0, grid))
            side_a = side_b if variant == "clean" else _extract(model, side_images(faces.faces, first, n, grid))
            tile = min(self.tile, n)
            pair_fn, tile_fn = _scorers(model, side_a, side_b, tile)
            start = time.perf_counter()
            with tqdm.tqdm(total=n * (n - 1) // 2, desc=f"{self.name} {variant} pairs", unit="pair", mininterval=5.0,
                           disable=n < 1000) as bar:
                scores[variant] = allpairs.verify_all_pairs(
                    faces.labels, pair_fn, tile_fn, weights=self.common.fusion_weights,
                    gate=self.common.gate_threshold, fars=self.fars, tile=tile, progress=bar.update)
            seconds += time.perf_counter() - start
        pairs_per_s = len(self.variants) * (n * (n - 1) // 2) / max(seconds, 1e-9)
        return FolderResult(faces, num_genuine, num_impostors, scores, pairs_per_s)

    def scalars(self, result: FolderResult) -> dict[str, float]:
        out = {}
        for variant, by_score in result.scores.items():
            for score, r in by_score.items():
                out.update({f"{self.name}/{variant}/{score}_tar@{far:.0e}": tar
                            for far, tar in r.tar.items() if tar is not None})
                out[f"{self.name}/{variant}/{score}_auc"] = r.auc
        return out

    def best_metric(self, scalars: Mapping[str, float]) -> Optional[float]:
        """The clean AdaFace AUC."""
        return scalars[f"{self.name}/clean/adaface_auc"]

    def tables(self, result: FolderResult) -> list[base.Table]:
        columns = tuple(f"TAR@{far:.0e}" for far in self.fars) + ("AUC",)
        rows = {}
        for variant, by_score in result.scores.items():
            for score, r in by_score.items():
                row = {f"TAR@{far:.0e}": 100.0 * tar for far, tar in r.tar.items() if tar is not None}
                rows[f"{self.name} {variant} {_LABELS[score]}"] = dict(row, AUC=100.0 * r.auc)
        notes = [f"{result.faces.summary(self.name)}; {result.num_genuine:,} genuine and {result.num_impostors:,} "
                 f"impostor pairs"]
        unmeasured = [f"{far:.0e}" for far in self.fars if far * result.num_impostors < 1.0 - 1e-9]
        if unmeasured:
            notes.append(f"{self.name}: TAR at FAR {', '.join(unmeasured)} not measurable on "
                         f"{result.num_impostors:,} impostor pairs (FAR f needs at least 1/f)")
        return [base.Table("folder variant score (%)", columns, rows, tuple(notes))]

    def summary(self, result: FolderResult) -> dict[str, Any]:
        faces = result.faces
        return {"folders": {self.name: {
            "faces": int(faces.faces.shape[0]), "identities": faces.identities, "photos": faces.photos,
            "without_face": faces.without_face, "unreadable": faces.unreadable, "skipped": faces.skipped,
            "genuine_pairs": result.num_genuine, "impostor_pairs": result.num_impostors,
            "pairs_per_s": result.pairs_per_s,
            "tar": {v: {s: {str(f): t for f, t in r.tar.items()} for s, r in by.items()}
                    for v, by in result.scores.items()},
            "auc": {v: {s: r.auc for s, r in by.items()} for v, by in result.scores.items()}}}}

    def write(self, result: FolderResult, out_dir: epath.Path) -> dict[str, epath.Path]:
        """<name>_<variant>_roc.png (FAR axis from 1 / the impostor pairs) and <name>_<variant>_hist.png (genuine vs
        impostor histograms per score)."""
        from oaml_jax.evaluation import plots  # matplotlib: only where figures are written

        files = {}
        for variant, by_score in result.scores.items():
            title = f"{self.name} {variant}"
            curves = {_LABELS[s]: (r.fpr, r.tpr) for s, r in by_score.items()}
            files[f"{self.name}_{variant}_roc"] = plots.plot_roc(curves, out_dir / f"{self.name}_{variant}_roc.png",
                                                                 title=title, num_impostors=result.num_impostors)
            files[f"{self.name}_{variant}_hist"] = plots.plot_score_histograms(
                {_LABELS[s]: (r.genuine, r.impostor_sample) for s, r in by_score.items()},
                out_dir / f"{self.name}_{variant}_hist.png", title=title)
        return files
