"""Tests for oaml_jax.verification: 10-fold protocol, fusion, TAR@FAR, ROC/AUC, embeddings helpers."""

import numpy as np
import pytest

from oaml_jax.evaluation import fusion, verification
from oaml_jax.evaluation.fusion import FusionStats


def _hand_example():
    # 20 pairs, 10 folds of 2: fold k = (genuine pair 2k, impostor pair 2k+1).
    genuine = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]
    impostor = [0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10, 0.05, 0.72]
    scores = np.array([s for pair in zip(genuine, impostor) for s in pair])
    issame = np.tile([True, False], 10)
    return scores, issame


def test_ten_fold_accuracy_hand_example():
    scores, issame = _hand_example()
    result = verification.ten_fold_accuracy(scores, issame)
    # Folds 0..8 held out: training has every genuine >= 0.50 (or 0.55 when fold 0 is out) and the regular
    # impostors <= 0.45 (0.40 when fold 0 is out) plus the outlier impostor 0.72. Any threshold between the
    # top regular impostor and the lowest genuine gets 17/18 (only 0.72 wrong); every other candidate is
    # worse (e.g. above 0.72 rejects at least 4 genuines). The only candidate there is the midpoint 0.475.
    # Test fold: its genuine (>= 0.50) is accepted and its impostor (<= 0.45) rejected -> accuracy 1.
    # Fold 9 held out: training is separable with the same gap 0.45 | 0.50 -> threshold 0.475, 18/18.
    # Test fold: genuine 0.95 accepted, impostor 0.72 > 0.475 accepted (wrong) -> accuracy 1/2.
    np.testing.assert_allclose(result["thresholds"], np.full(10, 0.475))
    np.testing.assert_allclose(result["fold_accuracies"], [1.0] * 9 + [0.5])
    # mean = 9.5 / 10; population variance = (9 * 0.05^2 + 0.45^2) / 10 = 0.0225 -> std 0.15.
    assert result["accuracy"] == pytest.approx(0.95)
    assert result["std"] == pytest.approx(0.15)


def test_best_threshold_ties_go_to_the_highest_threshold():
    scores = np.array([0.1, 0.9, 0.5, 0.6])
    issame = np.array([False, True, True, False])
    # Candidates -inf, 0.3, 0.55, 0.75, inf have accuracies 2/4, 3/4, 2/4, 3/4, 2/4: tie 0.3 vs 0.75.
    threshold, accuracy = verification.best_threshold(scores, issame)
    assert threshold == pytest.approx(0.75)
    assert accuracy == pytest.approx(0.75)


def test_fold_indices_match_kfold_sizes():
    folds = verification.fold_indices(23, 10)
    assert [f.size for f in folds] == [3, 3, 3] + [2] * 7
    np.testing.assert_array_equal(np.concatenate(folds), np.arange(23))


def _brute_force_ten_fold(scores, issame, n_folds=10):
    folds = np.array_split(np.arange(scores.size), n_folds)
    accs = []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        candidates = sorted(set(scores[train].tolist()))
        mids = [-np.inf] + [(a + b) / 2 for a, b in zip(candidates[:-1], candidates[1:])] + [np.inf]
        best_t, best_acc = None, -1.0
        for t in mids:
            acc = np.mean((scores[train] > t) == issame[train])
            if acc >= best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean((scores[test] > best_t) == issame[test]))
    return np.mean(accs)


def test_ten_fold_accuracy_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    issame = rng.random(203) < 0.5
    scores = np.round(rng.normal(size=203) + 1.2 * issame, 2)  # rounding makes ties
    result = verification.ten_fold_accuracy(scores, issame)
    assert result["accuracy"] == pytest.approx(_brute_force_ten_fold(scores, issame))


def test_insightface_grid_equals_distance_protocol():
    rng = np.random.default_rng(1)
    issame = rng.random(300) < 0.5
    cos = np.tanh(rng.normal(size=300) * 0.3 + 0.5 * issame)
    result = verification.ten_fold_accuracy(cos, issame,
                                            thresholds=verification.INSIGHTFACE_COSINE_THRESHOLDS)
    # insightface: distance 2 - 2cos, grid arange(0, 4, 0.01), same when dist < t, first argmax.
    dist = 2.0 - 2.0 * cos
    grid = np.arange(0.0, 4.0, 0.01)
    accs = []
    for test in np.array_split(np.arange(300), 10):
        train = np.setdiff1d(np.arange(300), test)
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in grid]
        t = grid[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < t) == issame[test]))
    assert result["accuracy"] == pytest.approx(np.mean(accs))


def test_ten_fold_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"issame: expected shape \(4,\)"):
        verification.ten_fold_accuracy(np.zeros(4), np.zeros(3, bool), n_folds=2)
    with pytest.raises(ValueError, match="score 1 is not finite"):
        verification.ten_fold_accuracy(np.array([0.0, np.nan]), np.array([True, False]), n_folds=2)
    with pytest.raises(ValueError, match="cannot split 3 pairs into 10 folds"):
        verification.ten_fold_accuracy(np.zeros(3), np.zeros(3, bool))


def test_fuse_known_answer():
    stats = FusionStats(mean={"a": 1.0, "b": 10.0}, std={"a": 2.0, "b": 5.0})
    fused = fusion.fuse({"a": np.array([3.0, 1.0]), "b": np.array([0.0, 20.0])}, {"a": 0.5, "b": 2.0},
                              stats)
    # 0.5 * (3 - 1) / 2 + 2 * (0 - 10) / 5 = -3.5;  0.5 * 0 + 2 * (20 - 10) / 5 = 4.
    np.testing.assert_allclose(fused, [-3.5, 4.0])


def test_fusion_stats_fit_and_errors():
    stats = FusionStats.fit({"a": np.array([1.0, 3.0])})
    assert stats.mean == {"a": 2.0} and stats.std == {"a": 1.0}
    with pytest.raises(ValueError, match="scores 'c': constant scores"):
        FusionStats.fit({"c": np.ones(3)})
    with pytest.raises(KeyError, match="weights name 'z' has no scores"):
        fusion.fuse({"a": np.ones(2)}, {"z": 1.0}, stats)


def test_fused_statistics_never_see_the_test_fold(monkeypatch):
    rng = np.random.default_rng(2)
    n, n_folds = 40, 10
    issame = np.tile([True, False], n // 2)
    ada = rng.normal(size=n) + issame
    qa = 5.0 * rng.normal(size=n) + 3.0 * issame
    folds = np.array_split(np.arange(n), n_folds)
    seen = []
    original_fit = FusionStats.fit.__func__

    def spy_fit(cls, score_dict):
        seen.append({k: np.array(v) for k, v in score_dict.items()})
        return original_fit(cls, score_dict)

    monkeypatch.setattr(FusionStats, "fit", classmethod(spy_fit))
    for k, test in enumerate(folds):
        # The held-out fold's scores are extreme outliers: any leak would swamp the statistics.
        ada_k, qa_k = ada.copy(), qa.copy()
        ada_k[test] = 1e6
        qa_k[test] = -1e6
        seen.clear()
        result = fusion.ten_fold_fused_accuracy({"ada": ada_k, "qa": qa_k}, issame,
                                                      {"ada": 1.0, "qa": 1.0}, n_folds=n_folds)
        assert len(seen) == n_folds
        train = np.setdiff1d(np.arange(n), test)
        np.testing.assert_array_equal(seen[k]["ada"], ada[train])
        np.testing.assert_array_equal(seen[k]["qa"], qa[train])
        stats = result["stats"][k]
        assert stats.mean["ada"] == np.mean(ada[train]) and stats.std["ada"] == np.std(ada[train])
        assert stats.mean["qa"] == np.mean(qa[train]) and stats.std["qa"] == np.std(qa[train])


def test_ten_fold_fused_accuracy_matches_manual_per_fold_fusion():
    rng = np.random.default_rng(3)
    issame = rng.random(60) < 0.5
    scores = {"ada": rng.normal(size=60) + issame, "qa": 3 * rng.normal(size=60) + 2 * issame}
    weights = {"ada": 0.7, "qa": 0.3}
    result = fusion.ten_fold_fused_accuracy(scores, issame, weights)
    accs = []
    for test in np.array_split(np.arange(60), 10):
        train = np.setdiff1d(np.arange(60), test)
        fused = sum(w * (scores[k] - scores[k][train].mean()) / scores[k][train].std()
                    for k, w in weights.items())
        t, _ = verification.best_threshold(fused[train], issame[train])
        accs.append(np.mean((fused[test] > t) == issame[test]))
    assert result["accuracy"] == pytest.approx(np.mean(accs))


def test_tar_at_far_hand_example():
    impostor = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    genuine = np.array([0.35, 0.55, 0.95, 1.5])
    scores = np.concatenate([genuine, impostor])
    issame = np.array([True] * 4 + [False] * 10)
    result = verification.tar_at_far(scores, issame, [0.0, 0.1, 0.29, 0.5, 1.0])
    # far 0: k = 0 false accepts -> threshold = max impostor 1.0 -> only 1.5 above: 1/4.
    # far 0.1: k = 1 -> 2nd largest impostor 0.9 -> 0.95, 1.5: 2/4.
    # far 0.29: k = floor(2.9) = 2 -> 3rd largest 0.8 -> 2/4.
    # far 0.5: k = 5 -> 6th largest 0.5 -> 0.55, 0.95, 1.5: 3/4.   far 1: -inf -> 4/4.
    assert result == {0.0: 0.25, 0.1: 0.5, 0.29: 0.5, 0.5: 0.75, 1.0: 1.0}


def test_tar_at_far_ties_never_exceed_the_far():
    scores = np.array([0.5, 0.5, 0.5, 0.1, 0.5, 0.6])
    issame = np.array([False, False, False, False, True, True])
    # far 0.25 of 4 impostors allows k = 1; the 2nd largest impostor is 0.5, no impostor is > 0.5
    # (measured FAR 0), genuine 0.6 accepted, 0.5 not.
    assert verification.tar_at_far(scores, issame, [0.25]) == {0.25: 0.5}


def test_roc_curve_and_auc_hand_example():
    scores = np.array([0.9, 0.6, 0.5, 0.4, 0.3])
    issame = np.array([True, True, False, True, False])
    fpr, tpr, thresholds = verification.roc_curve(scores, issame)
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.6, 0.5, 0.4, 0.3])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 1])
    # Genuine-over-impostor pairs: 0.9 > both, 0.6 > both, 0.4 > 0.3 only -> 5 of 6.
    assert verification.roc_auc(scores, issame) == pytest.approx(5 / 6)


def test_roc_auc_counts_ties_as_half():
    scores = np.array([0.5, 0.5, 0.2])
    issame = np.array([True, False, False])
    assert verification.roc_auc(scores, issame) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ROC needs both classes"):
        verification.roc_curve(scores, np.ones(3, bool))


def test_cosine_pair_scores():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [6.0, 8.0]])
    np.testing.assert_allclose(verification.cosine_pair_scores(emb), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"expected \[2N, E\]"):
        verification.cosine_pair_scores(np.ones((3, 2)))


def test_format_table():
    table = verification.format_table(
        {"lfw": {"AdaFace": 99.5, "QAConv": 99.25, "fused": 99.6},
         "lfw_occluded": {"AdaFace": 90.125, "fused": 93.0}},
        ["AdaFace", "QAConv", "fused"], corner="set")
    assert table.splitlines() == [
        "set           AdaFace  QAConv  fused",
        "------------  -------  ------  -----",
        "lfw             99.50   99.25  99.60",
        "lfw_occluded    90.12       -  93.00",
    ]
