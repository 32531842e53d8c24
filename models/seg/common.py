"""Conventions shared by the segmentation model zoo (docs/systems/segmentation_zoo.md).

Every zoo model is registered as a `SegSpec` and built by `spec.build(in_channels, num_classes, **arch_kwargs)`.
Its forward takes `image_BCHW` (float, any H, W that are multiples of `spec.multiple`) and returns a dict:
  "seg_logits_BCHW": (B, num_classes, H, W) logits at the input resolution (the engine's output key);
  "aux_logits_BCHW": optional list of extra (B, num_classes, H, W) logits (deep supervision / side outputs),
                     only in training mode.
No weights are ever downloaded: library encoders are built with `encoder_weights=None` / `pretrained=False`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SegSpec:
    """One zoo entry. `multiple`: H and W must be multiples of it. `source`: "own" (written here) or the library
    the architecture is built on ("smp", "timm", "torchvision"). `paper`: short reference."""
    name: str
    build: Callable[..., nn.Module]
    multiple: int
    source: str
    paper: str
    defaults: dict = field(default_factory=dict)


def seg_output(logits_BCHW: torch.Tensor, input_hw: Sequence[int],
               aux: Sequence[torch.Tensor] | None = None, training: bool = False) -> dict:
    """The output dict; logits (and aux logits) are resized bilinearly to `input_hw` when they differ."""
    def up(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[-2:]) != tuple(input_hw):
            t = F.interpolate(t, size=tuple(input_hw), mode="bilinear", align_corners=False)
        return t

    out = {"seg_logits_BCHW": up(logits_BCHW)}
    if training and aux:
        out["aux_logits_BCHW"] = [up(a) for a in aux]
    return out


class TensorToSeg(nn.Module):
    """Wraps a network whose forward returns one logits tensor (e.g. a segmentation_models_pytorch model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        return seg_output(self.net(image_BCHW), image_BCHW.shape[-2:])


def check_input(image_BCHW: torch.Tensor, multiple: int, where: str) -> None:
    """A clear error when H or W is not a multiple of the model's stride (instead of a shape mismatch deep inside)."""
    h, w = image_BCHW.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"{where}: input {h}x{w} must have H and W divisible by {multiple} "
                         f"(set data.input_hw to multiples of {multiple})")


def read_state_dict(path: str | Path, what: str, entries: Sequence[str] = ("model",)) -> dict[str, torch.Tensor]:
    """The state_dict in a local torch file: the file itself, or its first entry of `entries` that is a mapping
    (e.g. an engine checkpoint's "model"). Errors name the file and `what` it was given as (the config field).
    The file is read with the weights-only unpickler (engine.checkpoint.safe_torch_load): one holding other Python
    objects is refused (a CheckpointError naming the opt-out, MEDPOSE_TRUST_CHECKPOINTS=1) and runs no code."""
    from engine.checkpoint import safe_torch_load
    state = safe_torch_load(path, what)
    path = Path(path)
    for key in entries:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: {what} holds no state_dict (mapping of tensors)")
    return state
