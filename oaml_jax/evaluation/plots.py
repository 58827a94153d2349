"""Evaluation figures: ROC and CMC curves, occlusion-map grids, pair verification panels, ablation bars.

Figures are built as `matplotlib.figure.Figure` objects on the Agg canvas (no pyplot global state, no
display needed). `*_figure` functions return the figure; `plot_*` functions build it, write a PNG and
return the path.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib import cm, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Occlusion maps hold 1 = visible: occluded cells are tinted red, with opacity growing with occlusion, so
# visible parts of the face stay as they are.
_OCCLUDED_RGB = (1.0, 0.0, 0.0)
_OVERLAY_ALPHA = 0.6
_DPI = 100
# Pair panel layout, in inches: face panels, the gaps around them, and the band of each text element.
_PANEL_IN = 2.0
_GAP_IN = 0.1
_PAIR_WIDTH_IN = 2 * _PANEL_IN + 3 * _GAP_IN
_MARGIN_IN = 0.1
_TITLE_IN = 0.35
_CAPTION_IN = 0.25
_VERDICT_IN = 0.35
_LINE_IN = 0.2


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: epath.PathLike) -> epath.Path:
    """Writes `fig` as a PNG at `path` (local or any epath URI), creating its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=_DPI, format="png")
    path.write_bytes(buffer.getvalue())
    return path


def _check_face(image: np.ndarray, field: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{field}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _check_map(occlusion: np.ndarray, field: str) -> np.ndarray:
    occlusion = np.asarray(occlusion, dtype=np.float32)
    if occlusion.ndim != 2:
        raise ValueError(f"{field}: expected a [h, w] map, got shape {occlusion.shape}")
    return occlusion


def _occlusion_overlay(occlusion: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[h, w]` visibility map -> `[height, width, 4]` RGBA tint; each cell covers its image region."""
    rows = np.arange(height) * occlusion.shape[0] // height
    cols = np.arange(width) * occlusion.shape[1] // width
    visible = np.clip(occlusion[rows[:, None], cols[None, :]], 0.0, 1.0)
    overlay = np.empty((height, width, 4), np.float32)
    overlay[..., :3] = _OCCLUDED_RGB
    overlay[..., 3] = _OVERLAY_ALPHA * (1.0 - visible)
    return overlay


def _show_face(ax, image: np.ndarray, occlusion: np.ndarray | None = None, title: str | None = None):
    height, width = image.shape[:2]
    ax.imshow(image, interpolation="nearest", extent=(0, width, height, 0))
    if occlusion is not None:
        ax.imshow(_occlusion_overlay(occlusion, height, width), interpolation="nearest",
                  extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def lowest_measurable_fpr(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> float:
    """The smallest positive FPR of any curve: `1 / impostors` for curves of `verification.roc_curve` whose
    highest impostor score is not tied (the lowest FAR the impostor count can measure)."""
    positive = []
    for fpr, _ in curves.values():
        fpr = np.asarray(fpr, dtype=np.float64)
        if np.any(fpr > 0):
            positive.append(float(fpr[fpr > 0].min()))
    if not positive:
        raise ValueError("curves: no point with a positive false accept rate")
    return min(positive)


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC",
               num_impostors: int | None = None) -> Figure:
    """ROC curves with a log FAR axis from the lowest measurable FAR, the AUC of each in the legend.

    Args:
        curves: label -> `(fpr [K], tpr [K])` (e.g. from `verification.roc_curve`, which starts at (0, 0)
            and ends at (1, 1)).
        title: figure title.
        num_impostors: impostor pairs behind the curves; the FAR axis starts at `1 / num_impostors`. Without
            it, at the smallest positive FPR of the curves (`lowest_measurable_fpr`; the same for curves of
            `verification.roc_curve` unless the top impostor scores tie).

    Returns:
        The figure (6 x 5 inches at 100 dpi). Legend entries read "<label> (AUC 0.9876)", the AUC being the
        trapezoidal area under the whole curve (`verification.roc_auc` for `roc_curve` curves).
    """
    if not curves:
        raise ValueError("curves: expected at least one (fpr, tpr) curve")
    if num_impostors is not None and num_impostors < 1:
        raise ValueError(f"num_impostors: expected >= 1, got {num_impostors}")
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve '{label}': fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D shapes")
        keep = fpr > 0  # FPR 0 cannot be drawn on a log axis
        ax.plot(fpr[keep], tpr[keep], lw=1.2, label=f"{label} (AUC {np.trapezoid(tpr, fpr):.4f})")
    ax.set_xscale("log")
    ax.set_xlim(1.0 / num_impostors if num_impostors else lowest_measurable_fpr(curves), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="major", linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: epath.PathLike,
             title: str = "ROC", num_impostors: int | None = None) -> epath.Path:
    """Write `roc_figure(curves, title, num_impostors)` as a PNG at `path` and return the path."""
    return _save(roc_figure(curves, title, num_impostors), path)


def cmc_figure(curves: Mapping[str, np.ndarray], title: str = "CMC") -> Figure:
    """Cumulative match characteristic curves: identification rate at rank 1..K.

    Args:
        curves: label -> `[K]` share of mated probes found at rank <= r (`identification_metrics.cmc`).
        title: figure title.

    Returns:
        The figure (6 x 5 inches at 100 dpi); legend entries give rank-1.
    """
    if not curves:
        raise ValueError("curves: expected at least one CMC curve")
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        curve = np.asarray(curve, dtype=np.float64)
        if curve.ndim != 1 or curve.size == 0:
            raise ValueError(f"curve '{label}': expected a non-empty 1-D curve, got shape {curve.shape}")
        ax.plot(np.arange(1, curve.size + 1), 100.0 * curve, marker=".", lw=1.2,
                label=f"{label} (rank-1 {100.0 * curve[0]:.2f}%)")
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate (%)")
    ax.set_ylim(0.0, 100.0)
    ax.set_title(title)
    ax.grid(True, linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_cmc(curves: Mapping[str, np.ndarray], path: epath.PathLike, title: str = "CMC") -> epath.Path:
    """Write `cmc_figure(curves, title)` as a PNG at `path` and return the path."""
    return _save(cmc_figure(curves, title), path)


def visibility_colormap() -> colors.Colormap:
    """How `_occlusion_overlay` shows a visibility over a white face: red at 0 (occluded), none at 1 (visible)."""
    tint = lambda visible: tuple(1.0 - _OVERLAY_ALPHA * (1.0 - visible) * (1.0 - c) for c in _OCCLUDED_RGB)
    return colors.LinearSegmentedColormap.from_list("visibility", [tint(0.0), tint(1.0)])


GRID_CAPTION = "number after each name: the face's mean predicted visibility"
# Occlusion grid layout, in inches: a cell per face (the face inside a padding), a title band above each
# row of faces when titled, and a band under the faces for the colour bar and caption.
_GRID_CELL_IN = 1.5
_GRID_PAD_IN = 0.05
_GRID_TITLE_IN = 0.2
_LEGEND_IN = 0.75


def occlusion_grid_figure(images: np.ndarray, maps: np.ndarray, titles: Sequence[str] | None = None,
                          columns: int = 8, caption: str = GRID_CAPTION) -> Figure:
    """Faces with their predicted occlusion maps overlaid, up to `columns` per row, above a colour bar
    "predicted visibility (0 = occluded, 1 = visible)" and a caption.

    Args:
        images: uint8 `[N, H, W, 3]` RGB faces.
        maps: `[N, h, w]` visibility maps in [0, 1] (1 = visible), stretched over each face: the red tint
            grows with occlusion.
        titles: optional `N` captions.
        columns: faces per row.
        caption: the line under the colour bar, saying what the titles' numbers are (eval.py's titles end in
            the face's mean predicted visibility, the default caption's meaning).

    Returns:
        The figure: 1.5 inches per face (at least 4 inches wide), plus 0.2 inches per row of titles and
        `_LEGEND_IN` for the colour bar and caption.
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps: expected [{images.shape[0]}, h, w], got shape {maps.shape}")
    if titles is not None and len(titles) != images.shape[0]:
        raise ValueError(f"titles: expected {images.shape[0]} captions, got {len(titles)}")
    num = images.shape[0]
    if num == 0:
        raise ValueError("images: expected at least one face")
    cols = min(columns, num)
    rows = -(-num // cols)
    title_in = _GRID_TITLE_IN if titles else 0.0
    width = max(_GRID_CELL_IN * cols, 4.0)
    height = (_GRID_CELL_IN + title_in) * rows + _LEGEND_IN
    fig = _new_figure(width, height)
    left0 = (width - _GRID_CELL_IN * cols) / 2
    face = _GRID_CELL_IN - 2 * _GRID_PAD_IN
    for i in range(num):
        row, col = divmod(i, cols)
        left = left0 + col * _GRID_CELL_IN + _GRID_PAD_IN
        bottom = height - (row + 1) * (_GRID_CELL_IN + title_in) + _GRID_PAD_IN
        ax = fig.add_axes((left / width, bottom / height, face / width, face / height))
        _show_face(ax, images[i], maps[i], titles[i] if titles else None)
    bar = fig.add_axes((0.2, 0.5 * _LEGEND_IN / height, 0.6, 0.12 / height))
    fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(0.0, 1.0), cmap=visibility_colormap()), cax=bar,
                 orientation="horizontal")
    bar.set_title("predicted visibility (0 = occluded, 1 = visible)", fontsize=7)
    bar.tick_params(labelsize=7)
    fig.text(0.5, 0.08 * _LEGEND_IN / height, caption, ha="center", va="bottom", fontsize=7)
    return fig


def plot_occlusion_grid(images: np.ndarray, maps: np.ndarray, path: epath.PathLike,
                        titles: Sequence[str] | None = None, caption: str = GRID_CAPTION) -> epath.Path:
    """Write `occlusion_grid_figure(images, maps, titles, caption=caption)` as a PNG at `path`; return the path."""
    return _save(occlusion_grid_figure(images, maps, titles, caption=caption), path)


def pair_verification_figure(img_a: np.ndarray, img_b: np.ndarray, map_a: np.ndarray, map_b: np.ndarray,
                             lines: Sequence[str] = (), title: str | None = None,
                             verdict: str | None = None) -> Figure:
    """A pair of faces: top row as is, bottom row with occlusion maps overlaid, then verdict and score lines.

    Every element has a band of its own, top to bottom (title, the two rows of faces with their captions,
    verdict, one line per score), so no text overlaps another or a face.

    Args:
        img_a, img_b: uint8 `[H, W, 3]` RGB faces.
        map_a, map_b: `[h, w]` occlusion maps in [0, 1] (1 = visible).
        lines: text lines under the faces (e.g. each score with its threshold and decision).
        title: optional figure title (e.g. the two file names).
        verdict: optional headline above the lines (e.g. "same person (fused score at FAR 0.001)").

    Returns:
        The figure, `_PAIR_WIDTH_IN` inches wide and as tall as its bands; axes 0 and 1 hold the plain
        faces, 2 and 3 the overlays.
    """
    img_a, img_b = _check_face(img_a, "img_a"), _check_face(img_b, "img_b")
    map_a, map_b = _check_map(map_a, "map_a"), _check_map(map_b, "map_b")
    lines = list(lines)
    height = (2 * _MARGIN_IN + (_TITLE_IN if title else 0.0) + 2 * (_CAPTION_IN + _PANEL_IN) + _GAP_IN
              + (_VERDICT_IN if verdict else 0.0) + _LINE_IN * len(lines))
    fig = _new_figure(_PAIR_WIDTH_IN, height)
    top = height - _MARGIN_IN  # inches above the figure's bottom edge, moving down band by band

    def text(value: str, band: float, **kwargs) -> None:
        nonlocal top
        fig.text(0.5, (top - band / 2) / height, value, ha="center", va="center", **kwargs)
        top -= band

    if title:
        text(title, _TITLE_IN, fontsize=10)
    rows = (((img_a, None, "A"), (img_b, None, "B")),
            ((img_a, map_a, f"A visible {map_a.mean():.2f}"), (img_b, map_b, f"B visible {map_b.mean():.2f}")))
    for row in rows:
        top -= _CAPTION_IN + _PANEL_IN
        for col, (image, occlusion, caption) in enumerate(row):
            left = _GAP_IN + col * (_PANEL_IN + _GAP_IN)
            ax = fig.add_axes((left / _PAIR_WIDTH_IN, top / height, _PANEL_IN / _PAIR_WIDTH_IN, _PANEL_IN / height))
            _show_face(ax, image, occlusion, caption)
    top -= _GAP_IN
    if verdict:
        text(verdict, _VERDICT_IN, fontsize=10, fontweight="bold")
    for line in lines:
        text(line, _LINE_IN, fontsize=8, family="monospace")
    return fig


def plot_pair_verification(img_a: np.ndarray, img_b: np.ndarray, map_a: np.ndarray, map_b: np.ndarray,
                           lines: Sequence[str], path: epath.PathLike, title: str | None = None,
                           verdict: str | None = None) -> epath.Path:
    """Write `pair_verification_figure(...)` as a PNG at `path` and return the path."""
    return _save(pair_verification_figure(img_a, img_b, map_a, map_b, lines, title, verdict), path)


def ablation_figure(summary: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, int]]]],
                    title: str | None = None) -> Figure:
    """Grouped bars with error bars: one panel per score, occlusion variants on the x axis, a bar per
    ablation variant at its mean with +- one standard deviation.

    Args:
        summary: variant -> occlusion variant -> score -> (mean %, std %, runs) (`oaml_jax.ablation.summarize`).
        title: optional figure title.

    Returns:
        The figure (one 4 x 3.2 inch panel per score present).
    """
    variants = list(summary)
    if not variants:
        raise ValueError("summary: expected at least one variant")
    occlusions = list(next(iter(summary.values())))
    scores = [s for s in ("adaface", "qaconv", "fused")
              if any(s in summary[v][o] for v in variants for o in occlusions)]
    fig = _new_figure(4.0 * len(scores), 3.6)
    width = 0.8 / len(variants)
    x = np.arange(len(occlusions))
    for i, score in enumerate(scores):
        ax = fig.add_subplot(1, len(scores), i + 1)
        for j, variant in enumerate(variants):
            cells = [summary[variant][o].get(score) for o in occlusions]
            if not any(cells):
                continue
            means = [c[0] if c else np.nan for c in cells]
            stds = [c[1] if c else 0.0 for c in cells]
            ax.bar(x + (j - (len(variants) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=variant)
        ax.set_xticks(x, occlusions, fontsize=8)
        ax.set_ylim(50, 100)
        ax.set_title(score, fontsize=9)
        ax.set_ylabel("10-fold accuracy (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ablation(summary: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, int]]]], path: epath.PathLike,
                  title: str | None = None) -> epath.Path:
    """Write `ablation_figure(summary, title)` as a PNG at `path` and return the path."""
    return _save(ablation_figure(summary, title), path)


def plot_score_histograms(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: epath.PathLike,
                          title: str = "scores", bins: int = 60) -> epath.Path:
    """Genuine and impostor score histograms (densities), one panel per score, written as a PNG at `path`.

    Args:
        scores: label -> (genuine scores `[G]`, impostor scores `[I]`) (a sample of them is enough).
        path: the PNG (local or any epath URI).
        title: figure title.
        bins: bins per panel, over the range of both arrays.

    Returns:
        The path.
    """
    if not scores:
        raise ValueError("scores: expected at least one (genuine, impostor) pair of arrays")
    fig = _new_figure(4.0 * len(scores), 3.4)
    for k, (label, (genuine, impostor)) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), k + 1)
        both = np.concatenate([np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)])
        edges = np.linspace(both.min(), both.max() + 1e-12, bins + 1)
        ax.hist(impostor, bins=edges, density=True, alpha=0.6, label=f"impostor ({len(impostor):,})")
        ax.hist(genuine, bins=edges, density=True, alpha=0.6, label=f"genuine ({len(genuine):,})")
        ax.set_title(f"{title}: {label}", fontsize=9)
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
