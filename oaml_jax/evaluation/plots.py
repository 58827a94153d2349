"""Evaluation figures: ROC curves, occlusion-map grids and pair verification panels.

Figures are built as `matplotlib.figure.Figure` objects on the Agg canvas (no pyplot global state, no
display needed). `*_figure` functions return the figure (for `figure_to_array`, e.g. TensorBoard image
summaries); `plot_*` functions build it, write a PNG and return the path.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Occlusion maps hold 1 = visible: occluded cells are tinted red, with opacity growing with occlusion, so
# visible parts of the face stay as they are.
_OCCLUDED_RGB = (1.0, 0.0, 0.0)
_OVERLAY_ALPHA = 0.6
_DPI = 100


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to pixels.

    Args:
        fig: a figure built by this module (or any figure with an Agg canvas).

    Returns:
        uint8 `[H, W, 3]` RGB image, `H, W` = figure size in inches x dpi.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


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


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC",
               min_fpr: float = 1e-6) -> Figure:
    """ROC curves with a log FPR axis.

    Args:
        curves: label -> `(fpr [K], tpr [K])` (e.g. from `verification.roc_curve`).
        title: figure title.
        min_fpr: left end of the FPR axis (points at FPR 0 cannot be drawn on a log axis).

    Returns:
        The figure (6 x 5 inches at 100 dpi).
    """
    if not curves:
        raise ValueError("curves: expected at least one (fpr, tpr) curve")
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve '{label}': fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-D shapes")
        keep = fpr > 0
        ax.plot(fpr[keep], tpr[keep], lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_xlim(min_fpr, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="major", linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: epath.PathLike,
             title: str = "ROC") -> epath.Path:
    """Write `roc_figure(curves, title)` as a PNG at `path` and return the path."""
    return _save(roc_figure(curves, title), path)


def occlusion_grid_figure(images: np.ndarray, maps: np.ndarray, titles: Sequence[str] | None = None,
                          columns: int = 8) -> Figure:
    """Faces with their occlusion maps (1 = visible) overlaid, up to `columns` per row.

    Args:
        images: uint8 `[N, H, W, 3]` RGB faces.
        maps: `[N, h, w]` occlusion maps in [0, 1], stretched over each face.
        titles: optional `N` captions.
        columns: faces per row.

    Returns:
        The figure (1.5 inches per face).
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
    fig = _new_figure(1.5 * cols, 1.5 * rows + (0.2 * rows if titles else 0.0))
    for i in range(num):
        ax = fig.add_subplot(rows, cols, i + 1)
        _show_face(ax, images[i], maps[i], titles[i] if titles else None)
    fig.tight_layout(pad=0.3)
    return fig


def plot_occlusion_grid(images: np.ndarray, maps: np.ndarray, path: epath.PathLike,
                        titles: Sequence[str] | None = None) -> epath.Path:
    """Write `occlusion_grid_figure(images, maps, titles)` as a PNG at `path` and return the path."""
    return _save(occlusion_grid_figure(images, maps, titles), path)


def pair_verification_figure(img_a: np.ndarray, img_b: np.ndarray, map_a: np.ndarray, map_b: np.ndarray,
                             scores: Mapping[str, float], title: str | None = None) -> Figure:
    """A pair of faces: top row as is, bottom row with occlusion maps overlaid, scores underneath.

    Args:
        img_a, img_b: uint8 `[H, W, 3]` RGB faces.
        map_a, map_b: `[h, w]` occlusion maps in [0, 1] (1 = visible).
        scores: name -> score (e.g. AdaFace / QAConv / fused).
        title: optional figure title (e.g. "same" / "different").

    Returns:
        The figure (4 x 4.8 inches); axes 0 and 1 hold the plain faces, 2 and 3 the overlays.
    """
    img_a, img_b = _check_face(img_a, "img_a"), _check_face(img_b, "img_b")
    map_a, map_b = _check_map(map_a, "map_a"), _check_map(map_b, "map_b")
    fig = _new_figure(4.0, 4.8)
    grid = fig.add_gridspec(2, 2, left=0.02, right=0.98, top=0.92, bottom=0.16, wspace=0.05, hspace=0.1)
    _show_face(fig.add_subplot(grid[0, 0]), img_a, title="A")
    _show_face(fig.add_subplot(grid[0, 1]), img_b, title="B")
    _show_face(fig.add_subplot(grid[1, 0]), img_a, map_a, title=f"A visible {map_a.mean():.2f}")
    _show_face(fig.add_subplot(grid[1, 1]), img_b, map_b, title=f"B visible {map_b.mean():.2f}")
    text = "   ".join(f"{name}: {value:.3f}" for name, value in scores.items())
    fig.text(0.5, 0.06, text, ha="center", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_pair_verification(img_a: np.ndarray, img_b: np.ndarray, map_a: np.ndarray, map_b: np.ndarray,
                           scores: Mapping[str, float], path: epath.PathLike,
                           title: str | None = None) -> epath.Path:
    """Write `pair_verification_figure(...)` as a PNG at `path` and return the path."""
    return _save(pair_verification_figure(img_a, img_b, map_a, map_b, scores, title), path)
