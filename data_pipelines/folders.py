"""Image folders laid out as `root/<identity>/<image>` (aligned face crops)."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderSource:
    """Random-access source over `root/<identity>/<image>`.

    Labels are the positions of the identity names in sorted order, counting only identities that hold
    at least one image (`class_names[label]` is the folder name). Files without an image extension
    (.jpg .jpeg .png .bmp, any case), hidden files and files directly under `root` are ignored.

    Items are `{"image": bytes (encoded file contents), "label": int}`.
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: image folder root not found")
        identities = sorted(e.name for e in os.scandir(self.root)
                            if e.is_dir() and not e.name.startswith("."))
        if not identities:
            raise ValueError(f"{self.root}: no identity folders (expected root/<identity>/<image>)")
        class_names: list[str] = []
        paths: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        for name in identities:
            files = sorted(e.name for e in os.scandir(os.path.join(self.root, name))
                           if e.is_file() and _is_image(e.name))
            if not files:
                empty.append(name)
                continue
            label = len(class_names)
            class_names.append(name)
            paths.extend(os.path.join(name, f) for f in files)
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
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def where(self, i: int) -> str:
        """The file of the i-th image."""
        return os.path.join(self.root, self._paths[i])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.root}: image index {i} out of range [0, {len(self)})")
        with open(self.where(i), "rb") as fh:
            image = fh.read()
        return {"image": image, "label": int(self._labels[i])}

    def labels(self) -> np.ndarray:
        """Labels of every image, int64 `[len]`."""
        return self._labels
