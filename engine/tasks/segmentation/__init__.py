"""Generic multi-class segmentation task (SEEDS.md §4): the accumulator, contour overlays."""
from .metrics import SegAccumulator, dice_iou_from_confusion
from .task import SegmentationTask

__all__ = ["SegAccumulator", "SegmentationTask", "dice_iou_from_confusion"]
