"""Generic landmark detection (`data.task=landmarks`): any number of named landmarks from any reader, no masks needed.

Figures are engine/tasks/landmarks/metrics.py's (MRE, SD and median in px and mm, SDR, outliers, PCK, per-landmark
MRE, misses); when the reader gives masks and the model segments, the foreground Dice and mIoU of the split follow
as `seg_dice` / `seg_miou` (engine/tasks/segmentation/metrics.py, without HD95). Options (eval.task_args):
    sdr_radii     radii of the success detection rates, mm when every image has a spacing, else px (2, 2.5, 3, 4)
    pck_ref       "bbox", "image" or two landmark names / 0-based indices (see the metrics module); pck_thr 0.05
    num_overlays  overlays of the best, median and worst images by MRE (3)
Report figures: error box per landmark, SDR curve, overlays, mean error on the mean truth shape. The landmark names
travel in every checkpoint (task state), so `medpose predict` names its columns without the data.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engine.metrics import SummedState, radius_tag
from engine.plots import plot_sdr_curve

from ..base import Task, figure_formatter, predict_originals, spread_picks
from ..segmentation.metrics import SegAccumulator
from .geometry import mean_shape
from .metrics import LandmarkMetrics, check_pck_ref
from .plots import plot_error_boxes, plot_error_heatmap, plot_landmark_overlay

_WHERE = "engine/tasks/landmarks/task.py"


def _safe(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:80]


def default_names(k: int) -> list[str]:
    return [f"L{i + 1}" for i in range(k)]


class LandmarksAccumulator(SummedState):
    """update_sample / state / load_state / compute / records (engine/tasks/base.py): the landmark sums, plus the
    segmentation sums when the reader has masks (num_classes >= 2)."""
    where = _WHERE

    def __init__(self, kpt_names: Sequence[str], sdr_radii: Sequence[float], pck_ref: Any, pck_thr: float,
                 num_classes: int = 0, class_names: Sequence[str] | None = None, keep_records: bool = True):
        self._state = {}
        self.landmarks = LandmarkMetrics(len(kpt_names), kpt_names, sdr_radii=sdr_radii, pck_ref=pck_ref,
                                         pck_thr=pck_thr, keep_records=False)
        self.seg = SegAccumulator(num_classes, class_names, use_hd95=False, keep_records=False) \
            if num_classes >= 2 else None
        self._parts = {"landmarks": self.landmarks, **({"seg": self.seg} if self.seg is not None else {})}
        self.keep_records = keep_records
        self.records: list[dict[str, Any]] = []

    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        rec = self.landmarks.update_sample(pred, orig, meta)
        if self.seg is not None and pred.get("mask_HW") is not None and orig.get("mask_HW") is not None:
            self.seg.update_sample(pred, orig, meta)
        if self.keep_records:
            self.records.append(rec)

    def compute(self) -> dict[str, float]:
        out = self.landmarks.compute()
        if self.seg is not None:
            seg = self.seg.compute()
            out.update(seg_dice=seg["dice"], seg_miou=seg["miou"])
        return out


class LandmarksTask(Task):
    name = "landmarks"
    default_format = "coco"
    best_metric = "landmark_mre_px"
    best_mode = "min"
    shown = ("loss", "landmark_mre_px", "landmark_mre_mm", "pck")

    def __init__(self, sdr_radii: Sequence[float] = (2.0, 2.5, 3.0, 4.0), pck_ref: Any = "bbox",
                 pck_thr: float = 0.05, num_overlays: int = 3):
        radii = (sdr_radii,) if isinstance(sdr_radii, (int, float)) else tuple(sdr_radii)
        if not radii or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in radii):
            raise ValueError(f"{_WHERE}: eval.task_args.sdr_radii must be one or more positive radii, "
                             f"got {sdr_radii!r}")
        check_pck_ref(pck_ref)
        if not (isinstance(pck_thr, (int, float)) and math.isfinite(pck_thr) and pck_thr > 0):
            raise ValueError(f"{_WHERE}: eval.task_args.pck_thr must be a positive fraction, got {pck_thr!r}")
        if int(num_overlays) < 0:
            raise ValueError(f"{_WHERE}: eval.task_args.num_overlays must be >= 0, got {num_overlays}")
        self.sdr_radii = tuple(float(r) for r in radii)
        self.pck_ref = list(pck_ref) if not isinstance(pck_ref, str) else pck_ref
        self.pck_thr, self.num_overlays = float(pck_thr), int(num_overlays)
        # report.json's leading keys; the SDR key's unit is settled by the data (headline_keys)
        self.headline = ("landmark_mre_px", "landmark_mre_mm", "landmark_median_mm",
                         f"sdr_{radius_tag(self.sdr_radii[0])}mm", "pck")
        self.kpt_names: list[str] = []

    def headline_keys(self, figures: dict[str, float]) -> tuple[str, ...]:
        """The headline with the SDR key in the unit these figures use (sdr_2mm, or sdr_2px without a spacing)."""
        sdr = next((k for k in figures if k.startswith("sdr_")), None)
        return tuple(sdr if k.startswith("sdr_") and sdr else k for k in self.headline)

    # landmark names travel in every checkpoint (task state), so `medpose predict` names its columns
    def fit(self, train_dataset) -> None:
        names = getattr(train_dataset, "kpt_names", None)
        if names:
            self.kpt_names = list(names)

    def state_dict(self) -> dict[str, Any]:
        return {"kpt_names": list(self.kpt_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kpt_names = list(state.get("kpt_names") or self.kpt_names)

    def accumulator(self, cfg, data: dict[str, Any]) -> LandmarksAccumulator:
        names = list(data.get("kpt_names") or self.kpt_names)
        if not names:
            raise ValueError(f"{_WHERE}: data.task=landmarks needs the reader's landmark names (data['kpt_names'] "
                             f"is empty): how many landmarks to score is unknown")
        self.kpt_names = names
        return LandmarksAccumulator(names, self.sdr_radii, self.pck_ref, self.pck_thr,
                                    num_classes=int(data.get("num_classes") or 0), class_names=data.get("class_names"))

    # ------------------------------------------------------------------------------------------------- figures
    def _names(self, dataset, k: int) -> list[str]:
        for names in (getattr(dataset, "kpt_names", None), self.kpt_names):
            if names and len(names) == k:
                return list(names)
        return default_names(k)

    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        out_dir = Path(out_dir)
        scored = [r for r in records if r.get("num_scored", 0) > 0]
        if not scored:
            return []
        k = len(scored[0]["kpt_err_px"])
        names = self._names(dataset, k)
        # mm when every image with a scored landmark has a spacing: the rule of the SDR figures
        unit = "mm" if all(math.isfinite(r["mre_mm"]) for r in scored) else "px"
        err_NK = np.array([r[f"kpt_err_{unit}"] for r in records], dtype=np.float64)
        written = [plot_error_boxes(err_NK.T, names, out_dir / "landmark_error_boxes.png", unit),
                   plot_sdr_curve(err_NK[np.isfinite(err_NK)], out_dir / "sdr_curve.png", radii_mm=self.sdr_radii,
                                  unit=unit)]
        shape = mean_shape(np.array([r["kpts_true_px"] for r in records], dtype=np.float64))
        with np.errstate(invalid="ignore"):
            mean_err = [figures.get(f"landmark_mre_{unit}_{i + 1}", float(np.nanmean(err_NK[:, i]))
                                    if np.isfinite(err_NK[:, i]).any() else math.nan) for i in range(k)]
        if (np.isfinite(shape).all(1) & np.isfinite(mean_err)).any():
            written.append(plot_error_heatmap(shape, mean_err, names, out_dir / "error_heatmap.png", unit))
        if model is not None and dataset is not None and self.num_overlays > 0:
            written += self._overlays(out_dir, records, model, dataset, decode, names)
        return written

    def _overlays(self, out_dir: Path, records, model, dataset, decode: Callable, names) -> list[Path]:
        """Best, median and worst images by MRE (px), spread evenly for another count."""
        picks = spread_picks(records, "mre_px", self.num_overlays)
        tags = ["best", "median", "worst"] if len(picks) == 3 else \
            ["best" if i == 0 else "worst" if i == len(picks) - 1 else f"rank{i + 1}" for i in range(len(picks))]
        tag_of, rec_of = dict(zip(picks, tags)), {r["id"]: r for r in records}
        written = []
        for sid, orig, pred in predict_originals(picks, model, dataset, decode):
            r = rec_of[sid]
            title = f"{tag_of[sid]}: {sid}   MRE {r['mre_px']:.2f} px" + \
                (f" = {r['mre_mm']:.2f} mm" if math.isfinite(r["mre_mm"]) else "")
            written.append(plot_landmark_overlay(
                orig["image_HW3"], pred["kpts_px_K2"], out_dir / f"overlay_{tag_of[sid]}_{_safe(sid)}.png",
                true_K2=orig["kpts_px_K2"], pred_present_K=pred.get("kpt_present_K"),
                true_visible_K=orig.get("kpts_visible_K"), names=names, title=title))
        return written

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        f = figure_formatter(figures)
        sdr = [k for k in figures if k.startswith("sdr_")]
        ref = self.pck_ref if isinstance(self.pck_ref, str) else "-".join(str(r) for r in self.pck_ref)
        lines = [
            f" landmarks     MRE {f('landmark_mre_px', ' px')} ± {f('landmark_sd_px', ' px')} = "
            f"{f('landmark_mre_mm', ' mm')} ± {f('landmark_sd_mm', ' mm')}",
            f"               median {f('landmark_median_px', ' px')} = {f('landmark_median_mm', ' mm')}   "
            f"{f('landmark_mre_pct_diag', ' %')} of the diagonal",
            "               SDR " + "   ".join(f"@{k[4:]} {f(k, ' %')}" for k in sdr) +
            f"   outliers {f('landmark_outlier_pct', ' %')}",
            f"               PCK@{self.pck_thr:g} of the {ref} distance {f('pck')}",
            f" images        {f('num_images', digits=6)}   landmarks scored {f('num_landmarks_scored', digits=6)}   "
            f"missed {f('landmark_missed', digits=6)}"]
        if "seg_dice" in figures:
            lines.append(f" segmentation  foreground Dice {f('seg_dice')}   mIoU {f('seg_miou')}")
        return lines

    # ------------------------------------------------------------------------------------------------- predict
    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        """<name>_x, <name>_y in original pixels (None where predicted absent) and <name>_conf when the decoder
        gives a confidence; names from the reader, else the checkpoint's, else L1..LK."""
        kpts = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        k = len(kpts)
        names = item.get("kpt_names") if item.get("kpt_names") and len(item["kpt_names"]) == k else \
            self._names(None, k)
        present = pred.get("kpt_present_K")
        score = pred.get("kpt_score_K")
        row: dict[str, Any] = {}
        for i, (x, y) in enumerate(kpts):
            ok = (present is None or bool(np.asarray(present).reshape(-1)[i])) and math.isfinite(x) and \
                math.isfinite(y)
            row[f"{names[i]}_x"] = round(float(x), 2) if ok else None
            row[f"{names[i]}_y"] = round(float(y), 2) if ok else None
            if score is not None:
                row[f"{names[i]}_conf"] = round(float(np.asarray(score, dtype=np.float64).reshape(-1)[i]), 4)
        return row

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        k = len(np.asarray(pred["kpts_px_K2"]).reshape(-1, 2))
        truth = truth or {}
        names = truth.get("kpt_names") if truth.get("kpt_names") and len(truth["kpt_names"]) == k else \
            self._names(None, k)
        return plot_landmark_overlay(image_HW3, pred["kpts_px_K2"], out_path, true_K2=truth.get("kpts_px_K2"),
                                     pred_present_K=pred.get("kpt_present_K"),
                                     true_visible_K=truth.get("kpts_visible_K"), names=names, title=title)
