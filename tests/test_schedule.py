import math

import pytest

from engine.config import load_config
from engine.trainer import lr_factor


def test_warmup_then_cosine_to_the_floor():
    cfg = load_config(None, ["train.max_steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    assert lr_factor(0, cfg) == pytest.approx(0.1)      # (0 + 1) / 10
    assert lr_factor(4, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)     # cosine starts at the peak
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)    # past the end: stays at the floor


def test_step_and_constant_schedules():
    cfg = load_config(None, ["optim.scheduler=step", "optim.step_milestones=[60, 90]", "optim.step_gamma=0.1"])
    assert [lr_factor(s, cfg) for s in (0, 59, 60, 89, 90)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    const = load_config(None, ["optim.scheduler=constant"])
    assert lr_factor(123, const) == 1.0
