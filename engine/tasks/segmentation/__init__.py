"""Generic multi-class segmentation task (docs/systems/segmentation_zoo.md): the accumulator, contour overlays."""
from .metrics import SegAccumulator, dice_iou_from_confusion
from .task import SegmentationTask

__all__ = ["SegAccumulator", "SegmentationTask", "dice_iou_from_confusion"]
