"""Per-call choice between a Triton kernel and its pure-torch reference (README.md, "Kernels (Triton) and where targets
are rendered").

`impl` of every public op: "auto" (default), "triton" or "ref". The environment variable MEDPOSE_KERNELS
(auto | triton | ref) overrides "auto" at call time, never at import time, so a test or a user can force either path
without reloading anything. "auto" picks Triton when it imports and every tensor argument is a CUDA tensor, the
reference otherwise. Under TRITON_INTERPRET=1 (set before the kernels are defined) Triton also runs on CPU tensors —
that is how the kernels are tested without a GPU — but "auto" still picks the reference for CPU tensors.
"""
from __future__ import annotations

import os

import torch

ENV_VAR = "MEDPOSE_KERNELS"
IMPLS = ("auto", "triton", "ref")

try:  # Triton is an optional extra (setup.py "triton"); without it every op runs its reference.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def choose_impl(op: str, impl: str, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "ref" for one call of `op` (the name only goes into error messages)."""
    if impl not in IMPLS:
        raise ValueError(f"kernels/{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"kernels/{op}: environment variable {ENV_VAR}={env!r} is not one of {IMPLS}")
        impl = env
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return "triton" if HAVE_TRITON and on_cuda else "ref"
    if impl == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(f"kernels/{op}: impl='triton' (or {ENV_VAR}=triton) but triton is not installed; "
                               f"pip install 'medpose[triton]' or use impl='ref'")
        if not on_cuda and not interpreting():
            raise RuntimeError(f"kernels/{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                               f"the kernels are defined, to run them on the CPU); got a CPU tensor")
    return impl


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
