"""Fetal head circumference task (HC18): ellipse geometry, the accumulator, its figures."""
from .metrics import FetalHeadAccumulator
from .task import FetalHeadTask

__all__ = ["FetalHeadAccumulator", "FetalHeadTask"]
