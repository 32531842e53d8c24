"""Fetal head circumference (HC18, van den Heuvel et al. 2018): head segmentation, 4 axis landmarks, HC in mm.

Per image, in the original frame (engine/tasks/base.py):
- seg_dice: foreground (head) Dice 2|P & T| / (|P| + |T|), skipped where both are empty;
- HC from the mask: the predicted mask's ellipse (engine/ellipse.py, second-moment fit of the largest component)
  -> Ramanujan perimeter x pixel size, against the reference orig["hc_mm"] (HC18's official value; the truth mask's
  fitted HC when a reader gives none). Error = predicted - reference (signed: bias; absolute: MAE);
- HC from the landmarks: the ellipse spanned by the predicted axis ends, a = |ofd1 - ofd2| / 2, b = |bpd1 - bpd2| / 2;
- landmark radial error in px and mm (visible truth only).
An image whose prediction gives no ellipse (empty or tiny mask) is a failed measurement: it counts with a predicted HC
of 0, i.e. an error of the whole reference HC, so a model cannot improve hc_mae_mm by abstaining; failures are also
counted (hc_failures). The accumulator holds sums and counts only (all-reduce SUM, engine/metrics.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from data_pipelines.hc18 import HC18_KPT_NAMES
from engine import ellipse as ell
from engine.plots import _save, image_axes

from engine.metrics import SummedState

from .base import Task, figure_formatter, predict_originals, spread_picks

_WHERE = "engine/tasks/fetal_head.py"
# HC error sums: abs, signed, squared signed, count, failures (mask) / the same from landmarks
_HC_FIELDS = ("abs", "signed", "sq", "abs_rel", "count", "fail")


def _hc_errors(pred_mm: float, ref_mm: float) -> tuple[float, bool]:
    """(signed error, failed): a failed measurement (NaN) counts as predicted 0 (module docstring)."""
    failed = not math.isfinite(pred_mm)
    return (0.0 if failed else pred_mm) - ref_mm, failed


class FetalHeadAccumulator(SummedState):
    """update_sample / state / load_state / compute / records (engine/tasks/base.py)."""
    where = _WHERE

    def __init__(self, num_keypoints: int = 4, fit_method: str = "moments", keep_records: bool = True):
        self.num_keypoints, self.fit_method, self.keep_records = int(num_keypoints), fit_method, keep_records
        k = self.num_keypoints
        shapes = {"dice_sum_count_2": (2,), "hc_mask_6": (len(_HC_FIELDS),), "hc_lm_6": (len(_HC_FIELDS),),
                  "kpt_dist_px_sum_K": (k,), "kpt_dist_mm_sum_K": (k,), "kpt_count_K": (k,), "num_images_1": (1,)}
        self._state = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        self.records: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------------- cross-rank


    # -------------------------------------------------------------------------------------------------- update
    def _add_hc(self, key: str, pred_mm: float, ref_mm: float) -> float:
        if not math.isfinite(ref_mm):
            return math.nan
        err, failed = _hc_errors(pred_mm, ref_mm)
        self._add(key, [abs(err), err, err * err, abs(err) / ref_mm, 1.0, float(failed)])
        return err

    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        spacing = np.asarray(orig["spacing_mm_2"], dtype=np.float64).reshape(2)
        if not np.all(spacing > 0):
            raise ValueError(f"{_WHERE}: sample {meta.get('id')}: spacing_mm_2 must be positive, got {spacing}")
        px_mm = float(spacing[0])                      # HC18 pixels are isotropic
        rec: dict[str, Any] = {"id": meta.get("id", orig.get("id")), "pixel_size_mm": px_mm}
        true_mask = np.asarray(orig["mask_HW"]) == 1
        ref = orig.get("hc_mm")
        ref_mm = float(ref) if ref is not None else ell.hc_mm_from_mask(true_mask, px_mm, self.fit_method)
        rec["hc_ref_mm"] = ref_mm
        if pred.get("mask_HW") is not None:
            pred_mask = np.asarray(pred["mask_HW"]) == 1
            denom = int(pred_mask.sum() + true_mask.sum())
            dice = 2.0 * float((pred_mask & true_mask).sum()) / denom if denom else math.nan
            if denom:
                self._add("dice_sum_count_2", [dice, 1.0])
            e = ell.fit_ellipse_mask(pred_mask, self.fit_method)
            hc_mm = ell.ramanujan_perimeter(e.a, e.b) * px_mm if e.is_finite else math.nan
            rec.update(dice=dice, hc_pred_mm=hc_mm, hc_err_mm=self._add_hc("hc_mask_6", hc_mm, ref_mm),
                       ellipse_px=[e.cx, e.cy, e.a, e.b, e.angle_deg])
        kpts = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        if kpts.shape[0] != self.num_keypoints:
            raise ValueError(f"{_WHERE}: sample {rec['id']}: {kpts.shape[0]} predicted landmarks, expected "
                             f"{self.num_keypoints}")
        hc_lm = ell.hc_mm_from_landmarks(kpts, px_mm) if self.num_keypoints == 4 else math.nan
        rec.update(hc_lm_mm=hc_lm, hc_lm_err_mm=self._add_hc("hc_lm_6", hc_lm, ref_mm))
        self._update_landmarks(kpts, orig, spacing, rec)
        self._add("num_images_1", [1.0])
        if self.keep_records:
            self.records.append(rec)

    def _update_landmarks(self, kpts: np.ndarray, orig: dict[str, Any], spacing: np.ndarray, rec: dict) -> None:
        true = np.asarray(orig["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        vis = np.asarray(orig.get("kpts_visible_K", np.ones(len(true), bool)), dtype=bool) & np.isfinite(true).all(1)
        d = np.where(vis[:, None], kpts - true, 0.0)
        if not np.isfinite(d).all():
            raise ValueError(f"{_WHERE}: sample {rec['id']}: non-finite predicted landmark")
        dist_px, dist_mm = np.hypot(d[:, 0], d[:, 1]), np.hypot(d[:, 0] * spacing[0], d[:, 1] * spacing[1])
        self._add("kpt_dist_px_sum_K", dist_px)
        self._add("kpt_dist_mm_sum_K", dist_mm)
        self._add("kpt_count_K", vis)
        rec["kpts_pred_px"] = kpts.tolist()
        rec["kpt_err_px"] = np.where(vis, dist_px, np.nan).tolist()
        rec["kpt_err_mm"] = np.where(vis, dist_mm, np.nan).tolist()

    # ------------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        s = {k: v.numpy() for k, v in self._state.items()}
        ratio = (lambda a, b: float(a / b) if b > 0 else math.nan)
        out = {"seg_dice": ratio(*s["dice_sum_count_2"])}
        for key, prefix in (("hc_mask_6", "hc"), ("hc_lm_6", "hc_from_landmarks")):
            abs_, signed, sq, abs_rel, n, fail = s[key]
            out[f"{prefix}_mae_mm"] = ratio(abs_, n)
            out[f"{prefix}_bias_mm"] = ratio(signed, n)
            # SD of the signed error from sums: sqrt((S2 - S1^2 / n) / (n - 1)) (Bland-Altman limits = bias +- 1.96 SD)
            out[f"{prefix}_sd_mm"] = math.sqrt(max(sq - signed * signed / n, 0.0) / (n - 1)) if n > 1 else math.nan
            out[f"{prefix}_mape_pct"] = ratio(100.0 * abs_rel, n)
            out[f"{prefix}_failures"] = float(fail)
        n_k = s["kpt_count_K"]
        out["landmark_mre_px"] = ratio(s["kpt_dist_px_sum_K"].sum(), n_k.sum())
        out["landmark_mre_mm"] = ratio(s["kpt_dist_mm_sum_K"].sum(), n_k.sum())
        for k in range(self.num_keypoints):
            out[f"landmark_mre_px_{k + 1}"] = ratio(s["kpt_dist_px_sum_K"][k], n_k[k])
            out[f"landmark_mre_mm_{k + 1}"] = ratio(s["kpt_dist_mm_sum_K"][k], n_k[k])
        out["num_images"] = float(s["num_images_1"][0])
        return out


# ---------------------------------------------------------------------------------------------------------- figures
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
                      out_path: Path | str, title: str = "", pixel_size_mm: float = math.nan) -> Path:
    """Image + predicted mask contour (yellow) + its fitted ellipse (dashed) + predicted landmarks and axes; truth
    mask contour (cyan) and hollow truth landmarks when given; HC values in the corner."""
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
        e = ell.fit_ellipse_mask(mask)
        if e.is_finite:
            o = ell.ellipse_outline(e)
            ax.plot(o[:, 0], o[:, 1], "--", color="#ff8c00", linewidth=1.2)
            lines.append(f"HC (mask)      {ell.ramanujan_perimeter(e.a, e.b) * pixel_size_mm:.1f} mm")
    k = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
    if k.shape[0] == 4:
        for i, j, colour in ((0, 1, "#ff4040"), (2, 3, "#40ff40")):
            ax.plot(k[[i, j], 0], k[[i, j], 1], "-", color=colour, linewidth=1.0)
        lines.append(f"HC (landmarks) {ell.hc_mm_from_landmarks(k, pixel_size_mm):.1f} mm")
    ax.scatter(k[:, 0], k[:, 1], s=28, c="yellow", edgecolors="black", zorder=5)
    for i, (x, y) in enumerate(k):
        ax.annotate(HC18_KPT_NAMES[i] if k.shape[0] == 4 else f"P{i + 1}", (x, y), xytext=(4, -4),
                    textcoords="offset points", color="yellow", fontsize=8)
    if truth is not None and truth.get("kpts_px_K2") is not None:
        t = np.asarray(truth["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        ax.scatter(t[:, 0], t[:, 1], s=50, facecolors="none", edgecolors="cyan", linewidths=1.4, zorder=4)
    if truth is not None and truth.get("hc_mm") is not None:
        lines.append(f"HC reference   {float(truth['hc_mm']):.1f} mm")
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=9,
            family="monospace", color="white", bbox=dict(boxstyle="round", facecolor="black", alpha=0.6))
    image_axes(ax, w, h, title)
    fig.tight_layout()
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------------------------------ task
class FetalHeadTask(Task):
    name = "fetal_head"
    default_format = "hc18"
    headline = ("seg_dice", "hc_mae_mm", "landmark_mre_mm", "hc_from_landmarks_mae_mm")
    best_metric = "hc_mae_mm"
    best_mode = "min"
    shown = ("loss", "seg_dice", "hc_mae_mm", "landmark_mre_mm")

    def __init__(self, fit_method: str = "moments", num_overlays: int = 4):
        if fit_method not in ("moments", "conic"):
            raise ValueError(f"{_WHERE}: fit_method must be 'moments' or 'conic', got {fit_method!r}")
        self.fit_method, self.num_overlays = fit_method, int(num_overlays)

    def accumulator(self, cfg, data: dict[str, Any]) -> FetalHeadAccumulator:
        return FetalHeadAccumulator(num_keypoints=len(data.get("kpt_names") or HC18_KPT_NAMES),
                                    fit_method=self.fit_method)

    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        out_dir = Path(out_dir)
        written: list[Path] = []
        ref = [r.get("hc_ref_mm", math.nan) for r in records]
        for key, fname, what in (("hc_pred_mm", "hc_agreement.png", "HC from the mask"),
                                 ("hc_lm_mm", "hc_landmarks_agreement.png", "HC from the landmarks")):
            pred = [r.get(key, math.nan) for r in records]
            if np.sum(np.isfinite(ref) & np.isfinite(pred)) >= 2:
                written.append(plot_hc_agreement(ref, pred, out_dir / fname, what))
        dice = [r["dice"] for r in records if r.get("dice") is not None and math.isfinite(r["dice"])]
        if dice:
            written.append(plot_dice_histogram(dice, out_dir / "dice_histogram.png"))
        if model is not None and dataset is not None and self.num_overlays > 0:
            written += self._overlays(out_dir, records, model, dataset, decode)
        return written

    def _overlays(self, out_dir: Path, records, model, dataset, decode: Callable) -> list[Path]:
        return [draw_head_overlay(orig["image_HW3"], pred, orig, out_dir / f"overlay_{sid}.png", title=str(sid),
                                  pixel_size_mm=float(np.asarray(orig["spacing_mm_2"])[0]))
                for sid, orig, pred in predict_originals(
                    spread_picks(records, "hc_err_mm", self.num_overlays, by_abs_descending=True), model, dataset,
                    decode)]

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        f = figure_formatter(figures, digits=4)
        return [
            f" segmentation  head Dice {f('seg_dice')}",
            f" HC (mask)     MAE {f('hc_mae_mm', ' mm')}  bias {f('hc_bias_mm', ' mm')}  SD {f('hc_sd_mm', ' mm')}"
            f"  ({f('hc_mape_pct', ' %')}, failures {f('hc_failures')})",
            f" HC (landmarks) MAE {f('hc_from_landmarks_mae_mm', ' mm')}  bias {f('hc_from_landmarks_bias_mm', ' mm')}",
            f" landmarks     MRE {f('landmark_mre_px', ' px')} = {f('landmark_mre_mm', ' mm')}",
        ]

    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        px_mm = float(np.asarray(item.get("spacing_mm_2", [math.nan]), dtype=np.float64).reshape(-1)[0])
        r = (lambda v, d=2: round(float(v), d) if math.isfinite(v) else None)
        row: dict[str, Any] = {}
        if pred.get("mask_HW") is not None:
            e = ell.fit_ellipse_mask(np.asarray(pred["mask_HW"]) == 1, self.fit_method)
            row.update(hc_mm=r(ell.ramanujan_perimeter(e.a, e.b) * px_mm) if e.is_finite else None,
                       semi_major_mm=r(e.a * px_mm), semi_minor_mm=r(e.b * px_mm), angle_deg=r(e.angle_deg),
                       center_x=r(e.cx), center_y=r(e.cy))
        kpts = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        if kpts.shape[0] == 4:
            row["hc_from_landmarks_mm"] = r(ell.hc_mm_from_landmarks(kpts, px_mm))
        names = item.get("kpt_names") or list(HC18_KPT_NAMES)
        for k, (x, y) in enumerate(kpts):
            row[f"{names[k]}_x"], row[f"{names[k]}_y"] = r(x), r(y)
        truth = item.get("truth") or {}
        if truth.get("hc_mm") is not None:
            row["hc_ref_mm"] = r(truth["hc_mm"])
        return row

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        spacing = pred.get("spacing_mm_2")
        pixel_size_mm = float(np.asarray(spacing, dtype=float)[0]) if spacing is not None else math.nan
        return draw_head_overlay(image_HW3, pred, truth, out_path, title, pixel_size_mm)
