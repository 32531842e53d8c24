"""Hip ultrasound task (SEEDS.md §1): Graf geometry, the hip accumulator, its figures."""
from .metrics import MetricAccumulator
from .task import HipUltrasoundTask

__all__ = ["HipUltrasoundTask", "MetricAccumulator"]
