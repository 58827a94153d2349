"""The insightface layout of IJB-B / IJB-C: meta files, set folders and aligned faces.

Layout under `root` (for `name` in {"ijbb", "ijbc"}):
    meta/{name}_face_tid_mid.txt         "<image_name> <template_id> <media_id>"  (one line per face)
    meta/{name}_template_pair_label.txt  "<template_1> <template_2> <label>"      (label 1 = same)
    meta/{name}_name_5pts_score.txt      "<image_name> x1 y1 ... x5 y5 <detector score>"
    loose_crop/<image_name>              the face images, aligned here with the 5 landmarks

The two per-face files list the same faces in the same order (insightface indexes both by line number);
`read_ijb_meta` checks that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Optional

import numpy as np
from etils import epath

from data_pipelines.images import decode_image
from oaml_jax import align
from oaml_jax.models.face_input import FACE_SIZE

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
