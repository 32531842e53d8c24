"""The model and loss registries (plain dicts, chosen by name from the config; no decorators).

model.name -> builder(**model.args) -> nn.Module; model.criterion (default: model.name) -> loss class(**criterion_args).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .efficientnet_kpt import MODELS_KPT
from .hourglass import CRITERIA_HG, MODELS_HG
from .landmark_nets import CRITERIA_LANDMARK, MODELS_LANDMARK
from .losses import MultiHipPoseCriterion
from .losses_kpt import CRITERIA_KPT
from .losses_seg import SegCriterion
from .multihipposenet import build_multihipposenet
from .seg import MODELS_SEG
from .shape_unet import CRITERIA_SHAPE, MODELS_SHAPE
from .unet import MODELS_UNET

MODELS: dict[str, Callable[..., nn.Module]] = {"multihipposenet": build_multihipposenet, **MODELS_KPT, **MODELS_HG,
                                               **MODELS_UNET, **MODELS_SEG, **MODELS_LANDMARK,
                                               **MODELS_SHAPE}

# Every segmentation-zoo model (models/seg) trains with SegCriterion (named losses and weighted sums) by default.
# The UNet multi-task model trains with MultiHipPoseNet's loss (focal + Dice segmentation, weighted heatmap MSE).
# The landmark networks (models/landmark_nets.py) train with the visible-landmark heatmap MSE of HeatmapCoordLoss.
# ShapeUNet (models/shape_unet.py, spine discs from the image and its gradients) trains with the hourglass's loss.
CRITERIA: dict[str, Callable[..., nn.Module]] = {"multihipposenet": MultiHipPoseCriterion,
                                                 "unet_multitask": MultiHipPoseCriterion, **CRITERIA_KPT,
                                                 **CRITERIA_HG, "seg": SegCriterion,
                                                 **{name: SegCriterion for name in MODELS_SEG}, **CRITERIA_LANDMARK,
                                                 **CRITERIA_SHAPE}


def build_criterion(name: str = "multihipposenet", **kwargs) -> nn.Module:
    """The loss module registered under `name` (keys of CRITERIA), built from plain config values."""
    if name not in CRITERIA:
        raise KeyError(f"models/registry.py: no criterion named '{name}' (choose from {sorted(CRITERIA)})")
    return CRITERIA[name](**kwargs)
