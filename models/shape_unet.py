"""ShapeUNet: a U-Net for disc heatmaps that also sees the image's gradients (docs/systems/spine_disc_hourglass.md).

The "look once" disc-labelling work feeds its network the image's shape information as a second input: the gradient
maps of the image. Here they are computed inside the model, so every reader, loader, augmentation and `medpose
predict` path gives the network the same input without a data-side change: for each image channel c the Sobel
derivatives

    gx = I * [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8,   gy = I * [[-1, -2, -1], [0, 0, 0], [1, 2, 1]] / 8

(cross-correlation, replicate padding, so a constant image has zero gradient up to its border; /8 makes a unit ramp
give 1) are stacked after the image: the U-Net receives 3 x in_channels channels. Network: the double-conv U-Net of
models/unet.py (GroupNorm by default, `depth` poolings, `width` channels at full resolution) with one 1 x 1 head of
K heatmaps at input resolution, {"heatmap_BKHW"}. Trained with the hourglass's heatmap loss (visibility-weighted MSE,
models/hourglass.StackedHeatmapLoss with a single "stack") and schedule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hourglass import StackedHeatmapLoss
from .unet import NORMS, unet_features, unet_layers

WHERE = "models/shape_unet.py"

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_gradients(image_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W): gx and gy of every channel (channel c -> 2c, 2c + 1), Sobel / 8 with replicate padding."""
    c = image_BCHW.shape[1]
    kx = torch.tensor(SOBEL_X, dtype=image_BCHW.dtype, device=image_BCHW.device) / 8.0
    k = torch.stack([kx, kx.t()])[:, None].repeat(c, 1, 1, 1)            # (2C, 1, 3, 3)
    return F.conv2d(F.pad(image_BCHW, (1, 1, 1, 1), mode="replicate"), k, groups=c)


class ShapeUNet(nn.Module):
    """forward(image_BCHW) -> {"heatmap_BKHW": (B, K, H, W)}; shape_input() is what the U-Net sees."""

    def __init__(self, in_channels: int = 1, num_keypoints: int = 11, width: int = 16, depth: int = 4,
                 norm: str = "gn", gradients: bool = True):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"{WHERE}: norm must be one of {NORMS}, got {norm!r}")
        if in_channels < 1 or num_keypoints < 1 or width < 1 or depth < 1:
            raise ValueError(f"{WHERE}: need in_channels, num_keypoints, width, depth >= 1; got {in_channels}, "
                             f"{num_keypoints}, {width}, {depth}")
        self.depth, self.gradients = depth, gradients
        cin = in_channels * (3 if gradients else 1)
        chans = [width * 2 ** level for level in range(depth + 1)]
        self.encoder, self.decoder = unet_layers(cin, chans, norm)
        self.head = nn.Conv2d(chans[0], num_keypoints, 1)

    def shape_input(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        """What the U-Net sees: the image followed by its Sobel gradients (or the image alone)."""
        if not self.gradients:
            return image_BCHW
        return torch.cat([image_BCHW, sobel_gradients(image_BCHW)], dim=1)

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image_BCHW.shape[-2:]
        step = 2 ** self.depth
        if h % step or w % step:
            raise ValueError(f"{WHERE}: input {h}x{w} must be divisible by 2^depth = {step}")
        x = unet_features(self.shape_input(image_BCHW), self.encoder, self.decoder)
        return {"heatmap_BKHW": self.head(x)}


def build_shape_unet(in_channels: int = 1, num_keypoints: int = 11, width: int = 16, depth: int = 4,
                     norm: str = "gn", gradients: bool = True) -> ShapeUNet:
    """in_channels = the image's channels (filled from the data); the gradient channels are added inside."""
    return ShapeUNet(in_channels, num_keypoints, width, depth, norm, gradients)


MODELS_SHAPE = {"shape_unet": build_shape_unet}
CRITERIA_SHAPE = {"shape_unet": StackedHeatmapLoss}
