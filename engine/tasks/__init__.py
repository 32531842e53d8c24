"""Tasks by name (`data.task`): what to measure, draw and write for each clinical problem (engine/tasks/base.py).

One package per task: `task.py` (the Task subclass), `metrics.py` (its accumulator), `plots.py` (its figures) and its
geometry beside them. Landmark errors of every task come from engine/tasks/landmarks/metrics.py.
"""
from __future__ import annotations

import inspect
from typing import Any

from .base import Task
from .fetal_head import FetalHeadTask
from .hip_us import HipUltrasoundTask
from .hip_xray import HipXrayTask
from .landmarks import LandmarksTask
from .segmentation import SegmentationTask
from .spine_disc import SpineDiscTask

TASKS: dict[str, type[Task]] = {"hip_us": HipUltrasoundTask, "hip_xray": HipXrayTask, "spine_disc": SpineDiscTask,
                                "fetal_head": FetalHeadTask, "segmentation": SegmentationTask,
                                "landmarks": LandmarksTask}


def build_task(name: str, task_args: dict[str, Any] | None = None) -> Task:
    """A fresh task instance (tasks may learn state from the training split, so never share one)."""
    from engine.config import ConfigError
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task '{name}' (choose from {sorted(TASKS)})")
    cls, args = TASKS[name], dict(task_args or {})
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params) - {"self"})
        if unknown:
            valid = ", ".join(n for n in params if n != "self") or "none"
            raise ConfigError(f"eval.task_args: unknown option '{unknown[0]}' for task '{name}' (valid: {valid})")
    return cls(**args)


__all__ = ["TASKS", "Task", "build_task"]
