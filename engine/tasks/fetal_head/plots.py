"""Figures of the fetal-head task: HC agreement (scatter + Bland-Altman), the Dice histogram, the head overlay
(mask contours, fitted ellipse, axis landmarks, HC values).

Matplotlib object API only (engine/plots.py: Figure + Agg, no pyplot). Every function writes one PNG and returns it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from data_pipelines.readers.hc18 import HC18_KPT_NAMES
from engine.plots import _save, image_axes

from . import ellipse as ell

_WHERE = "engine/tasks/fetal_head/plots.py"


def plot_hc_agreement(ref_mm: Sequence[float], pred_mm: Sequence[float], out_path: Path | str,
                      what: str = "HC from the mask") -> Path:
    """Left: predicted vs reference HC with the identity line. Right: Bland-Altman (difference pred - ref against
    the mean) with the bias and the limits of agreement bias +- 1.96 SD."""
    t, p = np.asarray(ref_mm, dtype=np.float64), np.asarray(pred_mm, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    if t.size == 0:
        raise ValueError(f"{_WHERE}: plot_hc_agreement: no finite (reference, predicted) pair")
    fig = Figure(figsize=(11.0, 5.0))
    ax, ba = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lo, hi = float(min(t.min(), p.min())) - 5.0, float(max(t.max(), p.max())) + 5.0
    ax.scatter(t, p, s=14, alpha=0.7, label=f"n = {t.size}")
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="identity")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", xlabel="reference HC (mm)", ylabel="predicted HC (mm)")
    diff, mean = p - t, (p + t) / 2.0
    ax.set_title(f"{what}: MAE {np.abs(diff).mean():.2f} mm")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    ba.scatter(mean, diff, s=14, alpha=0.7)
    for value, style, label in ((bias, "-", "bias"), (bias + 1.96 * sd, "--", "+1.96 SD"),
                                (bias - 1.96 * sd, "--", "−1.96 SD")):
        ba.axhline(value, color="C3", linestyle=style, linewidth=1, label=f"{label} ({value:+.2f} mm)")
    ba.set(xlabel="mean of reference and predicted HC (mm)", ylabel="predicted − reference (mm)",
           title="Bland–Altman")
    ba.legend(fontsize=8, loc="best")
    ba.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_dice_histogram(dice: Sequence[float], out_path: Path | str) -> Path:
    d = np.asarray(dice, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError(f"{_WHERE}: plot_dice_histogram: no finite Dice value")
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(d, bins=np.linspace(min(0.8, float(d.min())), 1.0, 41), color="C0", edgecolor="white")
    ax.axvline(float(d.mean()), color="C3", linestyle="--", label=f"mean {d.mean():.4f} (n = {d.size})")
    ax.set(xlabel="head Dice per image", ylabel="images", title="Segmentation Dice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def draw_head_overlay(image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                      out_path: Path | str, title: str = "", pixel_size_mm: float = math.nan,
                      fit_method: str = "moments") -> Path:
    """Image + predicted mask contour (yellow) + its fitted ellipse (dashed, `fit_method`) + predicted landmarks and
    axes; truth mask contour (cyan) and hollow truth landmarks when given; HC values in the corner: mm, or px with
    "pixel size unknown" where the spacing is not known."""
    known = math.isfinite(pixel_size_mm) and pixel_size_mm > 0
    scale, unit = (pixel_size_mm, "mm") if known else (1.0, "px")
    img = np.asarray(image_HW3)
    h, w = img.shape[:2]
    fig = Figure(figsize=(8.0, 8.0 * h / w + 0.4))
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    lines = []
    if truth is not None and truth.get("mask_HW") is not None and np.any(np.asarray(truth["mask_HW"]) == 1):
        ax.contour(np.asarray(truth["mask_HW"]) == 1, levels=[0.5], colors=["cyan"], linewidths=1.0)
    if pred.get("mask_HW") is not None and np.any(np.asarray(pred["mask_HW"]) == 1):
        mask = np.asarray(pred["mask_HW"]) == 1
        ax.contour(mask, levels=[0.5], colors=["yellow"], linewidths=1.0)
        e = ell.fit_ellipse_mask(mask, fit_method)
        if e.is_finite:
            o = ell.ellipse_outline(e)
            ax.plot(o[:, 0], o[:, 1], "--", color="#ff8c00", linewidth=1.2)
            lines.append(f"HC (mask)      {ell.ramanujan_perimeter(e.a, e.b) * scale:.1f} {unit}")
    k = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
    if k.shape[0] == 4:
        for i, j, colour in ((0, 1, "#ff4040"), (2, 3, "#40ff40")):
            ax.plot(k[[i, j], 0], k[[i, j], 1], "-", color=colour, linewidth=1.0)
        lines.append(f"HC (landmarks) {ell.hc_mm_from_landmarks(k, scale):.1f} {unit}")
    ax.scatter(k[:, 0], k[:, 1], s=28, c="yellow", edgecolors="black", zorder=5)
    for i, (x, y) in enumerate(k):
        ax.annotate(HC18_KPT_NAMES[i] if k.shape[0] == 4 else f"P{i + 1}", (x, y), xytext=(4, -4),
                    textcoords="offset points", color="yellow", fontsize=8)
    if truth is not None and truth.get("kpts_px_K2") is not None:
        t = np.asarray(truth["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        ax.scatter(t[:, 0], t[:, 1], s=50, facecolors="none", edgecolors="cyan", linewidths=1.4, zorder=4)
    if truth is not None and truth.get("hc_mm") is not None:
        lines.append(f"HC reference   {float(truth['hc_mm']):.1f} mm")
    if not known and lines:
        lines.append("pixel size unknown (predict --spacing-mm)")
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            family="monospace", color="white", bbox=dict(boxstyle="round", facecolor="black", alpha=0.6))
    image_axes(ax, w, h, title)
    fig.tight_layout()
    return _save(fig, out_path)
