"""oaml_jax.evaluation.calibration: thresholds that give the stated FAR, the fused score, the file."""

import json

import numpy as np
import pytest

from oaml_jax.evaluation import calibration, fusion, verification

NUM_IMPOSTORS = 2000


def _scores(seed=0):
    """2,000 impostor pairs with the distinct scores 0, 1, ..., 1999 (shuffled) and 500 genuine pairs above."""
    rng = np.random.default_rng(seed)
    impostor = rng.permutation(NUM_IMPOSTORS).astype(np.float64)
    genuine = NUM_IMPOSTORS - 100 + rng.random(500) * 200
    issame = np.concatenate([np.zeros(NUM_IMPOSTORS, bool), np.ones(500, bool)])
    order = rng.permutation(issame.size)
    return np.concatenate([impostor, genuine])[order], issame[order]


def test_thresholds_give_the_stated_far_and_are_the_lowest_that_do():
    scores, issame = _scores()
    cal = calibration.fit({"adaface": scores}, issame, step=7, checkpoint="/ckpt", fitted_on=["lfw"])
    assert cal.num_pairs == 2500 and cal.num_impostors == NUM_IMPOSTORS
    impostor = scores[~issame]
    # With impostor scores 0..1999, FAR 1e-2 admits 20 of them: the threshold is the 21st largest, 1979.
    assert cal.threshold("adaface", 1e-2) == 1979.0
    assert cal.threshold("adaface", 1e-3) == 1997.0
    for far in calibration.FARS:
        t = cal.threshold("adaface", far)
        assert np.mean(impostor > t) <= far
        # Any lower threshold (the next impostor score below) accepts too many impostors.
        assert np.mean(impostor >= t) > far
    # 2,000 impostors cannot measure 1e-4: the threshold is the highest impostor score, and it says so.
    assert cal.threshold("adaface", 1e-4) == impostor.max()
    assert cal.resolved(1e-3) and not cal.resolved(1e-4)


def test_ties_never_raise_the_far_above_the_target():
    issame = np.array([False] * 100 + [True] * 10)
    scores = np.concatenate([np.repeat([0.1, 0.5, 0.9], [90, 5, 5]), np.full(10, 0.95)])
    cal = calibration.fit({"adaface": scores}, issame, step=0, checkpoint="c", fitted_on=["x"], fars=(0.07,))
    # Allowed 7 accepts, but the tie at 0.5 would make it 10: the threshold stays at 0.5 (5 accepted).
    assert cal.threshold("adaface", 0.07) == 0.5


def test_fused_thresholds_use_statistics_fitted_on_the_same_pairs():
    scores, issame = _scores()
    rng = np.random.default_rng(1)
    qaconv = scores / 100.0 + rng.normal(size=scores.size)
    weights = {"adaface": 0.3, "qaconv": 0.7}
    cal = calibration.fit({"adaface": scores, "qaconv": qaconv}, issame, step=1, checkpoint="c",
                          fitted_on=["lfw", "cfp_fp"], fusion_weights=weights)
    assert set(cal.thresholds) == {"adaface", "qaconv", "fused"}
    expected_stats = fusion.FusionStats.fit({"adaface": scores, "qaconv": qaconv})
    assert cal.fusion_stats == expected_stats and cal.fusion_weights == weights
    fused = 0.3 * (scores - scores.mean()) / scores.std() + 0.7 * (qaconv - qaconv.mean()) / qaconv.std()
    for far in calibration.FARS:
        assert cal.threshold("fused", far) == pytest.approx(verification.far_threshold(fused[~issame], far))
        assert cal.threshold("qaconv", far) == verification.far_threshold(qaconv[~issame], far)
    # Without every weighted score there is no fused score.
    alone = calibration.fit({"adaface": scores}, issame, step=1, checkpoint="c", fitted_on=["lfw"],
                            fusion_weights=weights)
    assert set(alone.thresholds) == {"adaface"} and alone.fusion_stats is None and alone.fusion_weights is None
    assert set(cal.without_fused().thresholds) == {"adaface", "qaconv"}


def test_round_trip_stale_step_and_bad_files(tmp_path, caplog):
    scores, issame = _scores()
    cal = calibration.fit({"adaface": scores, "qaconv": -scores}, issame, step=12, checkpoint="/ckpt",
                          fitted_on=["lfw"], fusion_weights=fusion.DEFAULT_WEIGHTS)
    path = calibration.save(cal, tmp_path / "eval" / calibration.CALIBRATION_FILE)
    saved = json.loads(path.read_text())
    assert saved["step"] == 12 and saved["fitted_on"] == ["lfw"] and set(saved["thresholds"]["fused"]) == {
        "0.01", "0.001", "0.0001"}
    assert calibration.load(path, 12) == cal
    assert calibration.load(path, 13) is None  # stale: another step, warned once
    assert calibration.load(path, 13) is None
    assert caplog.text.count("was fitted for step 12, not 13: ignored") == 1
    assert calibration.load(tmp_path / "absent.json", 12) is None
    path.write_text(json.dumps({"step": 12}))
    with pytest.raises(ValueError, match=r"calibration.json: not a calibration file \(KeyError"):
        calibration.load(path, 12)


def test_far_and_input_errors():
    scores, issame = _scores()
    cal = calibration.fit({"adaface": scores}, issame, step=0, checkpoint="c", fitted_on=["lfw"])
    assert cal.far_key(0.001) == 1e-3 and cal.far_key(1e-3 * (1 + 1e-9)) == 1e-3
    with pytest.raises(ValueError, match="far=0.005: no threshold at that FAR; calibrated at 0.01, 0.001, 0.0001"):
        cal.threshold("adaface", 5e-3)
    with pytest.raises(KeyError, match=r"score 'fused' has no thresholds; calibrated: \['adaface'\]"):
        cal.threshold("fused", 1e-3)
    with pytest.raises(ValueError, match="calibration needs genuine and impostor pairs; got 3 genuine of 3"):
        calibration.fit({"adaface": np.ones(3)}, np.ones(3, bool), step=0, checkpoint="c", fitted_on=["x"])
    with pytest.raises(ValueError, match="scores 'qaconv': 2 scores, the others have 3"):
        calibration.fit({"adaface": np.ones(3), "qaconv": np.ones(2)}, np.array([1, 0, 0]), step=0, checkpoint="c",
                        fitted_on=["x"])
    with pytest.raises(ValueError, match=r"fars: expected rates in \(0, 1\), got 1.5"):
        calibration.fit({"adaface": scores}, issame, step=0, checkpoint="c", fitted_on=["x"], fars=(1.5,))
