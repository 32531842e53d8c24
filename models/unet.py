"""A small multi-task UNet (Ronneberger et al., MICCAI 2015): segmentation logits + landmark heatmaps.

Encoder: a double-conv block (Conv3x3 -> norm -> ReLU, twice) at full resolution with `width` channels, then `depth`
times MaxPool 2x2 + double conv doubling the channels (width * 2^l at level l). Decoder: per level, bilinear x2
upsampling (align_corners=True, like MultiHipPoseNet's decoder, docs/systems/hip_us_multihipposenet.md), concatenation
with the encoder's skip of that level, and a double conv back to the skip's channel count. Two 1x1-conv heads read the
full-resolution decoder feature: "seg_logits_BCHW" (num_classes) and "heatmap_BKHW" (num_keypoints), both at input
resolution, so models/losses.py MultiHipPoseCriterion(num_classes, class_weights) trains it as it trains
MultiHipPoseNet.

Input H and W must be divisible by 2^depth. Norm: "gn" GroupNorm (gcd(8, C) groups: batch-size independent, the
choice for small medical batches), "bn" BatchNorm, "none" (convs get a bias instead). Parameter count of one double
conv (c_in -> c): 9 c_in c + 9 c^2 + 4c with a norm (two affine pairs), 9 c_in c + 9 c^2 + 2c without (two biases);
tests/test_unet.py checks the total against this formula.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("gn", "bn", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(Conv3x3 -> norm -> ReLU) x 2; convs carry a bias only without a norm (a norm's shift makes it redundant)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "gn"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias), _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), _norm(norm, out_channels),
            nn.ReLU(inplace=True))


def unet_layers(in_channels: int, chans: list[int], norm: str) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The double-conv U-Net's encoder (chans[0] .. chans[depth]) and decoder; decoder[j] takes level (depth - j) up
    to level (depth - j - 1). Shared by UNetMultiTask and ShapeUNet (their state_dict keys stay encoder.* /
    decoder.*)."""
    depth = len(chans) - 1
    encoder = nn.ModuleList([DoubleConv(in_channels, chans[0], norm)] +
                            [DoubleConv(chans[lv - 1], chans[lv], norm) for lv in range(1, depth + 1)])
    decoder = nn.ModuleList([DoubleConv(chans[lv] + chans[lv - 1], chans[lv - 1], norm)
                             for lv in range(depth, 0, -1)])
    return encoder, decoder


def unet_features(x: torch.Tensor, encoder: nn.ModuleList, decoder: nn.ModuleList) -> torch.Tensor:
    """Full-resolution features of unet_layers' encoder and decoder: max-pool down, bilinear up, skips concatenated."""
    skips = []
    for level, block in enumerate(encoder):
        x = block(x if level == 0 else F.max_pool2d(x, 2))
        skips.append(x)
    for j, block in enumerate(decoder):
        skip = skips[len(decoder) - j - 1]
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = block(torch.cat([x, skip], dim=1))
    return x


class UNetMultiTask(nn.Module):
    """forward(image_BCHW) -> {"seg_logits_BCHW": (B, num_classes, H, W), "heatmap_BKHW": (B, K, H, W)}."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, num_keypoints: int = 4, width: int = 16,
                 depth: int = 4, norm: str = "gn", heatmap_head: bool = True):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"models/unet.py: norm must be one of {NORMS}, got {norm!r}")
        if depth < 1 or width < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(f"models/unet.py: need depth, width, in_channels, num_classes >= 1, got depth={depth}, "
                             f"width={width}, in_channels={in_channels}, num_classes={num_classes}")
        if heatmap_head and num_keypoints < 1:
            raise ValueError(f"models/unet.py: heatmap_head needs num_keypoints >= 1, got {num_keypoints}")
        self.depth = depth
        chans = [width * 2 ** level for level in range(depth + 1)]
        self.encoder, self.decoder = unet_layers(in_channels, chans, norm)
        self.seg_head = nn.Conv2d(chans[0], num_classes, 1)
        self.heatmap_head = nn.Conv2d(chans[0], num_keypoints, 1) if heatmap_head else None

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image_BCHW.shape[-2:]
        step = 2 ** self.depth
        if h % step or w % step:
            raise ValueError(f"models/unet.py: input {h}x{w} must be divisible by 2^depth = {step}")
        x = unet_features(image_BCHW, self.encoder, self.decoder)
        out = {"seg_logits_BCHW": self.seg_head(x)}
        if self.heatmap_head is not None:
            out["heatmap_BKHW"] = self.heatmap_head(x)
        return out


def build_unet_multitask(in_channels: int = 3, num_classes: int = 2, num_keypoints: int = 4, width: int = 16,
                         depth: int = 4, norm: str = "gn", heatmap_head: bool = True) -> UNetMultiTask:
    return UNetMultiTask(in_channels, num_classes, num_keypoints, width, depth, norm, heatmap_head)


MODELS_UNET = {"unet_multitask": build_unet_multitask}
