"""LFW-format pairs files (type "pairs_file"): header variants, both row formats, the file's folds, the protocol."""

import numpy as np
import pytest
import ml_collections

from data_pipelines import synthetic
from data_pipelines.images import encode_png
from oaml_jax.evaluation import pairs, pairs_file, runner

from tiny_checkpoint import tiny_config, write_converted_checkpoint

ROWS = ["id0 1 2", "id1 1 2", "id2 1 2", "id0 1 id1 2", "id2 2 id3 1", "id3 1 id4 2",
        "id3 1 2", "id4 1 2", "id0 2 1", "id1 1 id4 1", "id2 1 id0 2", "id4 2 id1 2"]
SAME = [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
# Ten folds of one same and one different pair each.
ROWS_10 = [row for k in range(10) for row in (f"id{k % 5} 1 2", f"id{k % 5} 1 id{(k + 1) % 5} 2")]


@pytest.mark.parametrize("header,folds", [("2 3\n", 2), ("20\n", 10), ("10\n", 10), ("", 10)])
def test_header_variants_and_row_formats(header, folds):
    rows, same = (ROWS, SAME) if folds == 2 else (ROWS_10, [True, False] * 10)
    parsed = pairs_file.parse_pairs_file(header + "\n".join(rows) + "\n\n", "pairs.txt")
    assert parsed.n_folds == folds and parsed.issame.tolist() == same
    first_different = 3 if folds == 2 else 1
    assert parsed.rows[0][:4] == ("id0", 1, "id0", 2) and parsed.rows[first_different][:4] == ("id0", 1, "id1", 2)
    assert parsed.rows[0][4] == (2 if header else 1)  # line numbers (the header is line 1)


def test_pairs_file_errors():
    with pytest.raises(ValueError, match=r"pairs.txt:1: header '3 3' means 3 folds of 2 x 3 pairs \(18 rows"):
        pairs_file.parse_pairs_file("3 3\n" + "\n".join(ROWS), "pairs.txt")
    with pytest.raises(ValueError, match=r"pairs.txt:1: header '5' announces 5 rows \(or 5 of each kind\); the file "
                                         r"has 12"):
        pairs_file.parse_pairs_file("5\n" + "\n".join(ROWS), "pairs.txt")
    with pytest.raises(ValueError, match=r"pairs.txt:3: expected 'name n1 n2' \(same\) or 'name1 n1 name2 n2' "
                                         r"\(different\), got 'id0 one 2'"):
        pairs_file.parse_pairs_file("2 3\nid0 1 2\nid0 one 2\n", "pairs.txt")
    with pytest.raises(ValueError, match="pairs.txt: 2 pairs cannot be split into 10 folds"):
        pairs_file.parse_pairs_file("id0 1 2\nid0 1 id1 1\n", "pairs.txt")


def test_too_few_folds_is_said_first_and_plainly():
    with pytest.raises(ValueError) as raised:
        pairs_file.parse_pairs_file("1 4\n" + "\n".join(ROWS[:2] + ROWS[3:5] + ROWS[:2] + ROWS[3:5]), "pairs.txt")
    assert str(raised.value) == "pairs.txt:1: header '1 4': 1 fold; the 10-fold protocol needs at least 2"
    with pytest.raises(ValueError) as raised:
        pairs_file.parse_pairs_file("\n".join(ROWS[:2] + ROWS[3:5] + ROWS[6:8] + ROWS[9:11]), "pairs.txt")
    assert str(raised.value) == ("pairs.txt: 8 pairs cannot be split into 10 folds; for fewer folds, start the file "
                                 "with LFW's header line '<folds> <pairs per fold>' (e.g. '2 2': 2 folds, each 2 same "
                                 "then 2 different pairs)")
    parsed = pairs_file.parse_pairs_file("2 2\n" + "\n".join(ROWS[:2] + ROWS[3:5] + ROWS[6:8] + ROWS[9:11]), "p")
    assert parsed.n_folds == 2 and parsed.issame.tolist() == [True, True, False, False] * 2


def test_folds_holding_one_kind_of_pair_are_refused():
    # Header '2 2' over four same then four different rows: fold 1 all same, fold 2 all different.
    by_kind = ["id0 1 2", "id1 1 2", "id2 1 2", "id3 1 2", "id0 1 id1 2", "id2 2 id3 1", "id3 1 id4 2", "id1 1 id4 1"]
    with pytest.raises(ValueError) as raised:
        pairs_file.parse_pairs_file("2 2\n" + "\n".join(by_kind), "pairs.txt")
    assert str(raised.value) == (
        "pairs.txt: fold 1 of 2 (lines 2-5) holds 4 same and 0 different pairs; the folds are the file's own, in "
        "file order, and each must hold both kinds (LFW's layout: each fold lists its same pairs, then its "
        "different pairs)")
    # A headerless file sorted by kind: ten folds of two, the first five all same.
    with pytest.raises(ValueError, match=r"^pairs.txt: fold 1 of 10 \(lines 1-2\) holds 2 same and 0 different"):
        pairs_file.parse_pairs_file("\n".join(sorted(ROWS_10, key=lambda row: len(row.split()))), "pairs.txt")
    # Twelve rows without a header make ten folds, eight of them a single pair (the third on line 5).
    with pytest.raises(ValueError, match=r"^pairs.txt: fold 3 of 10 \(line 5\) holds 1 same and 0 different"):
        pairs_file.parse_pairs_file("\n".join(ROWS[:1] + ROWS[3:4] + ROWS[1:2] + ROWS[4:5] + ROWS[2:3] + ROWS[5:]),
                                    "pairs.txt")


def test_one_kind_fold_left_by_pairs_without_a_face_is_refused(tmp_path):
    write_lfw_root(tmp_path / "lfw", blank=(4, 2))
    # Without the two pairs with id4_0002 (lines 8, 9), six pairs remain: lines 2-4 and lines 5-7 (all different).
    rows = ["id0 1 2", "id1 1 2", "id0 1 id1 2", "id2 2 id3 1", "id2 1 id3 2", "id0 2 id1 1", "id4 1 2", "id4 2 1"]
    (tmp_path / "pairs.txt").write_text("2 2\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"pairs.txt \(without the 2 pairs that have no face\): fold 2 of 2 \(lines "
                                         r"5-7\) holds 0 same and 3 different pairs"):
        runner.run(config_for(tmp_path), str(tmp_path / "out"))


def write_lfw_root(root, blank=None):
    for ident in range(5):
        (root / f"id{ident}").mkdir(parents=True)
        for k in (1, 2):
            face = synthetic.render_face(synthetic.identity_params(7, ident), k, 7)
            if (ident, k) == blank:
                face = np.full((90, 80, 3), 100, np.uint8)
            ext = "png" if ident % 2 else "PNG"
            (root / f"id{ident}" / f"id{ident}_{k:04d}.{ext}").write_bytes(encode_png(face))
    return root


def config_for(tmp_path, **settings):
    config = tiny_config()
    config.eval.tensorboard = False
    config.eval.occlusion_variants = ("clean", "cross")
    config.eval.evaluators = ml_collections.ConfigDict({"mini": dict(
        type="pairs_file", pairs=str(tmp_path / "pairs.txt"), images=str(tmp_path / "lfw"), aligned=True) | settings})
    return config


def test_pairs_file_protocol_equals_the_pair_set_protocol(tmp_path, workdir, face_model):
    root = write_lfw_root(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("2 3\n" + "\n".join(ROWS) + "\n")
    result = runner.run(config_for(tmp_path), str(tmp_path / "out"), checkpoint=workdir)
    assert list(result["rows"]) == ["mini clean", "mini cross"]
    parsed = pairs_file.parse_pairs_file((tmp_path / "pairs.txt").read_text(), "pairs.txt")
    read = lambda name, n: pairs_file.image_path(root, name, n, {})
    from PIL import Image
    images = np.stack([np.asarray(Image.open(read(a, i))) if k == 0 else np.asarray(Image.open(read(b, j)))
                       for a, i, b, j, _ in parsed.rows for k in (0, 1)])
    scores, occlusion = pairs.pair_scores(face_model, images)
    expected, _ = pairs.score_metrics(scores, parsed.issame, face_model.fusion_weights,
                                      pairs.pair_visibility(occlusion), n_folds=2)
    got = result["metrics"]["mini"]["clean"]
    for method in ("adaface", "qaconv", "fused", "gated"):
        for key in ("accuracy", "tar", "auc"):
            assert got[method][key] == pytest.approx(expected[method][key], abs=1e-6), (method, key)
    assert "mini: 12 pairs (6 genuine, 6 impostor), 2 folds" in result["table"]
    assert result["files"]["calibration"].exists()


def test_pair_without_a_face_is_dropped_and_counted(tmp_path, workdir):
    write_lfw_root(tmp_path / "lfw", blank=(4, 2))
    (tmp_path / "pairs.txt").write_text("2 3\n" + "\n".join(ROWS) + "\n")
    config = config_for(tmp_path)
    config.eval.occlusion_variants = ("clean",)
    result = runner.run(config, str(tmp_path / "out"), checkpoint=workdir)
    # id4_0002 (90x80, not an aligned crop) is in the rows on lines 7 (id3 1 id4 2), 9 (id4 1 2) and 13.
    assert "mini: 9 pairs (5 genuine, 4 impostor), 2 folds; 3 pairs dropped, no face in an image (lines " \
           "pairs.txt:7, pairs.txt:9, pairs.txt:13)" in result["table"]


def test_missing_image_names_the_file(tmp_path):
    write_lfw_root(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("2 3\n" + "\n".join(["id9 1 2"] + ROWS[1:]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.txt: .*lfw/id9/id9_0001.<(?:[a-z]+\|)*webp>: no such image"):
        runner.run(config_for(tmp_path), str(tmp_path / "out"))


def test_converted_adaface_checkpoint_scores_a_pairs_file_with_adaface_only(tmp_path):
    write_lfw_root(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("\n".join(ROWS_10) + "\n")
    checkpoint = write_converted_checkpoint(str(tmp_path / "adaface"))
    result = runner.run(config_for(tmp_path), str(tmp_path / "out"), checkpoint=checkpoint)
    assert not result["has_qaconv"]
    for row in result["rows"].values():
        assert set(row) == {c for c in pairs.COLUMNS if c.startswith("AdaFace")}
