"""Hip ultrasound task (docs/systems/hip_us_multihipposenet.md): Graf geometry, the hip accumulator, its figures."""
from .metrics import MetricAccumulator
from .task import HipUltrasoundTask

__all__ = ["HipUltrasoundTask", "MetricAccumulator"]
