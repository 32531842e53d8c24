"""Generic multi-class segmentation (the segmentation model zoo, SEEDS.md §4, issue 7): `data.task=segmentation`
on any reader that gives masks (hc18, labelme hip, coco with masks).

Metrics, from sums that ranks all-reduce (engine/metrics.py):
  * the confusion matrix over the whole split (original frame): per class Dice 2TP / (2TP + FP + FN) and IoU
    TP / (TP + FP + FN); `dice` / `miou` average the foreground classes, `dice_with_bg` / `miou_with_bg` include
    the background class, as the published tables do (a model that predicts background everywhere scores ~0.5
    there and 0 on the foreground figures);
  * per-image foreground Dice averaged over images (`dice_per_image`);
  * HD95 per foreground class and image (px and mm), averaged over the images where both masks are non-empty;
  * pixel accuracy.
Figures: per-class Dice / IoU bars and contour overlays (truth solid, prediction dashed) of the worst, median and
best images by Dice. `medpose predict` writes the overlay and the predicted area per class.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from engine.metrics import SummedState, confusion_matrix, hd95
from engine.plots import _save, image_axes, plot_per_class_bars

from .base import Task, figure_formatter, predict_originals, spread_picks

_WHERE = "engine/tasks/segmentation.py"
_COLOURS = ("#ffd700", "#00e5ff", "#ff4081", "#76ff03", "#ff9100", "#d500f9", "#1de9b6", "#ff1744")


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


def draw_contours(image_HW3: np.ndarray, pred_mask_HW: np.ndarray | None, true_mask_HW: np.ndarray | None,
                  out_path: Path | str, class_names: Sequence[str], title: str = "") -> Path:
    """The image with each foreground class's truth contour (solid) and predicted contour (dashed)."""
    img = np.asarray(image_HW3)
    h, w = img.shape[:2]
    fig = Figure(figsize=(7.0, 7.0 * h / w + 0.6))
    ax = fig.add_subplot()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    handles = []
    from matplotlib.lines import Line2D
    for c in range(1, len(class_names)):
        colour = _COLOURS[(c - 1) % len(_COLOURS)]
        drawn = False
        for mask, style in ((true_mask_HW, "solid"), (pred_mask_HW, "dashed")):
            if mask is not None and np.any(np.asarray(mask) == c):
                ax.contour(np.asarray(mask) == c, levels=[0.5], colors=[colour], linewidths=1.3,
                           linestyles=style)
                drawn = True
        if drawn:
            handles.append(Line2D([], [], color=colour, label=class_names[c]))
    handles += [Line2D([], [], color="white", linestyle="solid", label="truth"),
                Line2D([], [], color="white", linestyle="dashed", label="prediction")]
    ax.legend(handles=handles, loc="lower right", fontsize=8, facecolor="black", labelcolor="white", framealpha=0.6)
    image_axes(ax, w, h, title)
    fig.tight_layout()
    return _save(fig, out_path)


class SegmentationTask(Task):
    name = "segmentation"
    default_format = "hc18"
    headline = ("dice", "miou", "dice_with_bg", "miou_with_bg", "hd95_mm")
    best_metric = "miou"           # SEEDS §4: training keeps the best validation mIoU
    best_mode = "max"
    shown = ("loss", "dice", "miou", "miou_with_bg")

    def __init__(self, num_overlays: int = 4, hd95: bool = True):
        self.num_overlays, self.use_hd95 = int(num_overlays), bool(hd95)
        self.class_names: list[str] = []

    # class names travel in every checkpoint (task state), so `medpose predict` names its columns without the data
    def fit(self, train_dataset) -> None:
        names = getattr(train_dataset, "class_names", None)
        if names:
            self.class_names = list(names)

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_names = list(state.get("class_names") or self.class_names)

    def accumulator(self, cfg, data: dict[str, Any]) -> SegAccumulator:
        self.class_names = list(data.get("class_names") or self.class_names)
        return SegAccumulator(int(data.get("num_classes") or 0), data.get("class_names"), use_hd95=self.use_hd95)

    def decoder(self, cfg) -> Callable[[dict], dict]:
        def decode(outputs: dict) -> dict:
            logits = outputs.get("seg_logits_BCHW")
            if logits is None:
                raise ValueError(f"{_WHERE}: data.task=segmentation needs a model with 'seg_logits_BCHW' outputs")
            b = logits.shape[0]
            return {"kpts_px_BK2": logits.new_zeros((b, 0, 2)), "mask_BHW": logits.argmax(1)}
        return decode

    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        out_dir = Path(out_dir)
        names = self.class_names or sorted({k for r in records for k in r.get("dice_per_class", {})})
        written = []
        if names:
            written.append(plot_per_class_bars({n: figures.get(f"dice_{n}", math.nan) for n in names},
                                               out_dir / "dice_per_class.png", "Dice (whole split)"))
            written.append(plot_per_class_bars({n: figures.get(f"iou_{n}", math.nan) for n in names},
                                               out_dir / "iou_per_class.png", "IoU (whole split)"))
        if model is not None and dataset is not None and self.num_overlays > 0:
            written += self._overlays(out_dir, records, model, dataset, decode, names)
        return written

    def _overlays(self, out_dir: Path, records, model, dataset, decode: Callable, names) -> list[Path]:
        dice_of = {r["id"]: r["dice"] for r in records}
        return [draw_contours(orig["image_HW3"], pred["mask_HW"], orig["mask_HW"], out_dir / f"overlay_{sid}.png",
                              names, title=f"{sid}  Dice {dice_of.get(sid, math.nan):.3f}")
                for sid, orig, pred in predict_originals(spread_picks(records, "dice", self.num_overlays), model,
                                                         dataset, decode)]

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        f = figure_formatter(figures, digits=4)
        lines = [f" foreground    Dice {f('dice')}  mIoU {f('miou')}  (per image Dice {f('dice_per_image')})",
                 f" with bg       Dice {f('dice_with_bg')}  mIoU {f('miou_with_bg')}  (as the published tables)",
                 f" HD95          {f('hd95_mm', ' mm')} = {f('hd95_px', ' px')}   pixel acc {f('pixel_acc')}"]
        per = [k[5:] for k in figures if k.startswith("dice_") and k not in ("dice_with_bg", "dice_per_image")]
        if per:
            lines.append(" per class     " + "  ".join(f"{n} {f('dice_' + n)}" for n in per))
        return lines

    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        mask = pred.get("mask_HW")
        if mask is None:
            return {}
        names = item.get("class_names") or self.class_names or \
            ["background"] + [f"class{c}" for c in range(1, int(np.max(mask, initial=0)) + 1)]
        px = np.asarray(item.get("spacing_mm_2", (math.nan, math.nan)), dtype=np.float64).reshape(-1)
        area_mm2 = float(px[0] * px[-1]) if px.size else math.nan
        row: dict[str, Any] = {}
        for c, name in enumerate(names):
            if c == 0:
                continue
            n = int((np.asarray(mask) == c).sum())
            row[f"{name}_area_px"] = n
            row[f"{name}_area_mm2"] = round(n * area_mm2, 2) if math.isfinite(area_mm2) else None
        return row

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        mask = pred.get("mask_HW")
        n = int(max(np.max(mask, initial=0) if mask is not None else 0,
                    np.max(truth["mask_HW"], initial=0) if truth and truth.get("mask_HW") is not None else 0)) + 1
        names = self.class_names if len(self.class_names) >= n else \
            ["background"] + [f"class{c}" for c in range(1, max(n, 2))]
        return draw_contours(image_HW3, mask, None if truth is None else truth.get("mask_HW"), out_path, names,
                             title)
