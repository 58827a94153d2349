"""Photos to aligned faces: decode each photo as a viewer shows it, detect, align, and count what failed.

    faces = faces_from_folder("photos/")           # PhotoFaces: uint8 [F, 112, 112, 3] + where each came from
    print(faces.summary())                          # one line: photos, faces, without a face, unreadable

A photo of exactly 112x112 is taken as an aligned crop; any other is detected and aligned
(`align.detect_and_align`). A photo without a face, or an undecodable file, is named and counted, never fatal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm
from absl import logging
from etils import epath

from data_pipelines.folders import name_skipped, scan_images
from data_pipelines.images import READABLE_EXTENSIONS, CorruptImageError, decode_photo
from oaml_jax import align
from oaml_jax.models.face_input import FACE_SIZE
from oaml_jax.paths import user_path

# Photo folders show detection progress from this many photos on (MTCNN takes about 0.1-1 s a photo),
# redrawn at most this often.
PROGRESS_MIN_PHOTOS = 20
PROGRESS_INTERVAL_S = 5.0


@dataclasses.dataclass(frozen=True)
class PhotoFaces:
    """The aligned faces found in a list of photos, and what was found in each.

    Attributes:
        faces: uint8 `[F, 112, 112, 3]` RGB aligned faces (F may be 0).
        sources: F (photo name, face index) in the order of `faces`; index 0 is a photo's largest face.
        photos: number of image files read.
        without_face: names of the photos in which no face passed the detection thresholds.
        unreadable: (name, reason) of the files that are not decodable images, or (with `aligned`) not
            112x112 crops.
        skipped: names of the folder's entries that are not read as images (hidden, AppleDouble, other
            extensions; subfolders with a trailing "/").
    """

    faces: np.ndarray
    sources: list[tuple[str, int]]
    photos: int
    without_face: list[str]
    unreadable: list[tuple[str, str]]
    skipped: Sequence[str] = ()

    def summary(self) -> str:
        """One line: photos, faces, photos without a face and unreadable files by name, skipped entries."""
        count = lambda n, noun: f"{n} {noun}{'' if n == 1 else 's'}"
        text = (f"{count(self.photos, 'photo')}, {count(len(self.sources), 'face')}, "
                f"{len(self.without_face)} without a face")
        if self.without_face:
            text += f" ({', '.join(self.without_face)})"
        if self.unreadable:
            text += f", {len(self.unreadable)} unreadable ({'; '.join(f'{n}: {r}' for n, r in self.unreadable)})"
        if self.skipped:
            entries = "1 other entry" if len(self.skipped) == 1 else f"{len(self.skipped)} other entries"
            text += f", {entries} skipped ({name_skipped(list(self.skipped))})"
        return text


def faces_from_photos(paths: Sequence[epath.PathLike], *, aligned: bool = False, mode: str = "largest",
                      min_face_size: float = align.DEFAULT_MIN_FACE_SIZE,
                      min_score: float = align.DEFAULT_MIN_SCORE) -> PhotoFaces:
    """Reads photos and aligns their faces: a 112x112 photo is taken as aligned, any other is detected.

    Each photo is decoded as a viewer shows it (`images.decode_photo`: its EXIF orientation applied).

    Args:
        paths: image files (local or any epath URI).
        aligned: every photo is an aligned 112x112 crop; other sizes are reported as unreadable.
        mode: "largest" (one face per photo) or "all" (every face, largest first); see `align.detect_and_align`.
        min_face_size: smallest face box side kept, in photo pixels.
        min_score: smallest MTCNN face probability kept.

    Returns:
        `PhotoFaces`; photos without a face and undecodable files are counted there (and warned about),
        never raised. More than `PROGRESS_MIN_PHOTOS` photos show a progress bar with ETA (stderr).

    Raises:
        ValueError: unknown `mode`, or a threshold out of range.
        OSError: a file cannot be read at all.
    """
    if mode not in align.DETECTION_MODES:
        raise ValueError(f"mode: expected one of {align.DETECTION_MODES}, got {mode!r}")
    if not (min_face_size > 0 and 0.0 <= min_score <= 1.0):
        raise ValueError(f"min_face_size={min_face_size} (> 0 px) and min_score={min_score} (in [0, 1]) out of range")
    faces, sources, without_face, unreadable = [], [], [], []
    for path in tqdm.tqdm(paths, desc="photos", unit="photo", mininterval=PROGRESS_INTERVAL_S,
                          disable=len(paths) <= PROGRESS_MIN_PHOTOS):
        path = epath.Path(path)
        try:
            image = decode_photo(path.read_bytes(), where=str(path))
        except CorruptImageError as e:
            logging.warning("%s: not a readable image (%s)", path, e.reason)
            unreadable.append((path.name, e.reason))
            continue
        if image.shape[:2] == (FACE_SIZE, FACE_SIZE):
            found = [image]
        elif aligned:
            reason = f"{image.shape[1]}x{image.shape[0]}, not a {FACE_SIZE}x{FACE_SIZE} aligned face (--aligned)"
            logging.warning("%s: %s", path, reason)
            unreadable.append((path.name, reason))
            continue
        else:
            found = [f.face for f in align.detect_and_align(image, mode=mode, min_face_size=min_face_size,
                                                             min_score=min_score)]
        if not found:
            logging.warning("%s: no face (min_face_size %g px, min_score %g)", path, min_face_size, min_score)
            without_face.append(path.name)
        faces.extend(found)
        sources.extend((path.name, k) for k in range(len(found)))
    return PhotoFaces(faces=np.stack(faces) if faces else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8),
                      sources=sources, photos=len(paths), without_face=without_face, unreadable=unreadable)


def faces_from_folder(folder: epath.PathLike, **options: Any) -> PhotoFaces:
    """`faces_from_photos` of the images directly in `folder` (`data_pipelines.folders.list_images`).

    Raises:
        FileNotFoundError: `folder` is not a folder, or holds no image file.
    """
    folder = user_path(folder, "--images")
    paths, skipped = scan_images(folder)
    if not paths:
        raise FileNotFoundError(f"--images={folder}: no image files ({'/'.join(READABLE_EXTENSIONS)}) in it")
    return dataclasses.replace(faces_from_photos(paths, **options), skipped=skipped)
