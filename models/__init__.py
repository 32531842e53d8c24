"""Models: MultiHipPoseNet, its losses and the heatmap codec (public API)."""
from .codecs import decode_outputs, render_heatmaps_torch
from .losses import CRITERIA, build_criterion
from typing import Callable

from torch import nn

from .multihipposenet import MultiHipPoseNet, build_multihipposenet, count_parameters

# model.name -> builder(**model.args); the one registry of models (DESIGN.md: plain dicts, no decorators)
MODELS: dict[str, Callable[..., nn.Module]] = {"multihipposenet": build_multihipposenet}

__all__ = ["MODELS", "CRITERIA", "MultiHipPoseNet", "build_multihipposenet", "build_criterion", "count_parameters",
           "decode_outputs", "render_heatmaps_torch"]
