"""Folder verification (type "folder"): the all-pairs engine's exact metrics and memory bound, the folder walk,
raw photos, and the evaluator through eval.py's runner and train-time validation."""

import io
import os
import tracemalloc

import ml_collections
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from data_pipelines import synthetic
from data_pipelines.images import encode_png
from oaml_jax import checkpoint as checkpoint_lib
from oaml_jax.evaluation import allpairs, evaluators, folder, plots, runner, verification

import train_worker
from tiny_checkpoint import tiny_config, write_converted_checkpoint

train_worker.enable_compilation_cache()  # before the first compile: the train step of tests/test_train.py

_DATA = os.path.join(os.path.dirname(__file__), "data")


def one_d_scorers(x):
    """pair_fn / tile_fn of the score -|x_i - x_j|."""
    pair_fn = lambda a, b: {"adaface": -np.abs(x[a] - x[b])}
    tile_fn = lambda rows, cols: {"adaface": -np.abs(x[rows][:, None] - x[cols][None, :])}
    return pair_fn, tile_fn


def test_all_pairs_hand_example():
    # Genuine pairs (0,1) -7, (2,3) -1, (2,4) -3, (3,4) -2; impostors (1,2) -3, (1,3) -4, (1,4) -6, (0,2) -10,
    # (0,3) -11, (0,4) -13.
    x = np.array([0.0, 7.0, 10.0, 11.0, 13.0])
    labels = np.array([7, 7, 3, 3, 3])
    assert allpairs.pair_counts(labels) == (4, 6)
    result = allpairs.verify_all_pairs(labels, *one_d_scorers(x), weights={}, gate=0.5, fars=(0.5, 0.34, 0.17, 0.1),
                                       tile=2)["adaface"]
    # FAR 0.5 allows floor(3.0) = 3 false accepts: threshold = the 4th highest impostor (-10), TAR 4/4; 0.34: 2,
    # the 3rd (-6), 3/4 above it; 0.17: 1, the 2nd (-4), 3/4; 0.1 x 6 < 1: not measurable on 6 impostors.
    assert result.tar == {0.5: 1.0, 0.34: 0.75, 0.17: 0.75, 0.1: None}
    # AUC: the impostor at -3 is below two genuine scores and ties one (half); -4 and -6 below three; the rest four.
    assert result.auc == pytest.approx(20.5 / 24)
    np.testing.assert_array_equal(result.genuine, [-7, -3, -2, -1])
    np.testing.assert_array_equal(np.sort(result.impostor_sample), [-13, -11, -10, -6, -4, -3])


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_every_pair_once_no_self_pairs(tile):
    n = 23
    labels = np.arange(n) % 4
    # Score = the pair's own id (a self-pair would get a half-integer): the streamed scores list which pairs
    # were scored, and how often.
    ident = lambda i, j: (np.minimum(i, j) * 1000 + np.maximum(i, j) + 0.5 * (i == j)).astype(np.float64)
    pair_fn = lambda a, b: {"adaface": ident(a, b)}
    tile_fn = lambda rows, cols: {"adaface": ident(rows[:, None], cols[None, :])}
    result = allpairs.verify_all_pairs(labels, pair_fn, tile_fn, weights={}, gate=0.5, tile=tile)["adaface"]
    i, j = np.triu_indices(n, k=1)
    same = labels[i] == labels[j]
    np.testing.assert_array_equal(result.genuine, np.sort(ident(i, j)[same]))
    np.testing.assert_array_equal(np.sort(result.impostor_sample), np.sort(ident(i, j)[~same]))


def test_all_pairs_equals_the_held_scores_protocol():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 40, n)
    emb = rng.integers(-3, 4, size=(n, 4)).astype(np.float64)  # integer scores: ties are exact
    pair_fn = lambda a, b: {"adaface": np.sum(emb[a] * emb[b], axis=1)}
    tile_fn = lambda rows, cols: {"adaface": emb[rows] @ emb[cols].T}
    result = allpairs.verify_all_pairs(labels, pair_fn, tile_fn, weights={}, gate=0.5, fars=(1e-2, 1e-3), tile=64)
    i, j = np.triu_indices(n, k=1)
    scores, same = np.sum(emb[i] * emb[j], axis=1), labels[i] == labels[j]
    assert result["adaface"].tar == verification.tar_at_far(scores, same, (1e-2, 1e-3))
    assert result["adaface"].auc == verification.roc_auc(scores, same)
    fpr, tpr, _ = verification.roc_curve(scores, same)
    assert set(zip(result["adaface"].fpr[1:-1], result["adaface"].tpr[1:-1])) <= set(zip(fpr, tpr))


def test_host_memory_is_bounded_at_2000_faces():
    n = 2000
    labels = np.repeat(np.arange(400), 5)
    emb = np.random.default_rng(1).normal(size=(n, 8))
    pair_fn = lambda a, b: {"adaface": np.sum(emb[a] * emb[b], axis=1)}
    tile_fn = lambda rows, cols: {"adaface": emb[rows] @ emb[cols].T}
    tracemalloc.start()
    result = allpairs.verify_all_pairs(labels, pair_fn, tile_fn, weights={}, gate=0.5, tile=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    num_pairs = n * (n - 1) // 2
    assert result["adaface"].genuine.size == 400 * 10
    # All pair scores as float64 would take 16 MB; the run peaks well below half of that.
    assert peak < 8 * num_pairs / 2, peak


def write_aligned_folder(root, identities=4, images=3, seed=0):
    for ident in range(identities):
        os.makedirs(os.path.join(root, f"id{ident}"))
        for k in range(images):
            face = synthetic.render_face(synthetic.identity_params(seed, ident), k, seed)
            with open(os.path.join(root, f"id{ident}", f"{k}.png"), "wb") as f:
                f.write(encode_png(face))
    return root


def folder_config(path, **settings):
    config = tiny_config()
    config.eval.tensorboard = False
    config.eval.evaluators = ml_collections.ConfigDict({"faces": dict(type="folder", path=path, aligned=True)
                                                        | settings})
    return config


def test_folder_run_equals_brute_force_over_all_pairs(tmp_path, workdir, face_model, monkeypatch):
    root = write_aligned_folder(str(tmp_path / "faces"))
    roc_figure, drawn = plots.roc_figure, []
    monkeypatch.setattr(plots, "roc_figure", lambda curves, title, num_impostors=None: drawn.append(num_impostors)
                        or roc_figure(curves, title, num_impostors))
    result = runner.run(folder_config(root, fars=(0.1, 0.02)), str(tmp_path / "out"), checkpoint=workdir)
    faces = np.stack([np.asarray(Image.open(os.path.join(root, f"id{i}", f"{k}.png"))) for i in range(4)
                      for k in range(3)])
    labels = np.repeat(np.arange(4), 3)
    scores = face_model.match(faces, faces)
    i, j = np.triu_indices(12, k=1)
    same = labels[i] == labels[j]
    by_score = result["results"]["faces"].scores["clean"]
    for name in ("adaface", "qaconv"):
        expected = verification.tar_at_far(scores[name][i, j], same, (0.1, 0.02))
        assert by_score[name].tar == pytest.approx(expected), name
        assert by_score[name].auc == pytest.approx(verification.roc_auc(scores[name][i, j], same), abs=1e-3)
    saved = result["folders"]["faces"]
    assert (saved["faces"], saved["genuine_pairs"], saved["impostor_pairs"]) == (12, 12, 54)
    lines = result["table"].splitlines()
    assert [line.split()[:3] for line in lines[2:6]] == [["faces", "clean", m] for m in ("AdaFace", "QAConv", "fused",
                                                                                           "gated")]
    assert lines[6] == ("faces: 12 faces of 4 identities from 12 photos (0 without a face; 0 unreadable; 0 other "
                        "entries skipped); 12 genuine and 54 impostor pairs")
    assert os.path.getsize(result["files"]["faces_clean_roc"]) > 0 and os.path.getsize(
        result["files"]["faces_clean_hist"]) > 0
    assert drawn == [54]  # the ROC's FAR axis starts at 1 / the impostor pairs


def test_folder_variants_and_identity_pattern(tmp_path, workdir):
    root = tmp_path / "flat"
    root.mkdir()
    for ident in range(3):
        for k in range(2):
            face = synthetic.render_face(synthetic.identity_params(3, ident), k, 3)
            (root / f"person{ident}_{k:04d}.png").write_bytes(encode_png(face))
    (root / "README.txt").write_text("not a face")
    (root / "unnamed.png").write_bytes(encode_png(face))
    listing = folder.list_folder(root, r"(.+)_\d+\.png")
    assert listing.names == ["person0", "person0", "person1", "person1", "person2", "person2"]
    assert listing.skipped == ["README.txt", "unnamed.png"]
    config = folder_config(str(root), identity_pattern=r"(?P<id>.+)_\d+\.png", variants=("clean", "both_mask", "cross"))
    first = runner.run(config, str(tmp_path / "a"), checkpoint=workdir)
    assert list(first["results"]["faces"].scores) == ["clean", "both_mask", "cross"]
    assert first["folders"]["faces"]["genuine_pairs"] == 3 and first["folders"]["faces"]["impostor_pairs"] == 12
    clean, masked = (first["results"]["faces"].scores[v]["adaface"].genuine for v in ("clean", "both_mask"))
    assert not np.allclose(clean, masked)
    faces = np.zeros((2, 112, 112, 3), np.uint8) + 128
    assert folder.variant_sides("cross") == ("mask", "sunglasses")
    np.testing.assert_array_equal(folder.side_images(faces, "mask", 5, 7), folder.side_images(faces, "mask", 5, 7))
    assert np.any(folder.side_images(faces, "mask", 5, 7) != folder.side_images(faces, "mask", 0, 7))


def _jpeg(image, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_folder_of_mixed_photos_with_junk(tmp_path, workdir):
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    astronaut = np.asarray(Image.open(os.path.join(_DATA, "astronaut_head.jpg")).convert("RGB"))
    root = tmp_path / "photos"
    for name in ("hopper", "astronaut", "synthetic"):
        (root / name).mkdir(parents=True)
    (root / "hopper" / "a.jpg").write_bytes(_jpeg(hopper))
    gray = np.asarray(Image.fromarray(hopper).convert("L").resize((360, 420)))
    Image.fromarray(gray).save(root / "hopper" / "b_gray.png")  # a true one-channel PNG
    (root / "hopper" / "c.JPG").write_bytes(_jpeg(np.asarray(Image.fromarray(hopper).resize((256, 300)))))
    (root / "hopper" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "hopper" / ".DS_Store").write_bytes(b"\0\0")
    (root / "astronaut" / "a.png").write_bytes(encode_png(astronaut))
    (root / "astronaut" / "b_gray.jpg").write_bytes(_jpeg(np.asarray(Image.fromarray(astronaut).convert("L"))))
    (root / "astronaut" / "blank.png").write_bytes(encode_png(np.full((200, 160, 3), 90, np.uint8)))
    for k in range(2):
        face = synthetic.render_face(synthetic.identity_params(5, 0), k, 5)
        (root / "synthetic" / f"{k}.png").write_bytes(encode_png(face))
    (root / "notes.txt").write_text("junk")
    config = folder_config(str(root), aligned=False, fars=(0.1,))
    result = runner.run(config, str(tmp_path / "out"), checkpoint=workdir)
    saved = result["folders"]["faces"]
    assert saved["photos"] == 9 and saved["faces"] == 7 and saved["identities"] == 3
    assert saved["unreadable"] == ["hopper/broken.jpg"] and saved["without_face"] == ["astronaut/blank.png"]
    assert sorted(saved["skipped"]) == ["hopper/.DS_Store", "notes.txt"]
    # hopper 3 faces, astronaut 2, synthetic 2: 3 + 1 + 1 genuine pairs of the 21.
    assert (saved["genuine_pairs"], saved["impostor_pairs"]) == (5, 16)
    assert ("7 faces of 3 identities from 9 photos (1 without a face: astronaut/blank.png; 1 unreadable: "
            "hopper/broken.jpg; 2 other entries skipped: hopper/.DS_Store, notes.txt)") in result["table"]


def test_train_time_validation_runs_a_folder_evaluator(tmp_path):
    from absl import flags
    from oaml_jax import train
    flags.FLAGS.mark_as_parsed()
    root = write_aligned_folder(str(tmp_path / "faces"))
    config = train_worker.tiny_config(train_worker.make_tiny_data(str(tmp_path / "data")), max_steps=2, eval_every=0)
    config.eval.evaluators = ml_collections.ConfigDict({
        "bins": dict(type="bin_pairs"),  # eval.py only
        "faces": dict(type="folder", path=root, aligned=True, validation=True, variants=("clean", "both_mask"))})
    built = evaluators.from_config(config, training=True)
    assert [e.name for e in built] == ["faces"] and built[0].variants == ("clean",)
    validation = train.train_and_evaluate(config, str(tmp_path / "run"))["validation"]
    assert set(validation) == {checkpoint_lib.BEST_METRIC} | {f"val/faces/clean/{s}_auc"
                                                              for s in ("adaface", "qaconv", "fused", "gated")}
    assert validation[checkpoint_lib.BEST_METRIC] == validation["val/faces/clean/adaface_auc"]


def test_converted_adaface_checkpoint_scores_a_folder_with_adaface_only(tmp_path):
    root = write_aligned_folder(str(tmp_path / "faces"), identities=3, images=2)
    checkpoint = write_converted_checkpoint(str(tmp_path / "adaface"))
    result = runner.run(folder_config(root), str(tmp_path / "out"), checkpoint=checkpoint)
    assert not result["has_qaconv"] and list(result["results"]["faces"].scores["clean"]) == ["adaface"]
    assert [line.split()[:3] for line in result["table"].splitlines()[2:3]] == [["faces", "clean", "AdaFace"]]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.evaluators.faces.path=.*missing: not a folder"):
        runner.run(folder_config(str(tmp_path / "missing")), str(tmp_path / "out"))
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="0 identities with photos; verification needs at least 2"):
        folder.list_folder(tmp_path / "one")
    with pytest.raises(ValueError, match="identity_pattern='x': expected a group"):
        folder.list_folder(tmp_path / "one", "x")
    labels = np.arange(4)
    with pytest.raises(ValueError, match="4 faces of 4 identities give 0 genuine and 6 impostor pairs"):
        allpairs.verify_all_pairs(labels, *one_d_scorers(np.zeros(4)), weights={}, gate=0.5)
