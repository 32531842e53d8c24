"""Fetal-head accumulator (HC18, van den Heuvel et al. 2018): head Dice, HC from the mask and the landmarks.

Per image, in the original frame (engine/tasks/base.py):
- seg_dice: foreground (head) Dice 2|P & T| / (|P| + |T|), skipped where both are empty;
- HC from the mask: the predicted mask's ellipse (engine/tasks/fetal_head/ellipse.py: the largest component's
  second-moment fit, or eval.task_args.fit_method conic / robust)
  -> Ramanujan perimeter x pixel size, against the reference orig["hc_mm"] (HC18's official value; the truth mask's
  fitted HC when a reader gives none). Error = predicted - reference (signed: bias; absolute: MAE);
- HC from the landmarks: the ellipse spanned by the predicted axis ends, a = |ofd1 - ofd2| / 2, b = |bpd1 - bpd2| / 2;
- landmark radial error in px and mm (visible truth only) with the other generic landmark figures (SD, median,
  SDR, PCK; engine/tasks/landmarks/metrics.py, shared by every task).
An image whose prediction gives no ellipse (empty or tiny mask) is a failed measurement: it counts with a predicted HC
of 0, i.e. an error of the whole reference HC, so a model cannot improve hc_mae_mm by abstaining; failures are also
counted (hc_failures). The accumulator holds sums and counts only (all-reduce SUM, engine/metrics.py).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from engine.metrics import SummedState

from ..landmarks.metrics import LandmarkMetrics
from . import ellipse as ell

_WHERE = "engine/tasks/fetal_head/metrics.py"
# HC error sums: abs, signed, squared signed, count, failures (mask) / the same from landmarks
_HC_FIELDS = ("abs", "signed", "sq", "abs_rel", "count", "fail")


def _hc_errors(pred_mm: float, ref_mm: float) -> tuple[float, bool]:
    """(signed error, failed): a failed measurement (NaN) counts as predicted 0 (module docstring)."""
    failed = not math.isfinite(pred_mm)
    return (0.0 if failed else pred_mm) - ref_mm, failed


class FetalHeadAccumulator(SummedState):
    """update_sample / state / load_state / compute / records (engine/tasks/base.py)."""
    where = _WHERE

    def __init__(self, num_keypoints: int = 4, fit_method: str = "moments", keep_records: bool = True,
                 kpt_names: Sequence[str] | None = None):
        self.num_keypoints, self.fit_method, self.keep_records = int(num_keypoints), fit_method, keep_records
        shapes = {"dice_sum_count_2": (2,), "hc_mask_6": (len(_HC_FIELDS),), "hc_lm_6": (len(_HC_FIELDS),),
                  "num_images_1": (1,)}
        self._state = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        self.records: list[dict[str, Any]] = []
        self.landmarks = LandmarkMetrics(self.num_keypoints, kpt_names, keep_records=False)
        self._parts = {"landmarks": self.landmarks}

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
        self._update_landmarks(kpts, pred, orig, meta, spacing, rec)
        self._add("num_images_1", [1.0])
        if self.keep_records:
            self.records.append(rec)

    def _update_landmarks(self, kpts: np.ndarray, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any],
                          spacing: np.ndarray, rec: dict) -> None:
        true = np.asarray(orig["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        # a landmark the reader could not place (non-finite) is not visible, whatever the flag says
        vis = np.asarray(orig.get("kpts_visible_K", np.ones(len(true), bool)), dtype=bool) & np.isfinite(true).all(1)
        image = orig.get("image_HW3", orig.get("mask_HW"))
        hw = np.asarray(image).shape[:2] if image is not None else meta.get("orig_hw", (np.nan, np.nan))
        present, score = pred.get("kpt_present_K"), pred.get("kpt_score_K")
        rec.update(self.landmarks.update(
            kpts[None], true[None], vis[None], spacing[None], np.asarray(hw, dtype=np.float64).reshape(1, 2),
            None if present is None else np.asarray(present, dtype=bool)[None],
            None if score is None else np.asarray(score, dtype=np.float64)[None], ids=[rec["id"]])[0])

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
        lm = self.landmarks.compute()   # the keys this task has always reported, in their order; the rest last
        for key in ("landmark_mre_px", "landmark_mre_mm", *(f"landmark_mre_{u}_{k + 1}" for k in
                                                            range(self.num_keypoints) for u in ("px", "mm"))):
            out[key] = lm[key]
        out["num_images"] = float(s["num_images_1"][0])
        out.update({k: v for k, v in lm.items() if k not in out})
        return out
