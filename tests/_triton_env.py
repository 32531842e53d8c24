"""Whether the test session runs Triton kernels in the interpreter (decided in tests/conftest.py, before any
kernels module defines its kernels: triton.jit reads TRITON_INTERPRET when a kernel is defined)."""
from __future__ import annotations

from collections.abc import Mapping

VAR = "TRITON_INTERPRET"


def triton_interpret_value(environ: Mapping[str, str], cuda_available: bool) -> str | None:
    """The TRITON_INTERPRET value to set, or None to leave the environment as it is.

    The interpreter is the way the kernels are tested on a CPU-only machine; with a CUDA device the kernels are
    compiled, so the `gpu` tests check the real kernels. A value the user set (1 or 0) is kept either way."""
    if VAR in environ:
        return None
    return None if cuda_available else "1"
