"""Tests for oaml_jax.plots: PNGs written at the figure size, faces visible where they are drawn, axes and legends
that say what they show."""

import io

import cv2
import numpy as np
import pytest

from oaml_jax.evaluation import plots, verification


def _read_png(path):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _render(fig):
    """The figure's pixels as the PNG writer renders them (uint8 [H, W, 3] RGB)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


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


def test_roc_axis_starts_at_the_lowest_measurable_far_and_the_legend_gives_auc():
    # 4 impostors (scores 0.9, 0.5, 0.3, 0.1), 4 genuine (0.95, 0.8, 0.6, 0.2): FAR steps of 1/4.
    scores = np.array([0.95, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1])
    issame = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    fpr, tpr, _ = verification.roc_curve(scores, issame)
    fig = plots.roc_figure({"AdaFace": (fpr, tpr)})
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((0.25, 1.0))  # 1 / 4 impostors
    # Genuine above each impostor: 1 above 0.9, 3 above 0.5 and 0.3, 4 above 0.1: AUC = (1 + 3 + 3 + 4) / 16.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["AdaFace (AUC 0.6875)"]
    assert verification.roc_auc(scores, issame) == pytest.approx(11 / 16)
    assert plots.roc_figure({"a": (fpr, tpr)}, num_impostors=1000).axes[0].get_xlim() == pytest.approx((1e-3, 1.0))
    # Two curves: the axis starts at the smaller of their lowest FARs.
    two = plots.roc_figure({"a": (fpr, tpr), "b": (np.array([0.0, 0.1, 1.0]), np.array([0.0, 0.5, 1.0]))})
    assert two.axes[0].get_xlim() == pytest.approx((0.1, 1.0))
    with pytest.raises(ValueError, match="no point with a positive false accept rate"):
        plots.roc_figure({"a": (np.zeros(2), np.array([0.0, 1.0]))})


def test_cmc_plot_shows_rank_one_in_the_legend(tmp_path):
    path = plots.plot_cmc({"AdaFace": np.array([0.5, 0.75, 1.0])}, str(tmp_path / "cmc.png"), title="set")
    assert _read_png(path).shape == (500, 600, 3)
    ax = plots.cmc_figure({"AdaFace": np.array([0.5, 0.75, 1.0])}).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["AdaFace (rank-1 50.00%)"]
    np.testing.assert_allclose(ax.lines[0].get_xydata(), [[1, 50.0], [2, 75.0], [3, 100.0]])


def test_plot_occlusion_grid(tmp_path):
    images = np.stack([_face(i) for i in range(10)])
    maps = np.random.default_rng(1).random((10, 7, 7)).astype(np.float32)
    path = plots.plot_occlusion_grid(images, maps, str(tmp_path / "grid.png"),
                                     titles=[f"face {i}" for i in range(10)])
    image = _read_png(path)
    # 8 columns x 2 rows at 1.5 inches per face plus 0.2 inches per row of titles, and 0.75 inches for the
    # colour bar and caption, 100 dpi.
    assert image.shape == (415, 1200, 3)
    fig = plots.occlusion_grid_figure(images, maps)
    assert len(fig.axes) == 11  # ten faces and the colour bar
    bar = fig.axes[10]
    assert bar.get_title() == "predicted visibility (0 = occluded, 1 = visible)"
    assert [t.get_text() for t in fig.texts] == [plots.GRID_CAPTION]
    assert "mean predicted visibility" in plots.GRID_CAPTION
    # The bar's colours are the overlay's: a white face under visibility 0 turns the bar's left colour, under
    # visibility 1 its right colour (white).
    white = np.full((1, 112, 112, 3), 255, np.uint8)
    for visible, end in ((0.0, 0.0), (1.0, 1.0)):
        face = _render(plots.occlusion_grid_figure(white, np.full((1, 7, 7), visible)))
        shown = face[60, 200]  # inside the face panel (4 inches wide, one 1.4-inch face in the middle)
        expected = 255 * np.array(plots.visibility_colormap()(end)[:3])
        np.testing.assert_allclose(shown, expected, atol=2)
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
    rendered = _render(fig)
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
