"""Stacked hourglass with multi-level attention for intervertebral disc labelling
(docs/systems/spine_disc_hourglass.md), and its loss.

Network (Newell et al., "Stacked Hourglass Networks", ECCV 2016, pre-activation form; attention as in the
published disc-labelling system):
  stem   Conv7x7/2 (in -> 64) + BN + ReLU -> Res(64 -> 128) -> MaxPool 2 -> Res(128 -> 256) -> Res(256 -> F)
         a 256x256 input becomes F @ 64x64 (stride 4);
  stack  hourglass (depth 4: max-pool down, nearest up, up1 + up2, `num_blocks` residual blocks per branch)
         -> `num_blocks` residual blocks -> fc (Conv1x1 + BN + ReLU) -> score Conv1x1 (F -> K);
         between stacks x <- x + fc_(y) + score_(heatmap) (intermediate supervision);
  attention  concat of every stack's fc output (F*S channels) -> Conv1x1 F*S -> 128 -> 16 -> 8 -> 1 (BN + ReLU
         between, sigmoid at the end) -> one (B, 1, h, w) map multiplying the LAST stack's fc output before its
         score conv;
  output every stack's heatmap upsampled bilinearly to the input size (x4).

The second stem block is the publication's "residual 128": a bottleneck whose *bottleneck width* is 128, i.e. 128 -> 256
channels (the pytorch-pose convention `_make_residual(block, planes=128)`), and the third is 256 -> F. Only this
reading, with biased convolutions and in_channels = 3, reproduces the published sizes exactly: 6,727,062 parameters
(6.73 M), 6,795,239 with attention (6.80 M), 9,969,394 with 3 stacks (9.97 M). A 128 -> 128 second block would give
6.57 M, and a 1-channel input 6.72 M.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .codecs import target_heatmaps

WHERE = "models/hourglass.py"


class PreActBottleneck(nn.Module):
    """BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3 -> BN-ReLU-Conv1x1 (width out/2, i.e. expansion 2) plus the identity, or a
    biased Conv1x1 projection when the channel count changes (He et al., "Identity Mappings in Deep Residual
    Networks", ECCV 2016)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        if out_ch % 2:
            raise ValueError(f"{WHERE}: bottleneck output channels must be even (expansion 2), got {out_ch}")
        mid = out_ch // 2
        self.bn1, self.conv1 = nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, mid, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(mid), nn.Conv2d(mid, mid, 3, padding=1)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, out_ch, 1)
        self.proj = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + self.proj(x)


def residual_blocks(in_ch: int, out_ch: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[PreActBottleneck(in_ch if i == 0 else out_ch, out_ch) for i in range(n)])


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class Hourglass(nn.Module):
    """Recursive hourglass: out = up1(x) + Up(low3(inner(low1(MaxPool(x))))), inner = hourglass of depth - 1 or,
    at the bottom, one more residual branch. Up is nearest-neighbour to up1's size (x2 when the size is even; an
    odd size, floored by the pool, is restored exactly instead of failing the addition)."""

    def __init__(self, channels: int, depth: int, num_blocks: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"{WHERE}: hourglass depth must be >= 1, got {depth}")
        self.up1 = residual_blocks(channels, channels, num_blocks)
        self.low1 = residual_blocks(channels, channels, num_blocks)
        self.inner = (Hourglass(channels, depth - 1, num_blocks) if depth > 1
                      else residual_blocks(channels, channels, num_blocks))
        self.low3 = residual_blocks(channels, channels, num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up1 = self.up1(x)
        low = self.low3(self.inner(self.low1(F.max_pool2d(x, 2))))
        return up1 + F.interpolate(low, size=up1.shape[-2:], mode="nearest")


class StackBody(nn.Module):
    """One stack up to its fc output: hourglass -> residual blocks -> Conv1x1 + BN + ReLU. The unit that
    `checkpointing=True` recomputes in the backward pass."""

    def __init__(self, channels: int, depth: int, num_blocks: int):
        super().__init__()
        self.hg = Hourglass(channels, depth, num_blocks)
        self.res = residual_blocks(channels, channels, num_blocks)
        self.fc = conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.res(self.hg(x)))


class MultiLevelAttention(nn.Module):
    """Concat of the S fc outputs -> Conv1x1 (F*S -> 128 -> 16 -> 8 -> 1), BN + ReLU between, sigmoid: one spatial
    gate in (0, 1) per pixel, shared by all K score channels."""

    def __init__(self, in_ch: int, widths: tuple[int, ...] = (128, 16, 8)):
        super().__init__()
        layers: list[nn.Module] = []
        for w in widths:
            layers.append(conv_bn_relu(in_ch, w))
            in_ch = w
        layers.append(nn.Conv2d(in_ch, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, fc_outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.net(torch.cat(fc_outputs, dim=1)))


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Recompute context for checkpointing: BN layers still normalise with the batch statistics (the recomputed
    activations equal the first pass) but must not move running_mean / running_var a second time. With momentum 0
    the update r <- (1 - 0) r + 0 * batch_stat leaves r bit-identical (momentum None, the cumulative average, is
    covered too: the module only uses 1 / num_batches_tracked when momentum is None); num_batches_tracked, which
    the module increments regardless, is put back. Passing no running stats instead (track_running_stats=False)
    would make batch_norm save fewer tensors than the first pass and fail checkpoint's tensor matching."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, tracked) in zip(bns, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)


class StackedHourglass(nn.Module):
    def __init__(self, num_stacks: int = 2, num_blocks: int = 1, num_features: int = 256, depth: int = 4,
                 num_keypoints: int = 11, in_channels: int = 3, attention: bool = True, checkpointing: bool = False):
        super().__init__()
        if num_stacks < 1 or num_blocks < 1 or num_keypoints < 1 or in_channels < 1:
            raise ValueError(f"{WHERE}: num_stacks={num_stacks}, num_blocks={num_blocks}, "
                             f"num_keypoints={num_keypoints}, in_channels={in_channels} must all be >= 1")
        f = num_features
        self.num_stacks, self.checkpointing = num_stacks, checkpointing
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            PreActBottleneck(64, 128), nn.MaxPool2d(2), PreActBottleneck(128, 256), PreActBottleneck(256, f))
        self.bodies = nn.ModuleList([StackBody(f, depth, num_blocks) for _ in range(num_stacks)])
        self.scores = nn.ModuleList([nn.Conv2d(f, num_keypoints, 1) for _ in range(num_stacks)])
        self.fc_ = nn.ModuleList([nn.Conv2d(f, f, 1) for _ in range(num_stacks - 1)])
        self.score_ = nn.ModuleList([nn.Conv2d(num_keypoints, f, 1) for _ in range(num_stacks - 1)])
        self.attention = MultiLevelAttention(f * num_stacks) if attention else None

    def _body(self, i: int, x: torch.Tensor) -> torch.Tensor:
        body = self.bodies[i]
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(body, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(body)))
        return body(x)

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(image_BCHW)
        fcs, scores = [], []
        for i in range(self.num_stacks):
            y = self._body(i, x)
            fcs.append(y)
            if i < self.num_stacks - 1:
                score = self.scores[i](y)
                scores.append(score)
                x = x + self.fc_[i](y) + self.score_[i](score)
        att_B1hw = self.attention(fcs) if self.attention is not None else None
        y_last = fcs[-1] * att_B1hw if att_B1hw is not None else fcs[-1]
        scores.append(self.scores[-1](y_last))
        size = image_BCHW.shape[-2:]
        heatmaps_SBKHW = torch.stack([F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                                      for s in scores])
        out = {"heatmap_BKHW": heatmaps_SBKHW[-1], "heatmaps_SBKHW": heatmaps_SBKHW}
        if att_B1hw is not None:
            out["attention_B1hw"] = att_B1hw
        return out


def build_hourglass(num_stacks: int = 2, num_blocks: int = 1, num_features: int = 256, depth: int = 4,
                    num_keypoints: int = 11, in_channels: int = 3, attention: bool = True,
                    checkpointing: bool = False) -> StackedHourglass:
    """Defaults = the published disc-labelling network (2 stacks, 1 block, 11 discs, attention): 6.80 M parameters.
    in_channels = 3 (grey replicated) is what the published counts imply. `checkpointing` recomputes each stack's
    body (hourglass + blocks + fc) in the backward pass (torch.utils.checkpoint, non-reentrant): same outputs and
    gradients, BN running statistics updated once, activation memory of the stacks no longer held."""
    return StackedHourglass(num_stacks, num_blocks, num_features, depth, num_keypoints, in_channels, attention,
                            checkpointing)


class StackedHeatmapLoss(nn.Module):
    """Sum over stacks of the visibility-weighted heatmap MSE 0.5 * mean((p v - g v)^2)
    (docs/systems/spine_disc_hourglass.md), each stack's heatmap against the same target at input resolution. Returns
    {"loss", "loss_stack0", ...}; parts detached. Computed in float32 whatever the autocast dtype of the outputs."""

    def __init__(self, sigma_px: float | None = None, heatmap_peak: float = 1.0):
        super().__init__()
        # used only when the loader left the targets to the device (data.targets=device): models/codecs.target_heatmaps
        self.sigma_px, self.heatmap_peak = sigma_px, float(heatmap_peak)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred_SBKHW = outputs.get("heatmaps_SBKHW")
        if pred_SBKHW is None:
            pred_SBKHW = outputs["heatmap_BKHW"].unsqueeze(0)
        target_BKHW = target_heatmaps(targets, pred_SBKHW[0], self.sigma_px, self.heatmap_peak, WHERE).float()
        if tuple(pred_SBKHW.shape[1:]) != tuple(target_BKHW.shape):
            raise ValueError(f"{WHERE}: heatmaps {tuple(pred_SBKHW.shape[1:])} do not match the target "
                             f"{tuple(target_BKHW.shape)}")
        v_BK11 = targets["kpts_visible_BK"].to(device=target_BKHW.device, dtype=torch.float32)[..., None, None]
        g_BKHW = target_BKHW * v_BK11
        parts, total = {}, target_BKHW.new_zeros(())
        for s in range(pred_SBKHW.shape[0]):
            loss_s = 0.5 * (pred_SBKHW[s].float() * v_BK11 - g_BKHW).pow(2).mean()
            total = total + loss_s
            parts[f"loss_stack{s}"] = loss_s.detach()
        return {"loss": total, **parts}


MODELS_HG = {"hourglass": build_hourglass}
CRITERIA_HG = {"hourglass": StackedHeatmapLoss}
