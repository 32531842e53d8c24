"""Generic landmark task (any number of named landmarks) and the landmark metrics every task shares."""
from .metrics import LandmarkMetrics

__all__ = ["LandmarkMetrics"]
