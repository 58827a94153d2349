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


@pytest.mark.parametrize("header,folds", [("2 3\n", 2), ("12\n", 10), ("6\n", 10), ("", 10)])
def test_header_variants_and_row_formats(header, folds):
    parsed = pairs_file.parse_pairs_file(header + "\n".join(ROWS) + "\n\n", "pairs.txt")
    assert parsed.n_folds == folds and parsed.issame.tolist() == SAME
    assert parsed.rows[0][:4] == ("id0", 1, "id0", 2) and parsed.rows[3][:4] == ("id0", 1, "id1", 2)
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
    (tmp_path / "pairs.txt").write_text("\n".join(ROWS + ["id9 1 2"]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.txt: .*lfw/id9/id9_0001.<(?:[a-z]+\|)*webp>: no such image"):
        runner.run(config_for(tmp_path), str(tmp_path / "out"))


def test_converted_adaface_checkpoint_scores_a_pairs_file_with_adaface_only(tmp_path):
    write_lfw_root(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("\n".join(ROWS) + "\n")
    checkpoint = write_converted_checkpoint(str(tmp_path / "adaface"))
    result = runner.run(config_for(tmp_path), str(tmp_path / "out"), checkpoint=checkpoint)
    assert not result["has_qaconv"]
    for row in result["rows"].values():
        assert set(row) == {c for c in pairs.COLUMNS if c.startswith("AdaFace")}
