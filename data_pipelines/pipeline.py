"""The Grain training pipeline: `train_epoch_dataset` (this process's part of every batch of an epoch).

Train: the sampler's epoch array `[num_batches, global_batch]` of record indices is cut to this
process's contiguous part of every global batch, then

    MapDataset.source(local batches of (record, global position) rows)
      .map(BatchLoader)               decode + check 112x112, then augment, then occlude
      .to_iter_dataset(ReadOptions)   .mp_prefetch(MultiprocessingOptions) when num_workers > 0

A whole batch is one Grain element, so Grain workers each build whole batches. Images stay uint8 RGB:
the train step maps them to the model's input on the device (`oaml_jax.models.face_input`), which moves a
quarter of the bytes from host to device and spends no host time on floating-point conversion.

Every element's randomness comes from Philox generators keyed by (seed, epoch) at counters (stream,
global position), one stream for its augmentation and one for its occlusion, so a batch is bitwise the
same whatever the number of workers or processes (Grain's own `random_map` generator is keyed by the
index inside this process's dataset, which depends on the process count).

With `data.occlusion_batch` > 0 each element also carries this process's part of the step's occlusion
batch (OAML's second stream: faces of `data.occlusion_sets` with their mask targets, and clean training
faces with all-visible ones; `BatchLoader.occlusion_stream`), drawn from a third stream keyed the same way,
so the checkpointed iterator state covers it and resuming is bitwise.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import cv2
import grain
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import augment, occlusion, occlusion_sets, samplers
from data_pipelines.augment import Augmentation
from data_pipelines.folders import ImageFolderSource
from data_pipelines.images import CorruptRecordError, check_size, decode_image
from data_pipelines.occlusion import Occlusion
from data_pipelines.occlusion_sets import OcclusionItems, OcclusionSet
from data_pipelines.recordio import RecordIOSource
from oaml_jax.models.face_input import FACE_SHAPE, FACE_SIZE
from oaml_jax.paths import user_path

SOURCES = ("recordio", "folder", "tfds")
SAMPLERS = ("pk", "graph")
ON_CORRUPT = ("raise", "skip")
# Whole batches are the unit of in-process prefetching; two in flight keep one ready without holding
# many full-size batches in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_WORKER_BUFFER = 2


def check_config(config: Mapping[str, Any], *, num_devices: int, process_count: int) -> None:
    """Checks `config.data` before anything is read or compiled; raises ValueError naming the field.

    The batch-level facts (train.batch_size divisible by data.k and by the processes) are checked with
    `config.train`, the occlusion stream's fields by `occlusion_sets.check_config`; whether `data.path` exists
    is checked when the source is opened. `data.augment` and `data.occlusion` are checked here, once: the
    per-epoch `BatchLoader` builds its `Augmentation` and `Occlusion` from them as given.

    Args:
        config: the whole run config; only `config.data` is read.
        num_devices, process_count: unused here (the signature every section check of `run_spec.validate_config`
            shares).
    """
    data_cfg = config["data"]
    if data_cfg.source not in SOURCES:
        raise ValueError(f"data.source: unknown source {data_cfg.source!r}; expected one of {SOURCES}")
    if data_cfg.sampler not in SAMPLERS:
        raise ValueError(f"data.sampler: unknown sampler {data_cfg.sampler!r}; expected one of {SAMPLERS}")
    if data_cfg.on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt: unknown policy {data_cfg.on_corrupt!r}; expected one of "
                         f"{ON_CORRUPT}")
    for field, minimum in (("k", 1), ("num_workers", 0), ("graph_chunk", 1)):
        if data_cfg[field] < minimum:
            raise ValueError(f"data.{field}={data_cfg[field]} must be >= {minimum}")
    if not os.fspath(data_cfg.path):
        raise ValueError(f"data.path is empty; expected the training data folder (data.source={data_cfg.source!r})")
    user_path(data_cfg.path, "data.path")
    augment.check_config(data_cfg.augment)
    occlusion.check_config(data_cfg.occlusion)


def open_source(data_cfg: ml_collections.ConfigDict) -> Any:
    """Opens the training source named by `data_cfg.source` at `data_cfg.path`.

    Args:
      data_cfg: the `config.data` ConfigDict (fields `source`, `path`, `on_corrupt`); `path` is any
        `etils.epath` path (local, gs://, ...); for "tfds" it is a prepared dataset folder or a TFDS
        data_dir holding "face_records". A RecordIO source gets `on_corrupt` (see `RecordIOSource`).

    Returns:
      A random-access source: `len(src)`, `src[i] -> {"image": bytes, "label": int}`, `src.num_classes`,
      `src.labels() -> int64 [len]`.

    Raises:
      FileNotFoundError: `data.path` is not a folder.
    """
    kind = data_cfg.source
    path = user_path(data_cfg.path, "data.path")
    if not path.is_dir():
        raise FileNotFoundError(f"data.path: training data folder {os.fspath(path)!r} does not exist "
                                f"(data.source={kind!r})")
    if kind == "tfds":
        # Imported on demand: tensorflow_datasets takes seconds to import.
        from data_pipelines.tfds_faces import TFDSSource
        return TFDSSource(path)
    if kind == "recordio":
        return RecordIOSource(path, on_corrupt=data_cfg.on_corrupt)
    return ImageFolderSource(path)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Global batches per epoch: `num_records // global_batch` (the samplers' `num_batches`)."""
    if global_batch <= 0:
        raise ValueError(f"train.batch_size must be positive, got {global_batch}")
    steps = num_records // global_batch
    if steps == 0:
        raise ValueError(f"train.batch_size {global_batch} exceeds the {num_records} training records: "
                         "an epoch would have no steps")
    return steps


def _where(source: Any, index: int) -> str:
    where = getattr(source, "where", None)
    return where(index) if where is not None else f"{type(source).__name__} record {index}"


# Each element draws its augmentation and its occlusion from two independent counter-based streams, so
# the stages can run one after the other over the whole batch; the occlusion batch's elements draw theirs
# from a third, at their position in the epoch's sequence of occlusion batches.
_AUGMENT_STREAM, _OCCLUDE_STREAM, _OCCLUSION_SET_STREAM = 0, 1, 2


def is_real(j: int, share: float) -> bool:
    """Whether place `j` of the global occlusion batch takes a set face (else a clean face): the first n
    places hold floor(n * share) set faces, spread evenly (so each device gets its share)."""
    return math.floor((j + 1) * share + 1e-9) > math.floor(j * share + 1e-9)


@functools.lru_cache(maxsize=4)
def _opened_sets(paths: tuple[str, ...], grid: int, aligned: bool) -> tuple[OcclusionSet, ...]:
    return tuple(OcclusionSet(p, grid, aligned=aligned, field=f"data.occlusion_sets[{i}]")
                 for i, p in enumerate(paths))


def occlusion_items(data_cfg: ml_collections.ConfigDict, grid: int, held_out: bool = False
                    ) -> Optional[OcclusionItems]:
    """The training (or held-out) items of `data.occlusion_sets`, opened once per process; None without.

    Raises:
        ValueError / FileNotFoundError: a set that is missing or holds no pair (before the first step), or
            one whose every pair is held out.
    """
    paths = occlusion_sets.set_paths(data_cfg.occlusion_sets)
    if not paths:
        return None
    sets = _opened_sets(paths, int(grid), bool(data_cfg.occlusion_aligned))
    items = OcclusionItems(sets, data_cfg.occlusion_holdout, held_out)
    if not len(items):
        raise ValueError(f"data.occlusion_sets={paths}: no {'held-out' if held_out else 'training'} pair left "
                         f"with data.occlusion_holdout={data_cfg.occlusion_holdout}")
    return items


class _ElementRandom:
    """Per-element generators from counter-based Philox: key (seed, epoch), counter (stream, position).

    Re-pointing one bit generator at an element's counter costs a few microseconds, against ~20 us for
    `np.random.default_rng([seed, epoch, position])` (SeedSequence hashing). Streams start 2**128 blocks
    apart (positions) or 2**64 blocks apart (streams of a position), so they never overlap.
    """

    def __init__(self, seed: int, epoch: int):
        key = np.array([seed % 2**64, epoch % 2**64], np.uint64)
        self._bits = np.random.Philox(key=key)
        self._generator = np.random.Generator(self._bits)
        # Assigning `state` copies these values into the bit generator; the dict is reused.
        self._counter = np.zeros(4, np.uint64)
        self._state = {"bit_generator": "Philox", "state": {"counter": self._counter, "key": key},
                       "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}

    def at(self, position: int, stream: int) -> np.random.Generator:
        """The generator of (position, stream), rewound to the start of that stream."""
        self._counter[:] = (0, stream, position, 0)
        self._bits.state = self._state
        return self._generator


class BatchLoader(grain.transforms.Map):
    """(record index, global position) rows of one batch -> that batch (module level, so workers pickle it).

    A whole batch is one Grain element: the framework's per-element cost is paid once per batch and the
    images are written straight into the batch array, with no stacking afterwards. The batch is built
    stage by stage (`decode` every image, then `augment` every image, then `occlude` every image), so
    each stage's code and tables stay in the CPU caches across the batch (in an interleaved A/B on this
    machine, about 20% faster than finishing one image at a time). `map` is all a Grain worker does per
    batch; timing it on one thread gives the per-worker rate (`bench/data_throughput.py`).
    """

    def __init__(self, source: Any, data_cfg: ml_collections.ConfigDict, epoch: int, grid: int, *,
                 global_batch: int = 0, process_index: int = 0, process_count: int = 1,
                 occlusion_items: Optional[OcclusionItems] = None):
        """Args:
            source: a random-access source (`open_source`).
            data_cfg: `config.data` (seed, on_corrupt, augment, occlusion, and the occlusion_* fields), taken
                as given: `check_config` checked it once, before the first epoch.
            epoch: the epoch (keys the per-element random streams).
            grid: side of the visibility maps (the model's feature map, `InputContract.grid`).
            global_batch, process_index, process_count: the layout of the global batch, needed with
                `occlusion_items` (this process builds its contiguous part of every occlusion batch).
            occlusion_items: the sets' training items; None = no occlusion batch.
        """
        self.source = source
        self.seed = int(data_cfg.seed)
        self.epoch = int(epoch)
        self.grid = int(grid)
        self.skip_corrupt = data_cfg.on_corrupt == "skip"
        self.augmentation = Augmentation.from_config(data_cfg.augment)
        self.occlusion = Occlusion.from_config(data_cfg.occlusion)
        self.occlusion_items = occlusion_items
        if occlusion_items is not None:
            self.global_batch = int(global_batch)
            self.occlusion_batch = int(data_cfg.occlusion_batch)
            self.occlusion_local = slice(process_index * self.occlusion_batch // process_count,
                                         (process_index + 1) * self.occlusion_batch // process_count)
            self.real_share = float(data_cfg.occlusion_real_share)
            self.occ_flip = float(data_cfg.occlusion_augment.flip_prob)
            self.occ_photometric = float(data_cfg.occlusion_augment.photometric_prob)

    def _decode(self, index: int) -> tuple[np.ndarray, int]:
        where = _where(self.source, index)
        item = self.source[index]
        image = check_size(decode_image(item["image"], where), (FACE_SIZE, FACE_SIZE), where)
        return image, int(item["label"])

    def _replacement(self, index: int, error: CorruptRecordError) -> tuple[np.ndarray, int]:
        """The next decodable record of the same identity (cyclic in record order)."""
        labels = self.source.labels()
        members = np.flatnonzero(labels == labels[index])
        after = np.searchsorted(members, index, side="right")
        for candidate in np.roll(members, -after):
            if candidate == index:
                continue
            try:
                return self._decode(int(candidate))
            except CorruptRecordError:
                continue
        raise CorruptRecordError(error.where, f"{error.reason}; no usable record of identity "
                                 f"{labels[index]} to replace it with ({members.size} records)")

    def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """int64 `[n, 2]` (record index, global position) -> the batch dict of `train_epoch_dataset`."""
        # On 112x112 images OpenCV's own thread pool costs more in hand-offs than it saves (resizes run
        # ~1.5x faster single-threaded); the parallelism is Grain's worker processes and read threads.
        cv2.setNumThreads(1)
        batch = self.decode(rows)
        self.augment(batch, rows)
        self.occlude(batch, rows)
        if self.occlusion_items is not None:
            batch.update(self.occlusion_stream(rows))
        return batch

    def decode(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 1: reads and decodes the rows' records; "mask" is left unset (see `occlude`)."""
        n = rows.shape[0]
        batch = {"image": np.empty((n,) + FACE_SHAPE, np.uint8), "label": np.empty(n, np.int32),
                 "mask": np.empty((n, self.grid, self.grid), np.float32), "corrupt": np.zeros(n, np.int32)}
        for i, index in enumerate(rows[:, 0].tolist()):
            batch["image"][i], batch["label"][i], batch["corrupt"][i] = self._decode_or_replace(index)
        return batch

    def _decode_or_replace(self, index: int) -> tuple[np.ndarray, int, int]:
        """(image, label, 1 if the record was corrupt and replaced else 0); see `data.on_corrupt`."""
        try:
            return *self._decode(index), 0
        except CorruptRecordError as e:
            if not self.skip_corrupt:
                raise
            logging.warning("Replacing a corrupt record (data.on_corrupt='skip'): %s", e)
            return *self._replacement(index, e), 1

    def augment(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Stage 2: augments every image in place, each from its own stream (`_AUGMENT_STREAM`)."""
        randoms = _ElementRandom(self.seed, self.epoch)
        images = batch["image"]
        for i, position in enumerate(rows[:, 1].tolist()):
            image = images[i]
            out = self.augmentation(image, randoms.at(position, _AUGMENT_STREAM))
            if out is not image:
                images[i] = out

    def occlude(self, batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Stage 3: occludes every image in place and writes its visibility map (`_OCCLUDE_STREAM`)."""
        randoms = _ElementRandom(self.seed, self.epoch)
        images, masks = batch["image"], batch["mask"]
        for i, position in enumerate(rows[:, 1].tolist()):
            image = images[i]
            out, masks[i] = self.occlusion(image, randoms.at(position, _OCCLUDE_STREAM), self.grid)
            if out is not image:
                images[i] = out


    def occlusion_stream(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """This process's part of the step's occlusion batch (`_OCCLUSION_SET_STREAM`).

        Place j of the global occlusion batch of step s (in the epoch) draws, from the stream at position
        `s * occlusion_batch + j`: a set face and its target (`is_real`), or a clean training face with an
        all-visible target; then a flip (face and target together) and the optional photometric jitter.
        """
        step = int(rows[0, 1]) // self.global_batch
        places = range(self.occlusion_batch)[self.occlusion_local]
        out = {"occ_image": np.empty((len(places),) + FACE_SHAPE, np.uint8),
               "occ_target": np.empty((len(places), self.grid, self.grid), np.float32),
               "occ_corrupt": np.zeros(len(places), np.int32)}
        randoms = _ElementRandom(self.seed, self.epoch)
        for i, j in enumerate(places):
            rng = randoms.at(step * self.occlusion_batch + j, _OCCLUSION_SET_STREAM)
            if is_real(j, self.real_share):
                face, target = self.occlusion_items[int(rng.integers(len(self.occlusion_items)))]
            else:
                face, _, out["occ_corrupt"][i] = self._decode_or_replace(int(rng.integers(len(self.source))))
                target = np.ones((self.grid, self.grid), np.float32)
            if rng.random() < self.occ_flip:
                face, target = face[:, ::-1], target[:, ::-1]
            if rng.random() < self.occ_photometric:
                face = augment.photometric(np.ascontiguousarray(face), rng)
            out["occ_image"][i], out["occ_target"][i] = face, target
        return out


def epoch_indices(source: Any, data_cfg: ml_collections.ConfigDict, epoch: int, global_batch: int,
                  neighbours: Optional[np.ndarray] = None, group_size: int = 0) -> np.ndarray:
    """The sampler's record indices of one epoch, int64 `[num_batches, global_batch]`.

    `group_size` is `model.qaconv_group_size` (0 = the whole batch): the graph sampler makes every group of
    that many consecutive images one class neighbourhood, and then needs `neighbours` with at least
    `group_size // data.k - 1` columns (`global_batch // data.k - 1` for 0).
    """
    labels = source.labels()
    p = global_batch // data_cfg.k
    if data_cfg.sampler == "pk":
        return samplers.PKSampler(labels, p, data_cfg.k, data_cfg.seed, group_size).epoch(epoch)
    if neighbours is None:
        raise ValueError("data.sampler 'graph' needs `neighbours` (int32 [C, >= G/K - 1], see "
                         "samplers.knn_classes)")
    return samplers.GraphSampler(labels, p, data_cfg.k, data_cfg.seed, group_size).epoch(epoch, neighbours)


def train_epoch_dataset(source: Any, data_cfg: ml_collections.ConfigDict, epoch: int, *,
                        global_batch: int, process_index: int, process_count: int, grid: int,
                        neighbours: Optional[np.ndarray] = None, group_size: int = 0,
                        occlusion: Optional[OcclusionItems] = None) -> grain.IterDataset:
    """This process's part of every global batch of one epoch.

    Args:
      source: a random-access source (`open_source`).
      data_cfg: `config.data` (sampler, k, seed, on_corrupt, grid, num_workers, augment, occlusion).
      epoch: epoch number; with `data_cfg.seed` it fixes batches and augmentation.
      global_batch: images per global batch (`train.batch_size`).
      process_index: this process, in [0, process_count).
      process_count: number of processes; each gets `b_local = global_batch // process_count` images,
        the contiguous slice `[process_index * b_local, (process_index + 1) * b_local)` of every batch.
      grid: side of the visibility maps (the model's feature map, `InputContract.grid`).
      neighbours: int32 `[C, >= classes per group - 1]` nearest classes, required by the "graph" sampler.
      group_size: QAConv's matching group (`model.qaconv_group_size`; 0 = the whole batch): the samplers
        lay batches out so each group of that many consecutive images is meaningful (see `epoch_indices`).
      occlusion: the occlusion sets' training items; None opens `data.occlusion_sets` (once per process,
        `occlusion_items`) when `data.occlusion_batch` > 0.

    Returns:
      An IterDataset of dicts "image" uint8 `[b_local, 112, 112, 3]` RGB (augmented and occluded;
      the train step maps it to the model's input on the device), "label" int32
      `[b_local]`, "mask" float32 `[b_local, grid, grid]` (1 = visible), "corrupt" int32 `[b_local]`
      (1 where a bad record was replaced by the next usable record of the same identity under
      on_corrupt="skip", each replacement logged; under "raise" the CorruptRecordError naming the record
      stops the iteration). A bad record is any per-record fault (`images.CorruptRecordError`): an image
      that cannot be decoded correctly or is not 112x112, a malformed record, a label that is not an
      integer class. With an occlusion batch (`data.occlusion_batch` > 0) also "occ_image" uint8
      `[b_occ_local, 112, 112, 3]` RGB, "occ_target" float32 `[b_occ_local, grid, grid]` (visible fraction per
      cell), "occ_corrupt" int32 `[b_occ_local]`, b_occ_local = occlusion_batch // process_count, built by
      `BatchLoader.occlusion_stream`. `iter(ds)` supports get_state/set_state (and
      grain.checkpoint.CheckpointSave): the occlusion batch is a function of the element's position, so
      resuming restores it too.
    """
    if occlusion is None and data_cfg.get("occlusion_batch", 0) > 0:
        occlusion = occlusion_items(data_cfg, grid)
    indices = epoch_indices(source, data_cfg, epoch, global_batch, neighbours, group_size)
    b_local = global_batch // process_count
    positions = np.arange(indices.size, dtype=np.int64).reshape(indices.shape)
    part = slice(process_index * b_local, (process_index + 1) * b_local)
    local = np.stack([indices[:, part], positions[:, part]], axis=-1)  # [num_batches, b_local, 2]
    ds = (grain.MapDataset.source(local)
          .map(BatchLoader(source, data_cfg, epoch, grid, global_batch=global_batch, process_index=process_index,
                           process_count=process_count, occlusion_items=occlusion))
          .to_iter_dataset(_READ_OPTIONS))
    if data_cfg.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                         per_worker_buffer_size=_WORKER_BUFFER))
    return ds
