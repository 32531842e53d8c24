"""Intervertebral-disc labelling task (SEEDS.md §3): the accumulator, the skeleton-prior decoder, its figures."""
from .metrics import SpineDiscAccumulator
from .task import SpineDiscTask

__all__ = ["SpineDiscAccumulator", "SpineDiscTask"]
