"""IJB-B / IJB-C 1:1 template verification in the insightface layout.

Layout under `root` (for `name` in {"ijbb", "ijbc"}):
    meta/{name}_face_tid_mid.txt         "<image_name> <template_id> <media_id>"  (one line per face)
    meta/{name}_template_pair_label.txt  "<template_1> <template_2> <label>"      (label 1 = same)
    meta/{name}_name_5pts_score.txt      "<image_name> x1 y1 ... x5 y5 <detector score>"
    loose_crop/<image_name>              the face images, aligned here with the 5 landmarks

The two per-face files list the same faces in the same order (insightface indexes both by line number);
`read_ijb_meta` checks that. A template's feature pools its faces' features per media (mean over the
frames of one video or the single photo), sums the media features and L2-normalizes; template pairs are
scored by cosine. insightface's best setting feeds un-normalized (norm-weighted) flip-summed features,
scaled by the detector score; `template_features` takes the features as given and optional per-face
weights so the caller picks the mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import scipy.sparse
from absl import logging
from etils import epath

from data_pipelines.images import decode_image
from oaml_jax import align
from oaml_jax.evaluation import base, fusion, verification
from oaml_jax.serving import FaceModel
from oaml_jax.models.face_input import FACE_SIZE
from oaml_jax.paths import user_path

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_NAMES = ("ijbb", "ijbc")


@dataclasses.dataclass(frozen=True)
class IJBMeta:
    """Parsed IJB metadata.

    Attributes:
        root: dataset folder.
        name: "ijbb" or "ijbc".
        image_names: `[F]` face image names (relative to `root/loose_crop`).
        templates: `[F]` int64 template id of each face.
        medias: `[F]` int64 media id of each face.
        landmarks: `[F, 5, 2]` float32 landmarks in the loose crop.
        detector_scores: `[F]` float32 face detector scores.
        pairs: `[M, 2]` int64 template ids of each verification pair.
        labels: `[M]` bool, True for same-identity pairs.
    """

    root: epath.Path
    name: str
    image_names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray

    @property
    def image_dir(self) -> epath.Path:
        return self.root / "loose_crop"


def _read_rows(path: epath.Path, num_fields: int, what: str) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from e
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != num_fields:
            raise ValueError(f"{path}:{line_no}: expected {num_fields} fields ({what}), got "
                             f"{len(fields)}: {line.strip()!r}")
        rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: no entries")
    return rows


def _parse(path: epath.Path, rows: list[list[str]], columns: slice, dtype) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric field ({e})") from e


def read_ijb_meta(root: epath.PathLike, name: str) -> IJBMeta:
    """Read the three IJB meta files.

    Args:
        root: dataset folder holding `meta/` and `loose_crop/`.
        name: "ijbb" or "ijbc" (case-insensitive).

    Returns:
        The parsed `IJBMeta`. Missing files raise FileNotFoundError naming the path; malformed lines
        raise ValueError naming file and line.
    """
    name = name.lower()
    if name not in IJB_NAMES:
        raise ValueError(f"name: expected one of {IJB_NAMES}, got '{name}'")
    root = epath.Path(root)
    meta_dir = root / "meta"
    tid_path = meta_dir / f"{name}_face_tid_mid.txt"
    pair_path = meta_dir / f"{name}_template_pair_label.txt"
    lmk_path = meta_dir / f"{name}_name_5pts_score.txt"

    tid_rows = _read_rows(tid_path, 3, "image_name template_id media_id")
    pair_rows = _read_rows(pair_path, 3, "template_1 template_2 label")
    lmk_rows = _read_rows(lmk_path, 12, "image_name, 10 landmark coordinates, detector score")

    image_names = np.array([row[0] for row in tid_rows])
    ids = _parse(tid_path, tid_rows, slice(1, 3), np.int64)
    pairs = _parse(pair_path, pair_rows, slice(0, 3), np.int64)
    lmk_values = _parse(lmk_path, lmk_rows, slice(1, 12), np.float32)

    if len(lmk_rows) != len(tid_rows):
        raise ValueError(f"{lmk_path} lists {len(lmk_rows)} faces but {tid_path} lists {len(tid_rows)}")
    lmk_names = np.array([row[0] for row in lmk_rows])
    mismatch = np.flatnonzero(lmk_names != image_names)
    if mismatch.size:
        i = int(mismatch[0])
        raise ValueError(f"{lmk_path}:{i + 1}: image '{lmk_names[i]}' differs from '{image_names[i]}' on the "
                         f"same line of {tid_path}; the files must list the same faces in the same order")
    bad_labels = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if bad_labels.size:
        raise ValueError(f"{pair_path}:{int(bad_labels[0]) + 1}: label must be 0 or 1")
    unknown = np.flatnonzero(~np.isin(pairs[:, :2], ids[:, 0]).all(axis=1))
    if unknown.size:
        i = int(unknown[0])
        raise ValueError(f"{pair_path}:{i + 1}: template pair {pairs[i, 0]} {pairs[i, 1]} names a template "
                         f"with no faces in {tid_path}")
    return IJBMeta(root=root, name=name, image_names=image_names, templates=ids[:, 0], medias=ids[:, 1],
                   landmarks=lmk_values[:, :10].reshape(-1, 5, 2), detector_scores=lmk_values[:, 10],
                   pairs=pairs[:, :2], labels=pairs[:, 2].astype(bool))


def load_aligned_face(meta: IJBMeta, index: int, size: int = FACE_SIZE) -> np.ndarray:
    """Read face `index` from `loose_crop/` and align it with its landmarks.

    Args:
        meta: parsed metadata.
        index: face index (line of the meta files, from 0).
        size: output side.

    Returns:
        uint8 `[size, size, 3]` RGB crop.
    """
    path = meta.image_dir / str(meta.image_names[index])
    if not path.is_file():
        raise FileNotFoundError(f"IJB image listed in the meta files is missing: {path}")
    return align.align_face(decode_image(path.read_bytes(), where=f"IJB image {path}"), meta.landmarks[index],
                            size)


def iter_aligned_faces(root: epath.PathLike, meta: IJBMeta, size: int = FACE_SIZE) -> Iterator[np.ndarray]:
    """Aligned crops of every face, in meta order.

    Args:
        root: dataset folder (normally `meta.root`; the images are read from `root/loose_crop`).
        meta: parsed metadata.
        size: output side.

    Yields:
        uint8 `[size, size, 3]` RGB crops.
    """
    meta = dataclasses.replace(meta, root=epath.Path(root))
    for index in range(meta.image_names.size):
        yield load_aligned_face(meta, index, size)


def iter_aligned_batches(root: epath.PathLike, meta: IJBMeta, batch_size: int,
                         size: int = FACE_SIZE) -> Iterator[np.ndarray]:
    """`iter_aligned_faces` grouped into batches (the last one may be smaller).

    Args:
        root: dataset folder.
        meta: parsed metadata.
        batch_size: faces per batch.
        size: output side.

    Yields:
        uint8 `[b, size, size, 3]` RGB crops, `b <= batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    batch = []
    for face in iter_aligned_faces(root, meta, size):
        batch.append(face)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      face_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Media-pooled template features.

    Each face feature is scaled by its weight (if given); faces of one media (same template and media
    id) are averaged; a template's media features are summed and the sum L2-normalized.

    Args:
        face_features: `[F, E]` features (insightface's best mode passes un-normalized features).
        templates: `[F]` template id per face.
        medias: `[F]` media id per face.
        face_weights: optional `[F]` per-face weights (e.g. detector scores).

    Returns:
        `(template_ids [T] sorted int64, features [T, E] float32 unit rows)`.
    """
    feats = np.asarray(face_features)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    if feats.ndim != 2:
        raise ValueError(f"face_features: expected [F, E], got shape {feats.shape}")
    num_faces = feats.shape[0]
    if templates.shape != (num_faces,) or medias.shape != (num_faces,):
        raise ValueError(f"templates {templates.shape} / medias {medias.shape}: expected ({num_faces},)")
    if num_faces == 0:
        raise ValueError("face_features: no faces")
    weights = np.ones(num_faces, dtype=np.float32)
    if face_weights is not None:
        weights = np.asarray(face_weights, dtype=np.float32)
        if weights.shape != (num_faces,):
            raise ValueError(f"face_weights: expected ({num_faces},), got {weights.shape}")
    _, media_of_face, media_counts = np.unique(np.stack([templates, medias], axis=1), axis=0,
                                               return_inverse=True, return_counts=True)
    template_ids, template_of_face = np.unique(templates, return_inverse=True)
    # Media mean then template sum is one linear map: face i enters its template with weight
    # w_i / |media(i)|. A sparse [T, F] matrix applies it without sorting or copying the features
    # (np.add.reduceat over rows is ~40x slower on IJB-sized inputs).
    coefficients = weights / media_counts[media_of_face.reshape(-1)]
    pooling = scipy.sparse.csr_matrix((coefficients, (template_of_face.reshape(-1), np.arange(num_faces))),
                                      shape=(template_ids.size, num_faces))
    template_feats = np.asarray(pooling @ np.asarray(feats, dtype=np.float32))

    norms = np.linalg.norm(template_feats, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"template {template_ids[zero[0]]}: pooled feature is zero, cannot normalize")
    return template_ids, (template_feats / norms).astype(np.float32)


def _template_rows(template_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Row of each template of `pairs` [M, 2] in `template_ids`; unknown ids raise naming the pair."""
    template_ids = np.asarray(template_ids, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs: expected [M, 2] template ids, got shape {pairs.shape}")
    order = np.argsort(template_ids, kind="stable")
    sorted_ids = template_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, pairs), 0, max(sorted_ids.size - 1, 0))
    found = sorted_ids[pos] == pairs
    if not found.all():
        m, k = np.argwhere(~found)[0]
        raise KeyError(f"pair {m}: template {pairs[m, k]} has no feature")
    return order[pos]


def verify_templates(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                     chunk: int = 100_000) -> np.ndarray:
    """Cosine score of each template pair, `chunk` pairs at a time.

    Args:
        template_ids: `[T]` ids of the rows of `template_feats`.
        template_feats: `[T, E]` unit template features.
        pairs: `[M, 2]` template ids.
        chunk: pairs per step (bounds the `[chunk, E]` temporaries).

    Returns:
        `[M]` float32 cosines.
    """
    rows = _template_rows(template_ids, pairs)
    feats = np.asarray(template_feats, dtype=np.float32)
    scores = np.empty(rows.shape[0], dtype=np.float32)
    for lo in range(0, rows.shape[0], chunk):
        a = feats[rows[lo:lo + chunk, 0]]
        b = feats[rows[lo:lo + chunk, 1]]
        scores[lo:lo + chunk] = np.einsum("me,me->m", a, b)
    return scores


def template_pair_scores_from_pairwise(templates: np.ndarray, pairs: np.ndarray,
                                       score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                                       chunk: int = 65_536) -> np.ndarray:
    """Template-pair scores as the mean of an image-pair score over all their faces' pairs.

    For pair (T1, T2) the score is `mean_{a in T1, b in T2} score_fn(a, b)`. All image pairs of all
    template pairs are enumerated lazily and handed to `score_fn` `chunk` at a time (a large template
    pair spans several calls), e.g. QAConv between the faces' feature maps. The cost is
    `sum_m |T1_m| * |T2_m|` image-pair scores: plan for it on the full IJB-C.

    Args:
        templates: `[F]` template id of each face.
        pairs: `[M, 2]` template ids.
        score_fn: `(idx_a [n] int64, idx_b [n] int64) -> [n]` scores of faces `idx_a[i]` vs `idx_b[i]`.
        chunk: image pairs per `score_fn` call.

    Returns:
        `[M]` float64 mean scores.
    """
    templates = np.asarray(templates, dtype=np.int64)
    if chunk < 1:
        raise ValueError(f"chunk: expected >= 1, got {chunk}")
    faces_by_template = np.argsort(templates, kind="stable")
    template_ids, starts, counts = np.unique(templates[faces_by_template], return_index=True,
                                             return_counts=True)
    rows = _template_rows(template_ids, pairs)
    start_a, start_b = starts[rows[:, 0]], starts[rows[:, 1]]
    count_a, count_b = counts[rows[:, 0]], counts[rows[:, 1]]
    sizes = count_a * count_b
    pair_end = np.cumsum(sizes)
    pair_start = pair_end - sizes
    sums = np.zeros(rows.shape[0], dtype=np.float64)
    total = int(pair_end[-1]) if pair_end.size else 0
    for lo in range(0, total, chunk):
        k = np.arange(lo, min(lo + chunk, total), dtype=np.int64)
        m = np.searchsorted(pair_end, k, side="right")
        local = k - pair_start[m]
        idx_a = faces_by_template[start_a[m] + local // count_b[m]]
        idx_b = faces_by_template[start_b[m] + local % count_b[m]]
        scores = np.asarray(score_fn(idx_a, idx_b), dtype=np.float64)
        if scores.shape != k.shape:
            raise ValueError(f"score_fn returned shape {scores.shape} for {k.size} image pairs")
        np.add.at(sums, m, scores)
    return sums / sizes


def ijb_tar_table(scores: np.ndarray, labels: np.ndarray,
                  fars: Sequence[float] = IJB_FARS) -> dict[float, float]:
    """TAR at each FAR of the IJB protocol (see `verification.tar_at_far` for the exact definition).

    A FAR below `1 / #impostor pairs` allows no false accept, so it is measured at FAR 0 (the threshold
    is the highest impostor score).

    Args:
        scores: `[M]` template-pair similarities.
        labels: `[M]` bool / 0-1 ground truth.
        fars: false accept rates.

    Returns:
        dict far -> tar.
    """
    return verification.tar_at_far(scores, labels, fars)


# Evaluation of a model on IJB-B/C (eval.py; too slow for train-time validation).

# Image pairs per QAConv call on IJB: two float16 maps each on the host gather (411 MB at 7x7x512) and
# float32 on the device.
IJB_QACONV_CHUNK = 4096
# Pairs matched at once inside one QAConv call: bounds the [n, hw, hw] similarity temporaries.
_QACONV_INNER_CHUNK = 1024


def ijb_folder(root: epath.PathLike, name: str) -> Optional[epath.Path]:
    """The folder of IJB set `name` under `eval.ijb_root`, or None when it is not there.

    Accepts insightface's `IJB_release` layout (`<root>/IJBB`, `<root>/IJBC`, each with `meta/` and
    `loose_crop/`) and a root that is itself one set's folder.
    """
    root = epath.Path(root)
    for folder in (root / name.upper(), root / name, root):
        if (folder / "meta" / f"{name}_face_tid_mid.txt").is_file():
            return folder
    return None


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
