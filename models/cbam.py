"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018), as used by the hip X-ray models
(docs/systems/hip_xray_efficientnet.md).

    channel:  M_c = sigmoid(MLP(avgpool_hw(x)) + MLP(maxpool_hw(x)))          (B, C, 1, 1), x <- x * M_c
              MLP = Conv1x1(C -> C/r, no bias) -> ReLU -> Conv1x1(C/r -> C, no bias), shared by both pools
    spatial:  M_s = sigmoid(Conv7x7([mean_c(x), max_c(x)]))                   (B, 1, H, W), x <- x * M_s
The spatial conv has no bias (as in the reference CBAM, whose conv is followed by a BatchNorm there; here the plain
conv is what the published hip X-ray model uses). Parameters: 2 C (C/r) + 2 * 49, with C/r = max(C // r, 1).
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x_BCHW.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x_BCHW.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"models/cbam.py: spatial kernel size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x_BCHW.mean(dim=1, keepdim=True), x_BCHW.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel then spatial attention, both multiplicative; output has the input's shape."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"models/cbam.py: channels={channels} and reduction={reduction} must be >= 1")
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = x_BCHW * self.channel(x_BCHW)
        return x_BCHW * self.spatial(x_BCHW)
