"""UNet-family segmentation networks of the zoo, part 1 (docs/systems/segmentation_zoo.md): "unet", "segnet",
"attention_unet", "unet_pp", "unet3p", "simple_unet". Part 2 (dense_unet, r2unet, r2_attention_unet, multiresunet,
onenet, csnet) is models/seg/unet_variants.py, which reuses the blocks and the generic encoder-decoder defined here.

All written here from the papers' descriptions (no pretrained weights):
* "unet" -- Ronneberger, Fischer, Brox, "U-Net: Convolutional networks for biomedical image segmentation",
  MICCAI 2015. Double conv (Conv3x3 -> BN -> ReLU, twice; padded, so the output keeps the input size; the paper's
  convs are unpadded and have no BN -- the now-standard reading), widths 64-128-256-512-1024, 4 max-poolings,
  2x2 transposed-conv (stride 2, halving the channels) upsampling, concatenation with the skip, 1x1 conv head.
* "segnet" -- Badrinarayanan, Kendall, Cipolla, "SegNet: A deep convolutional encoder-decoder architecture for
  image segmentation", TPAMI 2017. VGG16-BN encoder (13 convs, 2-2-3-3-3, widths 64-128-256-512-512, 5 max-poolings
  that keep their argmax indices); mirrored decoder that upsamples with those indices (max_unpool2d, no learned
  upsampling) followed by Conv3x3 + BN + ReLU stacks; the last decoder conv maps to the classes (3x3, no BN/ReLU).
* "attention_unet" -- Oktay et al., "Attention U-Net: Learning where to look for the pancreas", MIDL 2018.
  The UNet above with an additive attention gate on every skip: the skip x (resolution r) and the gating signal g
  (the coarser decoder map, resolution r/2) are projected to F_int = C_x/2 channels (x by a 2x2 stride-2 conv, g by a
  1x1 conv with bias), summed, ReLU, 1x1 conv to one channel (+bias), sigmoid, bilinearly resampled to r; the gated
  skip alpha*x goes through a 1x1 conv + BN. 2D reading with the UNet widths 64..1024.
* "unet_pp" -- Zhou et al., "UNet++: A nested U-Net architecture for medical image segmentation", DLMIA 2018.
  Nodes X(i,j), i+j <= 4: X(i,0) is the backbone (double conv after pooling), X(i,j) = double conv of
  [X(i,0..j-1), Up(X(i+1,j-1))] with Up a 2x2 transposed conv to the level's width; widths 32-64-128-256-512.
  1x1 heads: on X(0,4) always, and with deep_supervision=True also on X(0,1..3), returned as aux logits in training.
* "unet3p" -- Huang et al., "UNet 3+: A full-scale connected UNet for medical image segmentation", ICASSP 2020.
  UNet encoder (64..1024); every decoder stage gathers all five scales: shallower encoder maps max-pooled down,
  the same-scale encoder map, deeper decoder maps (and the bottleneck) bilinearly upsampled, each through a
  Conv3x3 (64 channels) + BN + ReLU; the 5 x 64 = 320 channels are fused by Conv3x3 (320) + BN + ReLU; the head is
  a 3x3 conv. deep_supervision=True adds 3x3-conv side outputs on the deeper decoder stages and the bottleneck.
* "simple_unet" -- a small plain UNet (the published zoo's "SimpleUNet"): the "unet" recipe with 3 poolings and widths
  32..256.

Every conv followed by BN has no bias. Inputs must have H, W divisible by `SegSpec.multiple` (2^poolings).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.seg.common import SegSpec, check_input, seg_output

_WHERE = "models.seg.unet_family"


def conv_bn_relu(cin: int, cout: int, k: int = 3, relu: bool = True) -> nn.Sequential:
    """Conv kxk (padding k//2, no bias) + BatchNorm (+ ReLU)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DoubleConv(nn.Sequential):
    """(Conv3x3 -> BN -> ReLU) x 2: cin -> cout -> cout. Params: 9*cin*cout + 9*cout^2 + 4*cout."""

    def __init__(self, cin: int, cout: int):
        super().__init__(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay 2018): gates skip `x` (resolution r) with the coarser signal `g` (r/2)."""

    def __init__(self, g_ch: int, x_ch: int, inter_ch: int | None = None):
        super().__init__()
        inter_ch = inter_ch or max(x_ch // 2, 1)
        self.theta_x = nn.Conv2d(x_ch, inter_ch, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(g_ch, inter_ch, 1, bias=True)
        self.psi = nn.Conv2d(inter_ch, 1, 1, bias=True)
        self.out = nn.Sequential(nn.Conv2d(x_ch, x_ch, 1, bias=False), nn.BatchNorm2d(x_ch))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q = F.relu(self.theta_x(x) + self.phi_g(g))
        alpha = torch.sigmoid(self.psi(q))
        alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(alpha * x)


BlockFactory = Callable[[int, int, int], nn.Module]   # (level, c_in, c_out) -> module producing c_out channels


class EncoderDecoder(nn.Module):
    """Generic UNet: level l has width widths[l]; encoder block l (after a 2x2 max-pool for l > 0), an optional
    module on the bottleneck, then per level from deep to shallow: optional skip transform (e.g. a Res path),
    optional attention gate (gating signal = the coarser decoder map), upsampling ("transpose": 2x2 stride-2
    transposed conv widths[l+1] -> widths[l]; "bilinear": parameter-free x2), concatenation [skip, up], decoder
    block l -> widths[l]; a 1x1 conv head on level 0."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], enc_block: BlockFactory,
                 dec_block: BlockFactory, where: str, up: str = "transpose",
                 skip_block: Callable[[int, int], nn.Module] | None = None,
                 gate: Callable[[int, int], nn.Module] | None = None,
                 bottleneck_extra: Callable[[int], nn.Module] | None = None):
        super().__init__()
        widths = list(widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"{where}: widths must list >= 2 positive channel counts, got {widths}")
        if up not in ("transpose", "bilinear"):
            raise ValueError(f"{where}: up must be 'transpose' or 'bilinear', got {up!r}")
        self.where = where
        self.multiple = 2 ** (len(widths) - 1)
        n = len(widths)
        self.encoders = nn.ModuleList(
            enc_block(i, in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(n))
        self.bottleneck_extra = bottleneck_extra(widths[-1]) if bottleneck_extra else nn.Identity()
        self.skip_blocks = nn.ModuleList(
            skip_block(i, widths[i]) if skip_block else nn.Identity() for i in range(n - 1))
        self.gates = nn.ModuleList(gate(widths[i + 1], widths[i]) for i in range(n - 1)) if gate else None
        if up == "transpose":
            self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                     for i in range(n - 1))
            dec_in = [2 * widths[i] for i in range(n - 1)]
        else:
            self.ups = nn.ModuleList(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                                     for _ in range(n - 1))
            dec_in = [widths[i] + widths[i + 1] for i in range(n - 1)]
        self.decoders = nn.ModuleList(dec_block(i, dec_in[i], widths[i]) for i in range(n - 1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        skips = []
        h = image_BCHW
        for i, enc in enumerate(self.encoders):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = enc(h)
            skips.append(h)
        h = self.bottleneck_extra(skips.pop())
        for i in reversed(range(len(self.decoders))):
            s = self.skip_blocks[i](skips[i])
            if self.gates is not None:
                s = self.gates[i](h, s)
            h = self.decoders[i](torch.cat([s, self.ups[i](h)], dim=1))
        return seg_output(self.head(h), image_BCHW.shape[-2:], None, self.training)


def widths_from(base: int, levels: int) -> list[int]:
    if base < 1 or levels < 2:
        raise ValueError(f"{_WHERE}: need base >= 1 and >= 2 levels, got base={base}, levels={levels}")
    return [base * 2 ** i for i in range(levels)]


def _double(level: int, cin: int, cout: int) -> nn.Module:
    return DoubleConv(cin, cout)


def build_unet(in_channels: int = 3, num_classes: int = 2, base: int = 64) -> nn.Module:
    """Original UNet (4 poolings). base: level-0 width (64 in the paper); widths base*2^l."""
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), _double, _double,
                          f"{_WHERE} (unet)")


def build_simple_unet(in_channels: int = 3, num_classes: int = 2, base: int = 32) -> nn.Module:
    """Small plain UNet: 3 poolings, widths base*2^l (32..256 by default)."""
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 4), _double, _double,
                          f"{_WHERE} (simple_unet)")


def build_attention_unet(in_channels: int = 3, num_classes: int = 2, base: int = 64) -> nn.Module:
    """Attention U-Net (2D, 4 poolings): UNet widths base*2^l plus an additive attention gate per skip."""
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), _double, _double,
                          f"{_WHERE} (attention_unet)", gate=AttentionGate)


# ----------------------------------------------------------------------------------------------------- SegNet
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class SegNet(nn.Module):
    """VGG16-BN encoder with pooling indices; decoder = unpool + Conv3x3/BN/ReLU stacks mirroring the encoder."""

    multiple = 32

    def __init__(self, in_channels: int, num_classes: int, base: int = 64):
        super().__init__()
        if base < 1:
            raise ValueError(f"{_WHERE} (segnet): base must be >= 1, got {base}")
        stages = [[c * base // 64 for c in stage] for stage in _VGG16_STAGES]
        self.where = f"{_WHERE} (segnet)"
        enc, cin = [], in_channels
        for stage in stages:
            layers = []
            for c in stage:
                layers.append(conv_bn_relu(cin, c))
                cin = c
            enc.append(nn.Sequential(*layers))
        self.encoder = nn.ModuleList(enc)
        # decoder stage s mirrors encoder stage s: convs keep the stage width, the last one maps to the width of
        # the next-shallower stage (the classes for stage 0, as a plain conv).
        dec = []
        for s in reversed(range(len(stages))):
            width = stages[s][0] if s == 0 else stages[s][-1]
            layers = []
            for j in range(len(stages[s])):
                last = j == len(stages[s]) - 1
                if not last:
                    layers.append(conv_bn_relu(width, width))
                elif s > 0:
                    layers.append(conv_bn_relu(width, stages[s - 1][-1]))
                else:
                    layers.append(nn.Conv2d(width, num_classes, 3, padding=1))
            dec.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(dec)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        h, pools = image_BCHW, []
        for stage in self.encoder:
            h = stage(h)
            size = h.shape[-2:]
            h, idx = F.max_pool2d(h, 2, 2, return_indices=True)
            pools.append((idx, size))
        for stage, (idx, size) in zip(self.decoder, reversed(pools)):
            h = stage(F.max_unpool2d(h, idx, 2, 2, output_size=size))
        return seg_output(h, image_BCHW.shape[-2:], None, self.training)


def build_segnet(in_channels: int = 3, num_classes: int = 2, base: int = 64) -> nn.Module:
    """SegNet. base: first VGG stage width (64 in the paper); all stage widths scale with base/64."""
    return SegNet(in_channels, num_classes, base)


# ----------------------------------------------------------------------------------------------------- UNet++
class UNetPlusPlus(nn.Module):
    """UNet++ with nested dense skip pathways; X(i,j) indexing as in the paper (i: level, j: column)."""

    multiple = 16

    def __init__(self, in_channels: int, num_classes: int, base: int = 32, deep_supervision: bool = False):
        super().__init__()
        w = widths_from(base, 5)
        self.where = f"{_WHERE} (unet_pp)"
        self.deep_supervision = deep_supervision
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(5):
            self.nodes[f"{i}_0"] = DoubleConv(in_channels if i == 0 else w[i - 1], w[i])
        for j in range(1, 5):
            for i in range(5 - j):
                self.ups[f"{i}_{j}"] = nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                self.nodes[f"{i}_{j}"] = DoubleConv((j + 1) * w[i], w[i])
        cols = range(1, 5) if deep_supervision else (4,)
        self.heads = nn.ModuleDict({str(j): nn.Conv2d(w[0], num_classes, 1) for j in cols})

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        x: dict[tuple[int, int], torch.Tensor] = {}
        h = image_BCHW
        for i in range(5):
            h = self.nodes[f"{i}_0"](h if i == 0 else F.max_pool2d(h, 2))
            x[i, 0] = h
        for j in range(1, 5):
            for i in range(5 - j):
                up = self.ups[f"{i}_{j}"](x[i + 1, j - 1])
                x[i, j] = self.nodes[f"{i}_{j}"](torch.cat([x[i, k] for k in range(j)] + [up], dim=1))
        logits = self.heads["4"](x[0, 4])
        aux = [self.heads[str(j)](x[0, j]) for j in (1, 2, 3)] if self.deep_supervision else None
        return seg_output(logits, image_BCHW.shape[-2:], aux, self.training)


def build_unet_pp(in_channels: int = 3, num_classes: int = 2, base: int = 32,
                  deep_supervision: bool = False) -> nn.Module:
    """UNet++. base: X(0,*) width (32 in the paper; widths base*2^i); deep_supervision: heads on X(0,1..3) too."""
    return UNetPlusPlus(in_channels, num_classes, base, deep_supervision)


# ----------------------------------------------------------------------------------------------------- UNet 3+
class UNet3Plus(nn.Module):
    """UNet 3+ with full-scale skip connections (and optional full-scale deep supervision)."""

    multiple = 16

    def __init__(self, in_channels: int, num_classes: int, base: int = 64, cat_channels: int = 64,
                 deep_supervision: bool = False):
        super().__init__()
        w = widths_from(base, 5)
        self.where = f"{_WHERE} (unet3p)"
        self.deep_supervision = deep_supervision
        up_ch = 5 * cat_channels
        self.encoders = nn.ModuleList(DoubleConv(in_channels if i == 0 else w[i - 1], w[i]) for i in range(5))
        # paths[i][k]: feature of scale k -> cat_channels at decoder level i (k < i from encoder, k == i encoder,
        # k > i from decoder level k (or the bottleneck for k = 4)).
        self.paths = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(4):
            self.paths.append(nn.ModuleList(
                conv_bn_relu(w[k] if (k <= i or k == 4) else up_ch, cat_channels) for k in range(5)))
            self.fuse.append(conv_bn_relu(up_ch, up_ch))
        self.head = nn.Conv2d(up_ch, num_classes, 3, padding=1)
        self.side = nn.ModuleList(
            nn.Conv2d(up_ch if i < 4 else w[4], num_classes, 3, padding=1) for i in range(1, 5)
        ) if deep_supervision else None

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        enc, h = [], image_BCHW
        for i, block in enumerate(self.encoders):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            enc.append(h)
        feats: dict[int, torch.Tensor] = {4: enc[4]}     # deeper-than-i sources (decoder stages, bottleneck)
        for i in reversed(range(4)):
            size = enc[i].shape[-2:]
            parts = []
            for k in range(5):
                if k < i:
                    src = F.max_pool2d(enc[k], 2 ** (i - k))
                elif k == i:
                    src = enc[i]
                else:
                    src = F.interpolate(feats[k], size=size, mode="bilinear", align_corners=False)
                parts.append(self.paths[i][k](src))
            feats[i] = self.fuse[i](torch.cat(parts, dim=1))
        aux = [side(feats[i]) for i, side in zip(range(1, 5), self.side)] if self.side is not None else None
        return seg_output(self.head(feats[0]), image_BCHW.shape[-2:], aux, self.training)


def build_unet3p(in_channels: int = 3, num_classes: int = 2, base: int = 64, cat_channels: int = 64,
                 deep_supervision: bool = False) -> nn.Module:
    """UNet 3+. base: encoder level-0 width (64); cat_channels: per-scale channels (64, so 320 per stage)."""
    return UNet3Plus(in_channels, num_classes, base, cat_channels, deep_supervision)


_P = {
    "unet": "Ronneberger et al., U-Net, MICCAI 2015",
    "segnet": "Badrinarayanan et al., SegNet, TPAMI 2017",
    "attention_unet": "Oktay et al., Attention U-Net, MIDL 2018",
    "unet_pp": "Zhou et al., UNet++, DLMIA 2018",
    "unet3p": "Huang et al., UNet 3+, ICASSP 2020",
    "simple_unet": "SimpleUNet of the published zoo: small plain U-Net after Ronneberger et al. 2015",
}

SPECS_UNET_FAMILY: dict[str, SegSpec] = {
    "unet": SegSpec("unet", build_unet, 16, "own", _P["unet"], {"base": 64}),
    "segnet": SegSpec("segnet", build_segnet, 32, "own", _P["segnet"], {"base": 64}),
    "attention_unet": SegSpec("attention_unet", build_attention_unet, 16, "own", _P["attention_unet"],
                              {"base": 64}),
    "unet_pp": SegSpec("unet_pp", build_unet_pp, 16, "own", _P["unet_pp"],
                       {"base": 32, "deep_supervision": False}),
    "unet3p": SegSpec("unet3p", build_unet3p, 16, "own", _P["unet3p"],
                      {"base": 64, "cat_channels": 64, "deep_supervision": False}),
    "simple_unet": SegSpec("simple_unet", build_simple_unet, 8, "own", _P["simple_unet"], {"base": 32}),
}
