"""ME-GCT: multi-expert gated channel transformation (MultiHipPoseNet, SEEDS.md §1).

At each encoder level the E experts' features are concatenated, every channel gets a data-dependent gain from a GCT
gate (Yang et al., "Gated Channel Transformation for Visual Recognition", CVPR 2020), and a 1x1 conv + GroupNorm +
ReLU fuses the E*C gated channels back to C.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet_gn import group_norm


def gct_gate(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """GCT gate (Yang et al. 2020, eqs. 1-4, l2 mode), plain torch: the specification and the CPU path.

    x: (B, C, H, W); alpha, gamma, beta: (1, C, 1, 1).
        emb  = alpha * sqrt(sum_{h,w} x^2 + eps)          global context embedding, per sample and channel
        norm = gamma / sqrt(mean_c(emb^2) + eps)          channel normalisation (competition between channels)
        out  = x * (1 + tanh(emb * norm + beta))          gain in (0, 2); identity at init (gamma = beta = 0)
    A reduction over H*W then an elementwise multiply: memory-bound, so a fused kernel (kernels/) can replace this
    function through a dispatcher with exactly this signature. Statistics are taken in at least float32 so bf16 inputs
    do not lose the sum of squares (float64 stays float64, for gradcheck).
    """
    if x.dim() != 4:
        raise ValueError(f"models/me_gct.py: gct_gate expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    xc = x.to(torch.promote_types(x.dtype, torch.float32))        # fp16/bf16 -> fp32; fp32/fp64 unchanged
    emb = alpha * (xc.pow(2).sum(dim=(2, 3), keepdim=True) + eps).sqrt()
    norm = gamma / (emb.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    gate = 1.0 + torch.tanh(emb * norm + beta)
    return (xc * gate).to(x.dtype)


class GCT(nn.Module):
    """The GCT gate's parameters, alpha/gamma/beta of shape (1, C, 1, 1) initialised 1/0/0 (Yang et al. 2020)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = float(eps)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return gct_gate(x_BCHW, self.alpha, self.gamma, self.beta, self.eps)


class MEGCT(nn.Module):
    """One level: concat E experts (B, E*C, H, W) -> GCT gate -> Conv1x1 (E*C -> C, no bias: GroupNorm follows)
    -> GroupNorm -> ReLU."""

    def __init__(self, num_experts: int, channels: int, gn_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.num_experts = num_experts
        self.gate = GCT(num_experts * channels, eps)
        self.fuse = nn.Sequential(nn.Conv2d(num_experts * channels, channels, 1, bias=False),
                                  group_norm(channels, gn_groups), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self.fuse[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, expert_feats: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(expert_feats) != self.num_experts:
            raise ValueError(f"models/me_gct.py: MEGCT built for {self.num_experts} experts, got {len(expert_feats)}")
        return self.fuse(self.gate(torch.cat(list(expert_feats), dim=1)))


class MEGCTSet(nn.Module):
    """The 5 levels' ME-GCT modules (one fusion module set; the network holds one per task or one shared)."""

    def __init__(self, num_experts: int, level_channels: list[int], gn_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.levels = nn.ModuleList(MEGCT(num_experts, c, gn_groups, eps) for c in level_channels)

    def forward(self, per_level_expert_feats: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        return [m(feats) for m, feats in zip(self.levels, per_level_expert_feats)]
