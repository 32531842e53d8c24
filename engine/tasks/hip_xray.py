"""Paediatric hip X-ray (SEEDS.md §2): 12 landmarks, acetabular index (AI) and IHDI grade of each hip.

Metrics, all from sums and counts (engine/metrics.py explains why), in the ORIGINAL image frame:
- landmark error: Euclidean distance of visible landmarks in original pixels (mean over landmarks and images), as a
  percentage of the image diagonal hypot(H, W), and in mm through the sample's spacing (images whose spacing is not
  finite are left out of the mm figure only); per landmark `landmark_mre_px_<k>` (1-based, k = 1 is p1).
- AI (engine/geometry_xray.py): absolute error per hip where the truth's AI is defined (p1, p3, p7 visible for the
  left hip; p3, p7, p9 for the right). A prediction whose AI is undefined cannot be scored and is counted in
  `ai_undefined_pred` instead. ai_mae_deg pools both hips. Pearson r from moment sums (pooled and per side).
- IHDI: 4x4 confusion matrices (rows truth, columns prediction) per side, where the truth's grade is defined
  (p4, p6 resp. p10, p12 also visible); `ihdi_accuracy` = correct / (scored + predictions with undefined grade)
  over both hips: an undefined prediction counts as wrong, never as absent.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engine import plots_xray
from engine.geometry_xray import (NUM_XRAY_LANDMARKS, XRAY_KPT_NAMES, acetabular_index_deg, ihdi_grades, roman)
from engine.metrics import SummedState, pearson_r_from_sums

from .base import Task, figure_formatter

_WHERE = "engine/tasks/hip_xray.py"
_AI_SHIFT_DEG = 20.0  # Pearson moments of (AI - 20): typical AI values, so the sums cancel less (r is shift-free)
_SIDES = ("left", "right")
# landmarks (0-based) each side's AI / IHDI grade needs in the truth
_AI_NEEDS = ((0, 2, 6), (2, 6, 8))
_IHDI_NEEDS = ((0, 2, 3, 5, 6), (2, 6, 8, 9, 11))


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
    return float(scale * num / den) if den > 0 else float("nan")


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class HipXrayAccumulator(SummedState):
    """update_sample per image; state()/load_state() for the cross-rank SUM; compute(); records."""
    where = _WHERE

    def __init__(self, kpt_names: Sequence[str] | None = None, keep_records: bool = True):
        self.kpt_names = list(kpt_names or XRAY_KPT_NAMES)
        if len(self.kpt_names) != NUM_XRAY_LANDMARKS:
            raise ValueError(f"{_WHERE}: hip X-ray needs {NUM_XRAY_LANDMARKS} landmark names, got {self.kpt_names}")
        self.keep_records = keep_records
        self.records: list[dict[str, Any]] = []
        K = NUM_XRAY_LANDMARKS
        shapes = {"kpt_dist_px_sum_K": (K,), "kpt_dist_pct_sum_K": (K,), "kpt_count_K": (K,),
                  "kpt_dist_mm_sum_K": (K,), "kpt_mm_count_K": (K,),
                  "ai_abs_err_sum_2": (2,), "ai_count_2": (2,), "ai_moments_2x5": (2, 5), "ai_undefined_pred_2": (2,),
                  "ihdi_confusion_2x4x4": (2, 4, 4), "ihdi_undefined_pred_2": (2,), "num_images_1": (1,)}
        self._state = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}

    # ---------------------------------------------------------------------------------------------- cross-rank

    # -------------------------------------------------------------------------------------------------- update
    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        """pred["kpts_px_K2"] and orig (truth, spacing, image) in the original frame; meta carries id / index."""
        p = _np(pred["kpts_px_K2"])
        t = _np(orig["kpts_px_K2"])
        vis = _np(orig["kpts_visible_K"], bool)
        if p.shape != (NUM_XRAY_LANDMARKS, 2) or t.shape != p.shape or vis.shape != (NUM_XRAY_LANDMARKS,):
            raise ValueError(f"{_WHERE}: sample {meta.get('id')}: want pred/true (12, 2) and visible (12,), got "
                             f"{p.shape}, {t.shape}, {vis.shape}")
        if not np.isfinite(t[vis]).all() or not np.isfinite(p[vis]).all():
            raise ValueError(f"{_WHERE}: sample {meta.get('id')}: non-finite coordinates at visible landmarks")
        hw = orig["image_HW3"].shape[:2] if orig.get("image_HW3") is not None else meta["orig_hw"]
        rec = {"id": str(meta.get("id", orig.get("id"))), "index": int(meta.get("index", -1))}
        rec.update(self._update_points(p, t, vis, float(math.hypot(*hw)), orig.get("spacing_mm_2")))
        rec.update(self._update_hips(p, t, vis))
        self._state["num_images_1"] += 1
        if self.keep_records:
            rec["kpts_pred_px"] = p.round(3).tolist()
            rec["kpts_true_px"] = np.where(vis[:, None], t, np.nan).tolist()
            self.records.append(rec)

    def _update_points(self, p, t, vis, diag_px: float, spacing) -> dict[str, Any]:
        d = np.where(vis[:, None], p - t, 0.0)
        dist_px = np.hypot(d[:, 0], d[:, 1])
        s = self._state
        s["kpt_dist_px_sum_K"] += torch.from_numpy(dist_px)
        s["kpt_dist_pct_sum_K"] += torch.from_numpy(100.0 * dist_px / diag_px)
        s["kpt_count_K"] += torch.from_numpy(vis.astype(np.float64))
        sp = None if spacing is None else _np(spacing).reshape(-1)
        if sp is not None and sp.shape == (2,) and np.all(np.isfinite(sp)) and np.all(sp > 0):
            s["kpt_dist_mm_sum_K"] += torch.from_numpy(np.hypot(d[:, 0] * sp[0], d[:, 1] * sp[1]))
            s["kpt_mm_count_K"] += torch.from_numpy(vis.astype(np.float64))
        err = np.where(vis, dist_px, np.nan)
        n = int(vis.sum())
        return {"kpt_err_px": err.tolist(), "mre_px": float(dist_px.sum() / n) if n else float("nan"),
                "mre_pct_diag": float(100.0 * dist_px.sum() / n / diag_px) if n else float("nan")}

    def _update_hips(self, p, t, vis) -> dict[str, Any]:
        ai_t, ai_p = np.stack(acetabular_index_deg(t)), np.stack(acetabular_index_deg(p))
        g_t, g_p = np.stack(ihdi_grades(t)), np.stack(ihdi_grades(p))
        rec: dict[str, Any] = {}
        s = self._state
        for i, side in enumerate(_SIDES):
            ai_ok = bool(vis[list(_AI_NEEDS[i])].all()) and math.isfinite(ai_t[i])
            rec[f"ai_true_{side}_deg"] = float(ai_t[i]) if ai_ok else float("nan")
            rec[f"ai_pred_{side}_deg"] = float(ai_p[i])
            if ai_ok and math.isfinite(ai_p[i]):
                x, y = ai_t[i] - _AI_SHIFT_DEG, ai_p[i] - _AI_SHIFT_DEG
                s["ai_abs_err_sum_2"][i] += abs(ai_p[i] - ai_t[i])
                s["ai_count_2"][i] += 1
                s["ai_moments_2x5"][i] += torch.tensor([x, y, x * y, x * x, y * y], dtype=torch.float64)
            elif ai_ok:
                s["ai_undefined_pred_2"][i] += 1
            g_ok = bool(vis[list(_IHDI_NEEDS[i])].all()) and g_t[i] > 0
            rec[f"ihdi_true_{side}"] = int(g_t[i]) if g_ok else 0
            rec[f"ihdi_pred_{side}"] = int(g_p[i])
            if g_ok and g_p[i] > 0:
                s["ihdi_confusion_2x4x4"][i, g_t[i] - 1, g_p[i] - 1] += 1
            elif g_ok:
                s["ihdi_undefined_pred_2"][i] += 1
        return rec

    # ------------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        s = {k: v.numpy() for k, v in self._state.items()}
        n = s["kpt_count_K"].sum()
        out = {"landmark_mre_px": _ratio(s["kpt_dist_px_sum_K"].sum(), n),
               "landmark_mre_pct_diag": _ratio(s["kpt_dist_pct_sum_K"].sum(), n),
               "landmark_mre_mm": _ratio(s["kpt_dist_mm_sum_K"].sum(), s["kpt_mm_count_K"].sum())}
        out.update({f"landmark_mre_px_{k + 1}": _ratio(s["kpt_dist_px_sum_K"][k], s["kpt_count_K"][k])
                    for k in range(NUM_XRAY_LANDMARKS)})
        out["ai_mae_deg"] = _ratio(s["ai_abs_err_sum_2"].sum(), s["ai_count_2"].sum())
        pooled = s["ai_moments_2x5"].sum(0)
        out["ai_pearson_r"] = pearson_r_from_sums(s["ai_count_2"].sum(), *pooled)
        cm, undef = s["ihdi_confusion_2x4x4"], s["ihdi_undefined_pred_2"]
        out["ihdi_accuracy"] = _ratio(np.trace(cm[0]) + np.trace(cm[1]), cm.sum() + undef.sum())
        for i, side in enumerate(_SIDES):
            out[f"ai_mae_{side}_deg"] = _ratio(s["ai_abs_err_sum_2"][i], s["ai_count_2"][i])
            out[f"ai_pearson_r_{side}"] = pearson_r_from_sums(s["ai_count_2"][i], *s["ai_moments_2x5"][i])
            out[f"ihdi_accuracy_{side}"] = _ratio(np.trace(cm[i]), cm[i].sum() + undef[i])
        out["ai_undefined_pred"] = float(s["ai_undefined_pred_2"].sum())
        out["ihdi_undefined_pred"] = float(undef.sum())
        out["num_hips_ihdi"] = float(cm.sum() + undef.sum())
        out["num_images"] = float(s["num_images_1"][0])
        return out

    def confusion(self) -> np.ndarray:
        """(2, 4, 4) int64 IHDI confusion matrices [left, right] from the (reduced) sums."""
        return self._state["ihdi_confusion_2x4x4"].numpy().astype(np.int64)


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
                      for s in _SIDES}
            written.append(plots_xray.plot_error_bars(
                ["left", "right"], [np.nanmean(ai_err[s]) for s in _SIDES], [np.nanstd(ai_err[s]) for s in _SIDES],
                out_dir / "ai_error.png", "|AI error| (deg)", "acetabular index error (mean ± SD)"))
        cms = {s: confusion_from_records(records, s) for s in _SIDES}
        cms["all"] = cms["left"] + cms["right"]
        for s, cm in cms.items():
            written.append(plots_xray.plot_confusion(cm, out_dir / f"ihdi_confusion_{s}.png", f"IHDI {s}"))
        written.extend(self._scatter_figures(out_dir, records, ai_err))
        if dataset is not None and self.comparisons_per_bin > 0:
            written.extend(self._comparisons(out_dir / "comparisons", records, dataset))
        return written

    def _scatter_figures(self, out_dir: Path, records: list[dict], ai_err: dict[str, np.ndarray]) -> list[Path]:
        written = []
        true = {s: _column(records, f"ai_true_{s}_deg") for s in _SIDES}
        pred = {s: _column(records, f"ai_pred_{s}_deg") for s in _SIDES}
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
        kpts = _np(pred["kpts_px_K2"])
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
            true = _np(truth["kpts_px_K2"]).copy()
            if truth.get("kpts_visible_K") is not None:
                true[~_np(truth["kpts_visible_K"], bool)] = np.nan
        return plots_xray.plot_xray_comparison(image_HW3, pred["kpts_px_K2"], out_path, true_kpts_K2=true,
                                               title=title)

