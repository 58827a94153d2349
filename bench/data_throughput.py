"""Training input pipeline throughput: decoded + augmented + occluded images/s.

    python bench/data_throughput.py                     # synthetic faces_emore-style RecordIO in a temp dir
    python bench/data_throughput.py --data=DIR --workers=4 --batches=50

Four measurements of the real pipeline (`data_pipelines.pipeline`):
1. per worker: `BatchLoader.map` on one thread, which is all a Grain worker process does per batch
   (read, decode, augment, occlude, write into the batch). Repeated --repeats times: this shared
   machine's speed drifts, so the best and the median are printed, in images/s and images per
   CPU-second (the latter is what one worker given one core delivers);
2. `train_epoch_dataset` in-process (num_workers=0: Grain's read threads in this process);
3. `train_epoch_dataset` with --workers Grain worker processes;
4. CPU microseconds per image of each BatchLoader stage (decode, augment, occlude), to show where
   the time goes.

Without --data the images are the embedded synthetic identities (`data_pipelines.synthetic`), encoded the
way insightface's faces_emore records are (MXNet's `pack_img`: OpenCV JPEG, quality 95, 4:2:0 chroma);
--subsampling=444 encodes them like the demo's own data instead (4:4:4, about 1.5x the decode time).
"""

import math
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags
import cv2
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oaml_jax.configs import default  # noqa: E402  (needs the repo root on sys.path)
from data_pipelines import pipeline  # noqa: E402
from data_pipelines.synthetic_faces import render_face  # noqa: E402
from data_pipelines.synthetic_identity import identity_params  # noqa: E402
from data_pipelines.images import encode_jpeg  # noqa: E402
from data_pipelines.recordio import RecordIOSource  # noqa: E402
from data_pipelines.recordio_format import write_recordio  # noqa: E402
from oaml_jax.models.face_input import grid_size  # noqa: E402

GRID = grid_size(4)  # the 7x7 visibility maps of the training recipe

_DATA = flags.DEFINE_string("data", "", "RecordIO folder; empty = write a synthetic one in a temp dir.")
_SUBSAMPLING = flags.DEFINE_enum("subsampling", "420", ["420", "444"],
                                 "Chroma subsampling of the synthetic JPEGs (420: as faces_emore; 444: as "
                                 "the demo data).")
_IMAGES = flags.DEFINE_integer("images", 16, "Images per identity of the synthetic RecordIO.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed per measurement (after one warm-up batch).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats of the per-worker measurement.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes of the multi-worker run.")


def _encode(image: np.ndarray) -> bytes:
    if _SUBSAMPLING.value == "444":
        return encode_jpeg(image, quality=95)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError("OpenCV could not encode a synthetic face")
    return buf.tobytes()


def _write_synthetic(folder: str, num_records: int) -> None:
    """Enough identities of --images images each for `num_records` records and P = batch / 4 ids."""
    identities = max(math.ceil(num_records / _IMAGES.value), _BATCH.value // 4)
    items = ((_encode(render_face(identity_params(0, i // _IMAGES.value),
                                  i % _IMAGES.value, 0)), i // _IMAGES.value)
             for i in range(identities * _IMAGES.value))
    write_recordio(folder, items, num_classes=identities)


def _data_cfg(num_workers: int) -> ml_collections.ConfigDict:
    """The training recipe's data config (configs/default.py: augmentation and occlusion), K = 4."""
    cfg = default.get_data_config()
    cfg.update(dict(k=4, num_workers=num_workers))
    return cfg


def _rows(source: RecordIOSource, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """int64 `[num_batches, batch, 2]` (record index, global position) rows of epoch 0, one process."""
    indices = pipeline.epoch_indices(source, cfg, 0, _BATCH.value)
    positions = np.arange(indices.size, dtype=np.int64).reshape(indices.shape)
    return np.stack([indices, positions], axis=-1)


def _worker_rates(source: RecordIOSource) -> list[tuple[float, float]]:
    """(images/s, images per CPU-second) of `BatchLoader.map` on this thread, once per repeat."""
    cfg = _data_cfg(0)
    rows = _rows(source, cfg)
    loader = pipeline.BatchLoader(source, cfg, 0, GRID)
    loader.map(rows[0])
    rates = []
    for _ in range(_REPEATS.value):
        start, cpu_start = time.perf_counter(), time.thread_time()
        for b in range(1, _BATCHES.value + 1):
            loader.map(rows[b])
        count = _BATCHES.value * _BATCH.value
        rates.append((count / (time.perf_counter() - start), count / (time.thread_time() - cpu_start)))
    return rates


def _pipeline_rate(source: RecordIOSource, num_workers: int) -> tuple[float, float, float]:
    """(images/s wall clock, images per CPU-second of this process, seconds to the first batch)."""
    ds = pipeline.train_epoch_dataset(source, _data_cfg(num_workers), 0, global_batch=_BATCH.value,
                                      process_index=0, process_count=1, grid=GRID)
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(_BATCHES.value):
        count += next(it)["image"].shape[0]
    rates = (count / (time.perf_counter() - start), count / (time.process_time() - cpu_start), first)
    it.close()
    return rates


def _stage_times(source: RecordIOSource) -> dict[str, float]:
    """CPU microseconds per image of each `BatchLoader` stage, over the timed batches."""
    cfg = _data_cfg(0)
    loader = pipeline.BatchLoader(source, cfg, 0, GRID)
    rows = _rows(source, cfg)
    loader.map(rows[0])
    totals = dict(decode=0.0, augment=0.0, occlude=0.0)
    for b in range(1, _BATCHES.value + 1):
        t0 = time.thread_time()
        batch = loader.decode(rows[b])
        t1 = time.thread_time()
        loader.augment(batch, rows[b])
        t2 = time.thread_time()
        loader.occlude(batch, rows[b])
        t3 = time.thread_time()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2)):
            totals[key] += dt
    return {key: 1e6 * value / (_BATCHES.value * _BATCH.value) for key, value in totals.items()}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        folder = _DATA.value
        needed = (_BATCHES.value + 1) * _BATCH.value
        if not folder:
            folder = os.path.join(tmp, "synthetic")
            # Spare batches: the worker processes, prefetching ahead, are still mid-epoch when closed.
            _write_synthetic(folder, needed + 8 * _BATCH.value)
        source = RecordIOSource(folder)
        if len(source) < needed:
            raise app.UsageError(f"{folder} holds {len(source)} records; --batch x (--batches + 1) needs "
                                 f"{needed}")
        sizes = [len(source[i]["image"]) for i in range(min(len(source), 1000))]
        worker = _worker_rates(source)
        stages = _stage_times(source)
        rows = [("workers=0 (in-process)", *_pipeline_rate(source, 0))]
        if _WORKERS.value > 0:
            rows.append((f"workers={_WORKERS.value}", *_pipeline_rate(source, _WORKERS.value)))
    data = _DATA.value or f"synthetic faces, OpenCV JPEG q95 {_SUBSAMPLING.value}"
    print(f"\n{data}, mean record {np.mean(sizes) / 1024:.1f} KiB; batch {_BATCH.value}, "
          f"{_BATCHES.value} timed batches, {os.cpu_count()} CPUs")
    walls, cpus = zip(*worker)
    print(f"\nper worker (BatchLoader.map on one thread, {_REPEATS.value} repeats)")
    print(f"{'':<12}{'images/s':>10}{'images/CPU-s':>14}")
    print(f"{'best':<12}{max(walls):>10.0f}{max(cpus):>14.0f}")
    print(f"{'median':<12}{statistics.median(walls):>10.0f}{statistics.median(cpus):>14.0f}")
    print(f"\n{'Grain pipeline':<28}{'images/s':>10}{'images/CPU-s':>14}{'first batch s':>15}")
    for name, rate, cpu_rate, first in rows:
        cpu = f"{cpu_rate:.0f}" if name.startswith("workers=0") else "-"
        print(f"{name:<28}{rate:>10.0f}{cpu:>14}{first:>15.2f}")
    total = sum(stages.values())
    print(f"\nBatchLoader stages ({_BATCHES.value} batches; decode includes the record read)")
    print(f"{'stage':<12}{'CPU us':>8}{'share':>8}")
    for name, us in stages.items():
        print(f"{name:<12}{us:>8.1f}{100 * us / total:>7.1f}%")
    print(f"{'total':<12}{total:>8.1f}   -> {1e6 / total:.0f} images/s per worker")


if __name__ == "__main__":
    app.run(main)
