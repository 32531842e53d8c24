"""Custom Triton kernels for the hot, memory-bound ops of the seed networks, each beside its pure-torch reference.

Every op dispatches per call (`impl="auto" | "triton" | "ref"`, environment variable MEDPOSE_KERNELS): Triton for
CUDA tensors when Triton is installed, the reference otherwise.
"""
from ._dispatch import ENV_VAR, HAVE_TRITON, IMPLS, choose_impl
