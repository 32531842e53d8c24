"""Generic report figures: training curves, prediction overlays, SDR curve, per-class bars, image axes.

Everything draws on `matplotlib.figure.Figure` objects and saves with the Agg renderer: no pyplot, no global backend
switch, no display, safe in worker threads. Every function writes one PNG (or several) and returns its path(s).
Points follow data_pipelines/batch.py: (x, y) = (column, row), pixel centres at integer coordinates, which is also
imshow's default extent, so landmarks and masks line up without offsets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

_WHERE = "engine/plots.py"
_DPI = 100
_CLASS_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                  "#bfef45", "#fabed4", "#469990", "#dcbeff"]


def _save(fig: Figure, out_path: Path | str, tight: bool = False) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight" if tight else None)  # tight: keep an outside legend
    return out


# ------------------------------------------------------------------------------------------------ training curves
_CURVES: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("curve_loss.png", ("loss", "loss_seg", "loss_kpt"), "loss", True),
    ("curve_landmark_error.png", ("landmark_mre_px",), "mean radial error (px)", False),
    ("curve_miou.png", ("seg_miou", "seg_dice"), "score", False),
    ("curve_angles.png", ("alpha_mae_deg", "beta_mae_deg"), "angle MAE (deg)", False),
    # the other tasks' headline figures (hip X-ray, spine discs, fetal head)
    ("curve_ai_error.png", ("ai_mae_deg", "ai_mae_left_deg", "ai_mae_right_deg"), "acetabular index MAE (deg)",
     False),
    ("curve_ihdi.png", ("ihdi_accuracy",), "IHDI grade accuracy", False),
    ("curve_disc_error.png", ("dtt_mm",), "distance to target (mm)", False),
    ("curve_disc_rates.png", ("fnr_pct", "fpr_pct"), "rate (%)", False),
    ("curve_head_circumference.png", ("hc_mae_mm", "hc_from_landmarks_mae_mm"), "HC MAE (mm)", False),
)


def image_axes(ax, w: int, h: int, title: str = "", fontsize: int = 10) -> None:
    """An image's axes in pixel coordinates (pixel centres at integers, y down), no ticks, with a title."""
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(title or "", fontsize=fontsize)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{_WHERE}: metrics file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{_WHERE}: {path} line {n} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{_WHERE}: {path} line {n} must be a JSON object with a 'step' field")
        rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], field: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one field for one split, sorted by step; null/non-numeric/non-finite values dropped
    (the run logger writes NaN as null)."""
    pts = [(float(r["step"]), float(r[field])) for r in rows
           if r.get("split", "train") == split and isinstance(r.get(field), (int, float))
           and not isinstance(r.get(field), bool) and math.isfinite(float(r[field]))]
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _centred_mean(vals: np.ndarray, window: int, log: bool) -> np.ndarray:
    """Centred moving average (shrinking at the ends): unlike an EMA it does not lag behind a falling loss.
    On a log axis the average is taken of log values (a geometric mean), which is what the eye reads there."""
    x = np.log(vals) if log else vals
    csum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(x.size)
    lo, hi = np.maximum(idx - window // 2, 0), np.minimum(idx + window // 2 + 1, x.size)
    smooth = (csum[hi] - csum[lo]) / (hi - lo)
    return np.exp(smooth) if log else smooth


def _draw_series(ax, rows, fields: Sequence[str], positive_only: bool) -> None:
    for fi, field in enumerate(fields):
        for split, style in (("train", "-"), ("val", "o-")):
            steps, vals = _series(rows, field, split)
            if positive_only:  # a log axis cannot show zero or negative losses
                steps, vals = steps[vals > 0], vals[vals > 0]
            if steps.size == 0:
                continue
            colour = f"C{fi}"
            if split == "train" and steps.size > 20:  # raw steps are noisy: faint raw line + smoothed line
                ax.plot(steps, vals, "-", color=colour, alpha=0.25, linewidth=0.8)
                vals = _centred_mean(vals, window=max(3, steps.size // 25), log=positive_only)
            ax.plot(steps, vals, style, color=colour, linewidth=1.5 if fi == 0 else 1.0,
                    markersize=3, alpha=1.0 if split == "val" else 0.9, label=f"{split} {field}")


def plot_training_curves(metrics_jsonl_path: Path | str, out_dir: Path | str) -> list[Path]:
    """One PNG per group of fields present in metrics.jsonl (loss, landmark error, mIoU/Dice, angle MAE); a
    group with no finite value is skipped. The loss figure is log-y and shows lr on a second axis when logged."""
    path = Path(metrics_jsonl_path)
    rows = _read_jsonl(path)
    written: list[Path] = []
    for fname, fields, ylabel, log_y in _CURVES:
        present = [f for f in fields if any(_series(rows, f, s)[0].size for s in ("train", "val"))]
        if not present:
            continue
        fig = Figure(figsize=(7.5, 4.5))
        ax = fig.add_subplot()
        _draw_series(ax, rows, present, positive_only=log_y)
        if log_y:
            ax.set_yscale("log")
        if fname == "curve_landmark_error.png":
            _twin_mm(ax, rows)
        if fname == "curve_loss.png":
            _twin_lr(ax, rows)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
        ax.set_title(f"{ylabel} — {path.parent.name or path.name}")
        fig.tight_layout()
        written.append(_save(fig, Path(out_dir) / fname))
    return written


def _twin_mm(ax, rows) -> None:
    for split in ("val", "train"):
        steps, vals = _series(rows, "landmark_mre_mm", split)
        if steps.size:
            twin = ax.twinx()
            twin.plot(steps, vals, "s--", color="C3", markersize=3, label=f"{split} landmark_mre_mm")
            twin.set_ylabel("mean radial error (mm)", color="C3")
            return


def _twin_lr(ax, rows) -> None:
    steps, lr = _series(rows, "lr", "train")
    keep = lr > 0
    if keep.any():
        twin = ax.twinx()
        twin.plot(steps[keep], lr[keep], ":", color="grey", linewidth=1.0)
        twin.set_yscale("log")
        twin.set_ylabel("learning rate (dotted)", color="grey")


# ------------------------------------------------------------------------------------------------------- overlay
def _line_across(p: np.ndarray, q: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """End points of the infinite line through p and q clipped to the image [-0.5, w-0.5] x [-0.5, h-0.5]
    (Liang-Barsky on the parameter t of p + t (q - p)); None for a degenerate or outside line."""
    d = q - p
    if not np.all(np.isfinite(d)) or np.hypot(*d) == 0:
        return None
    lo, hi = -np.inf, np.inf
    for axis, (a, b) in enumerate(((-0.5, w - 0.5), (-0.5, h - 0.5))):
        if d[axis] == 0:
            if not a <= p[axis] <= b:
                return None
            continue
        t1, t2 = (a - p[axis]) / d[axis], (b - p[axis]) / d[axis]
        lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
    if lo > hi:
        return None
    return np.stack([p + lo * d, p + hi * d])


def _as_image(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"{_WHERE}: plot_overlay wants a uint8 image of shape (H, W) or (H, W, 3), "
                         f"got {img.dtype} {img.shape}")
    return img


def _draw_masks(ax, pred: np.ndarray, true: np.ndarray | None, names: Sequence[str]) -> list[Patch]:
    overlay = np.zeros(pred.shape + (4,))
    handles = []
    classes = set(np.unique(pred).tolist()) | (set(np.unique(true).tolist()) if true is not None else set())
    for c in sorted(classes - {0}):
        colour = _CLASS_COLOURS[(c - 1) % len(_CLASS_COLOURS)]
        rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        overlay[pred == c] = np.append(rgb, 0.42)
        if true is not None and (true == c).any():  # truth as a contour in the same colour
            ax.contour((true == c).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        handles.append(Patch(facecolor=colour, alpha=0.6, label=names[c] if c < len(names) else f"class {c}"))
    ax.imshow(overlay, interpolation="nearest")
    return handles


def plot_overlay(image: Any, pred_mask_HW: Any, pred_kpts_K2: Any, out_path: Path | str,
                 true_mask_HW: Any = None, true_kpts_K2: Any = None, class_names: Sequence[str] | None = None,
                 title: str | None = None, decorate: Callable | None = None) -> Path:
    """Image + translucent predicted mask (None: landmarks only; legend per class) + predicted landmarks P1..PK.
    Truth, when given, as mask contours and hollow markers (non-finite truth points are not drawn).
    `decorate(ax, pred_K2, true_K2 or None, w, h) -> list of legend handles` draws what a task adds beneath the
    markers (the hip task's Graf lines and angles, engine/tasks/hip_us/plots.py)."""
    img = _as_image(image)
    h, w = img.shape[:2]
    pred_mask = np.zeros((h, w), np.int64) if pred_mask_HW is None else np.asarray(pred_mask_HW)
    true_mask = None if true_mask_HW is None else np.asarray(true_mask_HW)
    for name, m in (("pred_mask_HW", pred_mask), ("true_mask_HW", true_mask)):
        if m is not None and m.shape != (h, w):
            raise ValueError(f"{_WHERE}: plot_overlay: {name} has shape {m.shape}, image is {(h, w)}")
    pred_k = np.asarray(pred_kpts_K2, dtype=np.float64).reshape(-1, 2)
    true_k = None if true_kpts_K2 is None else np.asarray(true_kpts_K2, dtype=np.float64).reshape(-1, 2)
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(256)]

    fig = Figure(figsize=(10.0, 7.5 * h / w + 0.9))  # 7.5 in of image width + 2.5 in for the legend
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    handles = _draw_masks(ax, pred_mask.astype(np.int64), None if true_mask is None else true_mask.astype(np.int64),
                          names)
    if decorate is not None:
        handles += list(decorate(ax, pred_k, true_k, w, h))
    ok = np.isfinite(pred_k).all(1)
    handles.append(ax.scatter(pred_k[ok, 0], pred_k[ok, 1], s=30, c="yellow", edgecolors="black", zorder=5,
                              label="predicted"))
    for k in np.flatnonzero(ok):
        ax.annotate(f"P{k + 1}", pred_k[k], xytext=(4, -4), textcoords="offset points", color="yellow", fontsize=8)
    if true_k is not None:
        tok = np.isfinite(true_k).all(1)
        handles.append(ax.scatter(true_k[tok, 0], true_k[tok, 1], s=55, facecolors="none", edgecolors="cyan",
                                  linewidths=1.5, zorder=4, label="truth"))
    image_axes(ax, w, h, title)
    # dark legend so the white baseline and the yellow markers stay visible in it
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, facecolor="#303030",
              labelcolor="white", framealpha=1.0)
    fig.tight_layout()
    return _save(fig, out_path, tight=True)


# ------------------------------------------------------------------------------------------------------ SDR curve
def plot_sdr_curve(dist_mm: Any, out_path: Path | str, radii_mm: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
                   max_radius_mm: float | None = None, label: str | None = None, unit: str = "mm") -> Path:
    """Success detection rate (% of landmarks within r) as a function of r; non-finite distances (invisible
    landmarks) are dropped; the standard radii are marked with their rates. Distances and radii are in `unit`
    (mm, or px where the spacing is unknown)."""
    d = np.asarray(dist_mm, dtype=np.float64).ravel()
    d = np.sort(d[np.isfinite(d)])
    if d.size == 0:
        raise ValueError(f"{_WHERE}: plot_sdr_curve: no finite distance to plot")
    r_max = max_radius_mm or 1.05 * max(max(radii_mm), float(np.percentile(d, 95)))
    r = np.linspace(0.0, r_max, 400)
    rate = 100.0 * np.searchsorted(d, r, side="right") / d.size
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    ax.plot(r, rate, "-", linewidth=1.8, label=label or f"n = {d.size} landmarks")
    marks = np.asarray(radii_mm, dtype=np.float64)
    mark_rate = 100.0 * np.searchsorted(d, marks, side="right") / d.size
    ax.plot(marks, mark_rate, "o", color="C3")
    for x, y in zip(marks, mark_rate):
        ax.annotate(f"{y:.1f}%", (x, y), xytext=(0, -12), textcoords="offset points", fontsize=7, ha="center")
    ax.set_xlim(0.0, r_max)
    ax.set_ylim(0.0, 102.0)
    ax.set_xlabel(f"radius ({unit})")
    ax.set_ylabel("success detection rate (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------------------- per-class bars
def plot_per_class_bars(values: Mapping[str, float], out_path: Path | str, ylabel: str,
                        title: str | None = None) -> Path:
    """One bar per name with its value written above it; NaN values (nothing to average) are shown as 'n/a'."""
    if not values:
        raise ValueError(f"{_WHERE}: plot_per_class_bars: no values to plot")
    names = list(values)
    vals = np.array([float(values[n]) for n in names])
    finite = np.isfinite(vals)
    fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2.0), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    colours = [_CLASS_COLOURS[i % len(_CLASS_COLOURS)] for i in range(len(names))]
    ax.bar(x, np.where(finite, vals, 0.0), color=colours, edgecolor="black", linewidth=0.5)
    top = float(vals[finite].max()) if finite.any() else 1.0
    for xi, v, ok in zip(x, vals, finite):
        ax.text(xi, (v if ok else 0.0) + 0.01 * max(top, 1e-9), f"{v:.3g}" if ok else "n/a",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(0.0, float(vals[finite].min()) if finite.any() else 0.0), 1.12 * max(top, 1e-9))
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------------------ robustness curves
def robustness_curves(table: Mapping[str, Mapping[str, Mapping[str, float | None]]]
                      ) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, str]]]:
    """{kind: {figure: (levels, values divided by the figure's clean value, legend label)}} of a robustness table
    (kind -> level -> figures, level 0 = clean). Figures have different units, so each is drawn relative to its value
    at level 0 (1 = unchanged); a figure whose clean value is 0 or undefined is divided by its largest magnitude
    instead (the label says so). Undefined values are left out of the line."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray, str]]] = {}
    for kind, rows in table.items():
        levels = sorted(rows, key=float)
        keys = list(next(iter(rows.values()))) if rows else []
        curves = {}
        for key in keys:
            vals = np.array([np.nan if rows[lv].get(key) is None else float(rows[lv][key]) for lv in levels])
            ok = np.isfinite(vals)
            if not ok.any():
                continue
            x = np.array([float(lv) for lv in levels])
            clean = vals[x == 0.0][0] if (x == 0.0).any() else np.nan
            if np.isfinite(clean) and clean != 0.0:
                scale, label = abs(clean), f"{key} (clean {clean:.4g})"
            else:
                scale = float(np.abs(vals[ok]).max()) or 1.0
                label = f"{key} (÷ max {scale:.4g})"
            curves[key] = (x[ok], vals[ok] / scale, label)
        out[kind] = curves
    return out


def plot_robustness(table: Mapping[str, Mapping[str, Mapping[str, float | None]]], out_path: Path | str,
                    level_names: Mapping[str, str] | None = None) -> Path:
    """One panel per corruption kind: each headline figure against the corruption level, relative to its clean
    value (robustness_curves); the x axis is linear near 0 and logarithmic above the smallest positive level, so
    levels spanning decades (0.0001 ... 0.02) are all visible."""
    curves = robustness_curves(table)
    if not curves:
        raise ValueError(f"{_WHERE}: plot_robustness: an empty robustness table")
    n = len(curves)
    fig = Figure(figsize=(5.6 * n, 4.4))
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    for ax, (kind, lines) in zip(axes, curves.items()):
        positive = [float(lv) for lv in table[kind] if float(lv) > 0]
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        for i, (key, (x, y, label)) in enumerate(lines.items()):
            ax.plot(x, y, "o-", color=f"C{i % 10}", linewidth=1.5, markersize=4, label=label)
        ticks = sorted(float(lv) for lv in table[kind])
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks], rotation=45 if len(ticks) > 4 else 0, fontsize=8)
        ax.minorticks_off()
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"{kind}: {(level_names or {}).get(kind, 'level')}", fontsize=9)
        ax.set_ylabel("figure / its clean value")
        ax.set_title(kind)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return _save(fig, out_path, tight=True)
