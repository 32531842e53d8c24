"""Paediatric hip X-ray task (docs/systems/hip_xray_efficientnet.md): 12 landmarks, acetabular index (AI) and IHDI grade
of each hip.

The figures are engine/tasks/hip_xray/metrics.py's (definitions there); this module draws them (per-landmark and AI
error bars, IHDI confusion matrices, AI scatter plots, best / median / worst comparisons) and writes predict rows.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.metrics import to_numpy

from ..base import Task, figure_formatter
from . import plots as plots_xray
from .geometry import XRAY_KPT_NAMES, acetabular_index_deg, ihdi_grades, roman
from .metrics import SIDES, HipXrayAccumulator

_WHERE = "engine/tasks/hip_xray/task.py"


@contextlib.contextmanager
def _quiet():
    """Silence numpy's 'Mean of empty slice' RuntimeWarning: an all-NaN column is a legitimate NaN here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def _column(records: list[dict], key: str) -> np.ndarray:
    return np.array([r.get(key, float("nan")) for r in records], dtype=np.float64)


def confusion_from_records(records: list[dict[str, Any]], side: str) -> np.ndarray:
    """4x4 IHDI confusion (rows truth, columns prediction) of one side from per-image records."""
    cm = np.zeros((4, 4), dtype=np.int64)
    for r in records:
        t, p = int(r.get(f"ihdi_true_{side}", 0)), int(r.get(f"ihdi_pred_{side}", 0))
        if t > 0 and p > 0:
            cm[t - 1, p - 1] += 1
    return cm


class HipXrayTask(Task):
    name = "hip_xray"
    default_format = "xray_csv"
    num_keypoints = 12                         # AI and IHDI are built on p1..p12
    headline = ("landmark_mre_px", "landmark_mre_pct_diag", "ai_mae_deg", "ai_mae_left_deg", "ai_mae_right_deg",
                "ihdi_accuracy")
    best_metric = "landmark_mre_px"
    best_mode = "min"
    shown = ("loss", "landmark_mre_px", "ai_mae_deg", "ihdi_accuracy")

    def __init__(self, comparisons_per_bin: int = 3):
        if comparisons_per_bin < 0:
            raise ValueError(f"{_WHERE}: comparisons_per_bin must be >= 0, got {comparisons_per_bin}")
        self.comparisons_per_bin = int(comparisons_per_bin)

    def accumulator(self, cfg, data: dict[str, Any]) -> HipXrayAccumulator:
        return HipXrayAccumulator(kpt_names=data.get("kpt_names"))

    def decoder(self, cfg) -> Callable[[dict], dict]:
        """Regression outputs pass through; heatmaps (efficientnet_heatmap) are decoded with cfg.model.decode."""
        from models.codecs import decode_heatmaps
        method, sigma, peak = cfg.model.decode, cfg.data.sigma_px, cfg.data.heatmap_peak

        def decode(outputs: dict) -> dict:
            if outputs.get("kpts_px_BK2") is not None:
                return {"kpts_px_BK2": outputs["kpts_px_BK2"].detach().float()}
            if outputs.get("heatmap_BKHW") is None:
                raise KeyError(f"{_WHERE}: outputs hold neither 'kpts_px_BK2' nor 'heatmap_BKHW' ({sorted(outputs)})")
            xy, score = decode_heatmaps(outputs["heatmap_BKHW"].detach(), method, sigma, peak=peak)
            return {"kpts_px_BK2": xy, "kpt_score_BK": score}
        return decode

    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        out_dir = Path(out_dir)
        written: list[Path] = []
        if not records:
            return written
        names = list(getattr(dataset, "kpt_names", None) or XRAY_KPT_NAMES)
        err = np.array([r["kpt_err_px"] for r in records], dtype=np.float64)      # (N, 12), NaN = invisible
        with np.errstate(invalid="ignore"), _quiet():
            mean_k = np.array([figures.get(f"landmark_mre_px_{k + 1}", np.nanmean(err[:, k])) for k in range(12)])
            written.append(plots_xray.plot_error_bars(names, mean_k, np.nanstd(err, axis=0),
                                                      out_dir / "landmark_error_px.png", "mean error (px, original)",
                                                      "landmark error (mean ± SD)"))
            ai_err = {s: np.abs(_column(records, f"ai_pred_{s}_deg") - _column(records, f"ai_true_{s}_deg"))
                      for s in SIDES}
            written.append(plots_xray.plot_error_bars(
                ["left", "right"], [np.nanmean(ai_err[s]) for s in SIDES], [np.nanstd(ai_err[s]) for s in SIDES],
                out_dir / "ai_error.png", "|AI error| (deg)", "acetabular index error (mean ± SD)"))
        cms = {s: confusion_from_records(records, s) for s in SIDES}
        cms["all"] = cms["left"] + cms["right"]
        for s, cm in cms.items():
            written.append(plots_xray.plot_confusion(cm, out_dir / f"ihdi_confusion_{s}.png", f"IHDI {s}"))
        written.extend(self._scatter_figures(out_dir, records, ai_err))
        if dataset is not None and self.comparisons_per_bin > 0:
            written.extend(self._comparisons(out_dir / "comparisons", records, dataset))
        return written

    def _scatter_figures(self, out_dir: Path, records: list[dict], ai_err: dict[str, np.ndarray]) -> list[Path]:
        written = []
        true = {s: _column(records, f"ai_true_{s}_deg") for s in SIDES}
        pred = {s: _column(records, f"ai_pred_{s}_deg") for s in SIDES}
        true["all"], pred["all"] = np.concatenate([true["left"], true["right"]]), \
            np.concatenate([pred["left"], pred["right"]])
        for s in ("left", "right", "all"):
            if (np.isfinite(true[s]) & np.isfinite(pred[s])).any():
                written.append(plots_xray.plot_ai_scatter(true[s], pred[s], out_dir / f"ai_scatter_{s}.png",
                                                          f"acetabular index ({s})"))
        with np.errstate(invalid="ignore"), _quiet():
            angle = np.nanmean(np.stack([ai_err["left"], ai_err["right"]]), axis=0)
        px = _column(records, "mre_px")
        if (np.isfinite(px) & np.isfinite(angle)).any():
            written.append(plots_xray.plot_error_scatter(px, angle, out_dir / "pixel_vs_angle_error.png"))
        return written

    def _comparisons(self, out_dir: Path, records: list[dict], dataset) -> list[Path]:
        """Best / median / worst `comparisons_per_bin` images by mean landmark error."""
        ranked = sorted((r for r in records if math.isfinite(r["mre_px"]) and r["index"] >= 0),
                        key=lambda r: r["mre_px"])
        n, m = len(ranked), self.comparisons_per_bin
        mid = max(0, n // 2 - m // 2)
        bins = {"best": ranked[:m], "median": ranked[mid:mid + m], "worst": ranked[::-1][:m]}
        written = []
        for tag, recs in bins.items():
            for rank, r in enumerate(recs):
                orig = dataset.original(r["index"])
                title = (f"{tag} #{rank + 1}: {r['id']}  error {r['mre_px']:.1f} px "
                         f"({r['mre_pct_diag']:.2f}% of the diagonal)")
                written.append(plots_xray.plot_xray_comparison(
                    orig["image_HW3"], r["kpts_pred_px"], out_dir / f"{tag}_{rank + 1}_{_safe(r['id'])}.png",
                    true_kpts_K2=r["kpts_true_px"], title=title))
        return written

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        f = figure_formatter(figures)
        return [
            f" landmarks     MRE {f('landmark_mre_px', ' px')} = {f('landmark_mre_pct_diag', ' %')} of the diagonal"
            f" = {f('landmark_mre_mm', ' mm')}",
            f" acet. index   MAE {f('ai_mae_deg', '°')} (left {f('ai_mae_left_deg', '°')}, right "
            f"{f('ai_mae_right_deg', '°')})   Pearson r {f('ai_pearson_r')}",
            f" IHDI grade    accuracy {f('ihdi_accuracy', ' %', 100.0)} over {f('num_hips_ihdi')} hips "
            f"(left {f('ihdi_accuracy_left', ' %', 100.0)}, right {f('ihdi_accuracy_right', ' %', 100.0)})",
        ]

    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        kpts = to_numpy(pred["kpts_px_K2"], "kpts_px_K2", np.float64)
        ai_l, ai_r = (float(a) for a in acetabular_index_deg(kpts))
        g_l, g_r = (int(g) for g in ihdi_grades(kpts))
        row: dict[str, Any] = {"ai_left_deg": round(ai_l, 2) if math.isfinite(ai_l) else None,
                               "ai_right_deg": round(ai_r, 2) if math.isfinite(ai_r) else None,
                               "ihdi_left": roman(g_l) if g_l else None, "ihdi_right": roman(g_r) if g_r else None}
        names = item.get("kpt_names") or list(XRAY_KPT_NAMES)
        return {**row, **super().predict_row(pred, {**item, "kpt_names": names})}

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        true = None
        if truth is not None and truth.get("kpts_px_K2") is not None:
            true = to_numpy(truth["kpts_px_K2"], "truth kpts_px_K2", np.float64).copy()
            if truth.get("kpts_visible_K") is not None:
                true[~to_numpy(truth["kpts_visible_K"], "kpts_visible_K", bool)] = np.nan
        return plots_xray.plot_xray_comparison(image_HW3, pred["kpts_px_K2"], out_path, true_kpts_K2=true,
                                               title=title)

