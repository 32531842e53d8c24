"""Benchmarks run with `make bench` (pytest-benchmark), never in the test suite.
Each file compares providers side by side in one run (one benchmark group per comparison) and records the device
and versions in the benchmark's extra_info."""
import os
import platform

import pytest
import torch

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")


def device_info() -> dict:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return {"device": dev, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}


@pytest.fixture
def record(benchmark):
    def _record(**extra):
        benchmark.extra_info.update(device_info())
        benchmark.extra_info.update(extra)
    return _record
