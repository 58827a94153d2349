"""Face datasets as TFDS / ArrayRecord: convert a RecordIO or image-folder source, read it randomly.

The image bytes are stored as they come from the source (no decode, no re-encode), so a converted
dataset yields exactly the source's bytes and labels, in the source's order.

    builder = build_tfds("/data/faces_emore", "/data/tfds")          # once, offline
    src = TFDSSource(builder.data_dir)                                # or TFDSSource("face_records", data_dir=...)
    src[i] -> {"image": bytes, "label": int}
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from data_pipelines.folders import ImageFolderSource
from data_pipelines.recordio import RecordIOSource

SOURCES = {"recordio": RecordIOSource, "folder": ImageFolderSource}
LABELS_FILE = "labels.npy"


def _absolute(path: epath.PathLike) -> str:
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def open_face_source(folder: epath.PathLike, source: str):
    """Opens `folder` (any `etils.epath` path) as a "recordio" or "folder" source."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} for {folder}; expected one of {sorted(SOURCES)}")
    return SOURCES[source](folder)


class FaceRecords(tfds.core.GeneratorBasedBuilder):
    """Aligned face crops with identity labels, one "train" split.

    Features: "image" (encoded bytes, kept as in the source), "label" (int64).
    Metadata: "num_classes", "image_size" (height, width), "source_folder".
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded face crops and identity labels from RecordIO or image folders."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup of a builder's source file needs the importlib_resources backport, which is
        # not among our dependencies; the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, source_folder: Optional[epath.PathLike] = None, source: str = "recordio", **kwargs):
        self._source_folder = source_folder
        self._source_kind = source
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Aligned 112x112 face crops (encoded bytes) with identity labels.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "label": tfds.features.Scalar(dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(),
            # Keep the source's record order so index i here is record i there.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        if not self._source_folder:
            raise ValueError("FaceRecords: source_folder is required to prepare the dataset "
                             "(use build_tfds(source_folder, data_dir))")
        src = open_face_source(self._source_folder, self._source_kind)
        self.info.metadata.update({
            "num_classes": int(src.num_classes),
            "image_size": list(getattr(src, "image_size", (112, 112))),
            "source_folder": _absolute(self._source_folder),
        })
        return {"train": self._generate_examples(src)}

    def _generate_examples(self, src):
        for i in range(len(src)):
            item = src[i]
            yield i, {"image": item["image"], "label": item["label"]}


def build_tfds(source_folder: epath.PathLike, data_dir: epath.PathLike,
               source: str = "recordio") -> FaceRecords:
    """Converts a RecordIO folder or image folder into an ArrayRecord TFDS dataset under `data_dir`.

    Nothing is downloaded. The labels are also saved as `labels.npy` in the dataset folder so that
    `TFDSSource.labels()` needs no scan.

    Args:
        source_folder: the RecordIO folder (train.rec/train.idx/property) or image folder root; any
            `etils.epath` path.
        data_dir: the TFDS data directory (any `etils.epath` path); the dataset lands in
            `data_dir/face_records/1.0.0`.
        source: "recordio" or "folder".

    Returns:
        The prepared builder (`builder.data_dir` is the dataset folder).
    """
    src = open_face_source(source_folder, source)
    builder = FaceRecords(data_dir=data_dir, source_folder=source_folder, source=source,
                          file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    with (epath.Path(builder.data_dir) / LABELS_FILE).open("wb") as fh:
        np.save(fh, src.labels())
    return builder


class TFDSSource:
    """Random-access reader of a prepared face dataset (ArrayRecord), Grain compatible.

    Args:
        name_or_dir: a dataset folder (holding dataset_info.json), a TFDS data_dir holding
            "face_records", or a dataset name such as "face_records" found under `data_dir`. Folders
            are `etils.epath` paths (local, gs://, ...).
        split: the split to read.
        data_dir: the TFDS data directory when `name_or_dir` is a name.

    Items are `{"image": bytes, "label": int}`; the reader is reopened lazily after pickling.
    """

    def __init__(self, name_or_dir: epath.PathLike, split: str = "train",
                 data_dir: Optional[epath.PathLike] = None):
        path = epath.Path(name_or_dir)
        if (path / "dataset_info.json").is_file():
            builder = tfds.builder_from_directory(path)
        elif data_dir is None and (path / FaceRecords.name).is_dir():
            # A TFDS data_dir given on its own (e.g. as `data.path`): read the face_records in it.
            builder = tfds.builder(FaceRecords.name, data_dir=path)
        else:
            if data_dir is None or not epath.Path(data_dir).is_dir():
                raise FileNotFoundError(
                    f"{name_or_dir}: not a prepared TFDS dataset folder (no dataset_info.json), and "
                    f"data_dir {data_dir!r} is not a folder to look the name up in")
            builder = tfds.builder(os.fspath(name_or_dir), data_dir=epath.Path(data_dir))
        if not builder.is_prepared():
            raise FileNotFoundError(f"{name_or_dir}: no prepared dataset under {data_dir or name_or_dir} "
                                    "(run build_tfds first)")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(f"{builder.data_dir}: stored as {builder.info.file_format}, random access "
                             "needs array_record")
        self.builder_dir = os.fspath(builder.data_dir)
        self.split = split
        meta = builder.info.metadata or {}
        if "num_classes" not in meta:
            raise ValueError(f"{self.builder_dir}: dataset metadata lacks 'num_classes'")
        self.num_classes = int(meta["num_classes"])
        self.image_size = tuple(meta.get("image_size", (112, 112)))
        self._builder = builder
        self._ds = None
        self._labels: Optional[np.ndarray] = None
        self._len = builder.info.splits[split].num_examples

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_builder"] = None
        state["_ds"] = None
        return state

    def _source(self):
        if self._ds is None:
            if self._builder is None:
                self._builder = tfds.builder_from_directory(self.builder_dir)
            self._ds = self._builder.as_data_source(split=self.split)
        return self._ds

    def __len__(self) -> int:
        return int(self._len)

    def where(self, i: int) -> str:
        """"<dataset folder>[<split>] record <i>"."""
        return f"{self.builder_dir}[{self.split}] record {i}"

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.builder_dir}: index {i} out of range [0, {len(self)})")
        item = self._source()[i % len(self)]
        return {"image": bytes(item["image"]), "label": int(item["label"])}

    def labels(self) -> np.ndarray:
        """Labels of every record, int64 `[len]` (from labels.npy when present, else a scan)."""
        if self._labels is None:
            path = epath.Path(self.builder_dir) / LABELS_FILE
            labels = None
            if path.exists():
                with path.open("rb") as fh:
                    labels = np.load(fh, allow_pickle=False)
            if labels is None or labels.shape != (len(self),):
                logging.info("%s: scanning %d records for labels.", self.builder_dir, len(self))
                ds = self._source()
                labels = np.fromiter((int(ds[i]["label"]) for i in range(len(self))), np.int64, len(self))
            self._labels = labels.astype(np.int64)
        return self._labels
