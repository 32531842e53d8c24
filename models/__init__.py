"""Models: MultiHipPoseNet, its losses and the heatmap codec (public API)."""
from .codecs import decode_outputs, render_heatmaps_torch
from .losses import CRITERIA, build_criterion
from .multihipposenet import MODELS, MultiHipPoseNet, build_multihipposenet, count_parameters

__all__ = ["MODELS", "CRITERIA", "MultiHipPoseNet", "build_multihipposenet", "build_criterion", "count_parameters",
           "decode_outputs", "render_heatmaps_torch"]
