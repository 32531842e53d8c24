"""Generic landmark task (any number of named landmarks) and the landmark metrics every task shares."""
from .metrics import LandmarkMetrics
from .task import LandmarksAccumulator, LandmarksTask

__all__ = ["LandmarkMetrics", "LandmarksAccumulator", "LandmarksTask"]
