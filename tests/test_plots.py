"""Tests for oaml_jax.plots: PNGs written at the figure size, faces visible where they are drawn."""

import cv2
import numpy as np
import pytest

from oaml_jax.evaluation import plots, verification


def _read_png(path):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _face(seed):
    # A smooth synthetic "face": colour gradients, so a resampled rendering stays close to the original.
    yy, xx = np.mgrid[0:112, 0:112] / 111.0
    phase = seed * 1.3
    channels = [np.sin(3 * xx + phase), np.cos(2 * yy - phase), np.sin(2 * (xx + yy) + 2 * phase)]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def _axes_pixels(ax, rendered):
    # Axes extent is in display coordinates (origin bottom-left); array rows count from the top.
    box = ax.get_window_extent()
    height = rendered.shape[0]
    top, bottom = int(round(height - box.y1)), int(round(height - box.y0))
    left, right = int(round(box.x0)), int(round(box.x1))
    return rendered[top:bottom, left:right]


def test_plot_roc_writes_png_of_the_figure_size(tmp_path):
    rng = np.random.default_rng(0)
    issame = rng.random(2000) < 0.5
    curves = {}
    for name, gap in (("AdaFace", 2.0), ("QAConv", 1.5)):
        fpr, tpr, _ = verification.roc_curve(rng.normal(size=2000) + gap * issame, issame)
        curves[name] = (fpr, tpr)
    path = plots.plot_roc(curves, str(tmp_path / "sub" / "roc.png"), title="IJB-C")
    assert str(path) == str(tmp_path / "sub" / "roc.png")
    image = _read_png(path)
    assert image.shape == (500, 600, 3)
    assert image.std() > 10  # something other than a blank canvas was drawn


def test_figure_to_array_matches_the_png(tmp_path):
    fig = plots.roc_figure({"a": (np.array([0.0, 1e-3, 1.0]), np.array([0.0, 0.5, 1.0]))})
    array = plots.figure_to_array(fig)
    assert array.dtype == np.uint8 and array.shape == (500, 600, 3)
    fig.savefig(str(tmp_path / "roc.png"), dpi=100)
    np.testing.assert_array_equal(_read_png(str(tmp_path / "roc.png")), array)


def test_plot_occlusion_grid(tmp_path):
    images = np.stack([_face(i) for i in range(10)])
    maps = np.random.default_rng(1).random((10, 7, 7)).astype(np.float32)
    path = plots.plot_occlusion_grid(images, maps, str(tmp_path / "grid.png"),
                                     titles=[f"face {i}" for i in range(10)])
    image = _read_png(path)
    # 8 columns x 2 rows at 1.5 inches per face plus 0.2 inches per row of titles, 100 dpi.
    assert image.shape == (340, 1200, 3)
    fig = plots.occlusion_grid_figure(images, maps)
    assert len(fig.axes) == 10
    with pytest.raises(ValueError, match=r"maps: expected \[10, h, w\]"):
        plots.occlusion_grid_figure(images, maps[:3])


LINES = ("adaface    0.4100 > 0.3500: same", "qaconv     3.2000 <= 4.0000: different",
         "fused      1.0500 > 0.9000: same")


def test_pair_plot_shows_both_faces(tmp_path):
    img_a, img_b = _face(0), _face(3)
    map_a = np.ones((7, 7), np.float32)
    map_b = np.ones((7, 7), np.float32)
    map_b[4:, :] = 0.0  # lower face occluded
    path = plots.plot_pair_verification(img_a, img_b, map_a, map_b, LINES, str(tmp_path / "pair.png"))
    png = _read_png(path)
    fig = plots.pair_verification_figure(img_a, img_b, map_a, map_b, LINES)
    rendered = plots.figure_to_array(fig)
    # 4.3 inches wide; 0.2 margins + 2 x (0.25 caption + 2.0 face) + 0.1 gap + 3 x 0.2 lines = 5.4 high.
    assert png.shape == rendered.shape == (540, 430, 3)
    for ax, face, other in ((fig.axes[0], img_a, img_b), (fig.axes[1], img_b, img_a)):
        region = _axes_pixels(ax, rendered).astype(np.float64)
        resized = cv2.resize(face, region.shape[1::-1], interpolation=cv2.INTER_AREA).astype(np.float64)
        wrong = cv2.resize(other, region.shape[1::-1], interpolation=cv2.INTER_AREA).astype(np.float64)
        # The plain face panels reproduce their own face (up to resampling), not the other one.
        assert np.abs(region - resized).mean() < 6
        assert np.abs(region - wrong).mean() > 30
    # The overlay of B's occluded lower half is tinted red: more red than green there, unlike A's.
    lower_b = _axes_pixels(fig.axes[3], rendered)[-20:, 10:-10].astype(np.float64)
    lower_b_plain = _axes_pixels(fig.axes[1], rendered)[-20:, 10:-10].astype(np.float64)
    assert (lower_b[..., 0] - lower_b[..., 1]).mean() > (lower_b_plain[..., 0] - lower_b_plain[..., 1]).mean()
    assert [t.get_text() for t in fig.texts] == list(LINES)


def test_pair_plot_title_verdict_and_lines_overlap_nothing():
    title = "grace_hopper_portrait_1984.jpg vs astronaut_head.jpg"
    verdict = "different people (fused score at FAR 0.001)"
    fig = plots.pair_verification_figure(_face(0), _face(3), np.ones((7, 7)), np.ones((7, 7)), LINES, title, verdict)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    boxes = {f"text {t.get_text()!r}": t.get_window_extent(renderer) for t in fig.texts}
    for i, ax in enumerate(fig.axes):
        boxes[f"axes {i}"] = ax.get_window_extent(renderer)
        boxes[f"caption {ax.title.get_text()!r}"] = ax.title.get_window_extent(renderer)
    assert len(boxes) == 5 + 8
    names = list(boxes)
    for i, a in enumerate(names):
        box = boxes[a]
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0 and box.y1 <= fig.bbox.height, a
        for b in names[i + 1:]:
            assert not box.overlaps(boxes[b]), f"{a} overlaps {b}"
    # Top to bottom: title, faces, verdict, lines.
    order = [boxes[f"text {title!r}"], boxes["axes 0"], boxes["axes 2"], boxes[f"text {verdict!r}"]]
    order += [boxes[f"text {line!r}"] for line in LINES]
    assert all(upper.y0 > lower.y1 for upper, lower in zip(order, order[1:]))


def test_pair_plot_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match=r"img_b: expected uint8 \[H, W, 3\]"):
        plots.plot_pair_verification(_face(0), np.zeros((112, 112)), np.ones((7, 7)), np.ones((7, 7)), [],
                                     str(tmp_path / "x.png"))
