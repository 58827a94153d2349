"""Tests for oaml_jax.evaluation.ijb_layout and ijb_templates on a tiny IJB-style folder written here, against
plain-loop computations."""

import os

import cv2
import numpy as np
import pytest

from oaml_jax import align
from oaml_jax.evaluation import ijb_layout, ijb_templates, verification
from oaml_jax.models.face_input import ARCFACE_TEMPLATE

# (image name, template, media): template 101 has two medias (one with two frames), 7 one media of two
# frames, 55 a single photo, 8 two single-photo medias.
_FACES = [("a.png", 101, 5), ("b.png", 101, 5), ("c.png", 101, 6), ("d.png", 7, 9), ("e.png", 7, 9),
          ("f.png", 55, 2), ("g.png", 8, 3), ("h.png", 8, 4)]
_PAIRS = [(101, 7, 1), (101, 55, 0), (7, 55, 0), (8, 101, 1), (55, 8, 0), (7, 8, 0)]


def write_tiny_ijb(root, name="ijbc", rng=None):
    """Writes meta/ and loose_crop/ for `_FACES` / `_PAIRS`; returns the RGB images and landmarks."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    images, landmarks, det_scores = [], [], []
    for i, (image_name, _, _) in enumerate(_FACES):
        image = rng.integers(0, 256, size=(90 + 7 * i, 80 + 5 * i, 3), dtype=np.uint8)
        angle, scale = 0.1 * (i - 3), 0.6 + 0.05 * i
        c, s = np.cos(angle), np.sin(angle)
        points = ARCFACE_TEMPLATE @ (scale * np.array([[c, s], [-s, c]])) + [5.0 + i, 4.0]
        cv2.imwrite(os.path.join(root, "loose_crop", image_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append(image)
        landmarks.append(points)
        det_scores.append(0.5 + 0.05 * i)
    with open(os.path.join(root, "meta", f"{name}_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in _FACES)
    with open(os.path.join(root, "meta", f"{name}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {label}\n" for a, b, label in _PAIRS)
    with open(os.path.join(root, "meta", f"{name}_name_5pts_score.txt"), "w") as f:
        for (n, _, _), points, score in zip(_FACES, landmarks, det_scores):
            f.write(" ".join([n, *(f"{v:.4f}" for v in points.reshape(-1)), f"{score:.4f}"]) + "\n")
    return images, np.array(landmarks), np.array(det_scores)


@pytest.fixture
def tiny_ijb(tmp_path):
    root = str(tmp_path / "IJBC")
    images, landmarks, det_scores = write_tiny_ijb(root)
    return root, images, landmarks, det_scores


def _brute_template_features(feats, weights=None):
    result = {}
    for t in sorted({t for _, t, _ in _FACES}):
        medias = {}
        for i, (_, ft, m) in enumerate(_FACES):
            if ft == t:
                medias.setdefault(m, []).append(feats[i] * (1.0 if weights is None else weights[i]))
        total = sum(np.mean(np.array(v), axis=0) for v in medias.values())
        result[t] = total / np.linalg.norm(total)
    return result


def test_read_ijb_meta(tiny_ijb):
    root, _, landmarks, det_scores = tiny_ijb
    meta = ijb_layout.read_ijb_meta(root, "IJBC")
    assert meta.name == "ijbc"
    assert list(meta.image_names) == [n for n, _, _ in _FACES]
    np.testing.assert_array_equal(meta.templates, [t for _, t, _ in _FACES])
    np.testing.assert_array_equal(meta.medias, [m for _, _, m in _FACES])
    np.testing.assert_allclose(meta.landmarks, landmarks, atol=1e-4)
    np.testing.assert_allclose(meta.detector_scores, det_scores, atol=1e-4)
    np.testing.assert_array_equal(meta.pairs, [(a, b) for a, b, _ in _PAIRS])
    np.testing.assert_array_equal(meta.labels, [bool(label) for _, _, label in _PAIRS])


def test_aligned_faces_match_direct_alignment(tiny_ijb):
    root, images, _, _ = tiny_ijb
    meta = ijb_layout.read_ijb_meta(root, "ijbc")
    faces = list(ijb_layout.iter_aligned_faces(root, meta))
    assert len(faces) == len(_FACES)
    for face, image, points in zip(faces, images, meta.landmarks):
        np.testing.assert_array_equal(face, align.align_face(image, points))
    batches = list(ijb_layout.iter_aligned_batches(root, meta, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(faces))


def test_template_features_scores_and_tars_equal_brute_force(tiny_ijb):
    root = tiny_ijb[0]
    meta = ijb_layout.read_ijb_meta(root, "ijbc")
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(len(_FACES), 6)).astype(np.float32)
    for weights in (None, meta.detector_scores):
        template_ids, template_feats = ijb_templates.template_features(feats, meta.templates, meta.medias, weights)
        expected = _brute_template_features(feats.astype(np.float64), weights)
        assert list(template_ids) == sorted(expected)
        for t, row in zip(template_ids, template_feats):
            np.testing.assert_allclose(row, expected[t], rtol=1e-5, atol=1e-6)

        scores = ijb_templates.verify_templates(template_ids, template_feats, meta.pairs, chunk=4)
        brute_scores = np.array([expected[a] @ expected[b] for a, b in meta.pairs])
        np.testing.assert_allclose(scores, brute_scores, rtol=1e-5, atol=1e-6)

        fars = (0.0, 0.25, 0.5, 1.0)
        table = ijb_templates.ijb_tar_table(scores, meta.labels, fars)
        genuine = [s for s, y in zip(brute_scores, meta.labels) if y]
        impostor = [s for s, y in zip(brute_scores, meta.labels) if not y]
        for far in fars:
            # Best TAR over all thresholds whose measured FAR (score > t) stays within `far`.
            best = 0.0
            for t in [-np.inf, *brute_scores]:
                if sum(s > t for s in impostor) / len(impostor) <= far:
                    best = max(best, sum(s > t for s in genuine) / len(genuine))
            assert table[far] == pytest.approx(best)


def test_template_pair_scores_from_pairwise_equal_brute_force(tiny_ijb):
    meta = ijb_layout.read_ijb_meta(tiny_ijb[0], "ijbc")
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(len(_FACES), 4))
    mix = rng.normal(size=(4, 4))  # asymmetric, so swapping the faces of a pair would show
    calls = []

    def score_fn(idx_a, idx_b):
        calls.append(idx_a.size)
        return np.einsum("ne,ef,nf->n", feats[idx_a], mix, feats[idx_b])

    scores = ijb_templates.template_pair_scores_from_pairwise(meta.templates, meta.pairs, score_fn, chunk=4)
    expected = []
    for a, b in meta.pairs:
        faces_a = [i for i, (_, t, _) in enumerate(_FACES) if t == a]
        faces_b = [i for i, (_, t, _) in enumerate(_FACES) if t == b]
        expected.append(np.mean([feats[i] @ mix @ feats[j] for i in faces_a for j in faces_b]))
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # 3x2 + 3x1 + 2x1 + 2x3 + 1x2 + 2x2 = 23 image pairs in chunks of at most 4.
    assert sum(calls) == 23 and max(calls) == 4


def test_missing_meta_file_is_named(tiny_ijb):
    root = tiny_ijb[0]
    path = os.path.join(root, "meta", "ijbc_template_pair_label.txt")
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=f"IJB meta file not found: {path}"):
        ijb_layout.read_ijb_meta(root, "ijbc")
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        ijb_layout.read_ijb_meta(root, "ijbb")


def test_missing_image_is_named(tiny_ijb):
    root = tiny_ijb[0]
    meta = ijb_layout.read_ijb_meta(root, "ijbc")
    path = os.path.join(root, "loose_crop", "d.png")
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=f"IJB image listed in the meta files is missing: {path}"):
        list(ijb_layout.iter_aligned_faces(root, meta))


def test_malformed_meta_errors(tiny_ijb):
    root = tiny_ijb[0]
    lmk_path = os.path.join(root, "meta", "ijbc_name_5pts_score.txt")
    with open(lmk_path) as f:
        lines = f.readlines()
    lines[0], lines[1] = lines[1], lines[0]
    with open(lmk_path, "w") as f:
        f.writelines(lines)
    with pytest.raises(ValueError, match="5pts_score.txt:1: image 'b.png' differs from 'a.png'"):
        ijb_layout.read_ijb_meta(root, "ijbc")
    pair_path = os.path.join(root, "meta", "ijbc_template_pair_label.txt")
    with open(pair_path, "a") as f:
        f.write("101 7\n")
    with pytest.raises(ValueError, match="pair_label.txt:7: expected 3 fields"):
        ijb_layout.read_ijb_meta(root, "ijbc")


def test_verify_templates_unknown_template():
    feats = np.eye(2, dtype=np.float32)
    with pytest.raises(KeyError, match="pair 1: template 9 has no feature"):
        ijb_templates.verify_templates(np.array([3, 4]), feats, np.array([[3, 4], [4, 9]]))
    np.testing.assert_allclose(ijb_templates.verify_templates(np.array([4, 3]), feats, np.array([[3, 3], [3, 4]])),
                               [1.0, 0.0])


def test_ijb_tar_table_defaults_are_the_ijb_fars():
    labels = np.array([True, False] * 50)
    scores = np.where(labels, 1.0, 0.0) + np.linspace(0, 0.5, 100)
    table = ijb_templates.ijb_tar_table(scores, labels)
    assert list(table) == list(ijb_templates.IJB_FARS)
    assert table == verification.tar_at_far(scores, labels, ijb_templates.IJB_FARS)
