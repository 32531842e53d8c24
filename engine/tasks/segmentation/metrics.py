"""Segmentation accumulator (data.task=segmentation, docs/systems/segmentation_zoo.md): confusion matrix, Dice / IoU,
HD95.

Metrics, from sums that ranks all-reduce (engine/metrics.py):
  * the confusion matrix over the whole split (original frame): per class Dice 2TP / (2TP + FP + FN) and IoU
    TP / (TP + FP + FN); `dice` / `miou` average the foreground classes, `dice_with_bg` / `miou_with_bg` include
    the background class, as the published tables do (a model that predicts background everywhere scores ~0.5
    there and 0 on the foreground figures);
  * per-image foreground Dice averaged over images (`dice_per_image`);
  * HD95 per foreground class and image (px and mm), averaged over the images where both masks are non-empty;
  * pixel accuracy.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from engine.metrics import SummedState, confusion_matrix, hd95

_WHERE = "engine/tasks/segmentation/metrics.py"


def dice_iou_from_confusion(cm_CC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU from a confusion matrix (rows truth, columns prediction); NaN for a class absent from
    both truth and prediction."""
    cm = np.asarray(cm_CC, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice, iou


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


class SegAccumulator(SummedState):
    """update_sample / state / load_state / compute / records (engine/tasks/base.py)."""
    where = _WHERE

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, use_hd95: bool = True,
                 keep_records: bool = True):
        if num_classes < 2:
            raise ValueError(f"{_WHERE}: segmentation needs >= 2 classes (background + one), got {num_classes}; "
                             f"the reader of data.format gives no masks")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else \
            ["background"] + [f"class{c}" for c in range(1, num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{_WHERE}: {len(self.class_names)} class names for {num_classes} classes")
        self.use_hd95, self.keep_records = use_hd95, keep_records
        C = self.num_classes
        shapes = {"confusion_CC": (C, C), "img_dice_sum_count_2": (2,), "hd95_px_sum_C": (C,),
                  "hd95_mm_sum_C": (C,), "hd95_count_C": (C,), "num_images_1": (1,)}
        self._state = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
        self.records: list[dict[str, Any]] = []

    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        sid = meta.get("id", orig.get("id"))
        if pred.get("mask_HW") is None:
            raise ValueError(f"{_WHERE}: sample {sid}: the model gave no segmentation ('seg_logits_BCHW')")
        if orig.get("mask_HW") is None:
            raise ValueError(f"{_WHERE}: sample {sid}: the dataset has no truth mask")
        p, t = np.asarray(pred["mask_HW"]), np.asarray(orig["mask_HW"])
        if p.shape != t.shape:
            raise ValueError(f"{_WHERE}: sample {sid}: predicted mask {p.shape} vs truth {t.shape}")
        if t.max(initial=0) >= self.num_classes or t.min(initial=0) < 0:
            raise ValueError(f"{_WHERE}: sample {sid}: truth labels outside 0..{self.num_classes - 1}")
        cm = confusion_matrix(p[None], t[None], self.num_classes)[0]
        self._add("confusion_CC", cm)
        dice_C, iou_C = dice_iou_from_confusion(cm)
        fg = _nanmean(dice_C[1:])
        if math.isfinite(fg):
            self._add("img_dice_sum_count_2", [fg, 1.0])
        spacing = np.asarray(orig.get("spacing_mm_2", (1.0, 1.0)), dtype=np.float64).reshape(2)
        hd_px = np.full(self.num_classes, np.nan)
        hd_mm = np.full(self.num_classes, np.nan)
        if self.use_hd95:
            for c in range(1, self.num_classes):
                pc, tc = p == c, t == c
                hd_px[c] = hd95(pc, tc)
                hd_mm[c] = hd_px[c] * spacing[0] if spacing[0] == spacing[1] else \
                    hd95(pc, tc, sampling_yx=(spacing[1], spacing[0]))
            ok = np.isfinite(hd_px)
            self._add("hd95_px_sum_C", np.where(ok, hd_px, 0.0))
            self._add("hd95_mm_sum_C", np.where(ok, hd_mm, 0.0))
            self._add("hd95_count_C", ok)
        self._add("num_images_1", [1.0])
        if self.keep_records:
            names = self.class_names
            self.records.append({"id": sid, "dice": fg,
                                 "dice_per_class": {names[c]: float(dice_C[c]) for c in range(self.num_classes)},
                                 "iou_per_class": {names[c]: float(iou_C[c]) for c in range(self.num_classes)},
                                 "hd95_mm": {names[c]: float(hd_mm[c]) for c in range(1, self.num_classes)}})

    def compute(self) -> dict[str, float]:
        s = {k: v.numpy() for k, v in self._state.items()}
        dice, iou = dice_iou_from_confusion(s["confusion_CC"])
        out = {"dice": _nanmean(dice[1:]), "miou": _nanmean(iou[1:]), "dice_with_bg": _nanmean(dice),
               "miou_with_bg": _nanmean(iou)}
        for c, name in enumerate(self.class_names):
            out[f"dice_{name}"], out[f"iou_{name}"] = float(dice[c]), float(iou[c])
        cm = s["confusion_CC"]
        out["pixel_acc"] = float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else math.nan
        a, n = s["img_dice_sum_count_2"]
        out["dice_per_image"] = float(a / n) if n > 0 else math.nan
        cnt = s["hd95_count_C"][1:]
        out["hd95_px"] = float(s["hd95_px_sum_C"][1:].sum() / cnt.sum()) if cnt.sum() > 0 else math.nan
        out["hd95_mm"] = float(s["hd95_mm_sum_C"][1:].sum() / cnt.sum()) if cnt.sum() > 0 else math.nan
        out["num_images"] = float(s["num_images_1"][0])
        return out
