"""Spatial-transformer front-end for the segmentation zoo (docs/systems/segmentation_zoo.md; Jaderberg et al., "Spatial
Transformer Networks", NeurIPS 2015).

`SpatialTransformer(in_channels)`: localisation net 4 x [Conv3x3 + BatchNorm + ReLU] with channels
in_channels -> 8 -> 16 -> 32 -> 64, adaptive average pooling to 2x2 (64 * 4 = 256 features), Linear 256 -> 32,
ReLU, Linear 32 -> 6 initialised to the identity transform (zero weight, bias [1, 0, 0, 0, 1, 0]); the 2x3 affine
theta drives `affine_grid` + `grid_sample` (bilinear, align_corners=False, zero padding) on the input. Forward
returns (warped image, theta_B23).

`STNSeg(model, in_channels)`: warps the input, runs any zoo model on the warped image, then maps the logits (and
any aux logits) back to the input frame with the inverse affine, so that outputs stay aligned with the input image
for metrics and overlays. With theta = A[:2] for the 3x3 A = [theta; 0 0 1], `affine_grid(theta)` samples the input
at A p for every output location p, so the model's logits at p describe the input at q = A p; sampling the logits at
A^-1 q (the first two rows of inv(A)) therefore puts them back at q. Regions of the input frame that the warped view
did not cover are filled from the nearest covered logits (padding_mode="border"). The output dict also carries
"stn_theta_B23".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_WHERE = "models.seg.stn"


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def warp(image_BCHW: torch.Tensor, theta_B23: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample `image_BCHW` at theta · [x, y, 1] for every output location (normalised coords, align_corners=False)."""
    if theta_B23.dim() != 3 or theta_B23.shape[1:] != (2, 3) or theta_B23.shape[0] != image_BCHW.shape[0]:
        raise ValueError(f"{_WHERE}: theta must be (B, 2, 3) with B = {image_BCHW.shape[0]}, "
                         f"got {tuple(theta_B23.shape)}")
    grid = F.affine_grid(theta_B23.to(image_BCHW.dtype), list(image_BCHW.shape), align_corners=False)
    return F.grid_sample(image_BCHW, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def invert_affine(theta_B23: torch.Tensor) -> torch.Tensor:
    """First two rows of inv([theta; 0 0 1]) (differentiable; computed in float32 or wider)."""
    b = theta_B23.shape[0]
    work = theta_B23.float() if theta_B23.dtype in (torch.float16, torch.bfloat16) else theta_B23
    last = torch.tensor([0.0, 0.0, 1.0], dtype=work.dtype, device=work.device).expand(b, 1, 3)
    full = torch.cat([work, last], dim=1)
    return torch.linalg.inv(full)[:, :2, :].to(theta_B23.dtype)


class SpatialTransformer(nn.Module):
    """Localisation net + affine warp; starts as the identity. Returns (warped image, theta_B23)."""

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"{_WHERE}: in_channels must be >= 1, got {in_channels}")
        self.localisation = nn.Sequential(
            _conv_bn_relu(in_channels, 8), _conv_bn_relu(8, 16), _conv_bn_relu(16, 32), _conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, 32), nn.ReLU(inplace=True),
            nn.Linear(32, 6))
        last = self.localisation[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    @property
    def theta_head(self) -> nn.Linear:
        """The last Linear (32 -> 6) that produces theta."""
        return self.localisation[-1]

    def forward(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image_BCHW.dim() != 4:
            raise ValueError(f"{_WHERE}: expected a (B, C, H, W) image, got shape {tuple(image_BCHW.shape)}")
        theta_B23 = self.localisation(image_BCHW).view(-1, 2, 3)
        return warp(image_BCHW, theta_B23), theta_B23


class STNSeg(nn.Module):
    """Any zoo model behind a spatial transformer; logits are mapped back to the input frame."""

    def __init__(self, model: nn.Module, in_channels: int):
        super().__init__()
        self.stn = SpatialTransformer(in_channels)
        self.model = model

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        warped, theta_B23 = self.stn(image_BCHW)
        out = self.model(warped)
        if not isinstance(out, dict) or "seg_logits_BCHW" not in out:
            raise ValueError(f"{_WHERE}: the wrapped model must return a dict with 'seg_logits_BCHW', "
                             f"got {type(out).__name__}")
        inv_B23 = invert_affine(theta_B23)
        result = dict(out)
        result["seg_logits_BCHW"] = warp(out["seg_logits_BCHW"], inv_B23, padding_mode="border")
        if "aux_logits_BCHW" in out:
            result["aux_logits_BCHW"] = [warp(a, inv_B23, padding_mode="border") for a in out["aux_logits_BCHW"]]
        result["stn_theta_B23"] = theta_B23
        return result
