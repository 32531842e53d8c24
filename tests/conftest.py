import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch
    reasons = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA device",
        "dali": None if _has("nvidia.dali") else "nvidia-dali-cuda130 is not installed",
        "deepspeed": None if _has("deepspeed") else "deepspeed is not installed",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
