"""Figures of the generic landmark task: per-landmark error boxes, the overlay (truth hollow, prediction filled, a
line from each truth to its prediction) and the error heat map on the mean truth shape.

Any number of landmarks (1 to a few hundred): names are drawn small and the figures widen with K. Images of any size:
the overlay draws a downscaled copy of a large image (at most MAX_DRAWN_SIDE_PX on its longer side) stretched over the
original pixel extent, so the points keep their original-pixel coordinates exactly and only the raster is coarser.
Matplotlib object API only (engine/plots.py: Figure + Agg, no pyplot). Every function writes one PNG and returns it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from engine.plots import _save, image_axes

_WHERE = "engine/tasks/landmarks/plots.py"
MAX_DRAWN_SIDE_PX = 1600
TRUTH_COLOUR, PRED_COLOUR, LINE_COLOUR, MISSED_COLOUR = "#00e5ff", "#ffd400", "#ff5252", "#ff40ff"
_OUTLINE = [patheffects.withStroke(linewidth=1.5, foreground="black")]   # names readable on dark and light images


def _name_size(k: int) -> float:
    return 8.0 if k <= 12 else 6.0 if k <= 30 else 5.0


def drawable_image(image: Any) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 3) image, downscaled (box filter) when its longer side exceeds MAX_DRAWN_SIDE_PX."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"{_WHERE}: the overlay wants a uint8 (H, W) or (H, W, 3) image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if max(h, w) <= MAX_DRAWN_SIDE_PX:
        return img
    f = MAX_DRAWN_SIDE_PX / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX))


def _points(kpts: Any, flags: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    pts = np.full((k, 2), np.nan) if kpts is None else np.asarray(kpts, dtype=np.float64).reshape(-1, 2)
    ok = np.ones(len(pts), bool) if flags is None else np.asarray(flags, dtype=bool).reshape(-1)
    return pts, ok & np.isfinite(pts).all(1)


def plot_landmark_overlay(image: Any, pred_K2: Any, out_path: Path | str, true_K2: Any = None,
                          pred_present_K: Any = None, true_visible_K: Any = None,
                          names: Sequence[str] | None = None, title: str = "") -> Path:
    """The image with the truth (hollow cyan), the prediction (filled yellow) and a red line from each truth to its
    prediction; a visible truth the prediction calls absent is a magenta hollow marker; names beside the points."""
    src = np.asarray(image)
    h, w = src.shape[:2]
    img = drawable_image(src)
    pred, p_ok = _points(pred_K2, pred_present_K, 0)
    true, t_ok = _points(true_K2, true_visible_K, len(pred))
    k = len(pred)
    labels = list(names) if names is not None and len(names) == k else [f"L{i + 1}" for i in range(k)]
    fig = Figure(figsize=(8.0, 8.0 * h / w + 0.5))
    ax = fig.add_subplot()
    # extent = the original pixel frame: a downscaled raster still lines up with original-pixel points
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="antialiased",
              extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    both = p_ok & t_ok
    for i in np.flatnonzero(both):
        ax.plot([true[i, 0], pred[i, 0]], [true[i, 1], pred[i, 1]], "-", color=LINE_COLOUR, linewidth=1.0)
    marker = 30.0 if k <= 30 else 14.0
    missed = t_ok & ~p_ok                                  # a visible truth without a (present) prediction
    ax.scatter(true[t_ok & ~missed, 0], true[t_ok & ~missed, 1], s=marker * 1.6, facecolors="none",
               edgecolors=TRUTH_COLOUR, linewidths=1.2, zorder=4)
    ax.scatter(true[missed, 0], true[missed, 1], s=marker * 1.6, facecolors="none", edgecolors=MISSED_COLOUR,
               linewidths=1.4, zorder=4)
    ax.scatter(pred[p_ok, 0], pred[p_ok, 1], s=marker, c=PRED_COLOUR, edgecolors="black", linewidths=0.4, zorder=5)
    where = np.where(p_ok[:, None], pred, true)
    for i in np.flatnonzero(p_ok | t_ok):
        ax.annotate(labels[i], where[i], xytext=(3, -3), textcoords="offset points", color="white",
                    fontsize=_name_size(k), zorder=6, path_effects=_OUTLINE)
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor=TRUTH_COLOUR,
                      label="truth"),
               Line2D([], [], marker="o", linestyle="", color=PRED_COLOUR, markeredgecolor="black", label="prediction")]
    if missed.any():
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                              markeredgecolor=MISSED_COLOUR, label="missed"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, facecolor="black", labelcolor="white", framealpha=0.6)
    image_axes(ax, w, h, title)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_error_boxes(errors_by_landmark: Sequence[Sequence[float]], names: Sequence[str], out_path: Path | str,
                     unit: str) -> Path:
    """One box per landmark (median, quartiles, 1.5 IQR whiskers, outliers) of its radial errors; a landmark
    without a finite error keeps its tick, empty."""
    data = [np.asarray(e, dtype=np.float64) for e in errors_by_landmark]
    data = [e[np.isfinite(e)] for e in data]
    if len(data) != len(names) or not any(e.size for e in data):
        raise ValueError(f"{_WHERE}: plot_error_boxes: {len(data)} error lists for {len(names)} names, "
                         f"or no finite error")
    k = len(names)
    fig = Figure(figsize=(min(max(6.0, 0.28 * k + 2.0), 24.0), 4.5))
    ax = fig.add_subplot()
    pos = [i for i, e in enumerate(data) if e.size]
    ax.boxplot([data[i] for i in pos], positions=pos, widths=0.6, flierprops={"markersize": 3})
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=90 if k > 12 else 30, ha="center" if k > 12 else "right",
                       fontsize=_name_size(k))
    ax.set_xlim(-0.7, k - 0.3)
    ax.set_ylabel(f"radial error ({unit})")
    ax.set_title(f"error per landmark (n = {sum(e.size for e in data)} landmark predictions)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_error_heatmap(mean_shape_K2: Any, mean_error_K: Any, names: Sequence[str], out_path: Path | str,
                       unit: str) -> Path:
    """The mean truth shape (engine/tasks/landmarks/geometry.py), each landmark a disc coloured by its mean error,
    with a colourbar and the names; landmarks without a position or an error are left out."""
    shape = np.asarray(mean_shape_K2, dtype=np.float64).reshape(-1, 2)
    err = np.asarray(mean_error_K, dtype=np.float64).reshape(-1)
    ok = np.isfinite(shape).all(1) & np.isfinite(err)
    if len(err) != len(shape) or not ok.any():
        raise ValueError(f"{_WHERE}: plot_error_heatmap: {len(shape)} positions, {len(err)} errors, none usable")
    fig = Figure(figsize=(7.0, 6.0))
    ax = fig.add_subplot()
    k = len(shape)
    dots = ax.scatter(shape[ok, 0], shape[ok, 1], c=err[ok], s=260.0 if k <= 30 else 90.0, cmap="magma_r",
                      edgecolors="black", linewidths=0.5, vmin=0.0, vmax=max(float(err[ok].max()), 1e-9))
    for i in np.flatnonzero(ok):
        ax.annotate(names[i], shape[i], xytext=(6, 4), textcoords="offset points", fontsize=_name_size(k))
    fig.colorbar(dots, ax=ax, label=f"mean radial error ({unit})")
    span = np.ptp(shape[ok], axis=0).max() if ok.sum() > 1 else 1.0
    lo, hi = shape[ok].min(0) - 0.12 * span, shape[ok].max(0) + 0.12 * span
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])                              # image convention: y down
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("mean error on the mean truth shape (similarity-aligned)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)
