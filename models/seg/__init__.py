"""The segmentation model zoo (docs/systems/segmentation_zoo.md): every network by name, built the same way.

`SEG_SPECS` maps a name to its `SegSpec` (builder, input multiple, source library, paper). `build_seg_model(name,
in_channels, num_classes, stn=False, weights=None, **arch_kwargs)` builds one, optionally behind the spatial
transformer front-end (models/seg/stn.py: identity at the start, logits mapped back to the input frame) and loads an
optional local weights file (nothing is ever downloaded). `MODELS_SEG` exposes the same builders to the engine's
model registry (`model.name`, `model.args`).

Architectures that a kept library implements are built on it (smp: DeepLabV3+, PSPNet, SCSE-UNet; timm: HRNet, the
SETR ViT; torchvision: ResNet/VGG/MobileNetV2 backbones); the rest are written here (source "own").
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .bcdunet import SPECS_BCDUNET
from .common import SegSpec, read_state_dict
from .context_nets import SPECS_CONTEXT
from .encoder_nets import SPECS_ENCODER
from .light_nets import SPECS_LIGHT
from .stn import STNSeg
from .tmunet import SPECS_TMUNET
from .u2net import SPECS_U2
from .unet_family import SPECS_UNET_FAMILY
from .unet_variants import SPECS_UNET_VARIANTS

WHERE = "models/seg"

SEG_SPECS: dict[str, SegSpec] = {}
for _group in (SPECS_UNET_FAMILY, SPECS_UNET_VARIANTS, SPECS_ENCODER, SPECS_CONTEXT, SPECS_U2, SPECS_LIGHT,
               SPECS_TMUNET, SPECS_BCDUNET):
    for _name, _spec in _group.items():
        if _name in SEG_SPECS:
            raise RuntimeError(f"{WHERE}: model name '{_name}' registered twice")
        SEG_SPECS[_name] = _spec


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a local state_dict file (a plain state_dict, or a checkpoint with a 'model' entry) into `model`;
    errors name the file and the mismatching keys."""
    state = read_state_dict(path, "model.args.weights")
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"{path}: does not fit the model: missing {result.missing_keys[:5]} "
                         f"({len(result.missing_keys)} in all), unexpected {result.unexpected_keys[:5]} "
                         f"({len(result.unexpected_keys)} in all)")
    return model


def build_seg_model(name: str, in_channels: int = 3, num_classes: int = 2, stn: bool = False,
                    weights: str | None = None, **arch_kwargs: Any) -> nn.Module:
    """One zoo model by name; `stn` puts the spatial transformer in front; `weights` loads a local file (strict)."""
    if name not in SEG_SPECS:
        raise KeyError(f"{WHERE}: no segmentation model named '{name}' (choose from {', '.join(sorted(SEG_SPECS))})")
    model = SEG_SPECS[name].build(in_channels=in_channels, num_classes=num_classes, **arch_kwargs)
    if stn:
        model = STNSeg(model, in_channels)
    if weights:
        load_weights(model, weights)
    return model


def _builder(name: str) -> Callable[..., nn.Module]:
    return functools.partial(build_seg_model, name)


MODELS_SEG: dict[str, Callable[..., nn.Module]] = {name: _builder(name) for name in SEG_SPECS}

__all__ = ["SEG_SPECS", "MODELS_SEG", "SegSpec", "build_seg_model", "load_weights"]
