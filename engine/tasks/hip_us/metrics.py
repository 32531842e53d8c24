"""Hip-ultrasound accumulator (docs/systems/hip_us_multihipposenet.md): 7-structure segmentation, 6 landmarks, Graf
alpha/beta, screening.

Sums and counts only (engine/metrics.py explains why). Conventions:
- Segmentation: confusion matrix with rows = truth, columns = prediction (IoU from the summed matrix, NaN for a class
  absent from truth and prediction over the whole split; means skip NaN). Dice is per image, 2|P∩T|/(|P|+|T|),
  skipped where the class is absent in both. HD95 only where the class is present in both.
- Landmarks: engine/tasks/landmarks/metrics.py (LandmarkMetrics, one implementation for every task): only visible
  (and, when the decoder says so, present) ones count; distance in mm is sqrt((dx*sx)^2 + (dy*sy)^2) with spacing
  (sx, sy) mm/px. Per-landmark keys are 1-based (landmark_mre_px_1 is P1). SDR is always in mm here, at
  eval.sdr_radii_mm. SDR and angle-tolerance rates are percentages; screening accuracy/precision/recall, IoU, Dice,
  PCK and pixel accuracy are fractions in [0, 1]. The generic landmark figures (SD, median, PCK, ...) follow the
  figures the hip task has always reported, so their order in report.json is unchanged.
- Angles (Graf alpha/beta, engine/tasks/hip_us/geometry.py) only where all six landmarks are visible in the truth
  and both angles are defined. Screening: type II (alpha < 60 deg) is the positive class.
Radii and tolerances appear in keys formatted with `%g`: sdr_0.5mm, sdr_1mm, sdr_1.5mm, alpha_within_5deg.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from engine.metrics import (SummedState, confusion_matrix, hd95, iou_from_confusion, pearson_r_from_sums,
                            radius_tag, ratio, to_numpy)

from ..landmarks.metrics import LandmarkMetrics
from .geometry import NUM_HIP_LANDMARKS, graf_angles_deg, is_type_ii

_WHERE = "engine/tasks/hip_us/metrics.py"
_ANGLE_SHIFT_DEG = 60.0  # Pearson sums are taken of (angle - 60): r is shift-invariant, the sums cancel less.


class MetricAccumulator(SummedState):
    """One object per evaluation: `update` per batch, all-reduce `state()` (SUM), `load_state`, `compute`."""
    where = _WHERE

    def __init__(self, num_classes: int = 8, class_names: Sequence[str] | None = None,
                 sdr_radii_mm: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
                 angle_tolerances_deg: Sequence[float] = (3, 5, 10), hd95: bool = True,
                 keep_records: bool = True, num_keypoints: int = NUM_HIP_LANDMARKS,
                 kpt_names: Sequence[str] | None = None):
        if num_classes < 2:
            raise ValueError(f"{_WHERE}: num_classes must be >= 2 (background + one structure), got {num_classes}")
        names = list(class_names) if class_names is not None else \
            ["background"] + [f"class{c}" for c in range(1, num_classes)]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ValueError(f"{_WHERE}: class_names must be {num_classes} distinct names, got {names}")
        self.num_classes = num_classes
        self.class_names = names
        self.num_keypoints = int(num_keypoints)
        self.sdr_radii_mm = tuple(float(r) for r in sdr_radii_mm)
        self.angle_tolerances_deg = tuple(float(t) for t in angle_tolerances_deg)
        self.use_hd95 = bool(hd95)
        self.keep_records = bool(keep_records)
        self.records: list[dict[str, Any]] = []
        C, T = num_classes, len(self.angle_tolerances_deg)
        shapes = {
            "confusion_CC": (C, C), "dice_sum_C": (C,), "dice_count_C": (C,),
            "hd95_px_sum_C": (C,), "hd95_mm_sum_C": (C,), "hd95_count_C": (C,),
            # angles: index 0 = alpha, 1 = beta; moments = sums of x, y, xy, x^2, y^2 (x true, y pred, shifted)
            "angle_abs_err_sum_2": (2,), "angle_count_2": (2,), "angle_within_2T": (2, T),
            "angle_moments_2x5": (2, 5), "screening_tp_fp_fn_tn_4": (4,), "num_images_1": (1,),
        }
        self._state = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
        self.landmarks = LandmarkMetrics(self.num_keypoints, kpt_names, sdr_radii=self.sdr_radii_mm, sdr_unit="mm",
                                         keep_records=False)
        self._parts = {"landmarks": self.landmarks}

    # ------------------------------------------------------------------------------------------------------ update
    def update(self, pred_mask_BHW, true_mask_BHW, pred_kpts_BK2, true_kpts_BK2, visible_BK, spacing_mm_B2,
               ids: Sequence[Any] | None = None, present_BK=None, image_hw_B2=None) -> None:
        """Add one batch. Masks are (B, H, W) class ids (or both None: no segmentation); keypoints (B, K, 2) in
        pixels of the frame the masks/spacing belong to (or all three keypoint arguments None); spacing (B, 2)
        mm per pixel (x, y); optional: the decoder's presence (B, K) and the image sizes (B, 2) (H, W; else the
        masks' size, else unknown). Tensors on any device or numpy arrays."""
        spacing = to_numpy(spacing_mm_B2, "spacing_mm_B2", np.float64)
        if spacing is None or spacing.ndim != 2 or spacing.shape[1] != 2 or not np.all(spacing > 0):
            raise ValueError(f"{_WHERE}: spacing_mm_B2 must be (B, 2) positive mm/px, got "
                             f"{None if spacing is None else spacing.tolist()}")
        B = spacing.shape[0]
        if ids is not None and len(ids) != B:
            raise ValueError(f"{_WHERE}: {len(ids)} ids for a batch of {B}")
        seen = int(self._state["num_images_1"][0])  # default id: running image index within this accumulator
        recs = [{"id": ids[i] if ids is not None else seen + i} for i in range(B)]
        if (pred_mask_BHW is None) != (true_mask_BHW is None):
            raise ValueError(f"{_WHERE}: pass both pred and true masks, or neither")
        if pred_mask_BHW is not None:
            self._update_seg(to_numpy(pred_mask_BHW, "pred_mask_BHW"), to_numpy(true_mask_BHW, "true_mask_BHW"),
                             spacing, recs)
        kpts = (pred_kpts_BK2, true_kpts_BK2, visible_BK)
        if any(k is None for k in kpts) and not all(k is None for k in kpts):
            raise ValueError(f"{_WHERE}: pass pred_kpts_BK2, true_kpts_BK2 and visible_BK together, or none")
        if pred_kpts_BK2 is not None:
            if image_hw_B2 is None and pred_mask_BHW is not None:
                image_hw_B2 = np.tile(np.shape(pred_mask_BHW)[1:], (B, 1))
            self._update_points(to_numpy(pred_kpts_BK2, "pred_kpts_BK2", np.float64),
                                to_numpy(true_kpts_BK2, "true_kpts_BK2", np.float64),
                                to_numpy(visible_BK, "visible_BK", bool), spacing, image_hw_B2, present_BK, recs)
        self._add("num_images_1", [B])
        if self.keep_records:
            self.records.extend(recs)

    def _check_kpts(self, pred: np.ndarray, true: np.ndarray, vis: np.ndarray, B: int) -> None:
        want = (B, self.num_keypoints, 2)
        if pred.shape != want or true.shape != want or vis.shape != want[:2]:
            raise ValueError(f"{_WHERE}: keypoints must be {want} and visible_BK {want[:2]}; got pred {pred.shape}, "
                             f"true {true.shape}, visible {vis.shape}")
        for name, k in (("pred_kpts_BK2", pred), ("true_kpts_BK2", true)):
            if not np.isfinite(k[vis]).all():
                raise ValueError(f"{_WHERE}: {name} has non-finite coordinates at visible landmarks")

    def _update_seg(self, pred: np.ndarray, true: np.ndarray, spacing: np.ndarray, recs: list[dict]) -> None:
        if pred.shape[0] != len(recs):
            raise ValueError(f"{_WHERE}: masks hold {pred.shape[0]} images, spacing {len(recs)}")
        cm_BCC = confusion_matrix(pred, true, self.num_classes)
        self._add("confusion_CC", cm_BCC.sum(0))
        inter = np.diagonal(cm_BCC, axis1=1, axis2=2).astype(np.float64)
        denom = cm_BCC.sum(1) + cm_BCC.sum(2)  # |T| + |P| per image and class
        present = denom > 0
        dice_BC = np.divide(2.0 * inter, denom, out=np.full(inter.shape, np.nan), where=present)
        self._add("dice_sum_C", np.where(present, dice_BC, 0.0).sum(0))
        self._add("dice_count_C", present.sum(0))
        hd_px = np.full(inter.shape, np.nan)
        hd_mm = np.full(inter.shape, np.nan)
        if self.use_hd95:
            for b in range(pred.shape[0]):
                sx, sy = spacing[b]
                for c in range(1, self.num_classes):  # background HD95 is meaningless (and the costliest)
                    p, t = pred[b] == c, true[b] == c
                    hd_px[b, c] = hd95(p, t)
                    # isotropic spacing scales distances exactly; otherwise the nearest point may change
                    hd_mm[b, c] = hd_px[b, c] * sx if sx == sy else hd95(p, t, sampling_yx=(sy, sx))
            both = np.isfinite(hd_px)
            self._add("hd95_px_sum_C", np.where(both, hd_px, 0.0).sum(0))
            self._add("hd95_mm_sum_C", np.where(both, hd_mm, 0.0).sum(0))
            self._add("hd95_count_C", both.sum(0))
        for b, rec in enumerate(recs):
            rec["dice"] = {n: float(dice_BC[b, c]) for c, n in enumerate(self.class_names)}
            rec["hd95_px"] = {n: float(hd_px[b, c]) for c, n in enumerate(self.class_names) if c > 0}
            rec["hd95_mm"] = {n: float(hd_mm[b, c]) for c, n in enumerate(self.class_names) if c > 0}

    def _update_points(self, pred, true, vis, spacing, image_hw_B2, present_BK, recs: list[dict]) -> None:
        self._check_kpts(pred, true, vis, len(recs))
        per_image = self.landmarks.update(pred, true, vis, spacing, image_hw_B2, present_BK,
                                          ids=[r["id"] for r in recs])
        for rec, fields in zip(recs, per_image):
            rec.update(fields)
        if self.num_keypoints == NUM_HIP_LANDMARKS:
            self._update_angles(pred, true, vis, recs)

    def _update_angles(self, pred, true, vis, recs: list[dict]) -> None:
        alpha_t, beta_t = graf_angles_deg(true)
        alpha_p, beta_p = graf_angles_deg(pred)
        usable = vis.all(1)
        tol = np.asarray(self.angle_tolerances_deg)
        for i, (t, p) in enumerate(((alpha_t, alpha_p), (beta_t, beta_p))):
            ok = usable & np.isfinite(t) & np.isfinite(p)
            err = np.abs(p[ok] - t[ok])
            x, y = t[ok] - _ANGLE_SHIFT_DEG, p[ok] - _ANGLE_SHIFT_DEG
            self._state["angle_abs_err_sum_2"][i] += float(err.sum())
            self._state["angle_count_2"][i] += float(ok.sum())
            self._state["angle_within_2T"][i] += torch.from_numpy((err[:, None] <= tol[None, :]).sum(0) * 1.0)
            self._state["angle_moments_2x5"][i] += torch.tensor(
                [x.sum(), y.sum(), (x * y).sum(), (x * x).sum(), (y * y).sum()], dtype=torch.float64)
            if i == 0:  # screening on alpha: type II (alpha < 60 deg) is the positive class
                pos_t, pos_p = is_type_ii(t[ok]), is_type_ii(p[ok])
                self._add("screening_tp_fp_fn_tn_4", [(pos_t & pos_p).sum(), (~pos_t & pos_p).sum(),
                                                      (pos_t & ~pos_p).sum(), (~pos_t & ~pos_p).sum()])
        for b, rec in enumerate(recs):
            defined = bool(usable[b])
            for key, arr in (("alpha_true_deg", alpha_t), ("alpha_pred_deg", alpha_p),
                             ("beta_true_deg", beta_t), ("beta_pred_deg", beta_p)):
                rec[key] = float(arr[b]) if defined else float("nan")

    # ----------------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        """Final figures from the (reduced) sums; NaN where a figure has nothing to average."""
        s = {k: v.numpy() for k, v in self._state.items()}
        lm = self.landmarks.compute()
        out: dict[str, float] = {}
        out.update(self._seg_figures(s))
        out.update(self._landmark_figures(lm))
        out.update(self._angle_figures(s))
        out["num_images"] = float(s["num_images_1"][0])
        out.update({k: v for k, v in lm.items() if k not in out})
        return out

    def _seg_figures(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        cm = s["confusion_CC"]
        iou = iou_from_confusion(cm)
        fg_iou = iou[1:][np.isfinite(iou[1:])]
        all_iou = iou[np.isfinite(iou)]
        out = {"seg_miou": float(fg_iou.mean()) if fg_iou.size else float("nan"),
               "seg_miou_with_bg": float(all_iou.mean()) if all_iou.size else float("nan")}
        out.update({f"seg_iou_{n}": float(iou[c]) for c, n in enumerate(self.class_names)})
        out["seg_pixel_acc"] = ratio(np.trace(cm), cm.sum())
        out["seg_dice"] = ratio(s["dice_sum_C"][1:].sum(), s["dice_count_C"][1:].sum())
        out.update({f"seg_dice_{n}": ratio(s["dice_sum_C"][c], s["dice_count_C"][c])
                    for c, n in enumerate(self.class_names)})
        out["seg_hd95_px"] = ratio(s["hd95_px_sum_C"][1:].sum(), s["hd95_count_C"][1:].sum())
        out["seg_hd95_mm"] = ratio(s["hd95_mm_sum_C"][1:].sum(), s["hd95_count_C"][1:].sum())
        return out

    def _landmark_figures(self, lm: dict[str, float]) -> dict[str, float]:
        """The landmark figures the hip task has always reported, in their order (the generic rest goes last)."""
        keys = ["landmark_mre_px", "landmark_mre_mm", *(f"landmark_mre_px_{k + 1}" for k in range(self.num_keypoints)),
                "landmark_abs_dx_px", "landmark_abs_dy_px", *(k for k in lm if k.startswith("sdr_"))]
        return {k: lm[k] for k in keys}

    def _angle_figures(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, name in enumerate(("alpha", "beta")):
            n = s["angle_count_2"][i]
            out[f"{name}_mae_deg"] = ratio(s["angle_abs_err_sum_2"][i], n)
            for j, t in enumerate(self.angle_tolerances_deg):
                out[f"{name}_within_{radius_tag(t)}deg"] = ratio(s["angle_within_2T"][i, j], n, 100.0)
            sx, sy, sxy, sxx, syy = s["angle_moments_2x5"][i]
            out[f"{name}_pearson_r"] = pearson_r_from_sums(n, sx, sy, sxy, sxx, syy)
        tp, fp, fn, tn = s["screening_tp_fp_fn_tn_4"]
        out["screening_accuracy"] = ratio(tp + tn, tp + fp + fn + tn)
        out["screening_precision"] = ratio(tp, tp + fp)
        out["screening_recall"] = ratio(tp, tp + fn)
        return out
