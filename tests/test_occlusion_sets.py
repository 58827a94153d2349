"""Occlusion sets (OAML's second stream): reader, occlusion batch, step, training, evaluation, alignment."""

import os
import shutil
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from etils import epath
from PIL import Image

import train_worker
from data_pipelines import occlusion_set_align, occlusion_sets, pipeline, synthetic_occlusion
from data_pipelines.images import CorruptImageError
from data_pipelines.occlusion_sets import OcclusionItems, OcclusionSet
from oaml_jax import step as step_lib
from oaml_jax import train
from oaml_jax.configs import default
from oaml_jax.evaluation import runner
from oaml_jax.evaluation import evaluators as evaluators_lib
from oaml_jax.evaluation.occlusion_sets import OcclusionSetEvaluator, score
from oaml_jax.models import factory
from oaml_jax.models.face_input import ARCFACE_TEMPLATE, InputContract

flags.FLAGS.mark_as_parsed()
train_worker.enable_compilation_cache()

_DATA = os.path.join(os.path.dirname(__file__), "data")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, array):
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(os.path.splitext(str(path))[1], array)[1].tobytes())


def _face(seed, size=112):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _oaml_set(root):
    """OAML's layout: a 224x224 half mask, a graded BMP mask (the image's extension), an image without
    mask, an orphan mask, and a 100x100 face."""
    half = np.full((224, 224), 255, np.uint8)
    half[:, :112] = 0
    _png(f"{root}/kept_faces/a.png", _face(0))
    _png(f"{root}/masks/a_mask.png", half)
    _png(f"{root}/kept_faces/b.bmp", _face(1))
    _png(f"{root}/masks/b_mask.bmp", np.full((56, 56), 51, np.uint8))
    _png(f"{root}/kept_faces/c.png", _face(2))
    _png(f"{root}/masks/zz_mask.png", half)
    _png(f"{root}/kept_faces/d.png", _face(3, 100))
    _png(f"{root}/masks/d_mask.png", half)
    return root


def _two_folder_set(root):
    """Two folders, same names without suffix: a 120x100 mask whose top half is occluded."""
    mask = np.full((120, 100), 255, np.uint8)
    mask[:60] = 0
    _png(f"{root}/images/e.png", _face(4))
    _png(f"{root}/masks/e.png", mask)
    return root


def test_reader_targets_are_visible_fractions_by_area(tmp_path):
    s = OcclusionSet(_oaml_set(str(tmp_path / "oaml")), 7)
    assert s.names == ("a", "b", "d")
    assert s.unpaired_images == ("c.png",) and s.unpaired_masks == ("zz_mask.png",)
    face, target = s[0]
    np.testing.assert_array_equal(face, _face(0)[..., ::-1])  # written with cv2 (BGR), read as RGB
    # 224 px mask over 7 cells: 32 px each; columns 0-111 occluded -> cells 0-2 at 0, cell 3 half, 4-6 at 1.
    np.testing.assert_allclose(target, np.tile([0, 0, 0, 0.5, 1, 1, 1], (7, 1)), atol=1e-6)
    np.testing.assert_allclose(s[1][1], np.full((7, 7), 0.2), atol=1e-6)  # graded 51 / 255
    with pytest.raises(CorruptImageError, match=r"kept_faces/d\.png.*100x100 is not a 112x112 aligned face"):
        s[2]

    two = _two_folder_set(str(tmp_path / "two"))
    # 120 rows over 7 cells (17.14 px): rows 0-59 occluded -> cells 0-2 at 0, cell 3 half, 4-6 at 1.
    np.testing.assert_allclose(OcclusionSet(two, 7)[0][1], np.tile([[0], [0], [0], [0.5], [1], [1], [1]], (1, 7)),
                               atol=1e-5)
    # The 14x14 grid of the stage-3 map: 8.57 px cells, rows 0-59 are exactly cells 0-6.
    np.testing.assert_allclose(OcclusionSet(two, 14)[0][1], np.repeat([[0.0]] * 7 + [[1.0]] * 7, 14, axis=1),
                               atol=1e-5)


def test_sets_without_pairs_are_refused_naming_them(tmp_path):
    root = tmp_path / "empty"
    _png(f"{root}/kept_faces/x.png", _face(0))
    _png(f"{root}/masks/y_mask.png", np.zeros((7, 7), np.uint8))
    with pytest.raises(ValueError, match=r"data.occlusion_sets\[0\]: .*empty holds no image \+ mask pair \(1 images "
                                         r"without a mask, 1 masks without an image\)"):
        OcclusionSet(root, 7, field="data.occlusion_sets[0]")
    shutil.rmtree(root / "masks")
    with pytest.raises(FileNotFoundError, match=r"empty/masks"):
        OcclusionSet(root, 7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OcclusionSet(tmp_path / "nowhere", 7)


def test_array_record_round_trip_and_holdout_split(tmp_path):
    root = synthetic_occlusion.write_occlusion_set(str(tmp_path / "set"), 12, seed=0)["out_dir"]
    out = tmp_path / "set.array_record"
    assert occlusion_sets.convert_to_array_record(root, out) == 12
    with pytest.raises(ValueError, match="expected a new file"):
        occlusion_sets.convert_to_array_record(root, out)
    folder, records = OcclusionSet(root, 7), OcclusionSet(out, 7)
    assert folder.names == records.names
    for i in range(12):
        for a, b in zip(folder[i], records[i]):
            np.testing.assert_array_equal(a, b)
    train_part, held = folder.split(0.25)
    assert sorted(np.concatenate([train_part, held])) == list(range(12)) and 0 < len(held) < 12
    # The split follows the names: a set with more pairs holds the same names out.
    bigger = OcclusionSet(synthetic_occlusion.write_occlusion_set(str(tmp_path / "big"), 30, 0)["out_dir"], 7)
    assert {folder.names[i] for i in held} == {n for n in (bigger.names[i] for i in bigger.split(0.25)[1])
                                               if n in folder.names}


def test_set_on_gcs(gcs, tmp_path):
    local = _two_folder_set(str(tmp_path / "two"))
    gcs.put_tree(local, "sets/two")
    s = OcclusionSet(gcs.url("sets/two"), 14)
    assert s.names == ("e",) and s.where(0) == gcs.url("sets/two/images/e.png")
    np.testing.assert_array_equal(s[0][1], OcclusionSet(local, 14)[0][1])


def test_unaligned_photo_mask_follows_the_face(tmp_path, capsys):
    """A real photo (tests/data/astronaut_head.jpg) with a mask over the mouth, drawn at half the photo's
    size: aligned, the mask still covers the template's mouth corners and leaves the eyes visible."""
    from oaml_jax import align
    with Image.open(os.path.join(_DATA, "astronaut_head.jpg")) as image:
        photo = np.asarray(image.convert("RGB"))
    landmarks = align.detect_faces(photo)[1][0]
    mouth = landmarks[3:5]
    half = np.full((photo.shape[0] // 2, photo.shape[1] // 2), 255, np.uint8)
    x0, y0 = (mouth.min(axis=0) - 6) / 2
    x1, y1 = (mouth.max(axis=0) + 6) / 2
    half[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 0
    raw = tmp_path / "raw"
    _png(raw / "kept_faces" / "astro.jpg", photo[..., ::-1])
    _png(raw / "masks" / "astro_mask.png", half)
    with pytest.raises(ValueError, match="is an input folder"):
        occlusion_set_align.align_set(raw / "kept_faces", raw / "masks", raw / "masks" / "..")
    from test_inference_cli import run_main  # `oaml-inference align --images --masks --out`
    run_main("align", f"--images={raw / 'kept_faces'}", f"--masks={raw / 'masks'}", f"--out={tmp_path / 'aligned'}")
    assert capsys.readouterr().out.strip() == "1 written, 0 without face, 0 unpaired images, 0 unpaired masks"
    warped = cv2.imread(str(tmp_path / "aligned" / "masks" / "astro_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert warped.shape == (448, 448)
    scale = occlusion_sets.MASK_WARP_SCALE
    for (x, y), visible in zip(ARCFACE_TEMPLATE, (255, 255, None, 0, 0)):
        if visible is not None:
            assert warped[int(y * scale), int(x * scale)] == visible, (x, y)
    aligned_set = OcclusionSet(tmp_path / "aligned", 7)
    np.testing.assert_allclose(OcclusionSet(raw, 7, aligned=False)[0][1], aligned_set[0][1], atol=1 / 255)
    target = aligned_set[0][1]
    mouth_cell = (ARCFACE_TEMPLATE[3:5] / 16).astype(int)
    assert all(target[r, c] < 0.5 for c, r in mouth_cell) and np.all(target[:4] == 1.0)



def test_aligned_crops_are_kept_as_they_are_when_aligning_a_set(tmp_path):
    """112x112 crops (the synthetic set's faces, masks at another resolution) are taken as aligned, as plain
    `align` takes them: none is run through detection and dropped; faces, masks and targets come out unchanged,
    through `align_set` and through an unaligned set opened for training."""
    source = tmp_path / "synthetic"
    synthetic_occlusion.write_occlusion_set(str(source), 4, 3)
    counts = occlusion_set_align.align_set(source / "kept_faces", source / "masks", tmp_path / "aligned")
    assert counts == {"written": 4, "without_face": 0, "unpaired_images": 0, "unpaired_masks": 0}
    original, aligned = OcclusionSet(source, 7), OcclusionSet(tmp_path / "aligned", 7)
    unaligned = OcclusionSet(source, 7, aligned=False)
    assert aligned.names == original.names == unaligned.names and unaligned.without_face == ()
    for name in original.names:
        mask = f"masks/{name}_mask.png"
        read = lambda root: cv2.imread(str(root / mask), cv2.IMREAD_GRAYSCALE)
        assert read(source).shape != (112, 112)
        np.testing.assert_array_equal(read(tmp_path / "aligned"), read(source))
    for i in range(len(original)):
        for other in (aligned, unaligned):
            np.testing.assert_array_equal(other[i][0], original[i][0])
            np.testing.assert_array_equal(other[i][1], original[i][1])


def _data_cfg(occlusion_set, **overrides):
    cfg = default.get_config("test").data
    cfg.occlusion_sets = (occlusion_set,)
    cfg.occlusion_batch = 10
    cfg.occlusion_holdout = 0.25
    cfg.occlusion_augment.flip_prob = 0.5
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = train_worker.make_tiny_data(str(root / "data"))
    synthetic_occlusion.write_occlusion_set(str(root / "occ"), 48, seed=0)
    return data, str(root / "occ")


def test_occlusion_batch_in_the_grain_element(tiny):
    data, occ = tiny
    cfg = _data_cfg(occ)
    source = pipeline.open_source(ml_collections.ConfigDict(dict(source="recordio", path=data, on_corrupt="raise")))
    items = pipeline.occlusion_items(cfg, 7)
    held = pipeline.occlusion_items(cfg, 7, held_out=True)
    assert len(items) + len(held) == 48 and not {items.name(i) for i in range(len(items))} & \
        {held.name(i) for i in range(len(held))}

    def batches(process_index=0, process_count=1):
        return list(pipeline.train_epoch_dataset(source, cfg, 1, global_batch=16, process_index=process_index,
                                                 process_count=process_count, grid=7))

    whole = batches()
    assert whole[0]["occ_image"].shape == (10, 112, 112, 3) and whole[0]["occ_target"].shape == (10, 7, 7)
    real = [pipeline.is_real(j, 0.8) for j in range(10)]
    assert sum(real) == 8 and real[:5].count(True) == 4  # spread: each half of the batch gets its share
    for batch in whole:
        clean = batch["occ_target"][~np.array(real)]
        np.testing.assert_array_equal(clean, np.ones_like(clean))  # clean faces: all visible
        assert np.all(batch["occ_target"][np.array(real)].min(axis=(1, 2)) < 1)  # every covering occludes
    # Same batches for any process split (each process builds its contiguous part).
    halves = [batches(p, 2) for p in (0, 1)]
    for key in ("occ_image", "occ_target"):
        for step, batch in enumerate(whole):
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), batch[key])
    # A flipped face comes with its flipped target: match every real face to its set item.
    faces = {items[i][0].tobytes(): items[i][1] for i in range(len(items))}
    flipped = {items[i][0][:, ::-1].tobytes(): items[i][1][:, ::-1] for i in range(len(items))}
    kinds = set()
    for batch in whole:
        for face, target in zip(batch["occ_image"][np.array(real)], batch["occ_target"][np.array(real)]):
            kind = "plain" if face.tobytes() in faces else "flipped"
            expected = faces.get(face.tobytes(), flipped.get(face.tobytes()))
            np.testing.assert_array_equal(target, expected)
            kinds.add(kind)
    assert kinds == {"plain", "flipped"}


def test_check_config_names_the_field():
    cfg = _data_cfg("x")
    occlusion_sets.check_config({"data": cfg}, num_devices=2, process_count=1)
    for field, value, match in (("occlusion_batch", 9, r"occlusion_batch=9 must split evenly over the 2 devices"),
                                ("occlusion_batch", 0, "needs data.occlusion_batch > 0"),
                                ("occlusion_real_share", 0.0, r"occlusion_real_share=0.0 must be in \(0, 1\]"),
                                ("occlusion_holdout", 1.0, r"occlusion_holdout=1.0 must be in \[0, 1\)"),
                                ("occlusion_sets", "gs:/bucket", r"occlusion_sets\[0\].*a missing slash")):
        bad = _data_cfg("x", **{field: value})
        with pytest.raises(ValueError, match=match):
            occlusion_sets.check_config({"data": bad}, num_devices=2, process_count=1)
    assert occlusion_sets.set_paths("gs://b/one") == ("gs://b/one",) and occlusion_sets.set_paths(()) == ()


class _RecordingContract(InputContract):
    """The input contract, noting the shape of every batch it maps (at trace time)."""

    seen: list = []

    def preprocess(self, images):
        self.seen.append(tuple(images.shape))
        return super().preprocess(images)


def test_step_occlusion_batch_trains_only_the_head_through_one_contract():
    config = default.get_config("test")
    model = factory.build_model(config.model, 8)
    contract = _RecordingContract(grid=7)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = optax.sgd(0.1)
    built = step_lib.build_train_step(model, tx, optax.constant_schedule(0.1), contract, mesh, global_batch=8,
                                      occlusion_batch=4)
    state = built.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8),
             "label": np.arange(8, dtype=np.int32) // 2, "mask": np.ones((8, 7, 7), np.float32),
             "corrupt": np.zeros(8, np.int32), "occ_image": rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8),
             "occ_target": rng.random((4, 7, 7)).astype(np.float32), "occ_corrupt": np.zeros(4, np.int32)}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = contract.preprocess(jnp.asarray(batch["occ_image"]))

    def set_loss(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                      method=step_lib.occlusion_set_logits, mutable=["batch_stats"])
        return step_lib.occlusion_loss(logits, batch["occ_target"], model.occ_loss), updates["batch_stats"]

    grads, stats = jax.grad(set_loss, has_aux=True)(variables["params"])
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["backbone"]))  # no gradient into it
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["occlusion"]))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), stats, dict(state.batch_stats))
    assert all(jax.tree.leaves(same["backbone"]))  # the occlusion batch leaves the backbone's BN as it was
    assert not all(jax.tree.leaves(same["occlusion"]))  # and sets the head's
    _RecordingContract.seen.clear()
    new_state, metrics = built.step(state, batch)
    # Both streams reach the model through the one input contract (one channel order).
    assert sorted(_RecordingContract.seen) == [(4, 112, 112, 3), (8, 112, 112, 3)]
    assert {"loss_occ_set", "occ_set_mae", "loss_occ"} <= set(metrics)

    # In the step: the backbone's statistics are the main batch's update alone, the head's the occlusion batch's.
    main_only = step_lib.build_train_step(model, tx, optax.constant_schedule(0.1), InputContract(grid=7), mesh,
                                          global_batch=8)
    plain = {k: v for k, v in batch.items() if not k.startswith("occ_")}
    main_state, _ = main_only.step(main_only.init(jax.random.PRNGKey(0)), plain)
    for a, b in zip(*(jax.tree.leaves(s.batch_stats["backbone"]) for s in (new_state, main_state))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new_state.batch_stats["occlusion"]), jax.tree.leaves(stats["occlusion"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _run_config(data, occ, max_steps):
    config = train_worker.tiny_config(data, max_steps=max_steps, eval_every=0, epochs=6)
    config.data.occlusion_sets = occ  # a single path, as the command line gives it
    config.data.occlusion_batch = 8
    config.data.occlusion_holdout = 0.25
    config.data.occlusion_synthetic_head = False
    config.model.occ_loss = "bce"
    config.model.lam_occ = 20.0
    return config


def test_training_with_an_occlusion_set_learns_and_resumes_bitwise(tiny, tmp_path):
    data, occ = tiny
    full = train.train_and_evaluate(_run_config(data, occ, 16), str(tmp_path / "full"))
    first = train.train_and_evaluate(_run_config(data, occ, 6), str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(_run_config(data, occ, 16), str(tmp_path / "resumed"))
    assert {**first["losses"], **resumed["losses"]} == full["losses"]  # bitwise, occlusion stream included
    validation = full["validation"]
    name = "val/occ"
    # Held-out coverings (never drawn for training): the head beats the all-visible predictor.
    assert validation[f"{name}/faces"] >= 8
    assert validation[f"{name}/mae"] < 0.95 * validation[f"{name}/all_visible_mae"], validation
    assert validation[f"{name}/iou"] > validation[f"{name}/all_visible_iou"] == 0.0
    # Its loss falls.
    assert resumed["metrics"]["loss_occ_set"] < 0.8 * first["metrics"]["loss_occ_set"]
    # eval.py: the same scores in its table, and the grid of faces with predicted and true maps.
    config = _run_config(data, occ, 16)
    config.eval.tensorboard = False
    config.eval.occlusion_variants = ("clean",)
    evaluated = runner.run(config, str(tmp_path / "full"))
    last_row = evaluated["table"].splitlines()[-1]
    assert last_row.startswith(f"occ ({int(validation[f'{name}/faces'])} faces)")
    assert f"{100 * validation[f'{name}/mae']:.2f}" in last_row
    assert evaluated["scalars"]["occlusion"]["occ/mae"] == validation[f"{name}/mae"]
    assert evaluated["files"]["occlusion_sets"].exists()


def _occlusion_evaluators(data_sets=(), eval_sets=(), holdout=0.25, training=False, **entry):
    config = default.get_config("test")
    config.data.occlusion_sets, config.eval.occlusion_sets = data_sets, eval_sets
    config.data.occlusion_holdout = holdout
    config.eval.evaluators = ml_collections.ConfigDict(dict(occlusion=dict(type="occlusion", validation=True,
                                                                          **entry)))
    return evaluators_lib.from_config(config, training=training)


def test_evaluator_scores_and_report(tiny, tmp_path, face_model):
    _, occ = tiny
    evaluator, = _occlusion_evaluators(occ)
    assert isinstance(evaluator, OcclusionSetEvaluator) and evaluator.validation
    results = evaluator.evaluate(face_model)
    (name, result), = results.items()
    held_out = len(OcclusionSet(occ, 7).split(0.25)[1])
    assert name == "occ" and result.metrics["faces"] == held_out
    scalars = evaluator.scalars(results)
    assert sorted(scalars) == [f"occ/{m}" for m in ("all_visible_iou", "all_visible_mae", "faces", "iou", "mae")]
    assert scalars["occ/mae"] == result.metrics["mae"]
    # Train-time validation names them "val/<set>/<metric>".
    validation = evaluators_lib.validation_metrics(_occlusion_evaluators(occ, training=True), face_model)
    assert validation["val/occ/mae"] == pytest.approx(result.metrics["mae"], abs=1e-6)
    table, = evaluator.tables(results)
    assert table.columns == ("MAE", "IoU", "all-visible MAE", "all-visible IoU")
    assert table.rows == {f"occ ({held_out} faces)": {"MAE": 100 * result.metrics["mae"],
                                                      "IoU": 100 * result.metrics["iou"],
                                                      "all-visible MAE": 100 * result.metrics["all_visible_mae"],
                                                      "all-visible IoU": 100 * result.metrics["all_visible_iou"]}}
    files = evaluator.write(results, tmp_path / "eval")
    assert cv2.imread(str(files["occlusion_sets"])).shape[0] > 100
    # A named validation set is scored whole (and wins over the held-out part of the training sets).
    whole, = _occlusion_evaluators(occ, eval_sets=(occ,))
    assert whole.evaluate(face_model)["occ"].metrics["faces"] == 48
    # Known answers: a perfect map, and the all-visible map.
    targets = np.stack([np.eye(7), np.ones((7, 7))]).astype(np.float32)
    assert score(targets, targets) == {"mae": 0.0, "iou": 1.0, "all_visible_mae": pytest.approx(42 / 98),
                                       "all_visible_iou": 0.0, "faces": 2.0}
    half = score(np.full_like(targets, 0.25), targets)
    assert half["mae"] == pytest.approx((7 * 0.75 + 42 * 0.25 + 49 * 0.75) / 98)
    assert half["iou"] == pytest.approx(42 / 98)


def test_evaluator_left_out_or_refused(tiny, tmp_path):
    _, occ = tiny
    # Neither eval.occlusion_sets nor data.occlusion_sets (the default): left out; no held-out share: too.
    assert _occlusion_evaluators() == [] and _occlusion_evaluators(occ, holdout=0.0) == []
    with pytest.raises(FileNotFoundError, match=r"eval.occlusion_sets\[0\]: occlusion set folder .*missing"):
        _occlusion_evaluators(eval_sets=(str(tmp_path / "missing"),))
    for bad in (0.0, "0.5"):
        with pytest.raises(ValueError, match=rf"eval.evaluators.occlusion.threshold={bad!r}: expected a visible"):
            _occlusion_evaluators(occ, threshold=bad)


class _AllVisible14:
    """A model stand-in with a 14x14 grid (model.feature_stage=3) whose head predicts all visible."""

    has_qaconv = True
    contract = InputContract(grid=14)

    @staticmethod
    def occlusion_maps(faces):
        return np.ones((len(faces), 14, 14), np.float32)


def test_evaluator_takes_targets_at_the_model_grid(tiny):
    _, occ = tiny
    evaluator, = _occlusion_evaluators(occ)
    result = evaluator.evaluate(_AllVisible14())["occ"]
    held = OcclusionSet(occ, 14)
    targets = np.stack([held[int(i)][1] for i in held.split(0.25)[1]])
    assert result.targets.shape[1:] == (14, 14)
    np.testing.assert_array_equal(result.targets, targets[:result.targets.shape[0]])
    assert result.metrics == score(np.ones_like(targets), targets)
    assert result.metrics["mae"] == result.metrics["all_visible_mae"] > 0


def test_converted_adaface_checkpoint_gets_nothing(tiny, tmp_path):
    from oaml_jax.serving import FaceModel
    from tiny_checkpoint import write_converted_checkpoint

    _, occ = tiny
    model = FaceModel.from_checkpoint(write_converted_checkpoint(str(tmp_path / "adaface")), batch_size=4)
    evaluator, = _occlusion_evaluators(occ)
    result = evaluator.evaluate(model)
    assert not model.has_qaconv and result == {}
    assert evaluator.scalars(result) == {} and evaluator.tables(result) == []
    assert evaluator.write(result, tmp_path / "eval") == {} and not (tmp_path / "eval").exists()


def test_items_index_all_sets(tiny, tmp_path):
    _, occ = tiny
    other = _two_folder_set(str(tmp_path / "two"))
    items = OcclusionItems([OcclusionSet(occ, 7), OcclusionSet(other, 7)], 0.0, held_out=False)
    assert len(items) == 49 and items.name(48) == "e"
    np.testing.assert_array_equal(items[48][1], OcclusionSet(other, 7)[0][1])
    with pytest.raises(ValueError) as refused:
        _occlusion_evaluators(other, holdout=1e-9)
    assert str(refused.value) == (
        f"data.occlusion_sets[0]={other}: no held-out pair to validate the occlusion head on with "
        "data.occlusion_holdout=1e-09 (a set of 1 pair; add faces, or set data.occlusion_holdout=0 to validate on "
        "none, or name a validation set in eval.occlusion_sets)")
    # The remedies it names are accepted: no validation (the empty evaluator is left out), or a named
    # validation set (scored whole).
    assert len(_occlusion_evaluators(other, holdout=0.0)) == 0
    evaluator, = _occlusion_evaluators(other, eval_sets=(other,), holdout=1e-9)
    assert not evaluator.empty and len(evaluator.sets["two"][1]) == 1


def test_synthetic_occlusion_command_writes_the_sets_write_occlusion_set_writes(tmp_path):
    command = subprocess.run([sys.executable, "-m", "data_pipelines.synthetic_occlusion", f"--out={tmp_path / 'cli'}",
                              "--images=3", "--seed=2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert command.returncode == 0, command.stderr[-2000:]
    assert command.stdout.startswith("wrote 3 occluded faces with masks (") and str(tmp_path / "cli") in command.stdout
    synthetic_occlusion.write_occlusion_set(str(tmp_path / "lib"), 3, 2)
    written = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}
    assert len(written(tmp_path / "cli")) == 6 and written(tmp_path / "cli") == written(tmp_path / "lib")
    assert len(OcclusionSet(str(tmp_path / "cli"), 7).names) == 3
