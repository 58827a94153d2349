"""Image folders laid out as `root/<identity>/<image>` (aligned face crops), on any `etils.epath` path."""

from __future__ import annotations

import os

import numpy as np
from absl import logging
from etils import epath

from data_pipelines.images import READABLE_EXTENSIONS
from oaml_jax.paths import is_remote

# Skipped entries named in a message before "and N more".
NAMED_SKIPPED = 5


def is_image_name(name: str) -> bool:
    """Whether a file name is listed as an image: a readable extension (`images.READABLE_EXTENSIONS`, any
    case), and not hidden.

    Hidden names (leading ".") cover macOS litter: `.DS_Store` and the AppleDouble `._x.jpg` files that
    copies to non-Mac file systems leave beside every image.
    """
    return not name.startswith(".") and name.lower().endswith(READABLE_EXTENSIONS)


def scan_images(directory: epath.PathLike) -> tuple[list[epath.Path], list[str]]:
    """The image files directly in `directory`, and the names of every other entry.

    Args:
        directory: a folder (local, gs://, or any scheme `etils.epath` supports).

    Returns:
        (paths of the files whose names pass `is_image_name`, sorted; names of the other entries, sorted,
        folders with a trailing "/"). Locally, folders are never images; on object stores, where telling
        one costs a request per entry, names alone decide.

    Raises:
        FileNotFoundError: `directory` is not a folder.
    """
    directory = epath.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: image folder not found")
    if is_remote(directory):
        entries = [(p.name, False) for p in directory.iterdir()]
    else:
        with os.scandir(os.fspath(directory)) as scanned:
            entries = [(e.name, e.is_dir()) for e in scanned]
    images = [directory / name for name, is_dir in sorted(entries) if not is_dir and is_image_name(name)]
    skipped = [name + ("/" if is_dir else "") for name, is_dir in sorted(entries) if is_dir or not is_image_name(name)]
    return images, skipped


def list_images(directory: epath.PathLike) -> list[epath.Path]:
    """The image files directly in `directory`, sorted by name (`scan_images`' first part)."""
    return scan_images(directory)[0]


def name_skipped(skipped: list[str]) -> str:
    """Skipped entries for a message: the first `NAMED_SKIPPED` names and how many more, e.g. "a.txt, sub/"."""
    more = len(skipped) - NAMED_SKIPPED
    return ", ".join(skipped[:NAMED_SKIPPED]) + (f" and {more} more" if more > 0 else "")


class ImageFolderSource:
    """Random-access source over `root/<identity>/<image>`.

    Labels are the positions of the identity names in sorted order, counting only identities that hold
    at least one image (`class_names[label]` is the folder name). Images are what `list_images` lists
    (other entries are counted and named in a warning);
    hidden folders and files directly under `root` are ignored.

    Items are `{"image": bytes (encoded file contents), "label": int}`.

    Args:
        root: the dataset folder (local, gs://, or any scheme `etils.epath` supports).

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: no identity folder, or no image in any.
    """

    def __init__(self, root: epath.PathLike):
        self.root = epath.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder root not found")
        identities = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())
        if not identities:
            raise ValueError(f"{self.root}: no identity folders (expected root/<identity>/<image>)")
        class_names: list[str] = []
        paths: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        skipped: list[str] = []
        for name in identities:
            files, others = scan_images(self.root / name)
            skipped.extend(f"{name}/{other}" for other in others)
            if not files:
                empty.append(name)
                continue
            label = len(class_names)
            class_names.append(name)
            paths.extend(f"{name}/{f.name}" for f in files)
            labels.extend([label] * len(files))
        if empty:
            logging.warning("%s: %d of %d identity folders hold no images (%s) and were skipped.",
                            self.root, len(empty), len(identities), ", ".join(empty[:5]) +
                            (", ..." if len(empty) > 5 else ""))
        if skipped:
            logging.warning("%s: %d entries of the identity folders are not readable images and were skipped "
                            "(%s)", self.root, len(skipped), name_skipped(skipped))
        if not paths:
            raise ValueError(f"{self.root}: no images with extensions {READABLE_EXTENSIONS} in any of the "
                             f"{len(identities)} identity folders")
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.num_empty_identities = len(empty)
        # Relative names, not Path objects: millions of them stay small in memory and in pickles.
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def where(self, i: int) -> str:
        """The file of the i-th image."""
        return os.fspath(self.root / self._paths[i])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.root}: image index {i} out of range [0, {len(self)})")
        return {"image": (self.root / self._paths[i]).read_bytes(), "label": int(self._labels[i])}

    def labels(self) -> np.ndarray:
        """Labels of every image, int64 `[len]`."""
        return self._labels
