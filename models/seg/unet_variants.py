"""UNet-family segmentation networks of the zoo, part 2 (docs/systems/segmentation_zoo.md): "dense_unet", "r2unet",
"r2_attention_unet", "multiresunet", "onenet", "csnet". Part 1 and the generic encoder-decoder (`EncoderDecoder`: 2x2
max-pooling, skip concatenation, 1x1 head) are in models/seg/unet_family.py. All written here from the papers'
descriptions:

* "dense_unet" -- a UNet whose encoder and decoder blocks are dense blocks, after the 2D reading of Li et al.,
  "H-DenseUNet: Hybrid densely connected UNet for liver and tumor segmentation from CT volumes", IEEE TMI 2018
  (MedPose's reading: the paper's 2D branch is a DenseNet-161 encoder; here every UNet block is
  Conv3x3/BN/ReLU (c_in -> c) -> dense block (`layers` x [BN -> ReLU -> Conv3x3, `growth` new channels each,
  concatenated]) -> transition Conv1x1 (c + layers*growth -> c) + BN + ReLU). Widths 64..1024, growth 32, 4 layers.
* "r2unet" -- Alom et al., "Recurrent residual convolutional neural network based on U-Net (R2U-Net) for medical
  image segmentation", arXiv:1802.06955 (2018). Recurrent residual unit: Conv1x1 (c_in -> c, bias) then two
  recurrent conv layers (RCL, t = 2: h = f(x); h = f(x + h) twice, f = Conv3x3 + BN + ReLU with shared weights),
  output = Conv1x1 output + RCL(RCL(.)). Widths 64..1024 (the common 2D configuration; `base` scales them),
  2x2 transposed-conv upsampling.
* "r2_attention_unet" -- R2U-Net blocks with the Attention U-Net gates (Oktay et al. 2018) on the skips.
* "multiresunet" -- Ibtehaz and Rahman, "MultiResUNet: Rethinking the U-Net architecture for multimodal biomedical
  image segmentation", Neural Networks 121 (2020). MultiRes block with W = alpha*U (alpha = 1.67): three chained
  3x3 conv-BN-ReLU with int(0.167W), int(0.333W), int(0.5W) channels, concatenated, BN, plus a Conv1x1 + BN
  shortcut, ReLU, BN. Res paths of length 4, 3, 2, 1 (each unit: Conv3x3-BN-ReLU + Conv1x1-BN shortcut, ReLU, BN).
  U = 32, 64, 128, 256, 512; 2x2 transposed-conv upsampling to U; 1x1 head. The paper's 2D model has 7,262,875
  parameters (Keras count, BN without scale and with its moving statistics).
* "onenet" -- "OneNet (light UNet)" of the published zoo. The original source is unavailable, so this is MedPose's
  reading: a light UNet (4 poolings, widths 16..256) whose blocks are two MobileNet-style depthwise-separable convs
  (depthwise Conv3x3 + BN + ReLU, pointwise Conv1x1 + BN + ReLU); the first block starts with a full Conv3x3
  (as MobileNet's stem); parameter-free bilinear x2 upsampling.
* "csnet" -- Mou et al., "CS-Net: Channel and spatial attention network for curvilinear structure segmentation",
  MICCAI 2019. Residual encoder blocks (Conv3x3-BN-ReLU, Conv3x3-BN, + Conv1x1-BN shortcut, ReLU), widths
  32..512, 4 poolings; at the bottleneck a spatial attention block (query Conv1x3, key Conv3x1, both C/8 + BN +
  ReLU; HW x HW softmax affinity; value Conv1x1; gamma * out + x) and a channel attention block (C x C affinity,
  softmax(max - affinity), gamma * out + x) whose outputs are summed; transposed-conv decoder with residual blocks.
  Both gammas start at 0 (as in the paper's DANet-style blocks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.seg.common import SegSpec, check_input, seg_output
from models.seg.unet_family import AttentionGate, EncoderDecoder, conv_bn_relu, widths_from

_WHERE = "models.seg.unet_variants"


# ----------------------------------------------------------------------------------------------------- DenseUNet
class DenseBlock(nn.Module):
    """`layers` x [BN -> ReLU -> Conv3x3 (growth)], each layer sees the concatenation of all previous maps."""

    def __init__(self, cin: int, layers: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(inplace=False),
                          nn.Conv2d(cin + i * growth, growth, 3, padding=1, bias=False))
            for i in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class DenseUNetBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, layers: int, growth: int):
        dense = DenseBlock(cout, layers, growth)
        super().__init__(conv_bn_relu(cin, cout), dense, conv_bn_relu(dense.out_channels, cout, k=1))


def build_dense_unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, growth: int = 32,
                     layers: int = 4) -> nn.Module:
    """DenseUNet. base: level-0 width (widths base*2^l, 4 poolings); growth: dense growth rate; layers: dense
    layers per block."""
    if growth < 1 or layers < 1:
        raise ValueError(f"{_WHERE} (dense_unet): growth and layers must be >= 1, got {growth}, {layers}")

    def block(level: int, cin: int, cout: int) -> nn.Module:
        return DenseUNetBlock(cin, cout, layers, growth)
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), block, block, f"{_WHERE} (dense_unet)")


# ----------------------------------------------------------------------------------------------------- R2U-Net
class RecurrentConv(nn.Module):
    """RCL: h = f(x), then t times h = f(x + h); f = Conv3x3 + BN + ReLU (weights shared over time)."""

    def __init__(self, channels: int, t: int = 2):
        super().__init__()
        self.t = t
        self.f = conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.f(x)
        for _ in range(self.t):
            h = self.f(x + h)
        return h


class RRCNNBlock(nn.Module):
    """Recurrent residual unit: y = Conv1x1(x); out = y + RCL(RCL(y))."""

    def __init__(self, cin: int, cout: int, t: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)
        self.rcl = nn.Sequential(RecurrentConv(cout, t), RecurrentConv(cout, t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.rcl(y)


def _r2(name: str, in_channels: int, num_classes: int, base: int, t: int, attention: bool) -> nn.Module:
    if t < 1:
        raise ValueError(f"{_WHERE} ({name}): t must be >= 1, got {t}")

    def block(level: int, cin: int, cout: int) -> nn.Module:
        return RRCNNBlock(cin, cout, t)
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), block, block, f"{_WHERE} ({name})",
                          gate=AttentionGate if attention else None)


def build_r2unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, t: int = 2) -> nn.Module:
    """R2U-Net. base: level-0 width (widths base*2^l, 4 poolings); t: recurrence steps (2)."""
    return _r2("r2unet", in_channels, num_classes, base, t, attention=False)


def build_r2_attention_unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, t: int = 2) -> nn.Module:
    """R2U-Net with attention gates on the skips. base, t: as for r2unet."""
    return _r2("r2_attention_unet", in_channels, num_classes, base, t, attention=True)


# ----------------------------------------------------------------------------------------------------- MultiResUNet
class MultiResBlock(nn.Module):
    def __init__(self, cin: int, u: int, alpha: float = 1.67):
        super().__init__()
        w = alpha * u
        c1, c2, c3 = int(w * 0.167), int(w * 0.333), int(w * 0.5)
        if min(c1, c2, c3) < 1:
            raise ValueError(f"{_WHERE} (multiresunet): width {u} too small for alpha={alpha}")
        self.out_channels = c1 + c2 + c3
        self.conv3, self.conv5, self.conv7 = conv_bn_relu(cin, c1), conv_bn_relu(c1, c2), conv_bn_relu(c2, c3)
        self.shortcut = conv_bn_relu(cin, self.out_channels, k=1, relu=False)
        self.bn_cat = nn.BatchNorm2d(self.out_channels)
        self.bn_out = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3(x)
        b = self.conv5(a)
        c = self.conv7(b)
        out = self.bn_cat(torch.cat([a, b, c], dim=1))
        return self.bn_out(F.relu(out + self.shortcut(x)))


class ResPathUnit(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv_bn_relu(cin, cout)
        self.shortcut = conv_bn_relu(cin, cout, k=1, relu=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x) + self.shortcut(x)))


class MultiResUNet(nn.Module):
    multiple = 16

    def __init__(self, in_channels: int, num_classes: int, base: int = 32, alpha: float = 1.67):
        super().__init__()
        self.where = f"{_WHERE} (multiresunet)"
        u = widths_from(base, 5)
        self.encoders = nn.ModuleList()
        outs, cin = [], in_channels
        for i in range(5):
            blk = MultiResBlock(cin, u[i], alpha)
            self.encoders.append(blk)
            cin = blk.out_channels
            outs.append(cin)
        self.res_paths = nn.ModuleList(
            nn.Sequential(*[ResPathUnit(outs[i] if j == 0 else u[i], u[i]) for j in range(4 - i)])
            for i in range(4))
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        prev = outs[4]
        for i in reversed(range(4)):
            self.ups.append(nn.ConvTranspose2d(prev, u[i], 2, stride=2))
            blk = MultiResBlock(2 * u[i], u[i], alpha)
            self.decoders.append(blk)
            prev = blk.out_channels
        self.head = nn.Conv2d(prev, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        skips, h = [], image_BCHW
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        h = skips.pop()
        for up, dec, i in zip(self.ups, self.decoders, reversed(range(4))):
            h = dec(torch.cat([up(h), self.res_paths[i](skips[i])], dim=1))
        return seg_output(self.head(h), image_BCHW.shape[-2:], None, self.training)


def build_multiresunet(in_channels: int = 3, num_classes: int = 2, base: int = 32, alpha: float = 1.67) -> nn.Module:
    """MultiResUNet. base: U of level 0 (32; U = base*2^l); alpha: MultiRes width factor (1.67)."""
    return MultiResUNet(in_channels, num_classes, base, alpha)


# ----------------------------------------------------------------------------------------------------- OneNet
def dw_separable(cin: int, cout: int) -> nn.Sequential:
    """Depthwise Conv3x3 + BN + ReLU, pointwise Conv1x1 + BN + ReLU (MobileNet v1 unit)."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), conv_bn_relu(cin, cout, k=1))


def build_onenet(in_channels: int = 3, num_classes: int = 2, base: int = 16) -> nn.Module:
    """OneNet (light UNet), MedPose's reading (see the module docstring). base: level-0 width (16)."""
    def block(level: int, cin: int, cout: int) -> nn.Module:
        first = conv_bn_relu(cin, cout) if level == 0 else dw_separable(cin, cout)
        return nn.Sequential(first, dw_separable(cout, cout))

    def dec(level: int, cin: int, cout: int) -> nn.Module:
        return nn.Sequential(dw_separable(cin, cout), dw_separable(cout, cout))
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), block, dec, f"{_WHERE} (onenet)",
                          up="bilinear")


# ----------------------------------------------------------------------------------------------------- CS-Net
class ResBlock(nn.Module):
    """Conv3x3-BN-ReLU, Conv3x3-BN, + Conv1x1-BN shortcut, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout, relu=False))
        self.shortcut = conv_bn_relu(cin, cout, k=1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SpatialAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        inter = max(channels // 8, 1)
        self.query = nn.Sequential(nn.Conv2d(channels, inter, (1, 3), padding=(0, 1)), nn.BatchNorm2d(inter),
                                   nn.ReLU(inplace=True))
        self.key = nn.Sequential(nn.Conv2d(channels, inter, (3, 1), padding=(1, 0)), nn.BatchNorm2d(inter),
                                 nn.ReLU(inplace=True))
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)            # B, HW, C'
        k = self.key(x).flatten(2)                               # B, C', HW
        affinity = torch.softmax(torch.bmm(q, k), dim=-1)        # B, HW(query), HW(key)
        v = self.value(x).flatten(2)                             # B, C, HW
        out = torch.bmm(v, affinity.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = x.flatten(2)                                         # B, C, HW
        affinity = torch.bmm(f, f.transpose(1, 2))               # B, C, C
        affinity = affinity.amax(dim=-1, keepdim=True) - affinity
        out = torch.bmm(torch.softmax(affinity, dim=-1), f).view(b, c, h, w)
        return self.gamma * out + x


class SpatialChannelAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.spatial = SpatialAttention(channels)
        self.channel = ChannelAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(x) + self.channel(x)


def build_csnet(in_channels: int = 3, num_classes: int = 2, base: int = 32) -> nn.Module:
    """CS-Net. base: level-0 width (32; widths base*2^l, 4 poolings)."""
    def block(level: int, cin: int, cout: int) -> nn.Module:
        return ResBlock(cin, cout)
    return EncoderDecoder(in_channels, num_classes, widths_from(base, 5), block, block, f"{_WHERE} (csnet)",
                          bottleneck_extra=SpatialChannelAttention)


_P = {
    "dense_unet": "Li et al., H-DenseUNet, IEEE TMI 2018 (2D DenseUNet reading)",
    "r2unet": "Alom et al., R2U-Net, arXiv:1802.06955 (2018)",
    "r2_attention_unet": "Alom et al. 2018 (R2U-Net) + Oktay et al. 2018 (attention gates)",
    "multiresunet": "Ibtehaz & Rahman, MultiResUNet, Neural Networks 2020",
    "onenet": "OneNet (light UNet) of the published zoo; MedPose's reading (source unavailable)",
    "csnet": "Mou et al., CS-Net, MICCAI 2019",
}

SPECS_UNET_VARIANTS: dict[str, SegSpec] = {
    "dense_unet": SegSpec("dense_unet", build_dense_unet, 16, "own", _P["dense_unet"],
                          {"base": 64, "growth": 32, "layers": 4}),
    "r2unet": SegSpec("r2unet", build_r2unet, 16, "own", _P["r2unet"], {"base": 64, "t": 2}),
    "r2_attention_unet": SegSpec("r2_attention_unet", build_r2_attention_unet, 16, "own", _P["r2_attention_unet"],
                                 {"base": 64, "t": 2}),
    "multiresunet": SegSpec("multiresunet", build_multiresunet, 16, "own", _P["multiresunet"],
                            {"base": 32, "alpha": 1.67}),
    "onenet": SegSpec("onenet", build_onenet, 16, "own", _P["onenet"], {"base": 16}),
    "csnet": SegSpec("csnet", build_csnet, 16, "own", _P["csnet"], {"base": 32}),
}
