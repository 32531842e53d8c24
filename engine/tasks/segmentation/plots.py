"""Figures of the segmentation task: contour overlays (truth solid, prediction dashed, one colour per class).

Matplotlib object API only (engine/plots.py: Figure + Agg, no pyplot).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from engine.plots import _save, image_axes

_COLOURS = ("#ffd700", "#00e5ff", "#ff4081", "#76ff03", "#ff9100", "#d500f9", "#1de9b6", "#ff1744")


def draw_contours(image_HW3: np.ndarray, pred_mask_HW: np.ndarray | None, true_mask_HW: np.ndarray | None,
                  out_path: Path | str, class_names: Sequence[str], title: str = "") -> Path:
    """The image with each foreground class's truth contour (solid) and predicted contour (dashed)."""
    img = np.asarray(image_HW3)
    h, w = img.shape[:2]
    fig = Figure(figsize=(7.0, 7.0 * h / w + 0.6))
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    handles = []
    for c in range(1, len(class_names)):
        colour = _COLOURS[(c - 1) % len(_COLOURS)]
        drawn = False
        for mask, style in ((true_mask_HW, "solid"), (pred_mask_HW, "dashed")):
            if mask is not None and np.any(np.asarray(mask) == c):
                ax.contour(np.asarray(mask) == c, levels=[0.5], colors=[colour], linewidths=1.3,
                           linestyles=style)
                drawn = True
        if drawn:
            handles.append(Line2D([], [], color=colour, label=class_names[c]))
    handles += [Line2D([], [], color="white", linestyle="solid", label="truth"),
                Line2D([], [], color="white", linestyle="dashed", label="prediction")]
    ax.legend(handles=handles, loc="lower right", fontsize=8, facecolor="black", labelcolor="white", framealpha=0.6)
    image_axes(ax, w, h, title)
    fig.tight_layout()
    return _save(fig, out_path)
