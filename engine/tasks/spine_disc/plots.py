"""Figures of the disc-labelling task (docs/systems/spine_disc_hourglass.md): sagittal overlays, per-disc DTT bars, FN /
FP summary.

Images are the 2-D mid-sagittal views of data_pipelines/readers/nifti.py (rows superior -> inferior, columns anterior ->
posterior); points follow data_pipelines/batch.py ((x, y) = (column, row), pixel centres at integers). Pixels may be
anisotropic (A-P vs S-I spacing), so images are drawn with aspect = S-I spacing / A-P spacing to look anatomical.
Matplotlib's object API only (engine/plots.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from engine.plots import _save, image_axes, plot_per_class_bars

_WHERE = "engine/tasks/spine_disc/plots.py"
TRUTH_COLOUR, PRED_COLOUR = "#00e5ff", "#ffd400"


def _points(kpts: Any, flags: Any) -> tuple[np.ndarray, np.ndarray]:
    pts = np.asarray(kpts, dtype=np.float64).reshape(-1, 2)
    ok = np.ones(len(pts), bool) if flags is None else np.asarray(flags, dtype=bool).reshape(-1)
    return pts, ok & np.isfinite(pts).all(1)


def draw_disc_panel(ax, image_HW3: np.ndarray, pred_K2: Any, pred_present_K: Any, true_K2: Any = None,
                    true_visible_K: Any = None, names: Sequence[str] | None = None, spacing_mm_2: Any = None,
                    title: str = "") -> None:
    """One sagittal view on `ax`: truth as hollow cyan circles, predictions as yellow crosses, each with its disc
    name; a thin line joins each truth to the prediction of the same channel."""
    img = np.asarray(image_HW3)
    h, w = img.shape[:2]
    aspect = 1.0 if spacing_mm_2 is None else float(spacing_mm_2[1]) / float(spacing_mm_2[0])
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest", aspect=aspect)
    pred, pok = _points(pred_K2, pred_present_K)
    labels = list(names) if names is not None else [str(k + 1) for k in range(len(pred))]
    if true_K2 is not None:
        true, tok = _points(true_K2, true_visible_K)
        for k in np.flatnonzero(tok & pok[:len(tok)]):
            ax.plot([true[k, 0], pred[k, 0]], [true[k, 1], pred[k, 1]], "-", color="white", linewidth=0.6)
        ax.scatter(true[tok, 0], true[tok, 1], s=40, facecolors="none", edgecolors=TRUTH_COLOUR, linewidths=1.3,
                   zorder=4, label="truth")
        for k in np.flatnonzero(tok):
            ax.annotate(labels[k], true[k], xytext=(-5, 0), textcoords="offset points", color=TRUTH_COLOUR,
                        fontsize=6, ha="right", va="center")
    ax.scatter(pred[pok, 0], pred[pok, 1], s=30, marker="x", c=PRED_COLOUR, linewidths=1.3, zorder=5,
               label="predicted")
    for k in np.flatnonzero(pok):
        ax.annotate(labels[k], pred[k], xytext=(5, 0), textcoords="offset points", color=PRED_COLOUR, fontsize=6,
                    ha="left", va="center")
    image_axes(ax, w, h, title, fontsize=8)


def plot_disc_overlay(image_HW3: Any, pred_K2: Any, pred_present_K: Any, out_path: Path | str, true_K2: Any = None,
                      true_visible_K: Any = None, names: Sequence[str] | None = None, spacing_mm_2: Any = None,
                      title: str = "") -> Path:
    """One prediction over its sagittal image (truth too when given)."""
    img = np.asarray(image_HW3)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"{_WHERE}: plot_disc_overlay wants a uint8 (H, W[, 3]) image, got {img.dtype} {img.shape}")
    fig = Figure(figsize=(5.0, 7.0))
    ax = fig.add_subplot()
    draw_disc_panel(ax, img, pred_K2, pred_present_K, true_K2, true_visible_K, names, spacing_mm_2, title)
    ax.legend(loc="lower right", fontsize=7, facecolor="#303030", labelcolor="white", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_overlay_grid(items: Sequence[dict[str, Any]], out_path: Path | str, names: Sequence[str] | None = None,
                      cols: int = 3) -> Path:
    """A grid of sagittal overlays; each item: image_HW3, pred_K2, pred_present_K, true_K2, true_visible_K,
    spacing_mm_2 (optional), title."""
    if not items:
        raise ValueError(f"{_WHERE}: plot_overlay_grid: no images to draw")
    cols = max(1, min(cols, len(items)))
    rows = -(-len(items) // cols)
    fig = Figure(figsize=(3.4 * cols, 5.0 * rows))
    for n, it in enumerate(items):
        ax = fig.add_subplot(rows, cols, n + 1)
        draw_disc_panel(ax, it["image_HW3"], it["pred_K2"], it.get("pred_present_K"), it.get("true_K2"),
                        it.get("true_visible_K"), names, it.get("spacing_mm_2"), it.get("title", ""))
    fig.axes[0].legend(loc="lower right", fontsize=7, facecolor="#303030", labelcolor="white", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_dtt_per_disc(dtt_mm_K: Sequence[float], names: Sequence[str], out_path: Path | str) -> Path:
    """Mean distance to target per disc (mm), 'n/a' where the disc never had a prediction to measure."""
    if len(dtt_mm_K) != len(names):
        raise ValueError(f"{_WHERE}: {len(dtt_mm_K)} DTT values for {len(names)} disc names")
    return plot_per_class_bars(dict(zip(names, (float(v) for v in dtt_mm_K))), out_path,
                               ylabel="distance to target (mm)", title="DTT per disc")


def _rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(100.0 * num, den, out=np.full(num.shape, np.nan), where=den > 0)


def plot_fn_fp_summary(fn_K: Sequence[float], true_K: Sequence[float], fp_K: Sequence[float],
                       pred_K: Sequence[float], names: Sequence[str], out_path: Path | str) -> Path:
    """Per disc: false-negative rate (FN / true discs) and false-positive rate (FP / predictions of that channel),
    with the counts written on the bars and the overall FNR / FPR in the titles."""
    fn, tr, fp, pr = (np.asarray(v, dtype=np.float64) for v in (fn_K, true_K, fp_K, pred_K))
    if not (len(fn) == len(tr) == len(fp) == len(pr) == len(names)):
        raise ValueError(f"{_WHERE}: plot_fn_fp_summary: per-disc arrays and names differ in length")
    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 2.0), 6.5))
    x = np.arange(len(names))
    for row, (num, den, what, colour) in enumerate(((fn, tr, "false negatives (of true discs)", "#e6194b"),
                                                    (fp, pr, "false positives (of predictions)", "#4363d8"))):
        ax = fig.add_subplot(2, 1, row + 1)
        rate = _rate(num, den)
        ax.bar(x, np.nan_to_num(rate), color=colour, edgecolor="black", linewidth=0.5)
        top = max(10.0, float(np.nanmax(rate)) * 1.2 if np.isfinite(rate).any() else 10.0)
        for xi, n, d, r in zip(x, num, den, np.nan_to_num(rate)):
            ax.text(xi, r + 0.01 * top, f"{int(n)}/{int(d)}", ha="center", va="bottom", fontsize=7)
        total = 100.0 * num.sum() / den.sum() if den.sum() > 0 else float("nan")
        ax.set_title(f"{what}: {int(num.sum())}/{int(den.sum())} = {total:.3g} %", fontsize=9)
        ax.set_ylabel("%")
        ax.set_ylim(0, top)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)
