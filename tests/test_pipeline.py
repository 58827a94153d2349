"""Tests for data_pipelines.pipeline on a tiny RecordIO written with write_recordio."""

import os
import re
import struct

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from data_pipelines import augment, occlusion, pipeline
from data_pipelines.folders import ImageFolderSource
from data_pipelines.images import CorruptImageError, CorruptRecordError, decode_image, encode_jpeg
from data_pipelines.recordio import RecordIOSource
from data_pipelines.recordio_format import write_recordio
from test_images import damage_scan

NUM_IDS, PER_ID = 8, 6
GLOBAL_BATCH = 8  # P = 4 identities x K = 2 images
CORRUPT = 14  # record index of the JPEG with damaged scan data (identity 2)
GRID = 7  # visibility-map side of a stage-4 model


def _face(identity, sample):
    rng = np.random.default_rng([identity, sample])
    base = np.linspace(0, 200, 112, dtype=np.float32)[None, :, None] * (identity + 1) / NUM_IDS
    img = base + rng.normal(0, 20, (112, 112, 3)) + 10 * identity
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(folder, corrupt=None):
    items = []
    for i in range(NUM_IDS * PER_ID):
        jpeg = encode_jpeg(_face(i // PER_ID, i % PER_ID), quality=90)
        items.append((damage_scan(jpeg) if i == corrupt else jpeg, i // PER_ID))
    write_recordio(str(folder), items, num_classes=NUM_IDS)
    return RecordIOSource(str(folder))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def corrupt_source(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("corrupt"), corrupt=CORRUPT)


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        source="recordio", path="", sampler="pk", k=2, num_workers=0, seed=7,
        on_corrupt="raise", graph_chunk=4096,
        augment=dict(flip_prob=0.5, crop_prob=0.2, crop_scale=(0.6, 1.0), lowres_prob=0.2,
                     photometric_prob=0.2),
        occlusion=dict(prob_blocks=0.3, prob_mask=0.3, prob_sunglasses=0.2, prob_rgba=0.0, rgba_path="",
                       blocks_count=(1, 3), blocks_size=(0.1, 0.4))))
    cfg.update(overrides)
    return cfg


def _batches(source, cfg, epoch=0, process_index=0, process_count=1, **kw):
    ds = pipeline.train_epoch_dataset(source, cfg, epoch, global_batch=GLOBAL_BATCH,
                                      process_index=process_index, process_count=process_count, grid=GRID,
                                      **kw)
    return list(ds)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_pk_batches_shapes_and_identities(source):
    batches = _batches(source, _cfg())
    assert len(batches) == pipeline.steps_per_epoch(len(source), GLOBAL_BATCH) == 6
    seen = []
    for batch in batches:
        assert batch["image"].shape == (8, 112, 112, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].shape == (8, 7, 7)
        assert batch["mask"].min() >= 0 and batch["mask"].max() <= 1
        np.testing.assert_array_equal(batch["corrupt"], np.zeros(8, np.int32))
        labels = batch["label"].reshape(4, 2)
        assert (labels[:, 0] == labels[:, 1]).all() and np.unique(labels[:, 0]).size == 4
        seen.append(batch["label"])
    # 6 batches x 4 slots = every identity 3 times = each of its 6 images once.
    np.testing.assert_array_equal(np.bincount(np.concatenate(seen)), np.full(NUM_IDS, PER_ID))
    assert any(b["mask"].min() < 1 for b in batches), "some images should be occluded"


def test_deterministic_per_epoch(source):
    cfg = _cfg()
    first = _batches(source, cfg, epoch=1)
    _assert_batches_equal(first, _batches(source, cfg, epoch=1))
    other = _batches(source, cfg, epoch=2)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_element_random_streams_depend_only_on_seed_epoch_position_stream():
    def draws(seed, epoch, position, stream=0):
        return pipeline._ElementRandom(seed, epoch).at(position, stream).random(6)

    randoms = pipeline._ElementRandom(7, 1)
    first = randoms.at(5, 0).random(6)
    randoms.at(9, 1).random(100)  # another element in between, drawing more
    np.testing.assert_array_equal(randoms.at(5, 0).random(6), first)  # re-pointing restarts the stream
    np.testing.assert_array_equal(draws(7, 1, 5), first)
    for other in (draws(7, 1, 6), draws(7, 2, 5), draws(8, 1, 5), draws(7, 1, 5, stream=1)):
        assert not np.any(other == first)
    np.testing.assert_array_equal(draws(-1, 0, 3), draws(2**64 - 1, 0, 3))  # seeds taken modulo 2**64


def test_stages_build_the_batch_that_map_returns(source):
    loader = pipeline.BatchLoader(source, _cfg(), 0, GRID)
    rows = np.stack([np.arange(8) * 5, np.arange(8) + 40], axis=-1)
    whole = loader.map(rows)
    staged = loader.decode(rows)
    for i, index in enumerate(rows[:, 0]):
        np.testing.assert_array_equal(staged["image"][i], decode_image(source[index]["image"]))
        assert staged["label"][i] == index // PER_ID
    loader.augment(staged, rows)
    loader.occlude(staged, rows)
    for key in whole:
        np.testing.assert_array_equal(staged[key], whole[key], err_msg=key)
    assert whole["mask"].min() < 1.0 and not np.array_equal(whole["image"], loader.decode(rows)["image"])


def test_iterator_checkpoint_restores_same_batches(source):
    cfg = _cfg()
    reference = _batches(source, cfg)
    ds = pipeline.train_epoch_dataset(source, cfg, 0, global_batch=GLOBAL_BATCH, process_index=0,
                                      process_count=1, grid=GRID)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = it.get_state()
    resumed = iter(pipeline.train_epoch_dataset(source, cfg, 0, global_batch=GLOBAL_BATCH,
                                                process_index=0, process_count=1, grid=GRID))
    resumed.set_state(state)
    _assert_batches_equal(list(resumed), reference[2:])


def test_iterator_checkpoint_through_orbax(source, tmp_path):
    cfg = _cfg()
    reference = _batches(source, cfg)

    def fresh():
        return iter(pipeline.train_epoch_dataset(source, cfg, 0, global_batch=GLOBAL_BATCH,
                                                 process_index=0, process_count=1, grid=GRID))

    it = fresh()
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    resumed = fresh()
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(list(resumed), reference[3:])


def test_workers_match_in_process_and_checkpoint(source):
    flags.FLAGS.mark_as_parsed()
    reference = _batches(source, _cfg())
    cfg = _cfg(num_workers=2)
    ds = pipeline.train_epoch_dataset(source, cfg, 0, global_batch=GLOBAL_BATCH, process_index=0,
                                      process_count=1, grid=GRID)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    _assert_batches_equal(head, reference[:3])
    resumed = iter(ds)
    resumed.set_state(state)
    _assert_batches_equal(list(resumed), reference[3:])


def test_two_processes_split_the_global_batch(source):
    cfg = _cfg()
    whole = _batches(source, cfg)
    parts = [_batches(source, cfg, process_index=i, process_count=2) for i in range(2)]
    for step, batch in enumerate(whole):
        first, second = parts[0][step], parts[1][step]
        assert first["image"].shape[0] == 4
        assert not set(first["label"]) & set(second["label"]), "P-blocks are split between processes"
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key],
                                          err_msg=key)


def test_graph_sampler_pipeline(source):
    neighbours = np.array([[(c + d) % NUM_IDS for d in (1, 2, 3)] for c in range(NUM_IDS)], np.int32)
    batches = _batches(source, _cfg(sampler="graph"), neighbours=neighbours)
    assert len(batches) == 6
    for batch in batches:
        ids = batch["label"][::2]
        np.testing.assert_array_equal(np.sort(ids), np.sort((ids[0] + np.arange(4)) % NUM_IDS))
    with pytest.raises(ValueError, match="needs `neighbours`"):
        _batches(source, _cfg(sampler="graph"))


def test_corrupt_record_raises_naming_it(corrupt_source):
    with pytest.raises(CorruptImageError, match=r"train\.rec record 15: corrupt JPEG"):
        _batches(corrupt_source, _cfg())


_PLAIN = dict(flip_prob=0.0, crop_prob=0.0, crop_scale=(0.6, 1.0), lowres_prob=0.0, photometric_prob=0.0)
_NO_OCCLUSION = dict(prob_blocks=0.0, prob_mask=0.0, prob_sunglasses=0.0, prob_rgba=0.0, rgba_path="",
                     blocks_count=(1, 3), blocks_size=(0.1, 0.4))


def _assert_replaced_once(source, bad_record, caplog):
    """Under on_corrupt="skip": `bad_record` was drawn once, replaced by the next record of its identity,
    counted in "corrupt" and logged naming it."""
    with caplog.at_level("WARNING"):
        batches = _batches(source, _cfg(on_corrupt="skip", augment=_PLAIN, occlusion=_NO_OCCLUSION))
    corrupt = np.concatenate([b["corrupt"] for b in batches])
    assert corrupt.sum() == 1
    flat = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    j = int(np.flatnonzero(corrupt)[0])
    assert labels[j] == bad_record // PER_ID
    np.testing.assert_array_equal(flat[j], decode_image(source[bad_record + 1]["image"]))
    replaced = [r.getMessage() for r in caplog.records if "Replacing a corrupt record" in r.getMessage()]
    assert len(replaced) == 1 and f"record {bad_record + 1}:" in replaced[0]
    return replaced[0]


def test_corrupt_record_skipped_and_counted(corrupt_source, caplog):
    message = _assert_replaced_once(corrupt_source, CORRUPT, caplog)
    assert "corrupt JPEG" in message


def test_wrong_image_size_raises_or_is_skipped_naming_the_record(tmp_path, caplog):
    items = [(encode_jpeg(_face(i // PER_ID, i % PER_ID), quality=90), i // PER_ID)
             for i in range(NUM_IDS * PER_ID)]
    items[9] = (encode_jpeg(np.zeros((96, 96, 3), np.uint8)), items[9][1])
    write_recordio(str(tmp_path), items, num_classes=NUM_IDS)
    small = RecordIOSource(str(tmp_path))
    with pytest.raises(CorruptImageError,
                       match=r"train\.rec record 10: image is 96x96x3, expected 112x112x3"):
        _batches(small, _cfg(on_corrupt="raise"))
    message = _assert_replaced_once(small, 9, caplog)
    assert "image is 96x96x3" in message


def _patch_record(folder, key, at, data):
    """Overwrites bytes of record `key` (`at` bytes from its start) in a written RecordIO."""
    offsets = dict(tuple(int(v) for v in line.split("\t"))
                   for line in (folder / "train.idx").read_text().splitlines())
    with open(folder / "train.rec", "r+b") as fh:
        fh.seek(offsets[key] + at)
        fh.write(data)


@pytest.mark.parametrize("fault, record, at, data, reason", [
    ("bad magic", 14, 0, b"\0\0\0\0", r"bad magic 0x00000000"),
    ("fractional label", 20, 12, struct.pack("<f", 3.5), r"label 3\.5 is not a class in \[0, 8\)"),
])
def test_record_faults_raise_or_are_skipped(tmp_path, caplog, fault, record, at, data, reason):
    _write(tmp_path)
    _patch_record(tmp_path, record + 1, at, data)  # image record i is key i + 1
    strict = pipeline.open_source(_cfg(path=str(tmp_path), on_corrupt="raise"))
    with pytest.raises(CorruptRecordError, match=rf"train\.rec record {record + 1}: {reason}"):
        _batches(strict, _cfg(on_corrupt="raise"))
    skipping = pipeline.open_source(_cfg(path=str(tmp_path), on_corrupt="skip"))
    assert skipping.labels()[record] == record // PER_ID  # lent by the record before it
    message = _assert_replaced_once(skipping, record, caplog)
    assert re.search(reason, message), fault


def test_faults_that_are_not_per_record_stop_under_skip(tmp_path):
    _write(tmp_path)
    (tmp_path / "train.idx").write_text("0\t0\n1\tforty\n")
    with pytest.raises(ValueError, match=r"train\.idx line 2: malformed index line"):
        pipeline.open_source(_cfg(path=str(tmp_path), on_corrupt="skip"))
    os.remove(tmp_path / "train.idx")
    with pytest.raises(FileNotFoundError, match=r"train\.idx: missing RecordIO index"):
        pipeline.open_source(_cfg(path=str(tmp_path), on_corrupt="skip"))


@pytest.mark.parametrize("field,value,match", [
    ("source", "lmdb", r"data\.source: unknown source 'lmdb'"),
    ("sampler", "random", r"data\.sampler: unknown sampler 'random'"),
    ("on_corrupt", "ignore", r"data\.on_corrupt: unknown policy 'ignore'"),
    ("k", 0, r"data\.k=0 must be >= 1"),
    ("num_workers", -1, r"data\.num_workers=-1 must be >= 0"),
    ("path", "", r"data\.path is empty"),
    ("path", "gs:/bucket/faces", r"data\.path='gs:/bucket/faces': looks like a URI with a missing slash"),
])
def test_check_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _check(_cfg(**{field: value}, path="/data") if field != "path" else _cfg(path=value))


def _check(data_cfg):
    pipeline.check_config({"data": data_cfg}, num_devices=1, process_count=1)


def test_check_config_checks_augment_and_occlusion():
    _check(_cfg(path="/data"))
    cfg = _cfg(path="/data")
    cfg.augment.flip_prob = 1.5
    with pytest.raises(ValueError, match=r"data\.augment\.flip_prob"):
        _check(cfg)
    cfg = _cfg(path="/data")
    cfg.occlusion.prob_mask = 0.9
    with pytest.raises(ValueError, match=r"data\.occlusion\.prob_blocks \+ prob_mask"):
        _check(cfg)


def test_augment_and_occlusion_are_checked_once_not_every_epoch(source, monkeypatch):
    calls = []
    for module in (augment, occlusion):
        monkeypatch.setattr(module, "check_config", lambda cfg, check=module.check_config: calls.append(cfg) or
                            check(cfg))
    cfg = _cfg(path="/data")
    _check(cfg)
    assert calls == [cfg.augment, cfg.occlusion]
    for epoch in (0, 1):
        _batches(source, cfg, epoch)
    assert len(calls) == 2  # the per-epoch loaders take the checked configs as given


def test_epoch_longer_than_the_data_is_refused():
    with pytest.raises(ValueError, match="exceeds the 48 training records"):
        pipeline.steps_per_epoch(48, 64)


def test_open_source(source, tmp_path):
    opened = pipeline.open_source(_cfg(path=os.fspath(source.folder)))
    assert isinstance(opened, RecordIOSource) and len(opened) == NUM_IDS * PER_ID
    assert opened.on_corrupt == "raise"
    assert pipeline.open_source(_cfg(path=os.fspath(source.folder), on_corrupt="skip")).on_corrupt == "skip"
    missing = os.path.join(str(tmp_path), "nope")
    with pytest.raises(FileNotFoundError, match=r"data\.path: training data folder .*nope"):
        pipeline.open_source(_cfg(path=missing))


def test_open_source_on_gcs(gcs, source, tmp_path, monkeypatch):
    from data_pipelines import tfds_faces
    items = [(source[i]["image"], source[i]["label"]) for i in range(len(source))]
    write_recordio(gcs.url("rec"), items, num_classes=NUM_IDS)
    for i, (image, label) in enumerate(items[:8]):
        gcs.put(f"faces/id{label}/{i}.jpg", image)
    # ArrayRecord writes local files only: the TFDS dataset is prepared here, then uploaded.
    tfds_faces.build_tfds(os.fspath(source.folder), str(tmp_path / "tfds"))
    gcs.put_tree(str(tmp_path / "tfds"), "tfds")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rec = pipeline.open_source(_cfg(path=gcs.url("rec")))
    assert isinstance(rec, RecordIOSource) and rec._mm is None
    _assert_batches_equal(_batches(rec, _cfg()), _batches(source, _cfg()))
    folder = pipeline.open_source(_cfg(source="folder", path=gcs.url("faces")))
    assert isinstance(folder, ImageFolderSource) and folder.class_names == ["id0", "id1"]
    assert [folder[i] for i in range(8)] == [{"image": image, "label": label} for image, label in items[:8]]
    tfds = pipeline.open_source(_cfg(source="tfds", path=gcs.url("tfds")))
    assert tfds.builder_dir == gcs.url("tfds/face_records/1.0.0") and len(tfds) == len(source)
    _assert_batches_equal(_batches(tfds, _cfg()), _batches(source, _cfg()))
    with pytest.raises(FileNotFoundError, match=rf"data\.path: training data folder '{re.escape(gcs.url('nope'))}'"):
        pipeline.open_source(_cfg(path=gcs.url("nope")))
    read = {name.split("/")[0] for name, _, _ in gcs.reads()}
    assert read == {"rec", "faces", "tfds"}  # every source read its files from the bucket
    assert os.listdir(cwd) == []  # nothing named "gs:" in the working directory
