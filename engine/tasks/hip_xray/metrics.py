"""Hip X-ray accumulator (docs/systems/hip_xray_efficientnet.md): 12 landmarks, acetabular index (AI) and IHDI grade of
each hip.

Metrics, all from sums and counts (engine/metrics.py explains why), in the ORIGINAL image frame:
- landmark error (engine/tasks/landmarks/metrics.py, shared by every task): Euclidean distance of visible landmarks
  in original pixels (mean over landmarks and images), as a percentage of the image diagonal hypot(H, W), and in mm
  through the sample's spacing (images whose spacing is not finite are left out of the mm figures only); per landmark
  `landmark_mre_px_<k>` (1-based, k = 1 is p1); SD, median, SDR (mm when every image has a spacing, else px), PCK.
- AI (engine/tasks/hip_xray/geometry.py): absolute error per hip where the truth's AI is defined (p1, p3, p7 visible for the
  left hip; p3, p7, p9 for the right). A prediction whose AI is undefined cannot be scored and is counted in
  `ai_undefined_pred` instead. ai_mae_deg pools both hips. Pearson r from moment sums (pooled and per side).
- IHDI: 4x4 confusion matrices (rows truth, columns prediction) per side, where the truth's grade is defined
  (p4, p6 resp. p10, p12 also visible); `ihdi_accuracy` = correct / (scored + predictions with undefined grade)
  over both hips: an undefined prediction counts as wrong, never as absent.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from engine.metrics import SummedState, pearson_r_from_sums

from ..landmarks.metrics import LandmarkMetrics
from .geometry import NUM_XRAY_LANDMARKS, XRAY_KPT_NAMES, acetabular_index_deg, ihdi_grades

_WHERE = "engine/tasks/hip_xray/metrics.py"
_AI_SHIFT_DEG = 20.0  # Pearson moments of (AI - 20): typical AI values, so the sums cancel less (r is shift-free)
SIDES = ("left", "right")            # hip order in every per-side array and key
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
        shapes = {"ai_abs_err_sum_2": (2,), "ai_count_2": (2,), "ai_moments_2x5": (2, 5), "ai_undefined_pred_2": (2,),
                  "ihdi_confusion_2x4x4": (2, 4, 4), "ihdi_undefined_pred_2": (2,), "num_images_1": (1,)}
        self._state = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
        self.landmarks = LandmarkMetrics(NUM_XRAY_LANDMARKS, self.kpt_names, keep_records=False)
        self._parts = {"landmarks": self.landmarks}

    # -------------------------------------------------------------------------------------------------- update
    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        """pred["kpts_px_K2"] and orig (truth, spacing, image) in the original frame; meta carries id / index."""
        p = _np(pred["kpts_px_K2"])
        t = _np(orig["kpts_px_K2"])
        vis = _np(orig["kpts_visible_K"], bool)
        if p.shape != (NUM_XRAY_LANDMARKS, 2) or t.shape != p.shape or vis.shape != (NUM_XRAY_LANDMARKS,):
            raise ValueError(f"{_WHERE}: sample {meta.get('id')}: want pred/true (12, 2) and visible (12,), got "
                             f"{p.shape}, {t.shape}, {vis.shape}")
        hw = orig["image_HW3"].shape[:2] if orig.get("image_HW3") is not None else meta["orig_hw"]
        rec = {"id": str(meta.get("id", orig.get("id"))), "index": int(meta.get("index", -1))}
        spacing = orig.get("spacing_mm_2")
        present, score = pred.get("kpt_present_K"), pred.get("kpt_score_K")
        rec.update(self.landmarks.update(
            p[None], t[None], vis[None], None if spacing is None else _np(spacing).reshape(1, 2),
            np.asarray(hw, dtype=np.float64).reshape(1, 2), None if present is None else _np(present, bool)[None],
            None if score is None else _np(score)[None], ids=[rec["id"]])[0])
        rec.update(self._update_hips(p, t, vis))
        self._state["num_images_1"] += 1
        if self.keep_records:
            self.records.append(rec)

    def _update_hips(self, p, t, vis) -> dict[str, Any]:
        ai_t, ai_p = np.stack(acetabular_index_deg(t)), np.stack(acetabular_index_deg(p))
        g_t, g_p = np.stack(ihdi_grades(t)), np.stack(ihdi_grades(p))
        rec: dict[str, Any] = {}
        s = self._state
        for i, side in enumerate(SIDES):
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
        lm = self.landmarks.compute()
        # the landmark figures this task has always reported first, in their order; the generic rest goes last
        out = {k: lm[k] for k in ("landmark_mre_px", "landmark_mre_pct_diag", "landmark_mre_mm",
                                  *(f"landmark_mre_px_{k + 1}" for k in range(NUM_XRAY_LANDMARKS)))}
        out["ai_mae_deg"] = _ratio(s["ai_abs_err_sum_2"].sum(), s["ai_count_2"].sum())
        pooled = s["ai_moments_2x5"].sum(0)
        out["ai_pearson_r"] = pearson_r_from_sums(s["ai_count_2"].sum(), *pooled)
        cm, undef = s["ihdi_confusion_2x4x4"], s["ihdi_undefined_pred_2"]
        out["ihdi_accuracy"] = _ratio(np.trace(cm[0]) + np.trace(cm[1]), cm.sum() + undef.sum())
        for i, side in enumerate(SIDES):
            out[f"ai_mae_{side}_deg"] = _ratio(s["ai_abs_err_sum_2"][i], s["ai_count_2"][i])
            out[f"ai_pearson_r_{side}"] = pearson_r_from_sums(s["ai_count_2"][i], *s["ai_moments_2x5"][i])
            out[f"ihdi_accuracy_{side}"] = _ratio(np.trace(cm[i]), cm[i].sum() + undef[i])
        out["ai_undefined_pred"] = float(s["ai_undefined_pred_2"].sum())
        out["ihdi_undefined_pred"] = float(undef.sum())
        out["num_hips_ihdi"] = float(cm.sum() + undef.sum())
        out["num_images"] = float(s["num_images_1"][0])
        out.update({k: v for k, v in lm.items() if k not in out})
        return out

    def confusion(self) -> np.ndarray:
        """(2, 4, 4) int64 IHDI confusion matrices [left, right] from the (reduced) sums."""
        return self._state["ihdi_confusion_2x4x4"].numpy().astype(np.int64)
