"""Models: the seed networks, their losses and the heatmap codec (public API)."""
from .codecs import decode_outputs, render_heatmaps_torch
from .multihipposenet import MultiHipPoseNet, build_multihipposenet, count_parameters
from .registry import CRITERIA, MODELS, build_criterion

__all__ = ["MODELS", "CRITERIA", "MultiHipPoseNet", "build_multihipposenet", "build_criterion", "count_parameters",
           "decode_outputs", "render_heatmaps_torch"]
