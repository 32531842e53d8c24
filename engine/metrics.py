"""Evaluation metrics that reduce correctly across ranks: every accumulator holds only sums and counts.

`MetricAccumulator.state()` is a dict of float64 tensors that ranks combine with all-reduce SUM; `compute()` turns
the (summed) state into the final figures. A per-rank mean followed by a mean over ranks is wrong whenever ranks see
different numbers of images, landmarks or pixels, so no mean is ever taken before the reduction.

Conventions (SEEDS.md §1, "Evaluation"):
- Segmentation: confusion matrix with rows = truth, columns = prediction. IoU_c = TP/(TP+FP+FN) from the summed
  matrix (NaN for a class absent from truth and prediction over the whole split; means skip NaN). Dice is per image,
  2|P∩T|/(|P|+|T|), skipped where the class is absent in both. HD95 = 95th percentile of the symmetric surface
  distances (boundary pixels = mask minus its 4-connected erosion), only where the class is present in both.
- Landmarks: only visible ones count; distance in mm is sqrt((dx*sx)^2 + (dy*sy)^2) with spacing (sx, sy) mm/px.
  Per-landmark keys are 1-based (landmark_mre_px_1 is P1). SDR and angle-tolerance rates are percentages;
  screening accuracy/precision/recall, IoU, Dice and pixel accuracy are fractions in [0, 1].
- Angles (Graf alpha/beta, engine/geometry.py) only where all six landmarks are visible in the truth and both angles
  are defined. Screening: type II (alpha < 60 deg) is the positive class.
Radii and tolerances appear in keys formatted with `%g`: sdr_0.5mm, sdr_1mm, sdr_1.5mm, alpha_within_5deg.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from engine.geometry import NUM_HIP_LANDMARKS, graf_angles_deg, is_type_ii

_WHERE = "engine/metrics.py"
_ANGLE_SHIFT_DEG = 60.0  # Pearson sums are taken of (angle - 60): r is shift-invariant, the sums cancel less.
_CROSS_3x3 = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------------------------- segmentation pieces
def confusion_matrix(pred_BHW: np.ndarray, true_BHW: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image confusion matrices (B, C, C), rows = truth, columns = prediction, int64 pixel counts."""
    pred = np.asarray(pred_BHW).astype(np.int64, copy=False)
    true = np.asarray(true_BHW).astype(np.int64, copy=False)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"{_WHERE}: masks must both be (B, H, W); got pred {pred.shape}, true {true.shape}")
    for name, m in (("pred", pred), ("true", true)):
        if m.size and (m.min() < 0 or m.max() >= num_classes):
            raise ValueError(f"{_WHERE}: {name} mask holds class ids in [{m.min()}, {m.max()}], outside "
                             f"[0, {num_classes - 1}] for num_classes={num_classes}")
    c2 = num_classes * num_classes
    idx = true * num_classes + pred + (np.arange(pred.shape[0]) * c2)[:, None, None]
    counts = np.bincount(idx.ravel(), minlength=pred.shape[0] * c2)
    return counts.reshape(pred.shape[0], num_classes, num_classes)


def iou_from_confusion(cm_CC: np.ndarray) -> np.ndarray:
    """IoU per class = TP / (TP + FP + FN); NaN where the class is in neither truth nor prediction."""
    cm = np.asarray(cm_CC, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)


def _boundary(mask_HW: np.ndarray) -> np.ndarray:
    # Outside the image counts as background (border_value=0), so an object cut by the frame has an edge there.
    return mask_HW & ~ndimage.binary_erosion(mask_HW, structure=_CROSS_3x3, border_value=0)


def hd95(pred_HW: np.ndarray, true_HW: np.ndarray, sampling_yx: Sequence[float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks, in the units of `sampling_yx`
    (row, column spacing). NaN when either mask is empty. The EDT runs on the union bounding box plus a 1-pixel
    margin: every boundary pixel of both masks lies inside it, so nearest-boundary distances are unchanged."""
    pred = np.asarray(pred_HW, dtype=bool)
    true = np.asarray(true_HW, dtype=bool)
    if not pred.any() or not true.any():
        return float("nan")
    rows, cols = np.nonzero(pred | true)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, pred.shape[0])
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, pred.shape[1])
    edge_p = _boundary(pred[r0:r1, c0:c1])
    edge_t = _boundary(true[r0:r1, c0:c1])
    to_true = ndimage.distance_transform_edt(~edge_t, sampling=sampling_yx)
    to_pred = ndimage.distance_transform_edt(~edge_p, sampling=sampling_yx)
    dists = np.concatenate([to_true[edge_p], to_pred[edge_t]])
    return float(np.percentile(dists, 95))


def pearson_r_from_sums(n: float, sx: float, sy: float, sxy: float, sxx: float, syy: float) -> float:
    """Pearson r = (n Sxy - Sx Sy) / sqrt((n Sxx - Sx^2)(n Syy - Sy^2)); NaN when n < 2 or a variance is 0."""
    if n < 2:
        return float("nan")
    var_x = max(n * sxx - sx * sx, 0.0)  # clamp tiny negative rounding
    var_y = max(n * syy - sy * sy, 0.0)
    if var_x == 0.0 or var_y == 0.0:
        return float("nan")
    return float(np.clip((n * sxy - sx * sy) / math.sqrt(var_x * var_y), -1.0, 1.0))


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
    return float(scale * num / den) if den > 0 else float("nan")


def _fmt(value: float) -> str:
    return f"{value:g}"


def _to_numpy(x: Any, name: str, dtype=None) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_WHERE}: {name} is not array-like ({err})") from None


# ----------------------------------------------------------------------------------------------------- accumulator
class SummedState:
    """Sums and counts that ranks combine with all-reduce SUM: subclasses fill `self._state` (name -> float64
    tensor) in __init__ and set `where` (the file named in errors)."""

    where = _WHERE
    _state: dict[str, torch.Tensor]

    def state(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Copies of every sum/count (float64), to be all-reduced with SUM; `device` for NCCL (GPU tensors)."""
        return {k: v.clone() if device is None else v.to(device, copy=True) for k, v in self._state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums with reduced ones; keys and shapes must match this accumulator's configuration."""
        if set(state) != set(self._state):
            raise ValueError(f"{self.where}: load_state keys differ: missing "
                             f"{sorted(set(self._state) - set(state))}, unexpected {sorted(set(state) - set(self._state))}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self._state[k].shape):
                raise ValueError(f"{self.where}: load_state: {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(self._state[k].shape)} (accumulators configured differently?)")
            self._state[k] = torch.as_tensor(v).detach().to("cpu", torch.float64).clone()

    def _add(self, key: str, value: Any) -> None:
        self._state[key] += torch.as_tensor(np.asarray(value, dtype=np.float64))


class MetricAccumulator(SummedState):
    """One object per evaluation: `update` per batch, all-reduce `state()` (SUM), `load_state`, `compute`."""

    def __init__(self, num_classes: int = 8, class_names: Sequence[str] | None = None,
                 sdr_radii_mm: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
                 angle_tolerances_deg: Sequence[float] = (3, 5, 10), hd95: bool = True,
                 keep_records: bool = True, num_keypoints: int = NUM_HIP_LANDMARKS):
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
        C, K, R, T = num_classes, self.num_keypoints, len(self.sdr_radii_mm), len(self.angle_tolerances_deg)
        shapes = {
            "confusion_CC": (C, C), "dice_sum_C": (C,), "dice_count_C": (C,),
            "hd95_px_sum_C": (C,), "hd95_mm_sum_C": (C,), "hd95_count_C": (C,),
            "kpt_dist_px_sum_K": (K,), "kpt_dist_mm_sum_K": (K,), "kpt_abs_dx_sum_K": (K,),
            "kpt_abs_dy_sum_K": (K,), "kpt_count_K": (K,), "sdr_hits_R": (R,),
            # angles: index 0 = alpha, 1 = beta; moments = sums of x, y, xy, x^2, y^2 (x true, y pred, shifted)
            "angle_abs_err_sum_2": (2,), "angle_count_2": (2,), "angle_within_2T": (2, T),
            "angle_moments_2x5": (2, 5), "screening_tp_fp_fn_tn_4": (4,), "num_images_1": (1,),
        }
        self._state = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}

    # ------------------------------------------------------------------------------------------------------ update
    def update(self, pred_mask_BHW, true_mask_BHW, pred_kpts_BK2, true_kpts_BK2, visible_BK, spacing_mm_B2,
               ids: Sequence[Any] | None = None) -> None:
        """Add one batch. Masks are (B, H, W) class ids (or both None: no segmentation); keypoints (B, K, 2) in
        pixels of the frame the masks/spacing belong to (or all three keypoint arguments None); spacing (B, 2)
        mm per pixel (x, y). Tensors on any device or numpy arrays."""
        spacing = _to_numpy(spacing_mm_B2, "spacing_mm_B2", np.float64)
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
            self._update_seg(_to_numpy(pred_mask_BHW, "pred_mask_BHW"), _to_numpy(true_mask_BHW, "true_mask_BHW"),
                             spacing, recs)
        kpts = (pred_kpts_BK2, true_kpts_BK2, visible_BK)
        if any(k is None for k in kpts) and not all(k is None for k in kpts):
            raise ValueError(f"{_WHERE}: pass pred_kpts_BK2, true_kpts_BK2 and visible_BK together, or none")
        if pred_kpts_BK2 is not None:
            pred = _to_numpy(pred_kpts_BK2, "pred_kpts_BK2", np.float64)
            true = _to_numpy(true_kpts_BK2, "true_kpts_BK2", np.float64)
            vis = _to_numpy(visible_BK, "visible_BK", bool)
            self._check_kpts(pred, true, vis, B)
            self._update_landmarks(pred, true, vis, spacing, recs)
            if self.num_keypoints == NUM_HIP_LANDMARKS:
                self._update_angles(pred, true, vis, recs)
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

    def _update_landmarks(self, pred, true, vis, spacing, recs: list[dict]) -> None:
        d_BK2 = np.where(vis[..., None], pred - true, 0.0)  # zeros at invisible points keep the sums clean
        dist_px = np.hypot(d_BK2[..., 0], d_BK2[..., 1])
        dist_mm = np.hypot(d_BK2[..., 0] * spacing[:, None, 0], d_BK2[..., 1] * spacing[:, None, 1])
        self._add("kpt_dist_px_sum_K", dist_px.sum(0))
        self._add("kpt_dist_mm_sum_K", dist_mm.sum(0))
        self._add("kpt_abs_dx_sum_K", np.abs(d_BK2[..., 0]).sum(0))
        self._add("kpt_abs_dy_sum_K", np.abs(d_BK2[..., 1]).sum(0))
        self._add("kpt_count_K", vis.sum(0))
        visible_mm = dist_mm[vis]
        self._add("sdr_hits_R", [(visible_mm <= r).sum() for r in self.sdr_radii_mm])
        for b, rec in enumerate(recs):
            rec["kpt_err_px"] = np.where(vis[b], dist_px[b], np.nan).tolist()
            rec["kpt_err_mm"] = np.where(vis[b], dist_mm[b], np.nan).tolist()

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
        out: dict[str, float] = {}
        out.update(self._seg_figures(s))
        out.update(self._landmark_figures(s))
        out.update(self._angle_figures(s))
        out["num_images"] = float(s["num_images_1"][0])
        return out

    def _seg_figures(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        cm = s["confusion_CC"]
        iou = iou_from_confusion(cm)
        fg_iou = iou[1:][np.isfinite(iou[1:])]
        all_iou = iou[np.isfinite(iou)]
        out = {"seg_miou": float(fg_iou.mean()) if fg_iou.size else float("nan"),
               "seg_miou_with_bg": float(all_iou.mean()) if all_iou.size else float("nan")}
        out.update({f"seg_iou_{n}": float(iou[c]) for c, n in enumerate(self.class_names)})
        out["seg_pixel_acc"] = _ratio(np.trace(cm), cm.sum())
        out["seg_dice"] = _ratio(s["dice_sum_C"][1:].sum(), s["dice_count_C"][1:].sum())
        out.update({f"seg_dice_{n}": _ratio(s["dice_sum_C"][c], s["dice_count_C"][c])
                    for c, n in enumerate(self.class_names)})
        out["seg_hd95_px"] = _ratio(s["hd95_px_sum_C"][1:].sum(), s["hd95_count_C"][1:].sum())
        out["seg_hd95_mm"] = _ratio(s["hd95_mm_sum_C"][1:].sum(), s["hd95_count_C"][1:].sum())
        return out

    def _landmark_figures(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        n = s["kpt_count_K"].sum()
        out = {"landmark_mre_px": _ratio(s["kpt_dist_px_sum_K"].sum(), n),
               "landmark_mre_mm": _ratio(s["kpt_dist_mm_sum_K"].sum(), n)}
        out.update({f"landmark_mre_px_{k + 1}": _ratio(s["kpt_dist_px_sum_K"][k], s["kpt_count_K"][k])
                    for k in range(self.num_keypoints)})
        out["landmark_abs_dx_px"] = _ratio(s["kpt_abs_dx_sum_K"].sum(), n)
        out["landmark_abs_dy_px"] = _ratio(s["kpt_abs_dy_sum_K"].sum(), n)
        out.update({f"sdr_{_fmt(r)}mm": _ratio(s["sdr_hits_R"][i], n, 100.0)
                    for i, r in enumerate(self.sdr_radii_mm)})
        return out

    def _angle_figures(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, name in enumerate(("alpha", "beta")):
            n = s["angle_count_2"][i]
            out[f"{name}_mae_deg"] = _ratio(s["angle_abs_err_sum_2"][i], n)
            for j, t in enumerate(self.angle_tolerances_deg):
                out[f"{name}_within_{_fmt(t)}deg"] = _ratio(s["angle_within_2T"][i, j], n, 100.0)
            sx, sy, sxy, sxx, syy = s["angle_moments_2x5"][i]
            out[f"{name}_pearson_r"] = pearson_r_from_sums(n, sx, sy, sxy, sxx, syy)
        tp, fp, fn, tn = s["screening_tp_fp_fn_tn_4"]
        out["screening_accuracy"] = _ratio(tp + tn, tp + fp + fn + tn)
        out["screening_precision"] = _ratio(tp, tp + fp)
        out["screening_recall"] = _ratio(tp, tp + fn)
        return out
