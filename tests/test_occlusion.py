"""Tests for data_pipelines.occlusion and data_pipelines.occluders (the kinds it draws)."""


import cv2
import ml_collections
import numpy as np
import pytest

from data_pipelines import occluders, occlusion

CFG = {"prob_blocks": 0.2, "prob_mask": 0.2, "prob_sunglasses": 0.1, "prob_rgba": 0.0,
       "rgba_path": "", "blocks_count": (1, 3), "blocks_size": (0.1, 0.4)}
NONE = {**CFG, "prob_blocks": 0.0, "prob_mask": 0.0, "prob_sunglasses": 0.0}


def _face(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def test_visibility_map_of_hand_placed_block():
    visible = np.ones((112, 112), bool)
    visible[0:24, 0:40] = False  # 24 rows = 1.5 cells, 40 cols = 2.5 cells of 16 px
    vis = occlusion.visibility_map(visible, grid=7)
    assert vis.shape == (7, 7) and vis.dtype == np.float32
    # Occluded fraction of a cell = (occluded rows / 16) * (occluded cols / 16).
    expected = np.ones((7, 7), np.float32)
    expected[0, 0] = expected[0, 1] = 1 - (16 / 16) * (16 / 16)  # 0.0
    expected[0, 2] = 1 - (16 / 16) * (8 / 16)  # cols 32..39 of 32..47: 0.5
    expected[1, 0] = expected[1, 1] = 1 - (8 / 16) * (16 / 16)  # rows 16..23 of 16..31: 0.5
    expected[1, 2] = 1 - (8 / 16) * (8 / 16)  # 0.75
    np.testing.assert_allclose(vis, expected, atol=1e-6)
    np.testing.assert_allclose(occlusion.visibility_map(visible.astype(np.float32)), expected,
                               atol=1e-6)


def test_visibility_map_with_fractional_cells():
    # 10 px into 3 cells of 10/3 px: cell 0 = [0, 3.33) fully occluded, cell 1 = [3.33, 6.67)
    # has [3.33, 4) occluded, i.e. (4 - 10/3) / (10/3) = 0.2 of it.
    visible = np.ones((10, 10), bool)
    visible[0:4] = False
    vis = occlusion.visibility_map(visible, grid=3)
    np.testing.assert_allclose(vis, [[0.0] * 3, [0.8] * 3, [1.0] * 3], atol=1e-6)
    np.testing.assert_allclose(
        vis, cv2.resize(visible.astype(np.float32), (3, 3), interpolation=cv2.INTER_AREA),
        atol=1e-5)


def test_visibility_map_other_grid_and_errors():
    visible = np.ones((112, 112), bool)
    visible[:, :56] = False
    np.testing.assert_allclose(occlusion.visibility_map(visible, grid=14)[:, :7], 0.0)
    np.testing.assert_allclose(occlusion.visibility_map(visible, grid=14)[:, 7:], 1.0)
    np.testing.assert_array_equal(occlusion.visibility_map(np.ones((112, 112), bool)),
                                  np.ones((7, 7)))
    with pytest.raises(ValueError, match=r"pixel_mask must be \[H, W\]"):
        occlusion.visibility_map(np.ones((4, 4, 1)))


def test_no_occlusion_gives_all_ones_and_same_image():
    image = _face()
    out, vis = occlusion.Occlusion.from_config(NONE)(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(vis, np.ones((7, 7), np.float32))
    assert vis.dtype == np.float32


@pytest.mark.parametrize("kind", ["blocks", "mask", "sunglasses"])
def test_kinds_map_matches_pixels_and_leave_visible_pixels_alone(kind):
    image = np.zeros((112, 112, 3), np.uint8)
    fn = {"blocks": occluders.random_blocks, "mask": occluders.medical_mask,
          "sunglasses": occluders.sunglasses}[kind]
    for seed in range(10):
        out, visible = fn(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert visible.shape == (112, 112) and visible.dtype == bool
        assert not visible.all()
        np.testing.assert_array_equal(out[visible], image[visible])
        if kind == "mask":  # light fabric is drawn on every occluded pixel
            assert out[~visible].min(axis=-1).min() > 100
        vis = occlusion.visibility_map(visible)
        cell = (~visible[16:32, 32:48]).mean()
        np.testing.assert_allclose(vis[1, 2], 1.0 - cell, atol=1e-6)
    np.testing.assert_array_equal(image, 0)  # input untouched


def test_medical_mask_covers_nose_and_mouth_not_eyes():
    for seed in range(20):
        _, visible = occluders.medical_mask(_face(seed), np.random.default_rng(seed))
        vis = occlusion.visibility_map(visible)
        assert vis[4:7, 2:5].mean() < 0.4  # nose / mouth / chin cells
        assert vis[3].mean() > 0.8  # eye row mostly visible
        np.testing.assert_array_equal(vis[:3], 1.0)


def test_sunglasses_cover_eyes_not_mouth():
    for seed in range(20):
        _, visible = occluders.sunglasses(_face(seed), np.random.default_rng(seed))
        vis = occlusion.visibility_map(visible)
        assert vis[3, 1:6].mean() < 0.8  # eye row
        assert vis[2:4].mean() < 0.9
        assert vis[4:].mean() > 0.95
        np.testing.assert_array_equal(vis[5:], 1.0)


def test_random_blocks_respect_count_and_size():
    for seed in range(10):
        _, visible = occluders.random_blocks(_face(), np.random.default_rng(seed),
                                             count=(2, 2), size=(0.25, 0.25))
        occluded = (~visible).sum()
        assert 28 * 28 <= occluded <= 2 * 28 * 28
    black = np.zeros((112, 112, 3), np.uint8)
    for seed in range(10):  # solid colours and noise both land exactly on the occluded pixels
        out, visible = occluders.random_blocks(black, np.random.default_rng(seed))
        assert out[~visible].any(axis=-1).mean() > 0.9
        np.testing.assert_array_equal(out[visible], 0)


def test_occlude_seed_fixes_output_and_seeds_differ():
    image = _face()
    cfg = ml_collections.ConfigDict({**CFG, "prob_blocks": 0.4, "prob_mask": 0.3,
                                     "prob_sunglasses": 0.3})
    outputs = []
    for seed in range(6):
        out, vis = occlusion.Occlusion.from_config(cfg)(image, np.random.default_rng(seed))
        again, vis_again = occlusion.Occlusion.from_config(cfg)(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)
        np.testing.assert_array_equal(vis, vis_again)
        assert vis.shape == (7, 7) and vis.dtype == np.float32 and vis.min() < 1.0
        outputs.append(out)
    assert all(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_occlude_grid_argument():
    cfg = {**CFG, "prob_blocks": 1.0, "prob_mask": 0.0, "prob_sunglasses": 0.0}
    _, vis = occlusion.Occlusion.from_config(cfg)(_face(), np.random.default_rng(0), 14)
    assert vis.shape == (14, 14)


@pytest.mark.parametrize("kind", ["blocks", "mask", "sunglasses"])
def test_occlude_deterministic(kind):
    image = _face()
    out, vis = occlusion.occlude_deterministic(image, kind, seed=3)
    again, vis_again = occlusion.occlude_deterministic(image.copy(), kind, seed=3)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(vis, vis_again)
    other, _ = occlusion.occlude_deterministic(image, kind, seed=4)
    assert not np.array_equal(out, other)
    assert vis.min() < 1.0


def test_occlude_deterministic_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown occlusion kind 'scarf'"):
        occlusion.occlude_deterministic(_face(), "scarf", seed=0)


def test_probabilities_over_one_rejected():
    cfg = {**CFG, "prob_blocks": 0.5, "prob_mask": 0.4, "prob_sunglasses": 0.2}
    message = (r"data\.occlusion\.prob_blocks \+ prob_mask \+ prob_sunglasses \+ prob_rgba "
               r"must be <= 1 \(at most one occlusion per image\), got 0\.5 \+ 0\.4 \+ 0\.2 \+ "
               r"0\.0 = 1\.1")
    with pytest.raises(ValueError, match=message):
        occlusion.check_config(cfg)
    with pytest.raises(ValueError, match=r"data\.occlusion\.prob_mask must be in \[0, 1\]"):
        occlusion.check_config({**CFG, "prob_mask": -0.1})


def test_rgba_without_path_rejected():
    cfg = {**CFG, "prob_rgba": 0.1}
    message = (r"data\.occlusion\.prob_rgba > 0 needs an RGBA occluder image: "
               r"data\.occlusion\.rgba_path is empty or missing")
    with pytest.raises(ValueError, match=message):
        occlusion.check_config(cfg)
    without_key = {k: v for k, v in cfg.items() if k != "rgba_path"}
    with pytest.raises(ValueError, match=message):
        occlusion.check_config(without_key)
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent/mask\.png' "
                                                r"\(data\.occlusion\.rgba_path\) does not exist"):
        occlusion.check_config({**cfg, "rgba_path": "/nonexistent/mask.png"})


def test_missing_key_names_it():
    cfg = {k: v for k, v in CFG.items() if k != "prob_sunglasses"}
    with pytest.raises(KeyError, match=r"data\.occlusion\.prob_sunglasses"):
        occlusion.Occlusion.from_config(cfg)(_face(), np.random.default_rng(0))


def test_rgba_overlay(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[20:, :, :3] = (255, 0, 0)  # lower half: opaque red (RGB)
    rgba[20:, :, 3] = 255
    path = str(tmp_path / "occluder.png")
    cv2.imwrite(path, cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    no_alpha = str(tmp_path / "rgb.png")
    cv2.imwrite(no_alpha, rgba[..., :3])
    image = np.zeros((112, 112, 3), np.uint8)
    cfg = {**NONE, "prob_rgba": 1.0, "rgba_path": path}
    for seed in range(5):
        out, vis = occlusion.Occlusion.from_config(cfg)(image, np.random.default_rng(seed))
        assert vis[6, 2:5].mean() < 0.2 and vis[:4].min() == 1.0
        red = (out[..., 0] > 128) & (out[..., 1] == 0)
        assert red.sum() > 500
        direct, visible = occluders.rgba_overlay(image, np.random.default_rng(seed), path)
        # Visible pixels have alpha <= 0.5, so at most half of the red is blended in.
        assert direct[visible].max() <= 128 and direct[~visible, 0].min() > 127
    with pytest.raises(ValueError, match=r"must have 4 channels"):
        occluders.rgba_overlay(image, np.random.default_rng(0), no_alpha)
