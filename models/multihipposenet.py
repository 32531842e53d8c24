"""MultiHipPoseNet: multi-expert encoder + ME-GCT + one UNet decoder per task + MT-GALM
(docs/systems/hip_us_multihipposenet.md).

Tasks: 0 = segmentation (num_classes logits), 1 = landmarks (num_keypoints heatmaps), both at input resolution.
Published configuration: 3 ResNet-50-GN experts, width 64, shared fusion, weight-free MT-GALM -> 128.24 M parameters.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .me_gct import MEGCTSet
from .mt_galm import GALM_MODES, MTGALM
from .resnet_gn import ResNetGN, group_norm

FUSION_MODES = ("per_task", "shared")
DECODER_NORMS = ("none", "gn")


def conv_relu_pair(c_in: int, c_out: int, norm: str, gn_groups: int) -> nn.Sequential:
    """Two Conv3x3 (no bias) + ReLU; with norm="gn" a GroupNorm before each ReLU.

    The published decoder has no normalisation. Measured on the phantom at CPU widths (decoder width 16): whole
    regions of the landmark decoder's features die (ReLU at 0, e.g. 13 of 16 channels around P3) and that landmark's
    heatmap never leaves the predict-zero plateau; GroupNorm keeps every region's features alive."""
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        layers.append(nn.Conv2d(a, b, 3, padding=1, bias=False))
        if norm == "gn":
            layers.append(group_norm(b, gn_groups))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UpBlock(nn.Module):
    """Bilinear x2 (align_corners=True) -> concat skip -> two Conv3x3 (no bias) + ReLU (optionally GN)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, norm: str = "none", gn_groups: int = 32):
        super().__init__()
        self.convs = conv_relu_pair(c_in + c_skip, c_out, norm, gn_groups)

    def forward(self, x_BCHW: torch.Tensor, skip_BCHW: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x_BCHW, size=skip_BCHW.shape[-2:], mode="bilinear", align_corners=True)
        return self.convs(torch.cat([up, skip_BCHW], dim=1))


class TaskDecoder(nn.Module):
    """UNet decoder of one task: 4 up blocks (dec_width x 8/4/2/1), a final x2 block and a GN+ReLU+Conv3x3 head."""

    def __init__(self, enc_channels: list[int], dec_width: int, out_channels: int, gn_groups: int,
                 norm: str = "none"):
        super().__init__()
        widths = [dec_width * 8, dec_width * 4, dec_width * 2, dec_width]
        c_in = enc_channels[4]
        blocks = []
        for i, c_out in enumerate(widths):
            blocks.append(UpBlock(c_in, enc_channels[3 - i], c_out, norm, gn_groups))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.level_channels = widths
        self.final = conv_relu_pair(dec_width, dec_width, norm, gn_groups)
        self.head = nn.Sequential(group_norm(dec_width, gn_groups), nn.ReLU(inplace=False),
                                  nn.Conv2d(dec_width, out_channels, 3, padding=1))
        # The decoder has ~10 conv+ReLU layers and no normalisation: He init (fan_in) keeps the activation scale
        # constant through them (He et al., ICCV 2015); PyTorch's default shrinks it ~2x per layer.
        for m in [*self.blocks.modules(), *self.final.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def levels(self, enc: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pass 1: the 4 decoder level features, coarse to fine."""
        x, out = enc[4], []
        for i, block in enumerate(self.blocks):
            x = block(x, enc[3 - i])
            out.append(x)
        return out

    def finish(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Finest decoder level (1/2 resolution) -> x2 -> two convs -> head, at input resolution."""
        x = F.interpolate(x_BCHW, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.head(self.final(x))


class MultiHipPoseNet(nn.Module):
    """forward(image_BCHW) -> {"seg_logits_BCHW": (B, num_classes, H, W), "heatmap_BKHW": (B, num_keypoints, H, W)}."""

    def __init__(self, in_channels: int = 3, num_classes: int = 8, num_keypoints: int = 6, num_experts: int = 3,
                 expert_depth: int = 50, width: int = 64, decoder_width: int | None = None, fusion: str = "per_task",
                 galm: str = "gcn", galm_embed_dim: int = 10, gn_groups: int = 32, gct_eps: float = 1e-5,
                 decoder_norm: str = "none", gct_fused: bool = False):
        super().__init__()
        _check_args(num_classes, num_keypoints, num_experts, fusion, galm)
        if decoder_norm not in DECODER_NORMS:
            raise ValueError(f"models/multihipposenet.py: decoder_norm='{decoder_norm}' is not one of {DECODER_NORMS}")
        dec_width = width if decoder_width is None else int(decoder_width)
        if dec_width < 1:
            raise ValueError(f"models/multihipposenet.py: decoder_width={decoder_width} must be >= 1")
        self.experts = nn.ModuleList(ResNetGN(expert_depth, width, in_channels, gn_groups) for _ in range(num_experts))
        enc_channels = self.experts[0].out_channels
        num_sets = 2 if fusion == "per_task" else 1
        self.fusions = nn.ModuleList(MEGCTSet(num_experts, enc_channels, gn_groups, gct_eps, gct_fused)
                                     for _ in range(num_sets))
        self.decoders = nn.ModuleList([TaskDecoder(enc_channels, dec_width, num_classes, gn_groups, decoder_norm),
                                       TaskDecoder(enc_channels, dec_width, num_keypoints, gn_groups, decoder_norm)])
        self.galm = (None if galm == "none" else
                     MTGALM(self.decoders[0].level_channels, num_tasks=2, mode=galm, embed_dim=galm_embed_dim))
        self.in_channels = in_channels

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(image_BCHW)
        per_expert = [expert(image_BCHW) for expert in self.experts]
        per_level = list(zip(*per_expert))                      # 5 levels x E experts
        if len(self.fusions) > 1:  # per-task fusion sets gate the same concatenation: build it once per level
            per_level = [torch.cat(level, dim=1) for level in per_level]
        fused = [fusion(per_level) for fusion in self.fusions]
        enc_by_task = [fused[t % len(fused)] for t in range(len(self.decoders))]
        first = [dec.levels(enc) for dec, enc in zip(self.decoders, enc_by_task)]
        if self.galm is None:
            finest = [levels[-1] for levels in first]
        else:
            finest = self._second_pass(enc_by_task, first)
        seg_logits = self.decoders[0].finish(finest[0])
        heatmap = self.decoders[1].finish(finest[1])
        return {"seg_logits_BCHW": seg_logits, "heatmap_BKHW": heatmap}

    def _second_pass(self, enc_by_task: list[list[torch.Tensor]], first: list[list[torch.Tensor]]
                     ) -> list[torch.Tensor]:
        """MT-GALM pass 2: re-run each decoder adding the graph gain from the other tasks at every level.

        The first up block's output does not depend on the gains, so pass 1's level-0 feature is reused instead of
        being recomputed (same result, one up block fewer per task)."""
        adjs = self.galm.adjacencies()
        finest = []
        for t, dec in enumerate(self.decoders):
            x = None
            for lvl in range(len(dec.blocks)):
                x = first[t][0] if lvl == 0 else dec.blocks[lvl](x, enc_by_task[t][3 - lvl])
                feats_by_task = [levels[lvl] for levels in first]
                x = x + self.galm.gain(t, lvl, feats_by_task, adjs[lvl])
            finest.append(x)
        return finest

    def _check_input(self, image_BCHW: torch.Tensor) -> None:
        if image_BCHW.dim() != 4 or image_BCHW.shape[1] != self.in_channels:
            raise ValueError(f"models/multihipposenet.py: expected image_BCHW of shape (B, {self.in_channels}, H, W), "
                             f"got {tuple(image_BCHW.shape)}")
        h, w = image_BCHW.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"models/multihipposenet.py: input H, W = ({h}, {w}) must be divisible by 32")


def _check_args(num_classes: int, num_keypoints: int, num_experts: int, fusion: str, galm: str) -> None:
    where = "models/multihipposenet.py"
    if num_classes < 1 or num_keypoints < 1 or num_experts < 1:
        raise ValueError(f"{where}: num_classes={num_classes}, num_keypoints={num_keypoints}, "
                         f"num_experts={num_experts} must all be >= 1")
    if fusion not in FUSION_MODES:
        raise ValueError(f"{where}: fusion='{fusion}' is not one of {FUSION_MODES}")
    if galm not in GALM_MODES:
        raise ValueError(f"{where}: galm='{galm}' is not one of {GALM_MODES}")


def build_multihipposenet(in_channels: int = 3, num_classes: int = 8, num_keypoints: int = 6, num_experts: int = 3,
                          expert_depth: int = 50, width: int = 64, decoder_width: int | None = None,
                          fusion: str = "per_task", galm: str = "gcn", galm_embed_dim: int = 10, gn_groups: int = 32,
                          gct_eps: float = 1e-5, decoder_norm: str = "none", gct_fused: bool = False
                          ) -> MultiHipPoseNet:
    """Config-friendly builder (plain values only); see MultiHipPoseNet and docs/systems/hip_us_multihipposenet.md."""
    return MultiHipPoseNet(in_channels=in_channels, num_classes=num_classes, num_keypoints=num_keypoints,
                           num_experts=num_experts, expert_depth=expert_depth, width=width,
                           decoder_width=decoder_width, fusion=fusion, galm=galm, galm_embed_dim=galm_embed_dim,
                           gn_groups=gn_groups, gct_eps=gct_eps, decoder_norm=decoder_norm,
                           gct_fused=gct_fused)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())

