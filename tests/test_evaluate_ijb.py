"""evaluate.run's IJB-B/C 1:1 path on a tiny IJB folder, against plain loops over templates."""

import json
import os

import cv2
import numpy as np
import pytest

from data_pipelines.synthetic_faces import render_face
from data_pipelines.synthetic_identity import identity_params
from oaml_jax.evaluation import evaluators, fusion, ijb, ijb_layout, ijb_templates, pairs, runner
from oaml_jax.models.face_input import ARCFACE_TEMPLATE
from oaml_jax.serving import FaceModel, Features

from tiny_checkpoint import tiny_config, write_converted_checkpoint, write_training_checkpoint

# template -> (identity, [media of each face]): identity 0 has three templates, the others two; some
# templates hold one media of two frames, some two single-photo medias, some one photo.
_TEMPLATES = {10: (0, [1, 1]), 11: (0, [2, 3]), 12: (0, [4]), 20: (1, [5, 5, 6]), 21: (1, [7]),
              30: (2, [8, 9]), 31: (2, [10, 10]), 40: (3, [11]), 41: (3, [12, 13])}
# Every template pair: 6 genuine, 30 impostor (so FAR 1e-1 allows 3 false accepts).
_PAIRS = [(a, b, int(_TEMPLATES[a][0] == _TEMPLATES[b][0]))
          for i, a in enumerate(_TEMPLATES) for b in list(_TEMPLATES)[i + 1:]]
_SEED = 4
_BATCH = 16


def write_tiny_ijb(root: str, name: str = "ijbc") -> list[tuple[str, int, int]]:
    """Synthetic faces pasted at varying offsets into noise, with their landmarks, in the insightface layout.

    Returns:
        (image name, template, media) of each face, in meta order.
    """
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    faces, lines = [], []
    for template, (identity, medias) in _TEMPLATES.items():
        for media in medias:
            i = len(faces)
            face = render_face(identity_params(_SEED, identity), i, _SEED)
            dx, dy = 3 + i % 5, 2 + i % 3
            canvas = rng.integers(0, 256, size=(112 + 8, 112 + 8, 3), dtype=np.uint8)
            canvas[dy:dy + 112, dx:dx + 112] = face
            image_name = f"{i:03d}.png"
            cv2.imwrite(os.path.join(root, "loose_crop", image_name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
            points = ARCFACE_TEMPLATE + [dx, dy]
            lines.append(" ".join([image_name, *(f"{v:.4f}" for v in points.reshape(-1)), f"{0.5 + 0.03 * i:.4f}"]))
            faces.append((image_name, template, media))
    with open(os.path.join(root, "meta", f"{name}_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in faces)
    with open(os.path.join(root, "meta", f"{name}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {label}\n" for a, b, label in _PAIRS)
    with open(os.path.join(root, "meta", f"{name}_name_5pts_score.txt"), "w") as f:
        f.writelines(line + "\n" for line in lines)
    return faces


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJB_release")
    write_tiny_ijb(str(root / "IJBC"))  # no IJBB: the default eval.ijb_names skips it with a warning
    return str(root)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_training_checkpoint(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def brute(ijb_root, workdir):
    """Template-pair scores by plain loops from FaceModel features of the aligned faces."""
    model = FaceModel.from_checkpoint(workdir, batch_size=_BATCH)
    meta = ijb_layout.read_ijb_meta(os.path.join(ijb_root, "IJBC"), "ijbc")
    faces = np.stack(list(ijb_layout.iter_aligned_faces(meta.root, meta)))
    features = model.extract(faces, keep_maps=True)
    # AdaFace: (e n + e_flip n_flip) / 2 of each face, times its detector score, mean per media, sum per
    # template, normalized; cosine.
    feats = features.embeddings.astype(np.float64) * features.norms[:, None]
    template_feats = {}
    for t in _TEMPLATES:
        medias = {}
        for i in range(len(faces)):
            if meta.templates[i] == t:
                medias.setdefault(meta.medias[i], []).append(feats[i] * meta.detector_scores[i])
        total = sum(np.mean(v, axis=0) for v in medias.values())
        template_feats[t] = total / np.linalg.norm(total)
    adaface = np.array([template_feats[a] @ template_feats[b] for a, b, _ in _PAIRS])
    # QAConv: mean over the templates' image pairs, on maps rounded to float16 as evaluate stores them.
    maps16 = features.feature_maps.astype(np.float16).astype(np.float32)
    rounded = Features(features.embeddings, features.norms, features.occlusion, maps16)
    matrix = model.qaconv_matrix(rounded, rounded)
    qaconv = []
    for a, b, _ in _PAIRS:
        values = [matrix[i, j] for i in range(len(faces)) for j in range(len(faces))
                  if meta.templates[i] == a and meta.templates[j] == b]
        qaconv.append(np.mean(values))
    qaconv = np.array(qaconv)
    weights = fusion.check_weights(tiny_config().eval.fusion_weights)
    fused = (weights["adaface"] * (adaface - adaface.mean()) / adaface.std()
             + weights["qaconv"] * (qaconv - qaconv.mean()) / qaconv.std())
    return model, meta, {"adaface": adaface, "qaconv": qaconv, "fused": fused}


def brute_tars(scores, labels):
    """Best TAR over thresholds whose measured FAR (impostor score > t) stays within each IJB FAR."""
    genuine = [s for s, y in zip(scores, labels) if y]
    impostor = [s for s, y in zip(scores, labels) if not y]
    table = {}
    for far in ijb_templates.IJB_FARS:
        best = 0.0
        for t in [-np.inf, *scores]:
            if sum(s > t for s in impostor) / len(impostor) <= far:
                best = max(best, sum(s > t for s in genuine) / len(genuine))
        table[far] = best
    return table


def ijb_config(ijb_root, qaconv):
    config = tiny_config()
    config.eval.bin_names = ()
    config.eval.tensorboard = False
    config.eval.ijb_root = ijb_root
    config.eval.ijb_qaconv = qaconv
    config.eval.ijb_batch_size = 5  # rounded up to eval.batch_size (16): two extraction calls
    config.eval.ijb_qaconv_chunk = 64
    return config


def test_ijb_scores_equal_plain_loops(brute):
    model, meta, expected = brute
    weights = fusion.check_weights(tiny_config().eval.fusion_weights)
    scores = ijb.ijb_scores(model, meta, weights, batch_size=_BATCH, qaconv=True, qaconv_chunk=64)
    assert set(scores) == {"adaface", "qaconv", "fused"}
    for name, values in scores.items():
        np.testing.assert_allclose(values, expected[name], atol=1e-5, err_msg=name)
    adaface_only = ijb.ijb_scores(model, meta, weights, batch_size=_BATCH, qaconv=False)
    assert set(adaface_only) == {"adaface"}
    np.testing.assert_allclose(adaface_only["adaface"], expected["adaface"], atol=1e-5)


def test_converted_checkpoint_gets_adaface_scores_only(tmp_path, brute):
    _, meta, expected = brute
    model = FaceModel.from_checkpoint(write_converted_checkpoint(str(tmp_path / "adaface")), batch_size=_BATCH)
    scores = ijb.ijb_scores(model, meta, fusion.check_weights(tiny_config().eval.fusion_weights), batch_size=_BATCH,
                                 qaconv=True)
    assert set(scores) == {"adaface"}
    # Same backbone as the training checkpoint: same template scores.
    np.testing.assert_allclose(scores["adaface"], expected["adaface"], atol=1e-5)


@pytest.mark.parametrize("qaconv", [False, True])
def test_run_ijb_tars_equal_brute_force(tmp_path, ijb_root, workdir, brute, qaconv):
    _, meta, expected = brute
    out = str(tmp_path / "out")
    result = runner.run(ijb_config(ijb_root, qaconv), out, checkpoint=workdir)
    methods = ("adaface", "qaconv", "fused") if qaconv else ("adaface",)
    assert list(result["ijb"]) == ["ijbc"] and tuple(result["ijb"]["ijbc"]) == methods
    # The brute-force scores separate no genuine / impostor pair by less than the float32 noise.
    for method in methods:
        assert result["ijb"]["ijbc"][method] == brute_tars(expected[method], meta.labels), method
    labels = [label for label, key in pairs.METHODS if key in methods]
    assert [line.split()[:2] for line in result["table"].splitlines()[2:]] == [["ijbc", l] for l in labels]
    assert os.path.getsize(result["files"]["ijb_ijbc"]) > 0
    with open(os.path.join(out, "eval", "results.json")) as f:
        saved = json.load(f)["ijb"]["ijbc"]
    assert saved["adaface"] == {str(far): tar for far, tar in result["ijb"]["ijbc"]["adaface"].items()}


def test_ijb_config_errors(tmp_path, ijb_root):
    config = ijb_config(ijb_root, False)
    config.eval.ijb_names = ("ijbb",)
    with pytest.raises(FileNotFoundError, match=r"eval.ijb_root=.*no meta/<name>_face_tid_mid.txt for any of "
                                                r"eval.ijb_names=\('ijbb',\)"):
        runner.run(config, str(tmp_path))
    config.eval.ijb_names = ("IJBC", "ijbd")
    with pytest.raises(ValueError, match=r"eval.ijb_names: unknown \['ijbd'\]"):
        runner.run(config, str(tmp_path))
    config.eval.ijb_names = ("ijbc",)
    config.eval.ijb_qaconv_chunk = 0
    with pytest.raises(ValueError, match="eval.ijb_qaconv_chunk=0: expected >= 1"):
        runner.run(config, str(tmp_path))
    assert str(ijb_layout.ijb_folder(ijb_root, "ijbc")) == os.path.join(ijb_root, "IJBC")
    assert str(ijb_layout.ijb_folder(os.path.join(ijb_root, "IJBC"), "ijbc")) == os.path.join(ijb_root, "IJBC")
    assert ijb_layout.ijb_folder(ijb_root, "ijbb") is None
    assert "ijb" not in evaluators.from_config(tiny_config(), training=False)
