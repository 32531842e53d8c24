"""Figures of the hip X-ray task (docs/systems/hip_xray_efficientnet.md): per-landmark and AI error bars, IHDI confusion
matrices, AI agreement scatter plots, pixel-error vs angle-error scatter, and the per-image comparison (prediction vs
truth with roof lines, Hilgenreiner line, Perkin lines, H-points, AI values and IHDI grades).

Matplotlib object API only (engine/plots.py: Figure + Agg, no pyplot). Every function writes one PNG and returns it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from engine.plots import _line_across, _save, image_axes

from .geometry import P1, P3, P7, P9, acetabular_index_deg, hilgenreiner_frame, ihdi_grades, roman

_WHERE = "engine/tasks/hip_xray/plots.py"
GRADE_LABELS = ("I", "II", "III", "IV")


def plot_error_bars(names: Sequence[str], mean: Sequence[float], sd: Sequence[float] | None, out_path: Path | str,
                    ylabel: str, title: str = "") -> Path:
    """One bar per name (mean, +-1 SD whisker when given), value written above; NaN shown as 'n/a'."""
    m = np.asarray(mean, dtype=np.float64)
    if m.size == 0 or m.size != len(names):
        raise ValueError(f"{_WHERE}: plot_error_bars: {len(names)} names for {m.size} values")
    s = None if sd is None else np.nan_to_num(np.asarray(sd, dtype=np.float64))
    ok = np.isfinite(m)
    fig = Figure(figsize=(max(5.0, 0.6 * len(names) + 2.5), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, np.where(ok, m, 0.0), yerr=None if s is None else np.where(ok, s, 0.0), capsize=3,
           color=[f"C{i % 10}" for i in range(len(names))], edgecolor="black", linewidth=0.5)
    top = float(np.nanmax(np.where(ok, m + (0 if s is None else s), np.nan))) if ok.any() else 1.0
    for xi, v, good in zip(x, m, ok):
        ax.text(xi, (v if good else 0.0) + 0.01 * top, f"{v:.2f}" if good else "n/a", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.15 * max(top, 1e-9))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_confusion(cm_44: Any, out_path: Path | str, title: str) -> Path:
    """IHDI confusion matrix, rows = truth, columns = prediction, with counts and row percentages."""
    cm = np.asarray(cm_44, dtype=np.int64)
    if cm.shape != (4, 4):
        raise ValueError(f"{_WHERE}: plot_confusion wants a 4x4 matrix, got {cm.shape}")
    fig = Figure(figsize=(4.8, 4.3))
    ax = fig.add_subplot()
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(4):
        for j in range(4):
            ax.text(j, i, f"{cm[i, j]}\n{100 * frac[i, j]:.0f}%" if rows[i, 0] else "0", ha="center", va="center",
                    fontsize=9, color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(4))
    ax.set_yticks(range(4))
    ax.set_xticklabels(GRADE_LABELS)
    ax.set_yticklabels(GRADE_LABELS)
    ax.set_xlabel("predicted IHDI grade")
    ax.set_ylabel("true IHDI grade")
    total = cm.sum()
    acc = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"{title}: accuracy {100 * acc:.1f}% (n = {total})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def agreement_stats(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman rho, Kendall tau (scipy.stats), R^2 = 1 - SS_res / SS_tot of pred as an estimate of true
    (sklearn's r2_score convention), and the least-squares line pred = slope * true + intercept."""
    t, p = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    out = {"n": float(t.size)}
    if t.size < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        return {**out, **dict.fromkeys(("pearson", "spearman", "kendall", "r2", "slope", "intercept"), float("nan"))}
    ss_tot = float(((t - t.mean()) ** 2).sum())
    slope, intercept = np.polyfit(t, p, 1)
    return {**out, "pearson": float(stats.pearsonr(t, p)[0]), "spearman": float(stats.spearmanr(t, p)[0]),
            "kendall": float(stats.kendalltau(t, p)[0]), "r2": 1.0 - float(((p - t) ** 2).sum()) / ss_tot,
            "slope": float(slope), "intercept": float(intercept)}


def plot_ai_scatter(true_deg: Any, pred_deg: Any, out_path: Path | str, title: str) -> Path:
    """Predicted vs true acetabular index with the identity line, the regression line and the agreement stats."""
    t, p = np.asarray(true_deg, dtype=np.float64), np.asarray(pred_deg, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    if t.size == 0:
        raise ValueError(f"{_WHERE}: plot_ai_scatter: no pair of finite angles to plot")
    s = agreement_stats(t, p)
    lo, hi = float(min(t.min(), p.min())) - 2.0, float(max(t.max(), p.max())) + 2.0
    fig = Figure(figsize=(5.5, 5.2))
    ax = fig.add_subplot()
    ax.scatter(t, p, s=16, alpha=0.7)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="identity")
    if np.isfinite(s["slope"]):
        ax.plot([lo, hi], [s["slope"] * lo + s["intercept"], s["slope"] * hi + s["intercept"]], "C3-",
                label=f"fit y = {s['slope']:.2f}x + {s['intercept']:.1f}")
    ax.text(0.98, 0.02, f"n = {t.size}\nPearson r = {s['pearson']:.3f}\nSpearman ρ = {s['spearman']:.3f}\n"
            f"Kendall τ = {s['kendall']:.3f}\nR² = {s['r2']:.3f}\nMAE = {np.abs(p - t).mean():.2f}°",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, family="monospace",
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true acetabular index (deg)")
    ax.set_ylabel("predicted acetabular index (deg)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_error_scatter(px_err: Any, angle_err: Any, out_path: Path | str) -> Path:
    """Per-image mean landmark error (px) against the mean absolute AI error (deg), with Spearman rho."""
    x, y = np.asarray(px_err, dtype=np.float64), np.asarray(angle_err, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError(f"{_WHERE}: plot_error_scatter: no finite pair to plot")
    fig = Figure(figsize=(5.8, 4.5))
    ax = fig.add_subplot()
    ax.scatter(x[ok], y[ok], s=16, alpha=0.7)
    rho = float(stats.spearmanr(x[ok], y[ok])[0]) if ok.sum() > 1 and np.ptp(x[ok]) and np.ptp(y[ok]) else np.nan
    ax.set_xlabel("mean landmark error (px, original)")
    ax.set_ylabel("mean |AI error| over both hips (deg)")
    ax.set_title(f"landmark vs angle error (n = {ok.sum()}, Spearman ρ = {rho:.3f})", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def _draw_construction(ax, k: np.ndarray, w: int, h: int, colour: str, style: str, who: str) -> str:
    """Landmarks, roof lines p1-p3 / p7-p9, the H-line (through p3, p7), the P-lines (perpendicular to it through
    the projections of p1, p9) and the H-points; returns the AI / grade text of this set."""
    ok = np.isfinite(k).all(1)
    ax.scatter(k[ok, 0], k[ok, 1], s=22, c=colour, edgecolors="black", linewidths=0.5, zorder=5, label=who)
    for a, b in ((P1, P3), (P7, P9)):
        ax.plot(k[[a, b], 0], k[[a, b], 1], style, color=colour, linewidth=1.6)
    f = hilgenreiner_frame(k)
    seg = _line_across(k[P3], k[P7], w, h)
    if seg is not None:
        ax.plot(seg[:, 0], seg[:, 1], style, color=colour, linewidth=0.9, alpha=0.8)
    for o in (f["o_left"], f["o_right"]):
        seg = _line_across(o, o + f["u_p"], w, h) if np.isfinite(o).all() else None
        if seg is not None:
            ax.plot(seg[:, 0], seg[:, 1], style, color=colour, linewidth=0.9, alpha=0.8)
    hp = np.stack([f["h_left"], f["h_right"]])
    ax.scatter(hp[:, 0], hp[:, 1], s=70, marker="X", c=colour, edgecolors="black", linewidths=0.6, zorder=6)
    ai_l, ai_r = (float(a) for a in acetabular_index_deg(k))
    g_l, g_r = (int(g) for g in ihdi_grades(k))
    return f"{who:5s} AI L {ai_l:5.1f}° R {ai_r:5.1f}°  IHDI L {roman(g_l):>3s} R {roman(g_r):>3s}"


def plot_xray_comparison(image: Any, pred_kpts_K2: Any, out_path: Path | str, true_kpts_K2: Any = None,
                         title: str = "") -> Path:
    """The per-image figure: X-ray with the predicted construction (yellow, solid) and the truth (cyan, dashed)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"{_WHERE}: plot_xray_comparison wants a uint8 (H, W) or (H, W, 3) image, got "
                         f"{img.dtype} {img.shape}")
    h, w = img.shape[:2]
    fig = Figure(figsize=(8.0, 8.0 * h / w + 0.8))
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    lines = []
    if true_kpts_K2 is not None:
        lines.append(_draw_construction(ax, np.asarray(true_kpts_K2, dtype=np.float64).reshape(12, 2), w, h,
                                        "cyan", "--", "true"))
    lines.append(_draw_construction(ax, np.asarray(pred_kpts_K2, dtype=np.float64).reshape(12, 2), w, h,
                                    "yellow", "-", "pred"))
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            family="monospace", color="white", bbox=dict(boxstyle="round", facecolor="black", alpha=0.6))
    image_axes(ax, w, h, title)
    ax.legend(loc="lower right", fontsize=8, facecolor="#303030", labelcolor="white")
    fig.tight_layout()
    return _save(fig, out_path)
