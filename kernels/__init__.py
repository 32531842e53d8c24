"""Custom Triton kernels for the hot, memory-bound ops of the seed networks, each beside its pure-torch reference.

Every op dispatches per call (`impl="auto" | "triton" | "ref"`, environment variable MEDPOSE_KERNELS): Triton for
CUDA tensors when Triton is installed, the reference otherwise.
"""
from ._dispatch import ENV_VAR, HAVE_TRITON, IMPLS, choose_impl
from .gct_gate import (gct_gate, gct_gate_bytes, gct_gate_conv1x1, gct_gate_conv1x1_bytes, gct_gate_conv1x1_ref,
                       gct_gate_ref)
from .heatmap_render import render_heatmaps, render_heatmaps_bytes, render_heatmaps_ref
from .soft_argmax import soft_argmax, soft_argmax_bytes, soft_argmax_ref

__all__ = ["ENV_VAR", "HAVE_TRITON", "IMPLS", "choose_impl",
           "gct_gate", "gct_gate_ref", "gct_gate_bytes", "gct_gate_conv1x1", "gct_gate_conv1x1_ref",
           "gct_gate_conv1x1_bytes", "render_heatmaps", "render_heatmaps_ref", "render_heatmaps_bytes",
           "soft_argmax", "soft_argmax_ref", "soft_argmax_bytes"]
