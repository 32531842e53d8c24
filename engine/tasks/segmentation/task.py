"""Generic multi-class segmentation (the segmentation model zoo, docs/systems/segmentation_zoo.md):
`data.task=segmentation` on any reader that gives masks (hc18, labelme hip, coco with masks).

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
Post-processing: eval.task_args.largest_component keeps only the largest region of the listed classes
(engine/tasks/postprocess.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.plots import plot_per_class_bars

from ..base import Task, figure_formatter, predict_originals, spread_picks
from ..postprocess import ClassNamesState, parse_largest_component, resolve_classes, with_largest_regions
from .metrics import SegAccumulator
from .plots import draw_contours

_WHERE = "engine/tasks/segmentation/task.py"


class SegmentationTask(ClassNamesState, Task):
    name = "segmentation"
    default_format = "hc18"
    needs_masks, needs_landmarks = True, False
    headline = ("dice", "miou", "dice_with_bg", "miou_with_bg", "hd95_mm")
    best_metric = "miou"           # as the published zoo: training keeps the best validation mIoU
    best_mode = "max"
    shown = ("loss", "dice", "miou", "miou_with_bg")

    def __init__(self, num_overlays: int = 4, hd95: bool = True, largest_component: Any = False):
        self.num_overlays, self.use_hd95 = int(num_overlays), bool(hd95)
        self.largest_component = parse_largest_component(largest_component)
        self.class_names: list[str] = []

    def accumulator(self, cfg, data: dict[str, Any]) -> SegAccumulator:
        self.class_names = list(data.get("class_names") or self.class_names)
        return SegAccumulator(int(data.get("num_classes") or 0), data.get("class_names"), use_hd95=self.use_hd95)

    def decoder(self, cfg) -> Callable[[dict], dict]:
        def decode(outputs: dict) -> dict:
            logits = outputs.get("seg_logits_BCHW")
            if logits is None:
                raise ValueError(f"{_WHERE}: data.task=segmentation needs a model with 'seg_logits_BCHW' outputs")
            b, c = logits.shape[:2]
            keep = resolve_classes(self.largest_component, self.class_names, c)
            return with_largest_regions({"kpts_px_BK2": logits.new_zeros((b, 0, 2)), "mask_BHW": logits.argmax(1)},
                                        keep)
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
