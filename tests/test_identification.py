"""1:N identification: hand-computed rank-N, CMC and TPIR at FPIR; folders, lists, TinyFace and IJB 1:N layouts
written here and searched through a tiny checkpoint."""

import dataclasses
import json
import os

import cv2
import ml_collections
import numpy as np
import pytest
from test_eval_cli import _eval
from test_ijb import write_tiny_ijb
from test_inference import faces
from tiny_checkpoint import write_converted_checkpoint

from oaml_jax import checkpoint
from oaml_jax.configs import default
from oaml_jax.evaluation import (
    base,
    evaluators,
    fusion,
    identification,
    identification_benchmarks,
    identification_metrics,
    ijb,
    ijb_templates,
    runner,
)
from oaml_jax.evaluation.verdict import CalibratedFaceModel
from oaml_jax.serving import FaceModel

COMMON = base.Common(fusion_weights={"adaface": 0.5, "qaconv": 0.5}, variants=("clean",), gate_threshold=0.5,
                     training=False)

# Gallery: a, b, c and a distractor; probes a, b, c (mated) and two without a gallery identity.
GALLERY = ["a", "b", "c", None]
PROBES = ["a", "b", "c", "x", "y"]
SCORES = np.array([
    [0.9, 0.5, 0.1, 0.2],    # a: mate 0.9 above every non-mate: rank 1
    [0.7, 0.6, 0.3, 0.8],    # b: mate 0.6 below 0.8 and 0.7: rank 3
    [0.4, 0.2, 0.4, 0.1],    # c: mate 0.4 tied with a's 0.4 (ties count against): rank 2
    [0.3, 0.65, 0.2, 0.1],   # x: top 0.65
    [0.1, 0.2, 0.95, 0.3],   # y: top 0.95
])


def _whole_matrix_top(scores, probe_ids, gallery_ids, k):
    """`TopScores` of a whole `[P, G]` matrix in one update (what the evaluators gather chunk by chunk)."""
    acc = identification_metrics.TopScoreAccumulator(len(probe_ids), k)
    acc.update(scores, np.asarray(probe_ids)[:, None] == np.asarray(gallery_ids)[None, :])
    return acc.result()


def _top(k=4, chunks=None):
    probe_ids, gallery_ids = identification_metrics.identity_ids(PROBES, GALLERY)
    if chunks is None:
        return _whole_matrix_top(SCORES, probe_ids, gallery_ids, k)
    acc = identification_metrics.TopScoreAccumulator(len(PROBES), k)
    for lo, hi in chunks:
        acc.update(SCORES[:, lo:hi], probe_ids[:, None] == gallery_ids[None, lo:hi])
    return acc.result()


def test_identity_ids_never_match_distractors_or_unknown_probes():
    probe_ids, gallery_ids = identification_metrics.identity_ids(PROBES, GALLERY)
    np.testing.assert_array_equal(gallery_ids, [0, 1, 2, identification_metrics.DISTRACTOR])
    unknown = identification_metrics.NON_MATED
    np.testing.assert_array_equal(probe_ids, [0, 1, 2, unknown, unknown])


def test_ranks_and_cmc_by_hand():
    top = _top()
    np.testing.assert_array_equal(top.mated, [True, True, True, False, False])
    np.testing.assert_array_equal(identification_metrics.mated_ranks(top), [1, 3, 2])
    np.testing.assert_allclose(identification_metrics.cmc(top), [1 / 3, 2 / 3, 1.0, 1.0])
    np.testing.assert_allclose(top.nonmate[3], [0.65, 0.3, 0.2, 0.1])


def test_open_set_tpir_at_fpir_by_hand():
    out = identification_metrics.tpir_at_fpir(_top(), [0.5, 0.1])
    # Non-mated top scores 0.65 and 0.95. FPIR 0.5 allows one false alarm: T = 0.65, measured FPIR 1/2;
    # mated at rank 1 and above 0.65: a only (0.9) -> TPIR 1/3.
    assert out[0.5] == pytest.approx((1 / 3, 0.65, 0.5))
    # FPIR 0.1 of two non-mated probes allows none: T = 0.95, nobody above it.
    assert out[0.1] == pytest.approx((0.0, 0.95, 0.0))
    closed = identification_metrics.TopScores(*(x[:3] for x in (_top().mate, _top().nonmate, _top().mated)))
    with pytest.raises(ValueError, match="no non-mated probe: FPIR is undefined"):
        identification_metrics.tpir_at_fpir(closed, [0.1])


def test_chunks_keep_the_same_top_scores():
    whole = _top(k=2)
    chunked = _top(k=2, chunks=[(0, 1), (1, 3), (3, 4)])
    for field in ("mate", "nonmate", "mated"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))
    # K = 2 keeps ranks 1, 2 exactly and b's rank 3 as "beyond 2".
    np.testing.assert_array_equal(identification_metrics.mated_ranks(whole), [1, 3, 2])
    np.testing.assert_allclose(identification_metrics.cmc(whole), [1 / 3, 2 / 3])
    with pytest.raises(ValueError, match=r"CMC length 3: expected 1..2"):
        identification_metrics.cmc(whole, 3)


def _write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Gallery: 3 identities x 2 faces; probes: the first face of each (mated, an exact copy of a gallery face),
    2 faces of an identity not in the gallery, a 100x100 photo (not an aligned face) and a text file."""
    root = tmp_path_factory.mktemp("identification")
    images = faces(10, seed=5)
    for i in range(6):
        _write(root / "gallery" / f"id{i // 2}" / f"{i}.png", images[i])
    for i in (0, 2, 4):
        _write(root / "probe" / f"id{i // 2}" / f"p{i}.png", images[i])
    for i in (6, 8):
        _write(root / "probe" / "stranger" / f"p{i}.png", images[i])
    _write(root / "probe" / "id0" / "small.png", images[1][:100, :100])
    (root / "probe" / "id0" / "notes.txt").write_text("not an image")
    return root, images


def _brute(model, images, probe_rows, probe_labels, gallery_labels, k):
    matrices = model.match(images[probe_rows], images[:6])
    probe_ids, gallery_ids = identification_metrics.identity_ids(probe_labels, gallery_labels)
    return {name: _whole_matrix_top(m, probe_ids, gallery_ids, k) for name, m in matrices.items()
            if m is not None}


def test_folder_evaluator_equals_the_whole_score_matrix(sets, workdir, tmp_path):
    root, images = sets
    stats = fusion.FusionStats(mean={"adaface": 0.1, "qaconv": 0.2}, std={"adaface": 0.5, "qaconv": 2.0})
    model = CalibratedFaceModel.from_checkpoint(workdir, batch_size=4, fusion_stats=stats)
    evaluator = identification.IdentificationEvaluator(
        "mine", {"gallery": str(root / "gallery"), "probe": str(root / "probe"), "aligned": True, "gallery_chunk": 4,
                 "fpirs": (0.5,)}, COMMON)
    result = evaluator.evaluate(model)
    assert (result.gallery, result.mated, result.non_mated) == (6, 3, 2)
    assert [(os.path.basename(n), r) for n, r in result.failed] == [
        ("small.png", "100x100, not a 112x112 aligned face (--aligned)")]
    # Probe order: id0/p0, id1/p2, id2/p4, stranger/p6, stranger/p8 (the 100x100 photo left out).
    brute = _brute(model, images, [0, 2, 4, 6, 8], ["id0", "id1", "id2", "s", "s"],
                   [f"id{i // 2}" for i in range(6)], k=6)
    assert set(result.methods) == set(brute) == {"adaface", "qaconv", "fused"}
    for name, top in brute.items():
        expected = identification_metrics.method_result(top, (1, 5), (0.5,))
        np.testing.assert_allclose(result.methods[name].cmc, expected.cmc, err_msg=name)
        assert result.methods[name].tpir == pytest.approx(expected.tpir), name
    # Each mated probe is an exact copy of a gallery face: AdaFace (cosine 1) finds it first.
    assert result.methods["adaface"].ranks == {1: 1.0, 5: 1.0}
    scalars = evaluator.scalars(result)
    assert len(scalars) == 3 * 3  # rank-1, rank-5, TPIR per score
    assert scalars["adaface/rank1"] == 1.0 and "fused/tpir@fpir5e-01" in scalars
    assert evaluator.best_metric(scalars) == 1.0
    text = runner.merge_tables(evaluator.tables(result))
    files = evaluator.write(result, tmp_path)
    assert text.splitlines()[0].split() == ["identification", "(%)", "rank-1", "rank-5", "TPIR@FPIR5e-01"]
    assert "mine AdaFace" in text and "6 gallery faces, 3 mated and 2 non-mated probes" in text
    assert result.skipped == 1 and "1 folder entries that are not images skipped" in text  # notes.txt
    assert "1 photos without a usable face left out (" in text
    assert "FPIR 5e-01" not in text  # 2 non-mated probes measure FPIR 0.5
    assert files["cmc_mine"].exists()


def test_converted_checkpoint_gets_the_adaface_column_only(sets, tmp_path):
    root, _ = sets
    model = FaceModel.from_checkpoint(write_converted_checkpoint(str(tmp_path / "adaface")), batch_size=4)
    evaluator = identification.IdentificationEvaluator(
        "ar", {"gallery": str(root / "gallery"), "probe": str(root / "probe"), "aligned": True}, COMMON)
    result = evaluator.evaluate(model)
    assert set(result.methods) == {"adaface"}
    assert result.methods["adaface"].ranks == {1: 1.0, 5: 1.0}  # rank-10 is beyond the 6 gallery faces


def test_list_files_and_setting_errors(sets, tmp_path):
    root, _ = sets
    listing = tmp_path / "gallery.txt"
    listing.write_text(f"# identity path\nid0 {root}/gallery/id0/0.png\nid1 ../{tmp_path.name}/g.png\n\n")
    entries = identification.read_entries(str(listing), "g")
    assert entries.labels == ["id0", "id1"]
    assert [str(p) for p in entries.paths] == [f"{root}/gallery/id0/0.png", str(tmp_path / f"../{tmp_path.name}/g.png")]
    listing.write_text("id0 a.png\nlonely\n")
    with pytest.raises(ValueError, match=rf"{listing}:2: expected '<identity> <image path>', got 'lonely'"):
        identification.read_entries(str(listing), "g")
    with pytest.raises(FileNotFoundError, match=r"g=.*nowhere: no such folder or list file"):
        identification.read_entries(str(tmp_path / "nowhere"), "g")
    with pytest.raises(ValueError, match=r"eval.evaluators.ar: unknown settings \['galery'\]; expected some of"):
        identification.IdentificationEvaluator("ar", {"galery": "x", "probe": "y"}, COMMON)
    with pytest.raises(ValueError, match=r"eval.evaluators.ar: \['gallery'\] required"):
        identification.IdentificationEvaluator("ar", {"probe": str(root / "probe")}, COMMON)
    with pytest.raises(ValueError, match=r"eval.evaluators.ar.ranks=\(0,\): expected ranks >= 1"):
        identification.IdentificationEvaluator("ar", {"gallery": "x", "probe": "y", "ranks": (0,)}, COMMON)
    with pytest.raises(ValueError, match=r"eval.evaluators.ar.fpirs=\(1.0,\): expected rates in \(0, 1\)"):
        identification.IdentificationEvaluator("ar", {"gallery": "x", "probe": "y", "fpirs": (1.0,)}, COMMON)
    # IJB 1:N reads the same two settings the same way.
    with pytest.raises(ValueError, match=r"eval.evaluators.i.ranks=\(0,\): expected ranks >= 1"):
        identification_benchmarks.IJB1NEvaluator("i", {"ranks": (0,)}, COMMON)
    with pytest.raises(ValueError, match=r"eval.evaluators.i.fpirs=\(0.0,\): expected rates in \(0, 1\)"):
        identification_benchmarks.IJB1NEvaluator("i", {"fpirs": (0.0,)}, COMMON)


def test_built_from_the_config_by_type(sets, workdir):
    root, _ = sets
    config = default.get_config()
    with config.unlocked():
        config.eval.evaluators = ml_collections.ConfigDict(dict(ar=dict(
            type="identification", validation=True, gallery=str(root / "gallery"), probe=str(root / "probe"),
            aligned=True)))
    (built,) = evaluators.from_config(config, training=True)
    assert isinstance(built, identification.IdentificationEvaluator) and built.name == "ar" and built.validation
    assert len(built.gallery.paths) == 6 and built.common.fusion_weights == COMMON.fusion_weights
    # Train-time validation: its scalars under "val/", AdaFace rank-1 ranking the checkpoint.
    metrics = evaluators.validation_metrics([built], FaceModel.from_checkpoint(workdir, batch_size=4))
    assert metrics["val/adaface/rank1"] == 1.0 and metrics[checkpoint.BEST_METRIC] == 1.0
    assert evaluators.evaluator_class("t", "tinyface") is identification_benchmarks.TinyFaceEvaluator
    assert evaluators.evaluator_class("i", "ijb_1n") is identification_benchmarks.IJB1NEvaluator


def test_tinyface_layout(sets, workdir, tmp_path):
    _, images = sets
    folder = tmp_path / "aligned_pad_0.1_pad_high"
    for i in range(4):  # identities 7 and 12, two faces each
        _write(folder / "Gallery_Match" / f"{(7, 12)[i // 2]}_{i}.png", images[i])
    _write(folder / "Gallery_Distractor" / "x_1.png", images[6])
    _write(folder / "Probe" / "7_9.png", images[0])
    _write(folder / "Probe" / "12_3.png", images[3])
    gallery, probe = identification_benchmarks.read_tinyface(tmp_path)
    assert gallery.labels == ["12", "12", "7", "7", None]  # sorted file names
    assert probe.labels == ["12", "7"]
    model = FaceModel.from_checkpoint(workdir, batch_size=4)
    evaluator = identification_benchmarks.TinyFaceEvaluator("tinyface", {"root": str(tmp_path), "qaconv": False},
                                                            COMMON)
    result = evaluator.evaluate(model)
    assert result.methods["adaface"].ranks == {1: 1.0, 5: 1.0}  # rank-20 is beyond the 5 gallery faces
    assert (result.gallery, result.mated, result.non_mated) == (5, 2, 0)
    assert result.methods["adaface"].tpir == {}  # every TinyFace probe is mated: no open-set numbers
    _write(folder / "Probe" / "nobody.png", images[5])
    with pytest.raises(ValueError, match=r"Probe/nobody.png: TinyFace probe and gallery-match names start with"):
        identification_benchmarks.read_tinyface(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no Probe/, Gallery_Match/, Gallery_Distractor/ folders"):
        identification_benchmarks.tinyface_folder(tmp_path / "aligned_pad_0.1_pad_high" / "Probe")


def _write_1n(root, g1, g2, probe):
    for suffix, rows in (("gallery_G1", g1), ("gallery_G2", g2), ("probe_mixed", probe)):
        with open(os.path.join(root, "meta", f"ijbc_1N_{suffix}.csv"), "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{t},{s},img/{t}.jpg\n" for t, s in rows))


def test_ijb_1n_meta_and_search(tmp_path, workdir):
    root = str(tmp_path / "IJBC")
    write_tiny_ijb(root)  # templates 101, 7, 55, 8
    # G1 holds subject 1 (template 101), G2 subject 3 (template 55); probes 7 (subject 1), 8 (subject 3):
    # each probe is mated in one gallery and non-mated in the other.
    _write_1n(root, [(101, 1), (101, 1)], [(55, 3)], [(7, 1), (8, 3), (8, 3)])
    protocol = identification_benchmarks.read_ijb_1n(root, "ijbc")
    np.testing.assert_array_equal(protocol.probe[0], [7, 8])
    np.testing.assert_array_equal(protocol.galleries["G1"][0], [101])
    model = FaceModel.from_checkpoint(workdir, batch_size=4)
    # The root falls back on eval.ijb_root.
    common = dataclasses.replace(COMMON, eval_config={"ijb_root": str(tmp_path)})
    evaluator = identification_benchmarks.IJB1NEvaluator("ijb_1n", {"names": ("ijbc",), "fpirs": (0.5,)}, common)
    results = evaluator.evaluate(model)
    meta = protocol.meta
    feats, _, _ = ijb.ijb_face_features(model, meta, 4, keep_maps=False)
    ids, template_feats = ijb_templates.template_features(feats, meta.templates, meta.medias, meta.detector_scores)

    def cos(a, b):
        return float(template_feats[list(ids).index(a)] @ template_feats[list(ids).index(b)])

    # One gallery template and one non-mated probe each: TPIR = [mate scores above the non-mated one].
    g1, g2 = results["ijbc"].galleries["G1"], results["ijbc"].galleries["G2"]
    assert (g1.mated, g1.non_mated, g2.mated, g2.non_mated) == (1, 1, 1, 1)
    assert g1.methods["adaface"].ranks == {1: 1.0}
    assert g1.methods["adaface"].tpir[0.5] == float(cos(7, 101) > cos(8, 101))
    assert g2.methods["adaface"].tpir[0.5] == float(cos(8, 55) > cos(7, 55))
    assert results["ijbc"].mean["TPIR@FPIR5e-01"] == pytest.approx(
        (g1.methods["adaface"].tpir[0.5] + g2.methods["adaface"].tpir[0.5]) / 2)
    names = evaluator.scalars(results)
    assert set(names) == {f"ijbc/{g}/adaface/{m}" for g in ("G1", "G2", "mean") for m in ("rank1", "tpir@fpir5e-01")}
    text = runner.merge_tables(evaluator.tables(results))
    assert text.splitlines()[0].split() == ["IJB", "1:N", "(%)", "rank-1", "TPIR@FPIR5e-01"]
    assert "ijbc mean AdaFace" in text
    assert "ijbc G1: 1 gallery templates, 1 mated and 1 non-mated probe templates" in text
    (tmp_path / "out").mkdir()
    assert evaluator.write(results, tmp_path / "out")["cmc_ijbc_1n"].exists()
    assert evaluator.summary(results)["ijb_1n"]["ijbc"]["mean"] == results["ijbc"].mean
    # Train-time validation never runs it (too slow): nothing is read, nothing to score.
    assert identification_benchmarks.IJB1NEvaluator("ijb_1n", {}, dataclasses.replace(COMMON, training=True)).empty


def test_ijb_1n_meta_errors(tmp_path):
    root = str(tmp_path / "IJBC")
    write_tiny_ijb(root)
    meta = os.path.join(root, "meta")
    _write_1n(root, [(101, 1), (101, 2)], [(55, 3)], [(7, 1)])
    with pytest.raises(ValueError, match=r"ijbc_1N_gallery_G1.csv:3: template 101 has subject 2, but 1 on line 2"):
        identification_benchmarks.read_ijb_1n(root, "ijbc")
    _write_1n(root, [(101, 1)], [(56, 3)], [(7, 1)])
    with pytest.raises(ValueError, match=r"ijbc_1N_gallery_G2.csv: template 56 has no faces in .*face_tid_mid.txt"):
        identification_benchmarks.read_ijb_1n(root, "ijbc")
    with open(os.path.join(meta, "ijbc_1N_probe_mixed.csv"), "w") as f:
        f.write("TEMPLATE_ID,SUBJECT_ID\n7,one\n")
    with open(os.path.join(meta, "ijbc_1N_gallery_G2.csv"), "w") as f:
        f.write("TEMPLATE_ID,SUBJECT_ID\n55,3\n")
    with pytest.raises(ValueError, match=r"ijbc_1N_probe_mixed.csv:2: expected integer template and subject ids"):
        identification_benchmarks.read_ijb_1n(root, "ijbc")
    with open(os.path.join(meta, "ijbc_1N_probe_mixed.csv"), "w") as f:
        f.write("7,1\n")
    with pytest.raises(ValueError, match=r"ijbc_1N_probe_mixed.csv:1: expected a header line"):
        identification_benchmarks.read_ijb_1n(root, "ijbc")
    # Without the column names, the first two columns (insightface's reading).
    with open(os.path.join(meta, "ijbc_1N_probe_mixed.csv"), "w") as f:
        f.write("tid,sid\n7,1\n")
    np.testing.assert_array_equal(identification_benchmarks.read_1n_csv(
        os.path.join(meta, "ijbc_1N_probe_mixed.csv"))[1], [1])


def test_raw_photos_are_detected_and_aligned(tmp_path, workdir):
    """Real portraits (matplotlib's Grace Hopper, tests/data's astronaut) as raw photos, and a noise image without
    a face: the probes, copies of the gallery photos, find their own face first."""
    import shutil

    from matplotlib import cbook

    photos = {"hopper": cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
              "astronaut": os.path.join(os.path.dirname(__file__), "data", "astronaut_head.jpg")}
    for name, photo in photos.items():
        for side in ("gallery", "probe"):
            os.makedirs(tmp_path / side / name)
            shutil.copy(photo, tmp_path / side / name / f"{name}.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    _write(tmp_path / "probe" / "hopper" / "noise.png", noise)
    model = FaceModel.from_checkpoint(workdir, batch_size=4)
    evaluator = identification.IdentificationEvaluator(
        "photos", {"gallery": str(tmp_path / "gallery"), "probe": str(tmp_path / "probe"), "qaconv": False}, COMMON)
    result = evaluator.evaluate(model)
    assert (result.gallery, result.mated, result.non_mated) == (2, 2, 0)
    assert [(os.path.basename(n), r) for n, r in result.failed] == [("noise.png", "no face")]
    assert result.methods["adaface"].ranks == {1: 1.0}


def test_eval_gallery_probe_shorthand_prints_rank_rows(sets, workdir, tmp_path):
    """eval.py --gallery --probe --aligned end to end: the identification table on stdout, JSON and CMC written."""
    root, _ = sets
    out = tmp_path / "out"
    done = _eval(f"--workdir={out}", f"--checkpoint={workdir}", f"--gallery={root / 'gallery'}",
                 f"--probe={root / 'probe'}", "--aligned", "--config.eval.batch_size=16",
                 "--config.eval.tensorboard=False")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Ranks beyond the 6 gallery faces (10) are left out; 2 non-mated probes cannot measure FPIR 1e-2 or 1e-1.
    assert lines[0].split() == ["identification", "(%)", "rank-1", "rank-5", "TPIR@FPIR1e-02", "TPIR@FPIR1e-01"]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in lines[2:5]}
    assert list(rows) == ["gallery AdaFace", "gallery QAConv", "gallery fused"]
    assert rows["gallery AdaFace"][:2] == ["100.00", "100.00"]  # each mated probe is a copy of a gallery face
    assert "gallery: 6 gallery faces, 3 mated and 2 non-mated probes" in lines
    assert ("gallery: FPIR 1e-02, 1e-01: fewer than 1/FPIR non-mated probes, threshold = their highest score "
            "(no false alarm allowed)") in lines
    results = json.loads((out / "eval" / "gallery" / "results.json").read_text())
    assert results["identification"]["gallery"]["scores"]["adaface"]["ranks"] == {"1": 1.0, "5": 1.0}
    assert (out / "eval" / "gallery" / "cmc_gallery.png").exists()
    assert (out / "eval" / "gallery" / "results.txt").read_text() == done.stdout
