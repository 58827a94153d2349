"""Training input pipeline throughput: decoded + augmented + occluded images/s.

    python bench/data_throughput.py                     # synthetic RecordIO in a temp dir
    python bench/data_throughput.py --data=DIR --workers=4 --batches=50

Runs the real pipeline (`data_pipelines.pipeline.train_epoch_dataset`) with num_workers=0 (in-process:
the per-worker figure) and with --workers Grain worker processes, then times the stages of one element
(decode, augment, occlude, normalize) in-process to show where the time goes.
"""

import math
import os
import sys
import tempfile
import time

from absl import app, flags
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import pipeline  # noqa: E402  (needs the repo root on sys.path)
from data_pipelines.augment import augment, normalize  # noqa: E402
from data_pipelines.images import decode_image, encode_jpeg  # noqa: E402
from data_pipelines.occlusion import occlude  # noqa: E402
from data_pipelines.recordio import RecordIOSource, write_recordio  # noqa: E402

_DATA = flags.DEFINE_string("data", "", "RecordIO folder; empty = write a synthetic one in a temp dir.")
_IMAGES = flags.DEFINE_integer("images", 16, "Images per identity of the synthetic RecordIO.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Batches timed per configuration (after one warm-up batch).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes of the multi-worker run.")
_STAGE_SAMPLES = flags.DEFINE_integer("stage_samples", 300, "Elements timed per stage.")


def _synthetic_face(rng: np.random.Generator) -> np.ndarray:
    """A smooth 112x112 image with noise: JPEG-compresses like a face crop, not like pure noise."""
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32) / 112
    colour = rng.uniform(40, 220, 3).astype(np.float32)
    blob = np.exp(-((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) / 0.05)
    img = colour * (0.4 + 0.6 * blob[..., None]) + rng.normal(0, 6, (112, 112, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_synthetic(folder: str, num_records: int) -> None:
    """Enough identities of --images images each for `num_records` records and P = batch / 4 ids."""
    identities = max(math.ceil(num_records / _IMAGES.value), _BATCH.value // 4)
    rng = np.random.default_rng(0)
    items = ((encode_jpeg(_synthetic_face(rng), quality=90), i // _IMAGES.value)
             for i in range(identities * _IMAGES.value))
    write_recordio(folder, items, num_classes=identities)


def _data_cfg(num_workers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="recordio", path="", sampler="pk", k=4, num_workers=num_workers, seed=0, bgr=True,
        on_corrupt="raise", grid=7, graph_chunk=4096,
        augment=dict(flip_prob=0.5, crop_prob=0.2, crop_scale=(0.6, 1.0), lowres_prob=0.2,
                     photometric_prob=0.2),
        occlusion=dict(prob_blocks=0.2, prob_mask=0.2, prob_sunglasses=0.1, prob_rgba=0.0, rgba_path="",
                       blocks_count=(1, 3), blocks_size=(0.1, 0.4))))


def _pipeline_rate(source: RecordIOSource, num_workers: int) -> tuple[float, float, float]:
    """(images/s wall clock, images per CPU-second of this process, seconds to the first batch).

    CPU time counts this process's threads only, so the second figure is meaningful in-process
    (num_workers=0), where it shows the per-worker rate even on a machine shared with other jobs.
    """
    ds = pipeline.train_epoch_dataset(source, _data_cfg(num_workers), 0, global_batch=_BATCH.value,
                                      process_index=0, process_count=1)
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(_BATCHES.value):
        count += next(it)["image"].shape[0]
    return (count / (time.perf_counter() - start), count / (time.process_time() - cpu_start), first)


def _stage_times(source: RecordIOSource) -> dict[str, float]:
    """CPU microseconds per element of each stage (thread CPU time: robust to a busy machine)."""
    cfg = _data_cfg(0)
    totals = dict(read=0.0, decode=0.0, augment=0.0, occlude=0.0, normalize=0.0)
    n = min(_STAGE_SAMPLES.value, len(source))
    for i in range(n):
        rng = np.random.default_rng([0, 0, i])
        t0 = time.thread_time()
        data = source[i]["image"]
        t1 = time.thread_time()
        image = decode_image(data)
        t2 = time.thread_time()
        image = augment(image, rng, cfg.augment)
        t3 = time.thread_time()
        image, _ = occlude(image, rng, cfg.occlusion, grid=7)
        t4 = time.thread_time()
        normalize(image, bgr=True)
        t5 = time.thread_time()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            totals[key] += dt
    return {key: 1e6 * value / n for key, value in totals.items()}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        folder = _DATA.value
        needed = (_BATCHES.value + 1) * _BATCH.value
        if not folder:
            folder = os.path.join(tmp, "synthetic")
            _write_synthetic(folder, needed)
        source = RecordIOSource(folder)
        if len(source) < needed:
            raise app.UsageError(f"{folder} holds {len(source)} records; --batch x (--batches + 1) needs "
                                 f"{needed}")
        stages = _stage_times(source)
        rows = [("workers=0 (in-process, per worker)", *_pipeline_rate(source, 0))]
        if _WORKERS.value > 0:
            rows.append((f"workers={_WORKERS.value}", *_pipeline_rate(source, _WORKERS.value)))
    print(f"\npipeline, global batch {_BATCH.value}, {_BATCHES.value} timed batches, {os.cpu_count()} CPUs")
    print(f"{'configuration':<36}{'images/s':>10}{'images/CPU-s':>14}{'first batch s':>15}")
    for name, rate, cpu_rate, first in rows:
        cpu = f"{cpu_rate:.0f}" if name.startswith("workers=0") else "-"
        print(f"{name:<36}{rate:>10.0f}{cpu:>14}{first:>15.2f}")
    total = sum(stages.values())
    print(f"\nper-element stages (in-process, {min(_STAGE_SAMPLES.value, len(source))} elements)")
    print(f"{'stage':<12}{'CPU us':>8}{'share':>8}")
    for name, us in stages.items():
        print(f"{name:<12}{us:>8.1f}{100 * us / total:>7.1f}%")
    print(f"{'total':<12}{total:>8.1f}   -> {1e6 / total:.0f} images/s upper bound per worker")


if __name__ == "__main__":
    app.run(main)
