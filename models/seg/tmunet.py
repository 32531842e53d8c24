"""TMUnet for the segmentation zoo (docs/systems/segmentation_zoo.md): "tmunet".

Azad, Heidari, Wu, Merhof, "Contextual Attention Network: Transformer Meets U-Net", MLMI (MICCAI workshop) 2022,
arXiv:2203.01932. Written here from the paper and the layer list of the authors' released model; no code is shared
with it. Two branches meet in a contextual-attention head:

* CNN branch -- a U-Net on a torchvision ResNet (ResNet-50 in the paper, weights=None: nothing is downloaded).
  Skips: the input image (stride 1), the stem conv (stride 2, 64 channels), layer1..layer3 (strides 4..16);
  layer4 (stride 32) goes through a bridge of two Conv3x3-BN-ReLU. Five up blocks: 2x2 stride-2 transposed conv,
  concatenation with the skip, two Conv3x3-BN-ReLU. Widths follow the encoder (1024, 512, 256 for ResNet-50), then
  `dec_widths` (128, 64) at strides 2 and 1.
* Transformer branch (long-range context) -- the image is cut into P x P patches (P = 16); each patch is embedded by
  a small CNN (three stages of two Conv3x3-BN-ReLU and a 2x2 max-pool, widths `patch_widths` then `embed_dim`,
  global average pool), a class token and learned position embeddings are added (defined on a 16 x 16 patch grid,
  the paper's 256 x 256 input, and bilinearly resized to other grids), and `depth` pre-norm transformer blocks
  (multi-head self-attention softmax(Q K^T / sqrt(d)) V over all patches, MLP with ratio 4 and GELU) relate every
  patch to every other. The patch tokens give two maps at the input resolution (each patch's value over its
  pixels): the global contextual representation sigmoid(BN(Conv1x1(tokens))) (`ctx_channels` = 64) and the
  regional distribution sigmoid(mean of each token) (one channel).
* Contextual attention head -- on the last decoder map x (64 channels): a boundary map
  B = sigmoid(Conv1x1 -> BN -> ReLU -> Conv1x1(x)) (64 -> 32 -> 1), squeeze-excitation channel recalibration
  (ratio 16), x = SE(x) + B, x = x * regional distribution, concatenated with the global contextual
  representation, Conv1x1 to the classes (logits).

Where MedPose departs from the released code (each a bug there, or a fixed size): attention is scaled before the
softmax by sqrt(head dim) (the code divides the softmax output by sqrt(embedding size)); the patch maps use the
patch tokens only (the code's map includes the class token and is offset by one patch); the SE block multiplies its
input by the channel weights (the code returns the weights alone); any input size that is a multiple of 32 (and of
P) works. The paper adds boundary and region losses on B and the region coefficients; the zoo trains with its own
segmentation loss only, so B acts as a learned spatial attention term.

Parameter count: neither the paper nor its repository states one that we could find. The test compares the default
build (ResNet-50, embedding 512, depth 4, 8 heads) with the count computed from the layers listed above: 165.2 M,
of which 75.5 M are the 2048-wide bridge and 23.5 M the ResNet-50. The HC18 table trains a small build
(ResNet-18, embedding 128, `patch_widths` (32, 64), 4 heads).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import SegSpec, check_input, seg_output
from .encoder_nets import plain_resnet

_WHERE = "models/seg/tmunet.py"


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """Conv kxk with bias (as in the released model) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, E): qkv = Linear(E, 3E) split as [q | k | v], each into `heads`
    heads of E/heads; per head softmax(q k^T / sqrt(E/heads)) v; heads concatenated, Linear(E, E)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{_WHERE}: embed_dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)   # each B h N d
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, e))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) with MLP = Linear(E, rE) -> GELU -> Linear(rE, E)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """The transformer branch: (B, C, H, W) -> (global contextual map (B, ctx, H, W), regional map (B, 1, H, W))."""

    def __init__(self, in_channels: int, patch_size: int, embed_dim: int, depth: int, heads: int,
                 patch_widths: Sequence[int], ctx_channels: int, ref_grid: int):
        super().__init__()
        self.patch_size = patch_size
        widths = [*patch_widths, embed_dim]
        stages, cin = [], in_channels
        for w in widths:
            stages += [_conv_bn_relu(cin, w), _conv_bn_relu(w, w), nn.MaxPool2d(2)]
            cin = w
        self.patch_encoder = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_cls = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_grid = nn.Parameter(torch.zeros(1, embed_dim, ref_grid, ref_grid))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_cls, std=0.02)
        nn.init.trunc_normal_(self.pos_grid, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(embed_dim, heads) for _ in range(depth)))
        self.context = nn.Sequential(nn.Conv2d(embed_dim, ctx_channels, 1), nn.BatchNorm2d(ctx_channels),
                                     nn.Sigmoid())

    def forward(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = image_BCHW.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = image_BCHW.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, p, p)
        tokens = self.patch_encoder(patches).reshape(b, gh * gw, -1)                       # B N E, row-major
        pos = F.interpolate(self.pos_grid, size=(gh, gw), mode="bilinear", align_corners=False)   # identity at 16x16
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        cls = (self.cls_token + self.pos_cls).expand(b, -1, -1)
        tokens = self.blocks(torch.cat([cls, tokens], dim=1))[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, -1, gh, gw)                               # B E gh gw
        # 1x1 conv, BN (batch statistics are the same over repeated pixels) and the per-token mean commute with
        # copying each patch's value over its P x P pixels, so they run on the patch grid and are then expanded.
        ctx = F.interpolate(self.context(grid), size=(h, w), mode="nearest")
        region = F.interpolate(torch.sigmoid(grid.mean(dim=1, keepdim=True)), size=(h, w), mode="nearest")
        return ctx, region


class UpBlock(nn.Module):
    """2x2 stride-2 transposed conv (cin -> cout), concatenation with the skip, two Conv3x3-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.convs = nn.Sequential(_conv_bn_relu(cout + skip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class TMUnet(nn.Module):
    """TMUnet (see the module docstring)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", patch_size: int = 16,
                 embed_dim: int = 512, depth: int = 4, heads: int = 8, patch_widths: Sequence[int] = (128, 256),
                 dec_widths: Sequence[int] = (128, 64), ctx_channels: int = 64, se_ratio: int = 16,
                 img_size: int = 256):
        super().__init__()
        if patch_size < 8 or patch_size % 8:
            raise ValueError(f"{_WHERE}: patch_size must be a multiple of 8 (the patch CNN pools 3 times), "
                             f"got {patch_size}")
        if len(patch_widths) != 2 or len(dec_widths) != 2 or min(*patch_widths, *dec_widths) < 1:
            raise ValueError(f"{_WHERE}: patch_widths and dec_widths must be two positive widths each, "
                             f"got {list(patch_widths)}, {list(dec_widths)}")
        if depth < 1 or img_size % patch_size:
            raise ValueError(f"{_WHERE}: need depth >= 1 and img_size a multiple of patch_size, got depth={depth}, "
                             f"img_size={img_size}, patch_size={patch_size}")
        if dec_widths[1] < se_ratio:
            raise ValueError(f"{_WHERE}: dec_widths[1] ({dec_widths[1]}) must be >= se_ratio ({se_ratio})")
        self.multiple = math.lcm(32, patch_size)
        net = plain_resnet(backbone, in_channels)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        c = [_out_channels(layer) for layer in self.layers]
        self.bridge = nn.Sequential(_conv_bn_relu(c[3], c[3]), _conv_bn_relu(c[3], c[3]))
        d2, d1 = dec_widths
        self.ups = nn.ModuleList([UpBlock(c[3], c[2], c[2]), UpBlock(c[2], c[1], c[1]), UpBlock(c[1], c[0], c[0]),
                                  UpBlock(c[0], 64, d2), UpBlock(d2, in_channels, d1)])
        self.transformer = PatchTransformer(in_channels, patch_size, embed_dim, depth, heads, patch_widths,
                                            ctx_channels, img_size // patch_size)
        self.boundary = nn.Sequential(nn.Conv2d(d1, 32, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, 1, 1, bias=False), nn.Sigmoid())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(d1, d1 // se_ratio, bias=False),
                                nn.ReLU(inplace=True), nn.Linear(d1 // se_ratio, d1, bias=False), nn.Sigmoid())
        self.head = nn.Conv2d(d1 + ctx_channels, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_WHERE} (tmunet)")
        ctx, region = self.transformer(image_BCHW)
        s1 = self.stem(image_BCHW)
        feats, h = [], self.pool(s1)
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        h = self.bridge(feats[3])
        for up, skip in zip(self.ups, (feats[2], feats[1], feats[0], s1, image_BCHW)):
            h = up(h, skip)
        b = self.boundary(h)
        h = h * self.se(h)[:, :, None, None] + b
        h = h * region
        return seg_output(self.head(torch.cat([h, ctx], dim=1)), image_BCHW.shape[-2:], None, self.training)


def _out_channels(layer: nn.Sequential) -> int:
    """Output width of a torchvision ResNet layer (the last conv's out_channels of its last block)."""
    convs = [m for m in layer[-1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build_tmunet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", patch_size: int = 16,
                 embed_dim: int = 512, depth: int = 4, heads: int = 8, patch_widths: Sequence[int] = (128, 256),
                 dec_widths: Sequence[int] = (128, 64), ctx_channels: int = 64, img_size: int = 256) -> nn.Module:
    """TMUnet. Defaults are the paper's model (ResNet-50, 16 x 16 patches embedded to 512, depth 4, 8 heads);
    img_size: the input the position embeddings are defined for (other sizes resize them)."""
    return TMUnet(in_channels, num_classes, backbone, patch_size, embed_dim, depth, heads, tuple(patch_widths),
                  tuple(dec_widths), ctx_channels, 16, img_size)


SPECS_TMUNET: dict[str, SegSpec] = {
    "tmunet": SegSpec("tmunet", build_tmunet, 32, "torchvision",
                      "Azad et al., Contextual Attention Network: Transformer Meets U-Net, MLMI 2022",
                      {"backbone": "resnet50", "patch_size": 16, "embed_dim": 512, "depth": 4, "heads": 8,
                       "patch_widths": [128, 256], "dec_widths": [128, 64], "ctx_channels": 64, "img_size": 256}),
}
