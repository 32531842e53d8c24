"""Fetal head circumference (HC18, van den Heuvel et al. 2018): head segmentation, 4 axis landmarks, HC in mm.

What is measured per image, and why an image without an ellipse counts as a failed measurement, is the accumulator's
(engine/tasks/fetal_head/metrics.py); this task adds the figures (HC agreement and Bland-Altman plots, Dice
histogram, overlays of the worst, median and best images with the fitted ellipse), the summary and the predict row.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_pipelines.readers.hc18 import HC18_KPT_NAMES

from ..base import Task, figure_formatter, predict_originals, spread_picks
from ..postprocess import keep_largest_regions, parse_largest_component, resolve_classes, with_largest_regions
from . import ellipse as ell
from .metrics import FetalHeadAccumulator
from .plots import draw_head_overlay, plot_dice_histogram, plot_hc_agreement

_WHERE = "engine/tasks/fetal_head/task.py"


class FetalHeadTask(Task):
    name = "fetal_head"
    default_format = "hc18"
    needs_masks = True                         # HC comes from the head mask
    headline = ("seg_dice", "hc_mae_mm", "landmark_mre_mm", "hc_from_landmarks_mae_mm")
    best_metric = "hc_mae_mm"
    best_mode = "min"
    shown = ("loss", "seg_dice", "hc_mae_mm", "landmark_mre_mm")
    # a segmentation-only network (the zoo's unet_pp, u2net_small ...) is enough: HC comes from the mask, and the four
    # axis landmarks are the ends of the ellipse fitted to the mask (decoder below)
    landmarks_from_mask = True

    def __init__(self, fit_method: str = "moments", num_overlays: int = 4, largest_component: Any = False):
        if fit_method not in ell.FIT_METHODS:
            from engine.config import ConfigError      # engine.config imports the task registry
            raise ConfigError(f"eval.task_args.fit_method: expected one of {', '.join(ell.FIT_METHODS)}, got "
                              f"{fit_method!r} ({_WHERE})")
        self.fit_method, self.num_overlays = fit_method, int(num_overlays)
        # the head mask's largest region only (engine/tasks/postprocess.py): the ellipse is fitted to the largest
        # region anyway, so this changes the Dice and the predicted mask, not HC
        self.largest_component = parse_largest_component(largest_component)
        resolve_classes(self.largest_component, ["background", "head"], 2)

    def decoder(self, cfg) -> Callable[[dict], dict]:
        """The base decoder for models with a landmark head; for a segmentation-only model the landmarks are the axis
        ends [ofd1, ofd2, bpd1, bpd2] of the moment ellipse of each arg-max mask (input frame), score 1; an image
        without an ellipse (empty or tiny mask) gets all four at the frame's centre with score 0 (its HC from the
        mask is then a failed measurement, engine/tasks/fetal_head/metrics.py)."""
        base = super().decoder(cfg)
        fit_method = self.fit_method
        keep = resolve_classes(self.largest_component, ["background", "head"], 2)

        def decode(outputs: dict) -> dict:
            if outputs.get("heatmap_BKHW") is not None or outputs.get("kpts_px_BK2") is not None:
                return with_largest_regions(base(outputs), keep)
            logits = outputs.get("seg_logits_BCHW")
            if logits is None:
                raise KeyError(f"{_WHERE}: the model gives neither landmarks nor seg_logits_BCHW (got "
                               f"{sorted(outputs)})")
            mask = keep_largest_regions(logits.argmax(dim=1).to(torch.int64), keep)
            h, w = mask.shape[-2:]
            kpts, scores = [], []
            for m in mask.cpu().numpy():
                e = ell.fit_ellipse_mask(m == 1, fit_method)
                found = e.is_finite
                kpts.append(ell.axis_endpoints(e.cx, e.cy, e.a, e.b, e.angle_deg) if found
                            else np.tile([(w - 1) / 2.0, (h - 1) / 2.0], (4, 1)))
                scores.append(np.full(4, float(found)))
            k = torch.as_tensor(np.stack(kpts), dtype=torch.float32, device=logits.device)
            return {"kpts_px_BK2": k, "kpt_score_BK": torch.as_tensor(np.stack(scores), dtype=torch.float32,
                                                                      device=logits.device), "mask_BHW": mask,
                    "keep_largest_classes": keep}

        return decode

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
                                  pixel_size_mm=float(np.asarray(orig["spacing_mm_2"])[0]),
                                  fit_method=self.fit_method)
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
        return draw_head_overlay(image_HW3, pred, truth, out_path, title, pixel_size_mm, self.fit_method)
