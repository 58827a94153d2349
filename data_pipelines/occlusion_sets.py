"""Real occlusion sets: faces with drawn visibility masks, the occlusion head's second data stream (OAML's).

Layouts of a set folder `root` (any `etils.epath` path: local, gs://, ...):

    root/kept_faces/{name}.jpg|.png|...     the face (`root/images/` is accepted too)
    root/masks/{name}_mask.png              OAML's layout: suffix "_mask", ".png" or the image's extension
    root/masks/{name}.png                   two folders, same names, no suffix (".png" or the image's extension)

or one ArrayRecord file written by `convert_to_array_record` (`root` ending in ".array_record").
Masks are grayscale (colour masks are converted), 255 = visible, 0 = occluded, graded values are
fractions; any resolution. The target of a face is the visible fraction of each cell of the model's
`grid x grid` feature grid, computed by area from the mask at its own full resolution.

**Size rule.** A mask is taken to cover the same field of view as its image: a mask of another size
(say 224x224 for a 112x112 face, or 100x120) is stretched to the image, each axis on its own, and the
cell (i, j) of the grid is the region `[i/g, (i+1)/g) x [j/g, (j+1)/g)` of the mask's height and width,
whose mean (exact area weights where pixels straddle cells, `occlusion.visibility_map`) is the target.
This equals area-resizing the mask to the image first, without the resampling loss.

Images must be 112x112 aligned faces, refused naming the file otherwise, unless the set is declared
unaligned (`aligned=False`): faces are then detected and aligned when the set is opened (MTCNN,
`oaml_jax.align`) and each mask is warped by the same similarity transform (composed with the size rule),
at 4x the face's resolution so the targets keep the mask's detail; outside the photo counts as not visible.
There too, as in `oaml-inference align`, a 112x112 photo is taken as an aligned face: not detected, its
mask kept as it is (the size rule scales it to the face).
`occlusion_set_align.align_set` writes such a set once, aligned, in OAML's layout
(`oaml-inference align --masks=...`).

Images without a mask and masks without an image are counted and logged (names of the first few); a set
with no pair is refused. A deterministic share of each set (by a hash of the name, stable when the set
grows) is held out for validation (`split`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import cv2
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data_pipelines.folders import list_images
from data_pipelines.images import CorruptImageError, decode_image, decode_photo
from data_pipelines.occlusion import visibility_map
from oaml_jax.models.face_input import FACE_SIZE
from oaml_jax.paths import user_path

IMAGE_DIRS = ("kept_faces", "images")
MASK_DIR = "masks"
MASK_SUFFIX = "_mask"
ARRAY_RECORD_SUFFIX = ".array_record"
# Unaligned sets: masks are warped to this multiple of the face's side.
MASK_WARP_SCALE = 4
_SHOWN = 5
_HOLDOUT_BUCKETS = 10_000
_RECORD_HEADER = struct.Struct("<III")


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks the occlusion-stream fields of `config.data`; raises ValueError naming the field.

    `data.occlusion_sets` may be one path (as the command line gives it) or a tuple of paths; the sets
    themselves are opened (and a set with no pair refused) by `open_sets` before the first step.

    Args:
        config: the whole run config; only `config.data`'s occlusion-stream fields are read.
        num_devices, process_count: the occlusion batch splits over them like the main batch.
    """
    data_cfg = config["data"]
    sets = set_paths(data_cfg["occlusion_sets"])
    batch = data_cfg["occlusion_batch"]
    if batch < 0:
        raise ValueError(f"data.occlusion_batch={batch} must be >= 0 (0 = no occlusion stream)")
    if sets and batch == 0:
        raise ValueError(f"data.occlusion_sets={sets} needs data.occlusion_batch > 0 (images per step)")
    if batch and not sets:
        raise ValueError(f"data.occlusion_batch={batch} needs data.occlusion_sets (image + mask set folders)")
    if batch % num_devices or batch % process_count:
        raise ValueError(f"data.occlusion_batch={batch} must split evenly over the {num_devices} devices and "
                         f"{process_count} processes, like the main batch")
    share = data_cfg["occlusion_real_share"]
    if not 0.0 < share <= 1.0:
        raise ValueError(f"data.occlusion_real_share={share} must be in (0, 1] (the rest are clean faces)")
    holdout = data_cfg["occlusion_holdout"]
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"data.occlusion_holdout={holdout} must be in [0, 1)")
    flip = data_cfg["occlusion_augment"]["flip_prob"]
    photometric = data_cfg["occlusion_augment"]["photometric_prob"]
    for field, value in (("flip_prob", flip), ("photometric_prob", photometric)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.occlusion_augment.{field}={value} must be in [0, 1]")
    for i, path in enumerate(sets):
        user_path(path, f"data.occlusion_sets[{i}]")


def set_paths(value: Any) -> tuple[str, ...]:
    """`data.occlusion_sets` as a tuple of paths: one string (the command line's) or a sequence; "" = none."""
    if isinstance(value, (str, os.PathLike)):
        value = (value,) if os.fspath(value) else ()
    return tuple(os.fspath(v) for v in value)


def _stem(name: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(name)
    return stem, ext


@dataclasses.dataclass(frozen=True)
class Listing:
    """The pairs of a set folder and what could not be paired.

    Attributes:
        names: the pairs' names (image file name without its extension), sorted.
        images: the image path of each pair.
        masks: the mask path of each pair.
        unpaired_images: image files with no mask.
        unpaired_masks: mask files that belong to no image.
    """

    names: tuple[str, ...]
    images: tuple[epath.Path, ...]
    masks: tuple[epath.Path, ...]
    unpaired_images: tuple[str, ...]
    unpaired_masks: tuple[str, ...]


def image_folder(root: epath.PathLike) -> epath.Path:
    """`root/kept_faces` or `root/images`, whichever exists.

    Raises:
        FileNotFoundError: neither exists, or `root/masks` does not.
    """
    root = epath.Path(root)
    if not (root / MASK_DIR).is_dir():
        raise FileNotFoundError(f"{root}: an occlusion set needs {root / MASK_DIR} (the masks) beside "
                                f"{root / IMAGE_DIRS[0]} (the faces)")
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root}: an occlusion set needs a faces folder {root / IMAGE_DIRS[0]} "
                            f"(or {root / IMAGE_DIRS[1]}) beside {root / MASK_DIR}")


def pair_folders(images: epath.PathLike, masks: epath.PathLike) -> Listing:
    """Pairs the faces of `images` with the masks of `masks` (either layout, see the module docstring).

    For a face `{name}{ext}` the mask is the first of `{name}_mask.png`, `{name}_mask{ext}`, `{name}.png`,
    `{name}{ext}` found in `masks`.
    """
    image_paths = list_images(images)
    mask_paths = {p.name: p for p in list_images(masks)}
    names, paired_images, paired_masks, unpaired, used = [], [], [], [], set()
    for path in image_paths:
        stem, ext = _stem(path.name)
        candidates = (f"{stem}{MASK_SUFFIX}.png", f"{stem}{MASK_SUFFIX}{ext}", f"{stem}.png", f"{stem}{ext}")
        found = next((c for c in candidates if c in mask_paths), None)
        if found is None:
            unpaired.append(path.name)
            continue
        used.add(found)
        names.append(stem)
        paired_images.append(path)
        paired_masks.append(mask_paths[found])
    return Listing(tuple(names), tuple(paired_images), tuple(paired_masks), tuple(unpaired),
                   tuple(sorted(set(mask_paths) - used)))


def read_mask(data: bytes, where: str) -> np.ndarray:
    """Encoded grayscale (or colour) mask -> float32 `[H, W]` visibility in [0, 1] (255 = visible).

    Raises:
        CorruptImageError: the data is not a decodable image.
    """
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if data else None
    if mask is None:
        raise CorruptImageError(where, f"undecodable mask ({len(data)} bytes)")
    return mask.astype(np.float32) / 255.0


def mask_target(mask: np.ndarray, grid: int) -> np.ndarray:
    """The visible fraction of each cell of a `grid x grid` grid laid over the mask (the size rule above).

    Args:
        mask: float32 `[H, W]` in [0, 1], at any resolution, covering the image's field of view.
        grid: the model's feature-map side (`InputContract.grid`).

    Returns:
        float32 `[grid, grid]`.
    """
    return np.clip(visibility_map(mask, grid), 0.0, 1.0).astype(np.float32)


def _similarity_for_mask(landmarks: np.ndarray, image_hw: tuple[int, int], mask_hw: tuple[int, int]
                         ) -> np.ndarray:
    """The face's similarity (landmarks -> template) for the mask: its pixels stretched to the image's
    (the size rule), and the output at `MASK_WARP_SCALE` x the face's side."""
    from oaml_jax import align  # imported on use: detection pulls in tensorflow
    matrix = align.estimate_similarity(landmarks, align.template_for_size(FACE_SIZE))
    stretch = np.diag([image_hw[1] / mask_hw[1], image_hw[0] / mask_hw[0], 1.0])
    return MASK_WARP_SCALE * np.vstack([matrix, [0.0, 0.0, 1.0]]) @ stretch


def align_pair(image: np.ndarray, mask: np.ndarray, **detection: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Aligns a photo's face and its mask: a 112x112 photo is taken as an aligned face (as `oaml-inference
    align` takes it) with its mask kept as it is; any other is detected (largest face), aligned, and its mask
    warped by the same similarity.

    Args:
        image: uint8 `[H, W, 3]` RGB photo.
        mask: float32 `[h, w]` visibility covering the photo (any size: the size rule).
        **detection: `min_face_size`, `min_score` of `align.detect_and_align`.

    Returns:
        (uint8 `[112, 112, 3]` face, float32 mask in the face's frame): for a 112x112 photo `mask` itself
        (`[h, w]`, stretched to the face by the size rule when read), else `[448, 448]`, 0 outside the photo;
        or None when no face is found.
    """
    if image.shape[:2] == (FACE_SIZE, FACE_SIZE):
        return image, mask
    from oaml_jax import align
    faces = align.detect_and_align(image, mode="largest", **detection)
    if not faces:
        return None
    matrix = _similarity_for_mask(faces[0].landmarks, image.shape[:2], mask.shape)
    side = MASK_WARP_SCALE * FACE_SIZE
    warped = cv2.warpAffine(mask, matrix[:2], (side, side), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return faces[0].face, warped


def _holdout_bucket(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) % _HOLDOUT_BUCKETS


class OcclusionSet:
    """Random access to the (face, target) pairs of one occlusion set.

    `set[i] -> (uint8 [112, 112, 3] RGB face, float32 [grid, grid] visible fraction)`; pickles by paths
    (Grain workers re-read the files), except unaligned sets, whose aligned faces are held in memory.
    """

    def __init__(self, root: epath.PathLike, grid: int, *, aligned: bool = True, field: str = "occlusion set",
                 **detection: Any):
        """Lists (or, unaligned, aligns) the set.

        Args:
            root: a set folder or a `.array_record` file from `convert_to_array_record`.
            grid: the model's feature-map side.
            aligned: the faces are 112x112 aligned crops (others are refused when read); False aligns every
                face now (`align_pair`: a 112x112 photo as it is, others detected, their masks warped).
            field: the config field or flag named in errors.
            **detection: `min_face_size`, `min_score` for unaligned sets.

        Raises:
            FileNotFoundError: no such set, or its folders are missing.
            ValueError: the set has no pair (or, unaligned, no face).
        """
        self.root = user_path(root, field)
        self.grid = int(grid)
        self.unpaired_images: tuple[str, ...] = ()
        self.unpaired_masks: tuple[str, ...] = ()
        self.without_face: tuple[str, ...] = ()
        self._records = None
        self._memory: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        if str(self.root).endswith(ARRAY_RECORD_SUFFIX):
            if not self.root.exists():
                raise FileNotFoundError(f"{field}: {self.root} does not exist")
            self._records = _records(self.root)
            self.names = tuple(_split_record(self._records[i])[0] for i in range(len(self._records)))
        else:
            if not self.root.is_dir():
                raise FileNotFoundError(f"{field}: occlusion set folder {self.root} does not exist")
            listing = pair_folders(image_folder(self.root), self.root / MASK_DIR)
            self.names, self._images, self._masks = listing.names, listing.images, listing.masks
            self.unpaired_images, self.unpaired_masks = listing.unpaired_images, listing.unpaired_masks
        for what, names in (("images without a mask", self.unpaired_images),
                            ("masks without an image", self.unpaired_masks)):
            if names:
                logging.warning("%s: %d %s (skipped), e.g. %s", self.root, len(names), what, list(names[:_SHOWN]))
        if not self.names:
            raise ValueError(f"{field}: {self.root} holds no image + mask pair ({len(self.unpaired_images)} "
                             f"images without a mask, {len(self.unpaired_masks)} masks without an image); "
                             f"expected {IMAGE_DIRS[0]}/NAME.jpg with {MASK_DIR}/NAME{MASK_SUFFIX}.png")
        if not aligned:
            self._align(field, detection)
        logging.info("%s: %d face + mask pairs (grid %dx%d)", self.root, len(self.names), self.grid, self.grid)

    def _align(self, field: str, detection: dict) -> None:
        kept, memory, without = [], [], []
        for i, name in enumerate(self.names):
            image_bytes, mask_bytes, where = self._encoded(i)
            out = align_pair(decode_photo(image_bytes, where), read_mask(mask_bytes, where), **detection)
            if out is None:
                without.append(name)
                continue
            kept.append(name)
            memory.append(out)
        if without:
            logging.warning("%s: %d images without a detected face (skipped), e.g. %s", self.root, len(without),
                            without[:_SHOWN])
        if not kept:
            raise ValueError(f"{field}: no face detected in any of the {len(self.names)} images of {self.root}")
        self.names, self._memory, self.without_face = tuple(kept), memory, tuple(without)

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        # An open ArrayRecord reader does not pickle: Grain workers reopen the file.
        return dict(self.__dict__, _records=None if self._records is None else True)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._records is True:
            self._records = _records(self.root)

    def where(self, i: int) -> str:
        if self._records is not None or self._memory is not None:
            return f"{self.root} item {self.names[i]!r}"
        return str(self._images[i])

    def _encoded(self, i: int) -> tuple[bytes, bytes, str]:
        if self._records is not None:
            name, image, mask = _split_record(self._records[i])
            return image, mask, f"{self.root} item {name!r}"
        return self._images[i].read_bytes(), self._masks[i].read_bytes(), str(self._images[i])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 `[112, 112, 3]` RGB face, float32 `[grid, grid]` target) of pair `i`.

        Raises:
            CorruptImageError: an undecodable face or mask, or a face that is not 112x112 (naming the file).
        """
        if self._memory is not None:
            face, mask = self._memory[i]
            return face, mask_target(mask, self.grid)
        image_bytes, mask_bytes, where = self._encoded(i)
        face = decode_image(image_bytes, where)
        if face.shape[:2] != (FACE_SIZE, FACE_SIZE):
            raise CorruptImageError(where, f"{face.shape[1]}x{face.shape[0]} is not a {FACE_SIZE}x{FACE_SIZE} "
                                    "aligned face; declare the set unaligned (data.occlusion_aligned=False) or "
                                    "align it once with `oaml-inference align --images=... --masks=... --out=...`")
        mask_where = str(self._masks[i]) if self._records is None else where
        return face, mask_target(read_mask(mask_bytes, mask_where), self.grid)

    def split(self, holdout: float) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices) int64: a name is held out when a hash of it falls in the
        first `holdout` share of its range, so the split does not move when pairs are added."""
        held = np.array([_holdout_bucket(n) < holdout * _HOLDOUT_BUCKETS for n in self.names], bool)
        return np.flatnonzero(~held), np.flatnonzero(held)


def open_sets(data_cfg: ml_collections.ConfigDict | Any, grid: int) -> list[OcclusionSet]:
    """The sets of `data.occlusion_sets` (aligned per `data.occlusion_aligned`); [] when there are none."""
    return [OcclusionSet(path, grid, aligned=data_cfg["occlusion_aligned"], field=f"data.occlusion_sets[{i}]")
            for i, path in enumerate(set_paths(data_cfg["occlusion_sets"]))]


class OcclusionItems:
    """One index space over several sets' items (training or held-out part), picklable for Grain workers."""

    def __init__(self, sets: Sequence[OcclusionSet], holdout: float, held_out: bool):
        self.sets = list(sets)
        parts = [s.split(holdout)[1 if held_out else 0] for s in self.sets]
        self.index = np.concatenate([np.stack([np.full(len(p), k), p], axis=1) for k, p in enumerate(parts)]
                                    ).astype(np.int64) if parts else np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k, j = self.index[i]
        return self.sets[k][int(j)]

    def name(self, i: int) -> str:
        k, j = self.index[i]
        return self.sets[k].names[int(j)]


def _records(path: epath.Path) -> Any:
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    return ArrayRecordDataSource([os.fspath(path)])


def _split_record(record: bytes) -> tuple[str, bytes, bytes]:
    n, a, b = _RECORD_HEADER.unpack_from(record)
    start = _RECORD_HEADER.size
    name = record[start:start + n].decode("utf-8")
    return name, record[start + n:start + n + a], record[start + n + a:start + n + a + b]


def convert_to_array_record(root: epath.PathLike, out_file: epath.PathLike) -> int:
    """Writes a set folder as one ArrayRecord file: per pair its name, face and mask bytes as they are.

    ArrayRecord writes local files only: write here, then copy to a bucket. Returns the pairs written.

    Raises:
        ValueError: `out_file` does not end in ".array_record", or already exists (never written over).
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    out = user_path(out_file, "out_file")
    if not str(out).endswith(ARRAY_RECORD_SUFFIX) or out.exists():
        raise ValueError(f"{out}: expected a new file ending in {ARRAY_RECORD_SUFFIX}")
    source = OcclusionSet(root, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(out), "group_size:1")
    for i, name in enumerate(source.names):
        image, mask, _ = source._encoded(i)  # pylint: disable=protected-access
        raw = name.encode("utf-8")
        writer.write(_RECORD_HEADER.pack(len(raw), len(image), len(mask)) + raw + image + mask)
    writer.close()
    return len(source)
