"""Intervertebral-disc labelling task (docs/systems/spine_disc_hourglass.md): the accumulator, the skeleton-prior
decoder, its figures."""
from .metrics import SpineDiscAccumulator
from .task import SpineDiscTask

__all__ = ["SpineDiscAccumulator", "SpineDiscTask"]
