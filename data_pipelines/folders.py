"""Image folders laid out as `root/<identity>/<image>` (aligned face crops), on any `etils.epath` path."""

from __future__ import annotations

import os

import numpy as np
from absl import logging
from etils import epath

from oaml_jax.paths import is_remote

# The file extensions read as images (any case), here and wherever a folder of faces is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def is_image_name(name: str) -> bool:
    """Whether a file name is listed as an image: an image extension, and not hidden.

    Hidden names (leading ".") cover macOS litter: `.DS_Store` and the AppleDouble `._x.jpg` files that
    copies to non-Mac file systems leave beside every image.
    """
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(directory: epath.PathLike) -> list[epath.Path]:
    """The image files directly in `directory`, sorted by name.

    Args:
        directory: a folder (local, gs://, or any scheme `etils.epath` supports).

    Returns:
        Paths of the files whose names pass `is_image_name`, sorted. Locally, directories are left out
        too; on object stores, where telling one costs a request per entry, names alone decide.

    Raises:
        FileNotFoundError: `directory` is not a folder.
    """
    directory = epath.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: image folder not found")
    if is_remote(directory):
        names = [p.name for p in directory.iterdir()]
    else:
        with os.scandir(os.fspath(directory)) as entries:
            names = [e.name for e in entries if e.is_file()]
    return [directory / name for name in sorted(names) if is_image_name(name)]


class ImageFolderSource:
    """Random-access source over `root/<identity>/<image>`.

    Labels are the positions of the identity names in sorted order, counting only identities that hold
    at least one image (`class_names[label]` is the folder name). Images are what `list_images` lists;
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
        for name in identities:
            files = list_images(self.root / name)
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
        if not paths:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS} in any of the "
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
