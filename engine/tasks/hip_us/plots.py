"""Figures of the hip-ultrasound task (docs/systems/hip_us_multihipposenet.md): the overlay with the Graf construction
(baseline, bony and cartilage roof lines, alpha/beta and the type) and the alpha/beta agreement plots.

Matplotlib object API only (engine/plots.py: Figure + Agg, no pyplot). Every function writes one PNG and returns it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from engine.plots import _line_across, _save, plot_overlay

from .geometry import GRAF_ALPHA_THRESHOLD_DEG, NUM_HIP_LANDMARKS, graf_angles_deg

_WHERE = "engine/tasks/hip_us/plots.py"


# ------------------------------------------------------------------------------------------------------- overlay
def _angle_text(pred_K2: np.ndarray, true_K2: np.ndarray | None) -> str:
    alpha_p, beta_p = (float(a) for a in graf_angles_deg(pred_K2))
    lines = [f"pred  α = {alpha_p:.1f}°  β = {beta_p:.1f}°"
             + (f"  type {'II' if alpha_p < GRAF_ALPHA_THRESHOLD_DEG else 'I'}" if math.isfinite(alpha_p) else "")]
    if true_K2 is not None and np.isfinite(true_K2).all():
        alpha_t, beta_t = (float(a) for a in graf_angles_deg(true_K2))
        lines.append(f"true  α = {alpha_t:.1f}°  β = {beta_t:.1f}°"
                     + (f"  type {'II' if alpha_t < GRAF_ALPHA_THRESHOLD_DEG else 'I'}"
                        if math.isfinite(alpha_t) else ""))
    return "\n".join(lines)


def draw_graf_construction(ax, pred_K2: np.ndarray, true_K2: np.ndarray | None, w: int, h: int) -> list:
    """The predicted baseline P1-P2, bony roof P3-P5 and cartilage roof P4-P6 extended across the image, and the
    alpha/beta values (with the truth's when given) in the corner; returns the lines' legend handles. Nothing is
    drawn unless there are exactly six landmarks."""
    if pred_K2.shape[0] != NUM_HIP_LANDMARKS:
        return []
    handles = []
    for (i, j), style, colour, label in (((0, 1), "-", "white", "baseline P1–P2"),
                                         ((2, 4), "--", "#ff8c00", "bony roof P3–P5"),
                                         ((3, 5), "-.", "#00e676", "cartilage roof P4–P6")):
        seg = _line_across(pred_K2[i], pred_K2[j], w, h)
        if seg is not None:
            handles.append(ax.plot(seg[:, 0], seg[:, 1], style, color=colour, linewidth=1.4, label=label)[0])
    ax.text(0.01, 0.99, _angle_text(pred_K2, true_K2), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            family="monospace", bbox=dict(boxstyle="round", facecolor="black", alpha=0.6), color="white")
    return handles


def plot_hip_overlay(image: Any, pred_mask_HW: Any, pred_kpts_K2: Any, out_path: Path | str, true_mask_HW: Any = None,
                     true_kpts_K2: Any = None, class_names: Sequence[str] | None = None,
                     title: str | None = None) -> Path:
    """engine/plots.py's overlay (masks, landmarks, truth) with the Graf construction on top."""
    return plot_overlay(image, pred_mask_HW, pred_kpts_K2, out_path, true_mask_HW=true_mask_HW,
                        true_kpts_K2=true_kpts_K2, class_names=class_names, title=title,
                        decorate=draw_graf_construction)


# ------------------------------------------------------------------------------------------------ angle agreement
def _finite_pairs(true_deg: Any, pred_deg: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true_deg, dtype=np.float64).ravel()
    p = np.asarray(pred_deg, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{_WHERE}: {what}: true and pred have {t.size} and {p.size} values")
    ok = np.isfinite(t) & np.isfinite(p)
    if not ok.any():
        raise ValueError(f"{_WHERE}: {what}: no pair of finite angles to plot")
    return t[ok], p[ok]


def plot_angle_agreement(true_deg: Any, pred_deg: Any, out_path: Path | str, name: str = "alpha") -> Path:
    """Left: predicted vs true with the identity line, the least-squares line and Pearson r (for alpha, the 60 deg
    screening threshold on both axes, so the quadrants are the screening confusion). Right: Bland-Altman plot,
    difference (pred - true) vs mean, with the bias and the limits of agreement bias +/- 1.96 SD."""
    t, p = _finite_pairs(true_deg, pred_deg, "plot_angle_agreement")
    fig = Figure(figsize=(11.0, 5.0))
    ax, ba = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lo, hi = float(min(t.min(), p.min())) - 2.0, float(max(t.max(), p.max())) + 2.0
    ax.scatter(t, p, s=14, alpha=0.7, label=f"n = {t.size}")
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="identity")
    if t.size >= 2 and np.ptp(t) > 0 and np.ptp(p) > 0:
        slope, intercept = np.polyfit(t, p, 1)
        r = float(np.corrcoef(t, p)[0, 1])
        ax.plot([lo, hi], [slope * lo + intercept, slope * hi + intercept], "C3-", linewidth=1.2,
                label=f"fit y = {slope:.2f}x + {intercept:.1f}, r = {r:.3f}")
    if name == "alpha":
        for line in (ax.axvline, ax.axhline):
            line(GRAF_ALPHA_THRESHOLD_DEG, color="grey", linestyle=":", linewidth=1)
        ax.text(GRAF_ALPHA_THRESHOLD_DEG, lo, " type II | type I", fontsize=7, color="grey", va="bottom", ha="center")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true {name} (deg)")
    ax.set_ylabel(f"predicted {name} (deg)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)

    mean, diff = (t + p) / 2.0, p - t
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    ba.scatter(mean, diff, s=14, alpha=0.7)
    upper, lower = bias + 1.96 * sd, bias - 1.96 * sd
    for value, style, label in ((bias, "-", f"bias {bias:+.2f}°"), (upper, "--", f"+1.96 SD {upper:+.2f}°"),
                                (lower, "--", f"−1.96 SD {lower:+.2f}°")):
        ba.axhline(value, color="C3", linestyle=style, linewidth=1, label=label)
    ba.set_xlabel(f"mean of true and predicted {name} (deg)")
    ba.set_ylabel("predicted − true (deg)")
    ba.legend(fontsize=8, loc="best")
    ba.grid(True, alpha=0.3)
    ba.set_title("Bland–Altman")
    ax.set_title(f"{name}: MAE {np.abs(diff).mean():.2f}°")
    fig.tight_layout()
    return _save(fig, out_path)
