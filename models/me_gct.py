"""ME-GCT: multi-expert gated channel transformation (MultiHipPoseNet, docs/systems/hip_us_multihipposenet.md).

At each encoder level the E experts' features are concatenated, every channel gets a data-dependent gain from a GCT
gate (Yang et al., "Gated Channel Transformation for Visual Recognition", CVPR 2020), and a 1x1 conv + GroupNorm +
ReLU fuses the E*C gated channels back to C.

The gate is kernels/gct_gate.py: `gct_gate` (Triton on CUDA, its torch reference `gct_gate_ref` elsewhere; the
reference is the specification, docs/systems/hip_us_multihipposenet.md). Because the gate is a per-sample, per-channel
scale, the 1x1 fusion conv can absorb it (`gct_gate_conv1x1(route="fused")`, model.args.gct_fused): the gated (B, E*C,
H, W) tensor is then never written. Gate-then-conv is the default: it measured faster on an H200.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.gct_gate import gct_gate, gct_gate_conv1x1, gct_gate_ref

from .resnet_gn import group_norm

__all__ = ["GCT", "MEGCT", "MEGCTSet", "gct_gate", "gct_gate_conv1x1", "gct_gate_ref"]


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
    -> GroupNorm -> ReLU. fused=False (default) gates with the gct_gate kernels, writes the gated tensor, then runs
    the cuDNN conv: measured faster on an H200 than fused=True, which folds the gate into a batched GEMM with a
    per-sample weight so the gated tensor is never written (same values and parameters either way)."""

    def __init__(self, num_experts: int, channels: int, gn_groups: int = 32, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.num_experts, self.fused = num_experts, bool(fused)
        self.gate = GCT(num_experts * channels, eps)
        self.fuse = nn.Sequential(nn.Conv2d(num_experts * channels, channels, 1, bias=False),
                                  group_norm(channels, gn_groups), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self.fuse[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, expert_feats: list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor) -> torch.Tensor:
        """expert_feats: the E experts' features of this level, or their channel concatenation (B, E*C, H, W) when
        the caller shares one concatenation between several fusion module sets."""
        if torch.is_tensor(expert_feats):
            x_BCHW = expert_feats
            if x_BCHW.shape[1] != self.gate.alpha.shape[1]:
                raise ValueError(f"models/me_gct.py: MEGCT built for {self.gate.alpha.shape[1]} concatenated "
                                 f"channels, got {x_BCHW.shape[1]}")
        else:
            if len(expert_feats) != self.num_experts:
                raise ValueError(f"models/me_gct.py: MEGCT built for {self.num_experts} experts, got "
                                 f"{len(expert_feats)}")
            x_BCHW = torch.cat(list(expert_feats), dim=1)
        if not self.fused:
            return self.fuse(self.gate(x_BCHW))
        conv, norm, act = self.fuse
        g = self.gate
        return act(norm(gct_gate_conv1x1(x_BCHW, g.alpha, g.gamma, g.beta, conv.weight, g.eps, route="fused")))


class MEGCTSet(nn.Module):
    """The 5 levels' ME-GCT modules (one fusion module set; the network holds one per task or one shared)."""

    def __init__(self, num_experts: int, level_channels: list[int], gn_groups: int = 32, eps: float = 1e-5,
                 fused: bool = False):
        super().__init__()
        self.levels = nn.ModuleList(MEGCT(num_experts, c, gn_groups, eps, fused) for c in level_channels)

    def forward(self, per_level_expert_feats: list[tuple[torch.Tensor, ...] | torch.Tensor]) -> list[torch.Tensor]:
        return [m(feats) for m, feats in zip(self.levels, per_level_expert_feats)]
