import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _triton_env import VAR as _TRITON_VAR, triton_interpret_value  # noqa: E402

# Triton's interpreter only where no CUDA device is present (CPU CI); on a GPU the kernels are compiled. Set before
# any kernels module is imported: triton.jit reads it when a kernel is defined.
_interpret = triton_interpret_value(os.environ, torch.cuda.is_available())
if _interpret is not None:
    os.environ[_TRITON_VAR] = _interpret
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _interpreting() -> bool:
    return os.environ.get(_TRITON_VAR, "0").strip().lower() in ("1", "true", "on", "yes")


def pytest_collection_modifyitems(config, items):
    import pytest
    reasons = {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA device",
        "dali": None if _has("nvidia.dali") else "nvidia-dali-cuda130 is not installed",
        "deepspeed": None if _has("deepspeed") else "deepspeed is not installed",
    }
    # The `gpu` kernel tests are there to check compiled kernels: with the interpreter forced on a CUDA machine
    # they would pass without compiling anything.
    compiled_only = f"{_TRITON_VAR}=1 is set: the gpu kernel tests check compiled kernels (unset it)" \
        if torch.cuda.is_available() and _interpreting() else None
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
        if compiled_only and "gpu" in item.keywords and item.path.name.startswith("test_kernel"):
            item.add_marker(pytest.mark.skip(reason=compiled_only))
