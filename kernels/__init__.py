"""Custom Triton kernels for the hot, memory-bound ops of the seed networks, each beside its pure-torch reference.

One module per op, imported by its own name (the package does not re-export the ops: `kernels.gct_gate` must stay
the module, not the function of the same name):
    kernels.gct_gate        gct_gate, gct_gate_conv1x1 (+ _ref, _bytes)     ME-GCT gate, gate + 1x1 fusion conv
    kernels.soft_argmax     soft_argmax (+ _ref, _bytes)                    heatmaps -> coordinates (+ variance)
    kernels.heatmap_render  render_heatmaps (+ _ref, _bytes)                keypoints -> Gaussian target heatmaps
Every op dispatches per call (`impl="auto" | "triton" | "ref"`, environment variable MEDPOSE_KERNELS): Triton for
CUDA tensors when Triton is installed, the reference otherwise.
"""
from ._dispatch import ENV_VAR, HAVE_TRITON, IMPLS, choose_impl

__all__ = ["ENV_VAR", "HAVE_TRITON", "IMPLS", "choose_impl"]
