"""HarDNet, HarDNet-MSEG, CE-Net and LightNet for the segmentation zoo (docs/systems/segmentation_zoo.md).

* "hardnet": HarDNet-68 (Chao, Kao, Ruan, Huang, Lin, "HarDNet: a low memory traffic network", ICCV 2019) read as a
  segmentation encoder-decoder in the FC-HarDNet style of the same paper: the HarDNet-68 encoder (stem
  Conv3x3/2 32 + Conv3x3 64 + MaxPool/2; harmonic dense blocks with growth k = 14, 16, 20, 40, 160, multiplier
  m = 1.7, 8, 16, 16, 16, 4 layers, each followed by a 1x1 transition to 128, 256, 320, 640, 1024 channels and a
  max-pool after the 1st, 3rd and 4th) and a decoder that at every scale upsamples, concatenates the skip, halves
  the channels with a 1x1 conv and runs a harmonic dense block (growth / layers of the encoder block at that scale;
  k = 10, 4 layers at 1/2, where the encoder has none); 1x1 classifier at 1/2 resolution.
  Harmonic dense block: layer l (1-based) reads layer l - 2^n for every n with 2^n | l (layer 0 = block input) and
  has k * m^n channels (n the largest such exponent, rounded to an even number); the block outputs the
  concatenation of its odd layers and its last layer. Every conv: Conv (no bias) + BatchNorm + ReLU6.
* "hardnet_mseg": HarDNet-MSEG (Huang, Wu, Lin, "HarDNet-MSEG: a simple encoder-decoder polyp segmentation neural
  network that achieves over 0.9 mean Dice and 86 FPS", arXiv 2101.07172, 2021): the HarDNet-68 encoder; receptive
  field blocks (RFB, 32 channels) on the 1/8, 1/16 and 1/32 features; the cascaded partial decoder of CPD (Wu et
  al., CVPR 2019: multiplicative top-down fusion + concatenation) giving logits at 1/8, upsampled to the input.
* "cenet": CE-Net (Gu et al., "CE-Net: context encoder network for 2D medical image segmentation", IEEE TMI 2019):
  torchvision ResNet-34 encoder (weights=None), dense atrous convolution (DAC) block, residual multi-kernel pooling
  (RMP) block and a decoder of [1x1, deconv 3x3/2, 1x1] blocks with additive skips. MedPose's reading of the DAC:
  four cascaded branches (d = 1; 3 -> 1x1; 1 -> 3 -> 1x1; 1 -> 3 -> 5 -> 1x1) sharing one 3x3 conv per dilation
  and one 1x1 conv (x + sum of ReLU branches). RMP: max-pooling with kernels 2, 3, 5, 6 (kernel clamped to the map
  size when the 1/32 map is smaller; the paper's 448-pixel inputs never hit that), a shared 1x1 conv to one channel
  each, upsampled and concatenated with the input (512 + 4 channels).
* "lightnet": the published zoo lists a "LightNet" whose source is unavailable; this is MedPose's reading: a
  MobileNetV2 inverted-residual encoder (torchvision.models.mobilenet_v2(weights=None).features; Sandler et al.,
  CVPR 2018) with a light FPN-style decoder: 1x1 laterals (Conv + BN + ReLU) to `dec_ch` channels at 1/32, 1/16,
  1/8, 1/4 and 1/2, top-down upsample-and-add, one depthwise-separable 3x3 block after each addition and a 1x1
  classifier at 1/2 resolution.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.seg.common import SegSpec, check_input, seg_output

_WHERE = "models.seg.light_nets"
MULTIPLE = 32


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------- HarDNet-68
class ConvLayer(nn.Sequential):
    """Conv (no bias, 'same' padding) + BatchNorm + ReLU6, HarDNet's basic layer."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


def harmonic_links(layer: int, growth: int, mult: float) -> tuple[int, list[int]]:
    """(channels of `layer`, the earlier layers it reads) for layer >= 1 of a harmonic dense block."""
    links = []
    channels = float(growth)
    for n in range(32):
        step = 2 ** n
        if step > layer:
            break
        if layer % step == 0:
            links.append(layer - step)
            if n > 0:
                channels *= mult
    return int(int(channels + 1) / 2) * 2, links


class HarDBlock(nn.Module):
    """Harmonic dense block (see module docstring); `out_channels` = sum over odd layers and the last layer."""

    def __init__(self, c_in: int, growth: int, mult: float, n_layers: int):
        super().__init__()
        widths = [c_in]
        self.links: list[list[int]] = []
        layers = []
        for layer in range(1, n_layers + 1):
            c_out, links = harmonic_links(layer, growth, mult)
            layers.append(ConvLayer(sum(widths[k] for k in links), c_out))
            widths.append(c_out)
            self.links.append(links)
        self.layers = nn.ModuleList(layers)
        self.keep = [i for i in range(1, n_layers + 1) if i % 2 == 1 or i == n_layers]
        self.out_channels = sum(widths[i] for i in self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for conv, links in zip(self.layers, self.links):
            inp = outs[links[0]] if len(links) == 1 else torch.cat([outs[k] for k in links], dim=1)
            outs.append(conv(inp))
        return torch.cat([outs[i] for i in self.keep], dim=1)


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


class HarDNet68Encoder(nn.Module):
    """HarDNet-68 without the classifier. forward -> features at 1/2, 1/4, 1/8, 1/16, 1/32 (see `channels`).
    `width` scales stem widths, growth rates and transition widths (1.0 = paper); `n_layers` the block depths."""

    GROWTH = (14, 16, 20, 40, 160)
    TRANSITION = (128, 256, 320, 640, 1024)
    N_LAYERS = (8, 16, 16, 16, 4)
    DOWNSAMPLE = (True, False, True, True, False)

    def __init__(self, in_channels: int = 3, width: float = 1.0, n_layers: Sequence[int] | None = None,
                 mult: float = 1.7):
        super().__init__()
        n_layers = tuple(self.N_LAYERS if n_layers is None else n_layers)
        if len(n_layers) != 5 or min(n_layers) < 1:
            raise ValueError(f"{_WHERE}: HarDNet-68 needs 5 block depths >= 1, got {n_layers}")
        stem1, stem2 = _even(32 * width), _even(64 * width)
        self.stem1 = ConvLayer(in_channels, stem1, 3, stride=2)
        self.stem2 = nn.Sequential(ConvLayer(stem1, stem2, 3), nn.MaxPool2d(3, stride=2, padding=1))
        self.stages = nn.ModuleList()
        ch = stem2
        self.block_cfg = []   # (growth, layers) per stage, for the FC-HarDNet decoder
        for growth, trans, depth, down in zip(self.GROWTH, self.TRANSITION, n_layers, self.DOWNSAMPLE):
            growth, trans = _even(growth * width), _even(trans * width)
            block = HarDBlock(ch, growth, mult, depth)
            self.stages.append(nn.Sequential(block, ConvLayer(block.out_channels, trans, 1)))
            self.block_cfg.append((growth, depth))
            ch = trans
        self.pool = nn.MaxPool2d(2, stride=2)
        t = [_even(c * width) for c in self.TRANSITION]
        self.channels = (stem1, t[0], t[2], t[3], t[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f2 = self.stem1(x)
        h = self.stem2(f2)
        feats = [f2]
        for i, (stage, down) in enumerate(zip(self.stages, self.DOWNSAMPLE)):
            h = stage(h)
            if i != 1:                      # stage 2 (256 ch) and stage 3 (320 ch) share 1/8: keep the latter
                feats.append(h)
            if down:
                h = self.pool(h)
        return feats                        # 1/2, 1/4, 1/8, 1/16, 1/32


class HarDNetSeg(nn.Module):
    """HarDNet-68 encoder + FC-HarDNet-style decoder (see module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0,
                 n_layers: Sequence[int] | None = None, mult: float = 1.7):
        super().__init__()
        self.encoder = HarDNet68Encoder(in_channels, width, n_layers, mult)
        cfg = self.encoder.block_cfg
        # decoder blocks at 1/16, 1/8, 1/4 reuse the encoder block settings there; 1/2 has growth 10, 4 layers
        dec_cfg = [cfg[3], cfg[2], cfg[0], (_even(10 * width), max(1, min(4, cfg[0][1])))]
        skips = self.encoder.channels[::-1][1:]          # 1/16, 1/8, 1/4, 1/2
        self.reduce = nn.ModuleList()
        self.blocks = nn.ModuleList()
        ch = self.encoder.channels[-1]
        for skip_ch, (growth, depth) in zip(skips, dec_cfg):
            half = (ch + skip_ch) // 2
            self.reduce.append(ConvLayer(ch + skip_ch, half, 1))
            block = HarDBlock(half, growth, mult, depth)
            self.blocks.append(block)
            ch = block.out_channels
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, MULTIPLE, _WHERE)
        feats = self.encoder(image_BCHW)
        h = feats[-1]
        for reduce, block, skip in zip(self.reduce, self.blocks, feats[-2::-1]):
            h = block(reduce(torch.cat([_up_to(h, skip), skip], dim=1)))
        return seg_output(self.classifier(h), image_BCHW.shape[-2:], None, self.training)


# ------------------------------------------------------------------------------------------------- HarDNet-MSEG
class BasicConv(nn.Sequential):
    """Conv (no bias) + BatchNorm, the RFB / partial-decoder unit (no activation, as in RFB and CPD)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int] = 1, dilation: int = 1):
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        pad = (dilation * (k[0] - 1) // 2, dilation * (k[1] - 1) // 2)
        super().__init__(nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out))


class RFB(nn.Module):
    """Receptive field block: a 1x1 branch and three [1x1, 1xk, kx1, 3x3 dilation k] branches (k = 3, 5, 7),
    concatenated, fused by a 3x3 conv, plus a 1x1 residual projection, then ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.branch0 = BasicConv(c_in, c_out, 1)
        self.branches = nn.ModuleList([
            nn.Sequential(BasicConv(c_in, c_out, 1), BasicConv(c_out, c_out, (1, k)),
                          BasicConv(c_out, c_out, (k, 1)), BasicConv(c_out, c_out, 3, dilation=k))
            for k in (3, 5, 7)])
        self.fuse = BasicConv(4 * c_out, c_out, 3)
        self.residual = BasicConv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cat = torch.cat([self.branch0(x)] + [b(x) for b in self.branches], dim=1)
        return F.relu(self.fuse(cat) + self.residual(x))


class PartialDecoder(nn.Module):
    """CPD's cascaded partial decoder on three c-channel maps (1/32, 1/16, 1/8): multiplicative refinement
    x16 * conv(up(x32)), x8 * conv(up^2(x32)) * conv(up(x16)), then concatenation cascades; 1x1 to classes."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.up1 = BasicConv(c, c, 3)            # up(x32) -> multiplies x16
        self.up2 = BasicConv(c, c, 3)            # up^2(x32) -> multiplies x8
        self.up3 = BasicConv(c, c, 3)            # up(x16) -> multiplies x8
        self.up4 = BasicConv(c, c, 3)            # up(x32) -> concatenated with refined x16
        self.up5 = BasicConv(2 * c, 2 * c, 3)    # up(cat16) -> concatenated with refined x8
        self.cat2 = BasicConv(2 * c, 2 * c, 3)
        self.cat3 = BasicConv(3 * c, 3 * c, 3)
        self.conv4 = BasicConv(3 * c, 3 * c, 3)
        self.conv5 = nn.Conv2d(3 * c, num_classes, 1)

    def forward(self, x32: torch.Tensor, x16: torch.Tensor, x8: torch.Tensor) -> torch.Tensor:
        r16 = self.up1(_up_to(x32, x16)) * x16
        r8 = self.up2(_up_to(x32, x8)) * self.up3(_up_to(x16, x8)) * x8
        c16 = self.cat2(torch.cat([r16, self.up4(_up_to(x32, x16))], dim=1))
        c8 = self.cat3(torch.cat([r8, self.up5(_up_to(c16, x8))], dim=1))
        return self.conv5(self.conv4(c8))


class HarDNetMSEG(nn.Module):
    """HarDNet-68 encoder + RFBs on 1/8, 1/16, 1/32 + cascaded partial decoder (logits at 1/8, upsampled)."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0, channel: int = 32,
                 n_layers: Sequence[int] | None = None):
        super().__init__()
        self.encoder = HarDNet68Encoder(in_channels, width, n_layers)
        ch = self.encoder.channels
        self.rfb8, self.rfb16, self.rfb32 = RFB(ch[2], channel), RFB(ch[3], channel), RFB(ch[4], channel)
        self.decoder = PartialDecoder(channel, num_classes)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, MULTIPLE, _WHERE)
        feats = self.encoder(image_BCHW)
        logits = self.decoder(self.rfb32(feats[4]), self.rfb16(feats[3]), self.rfb8(feats[2]))
        return seg_output(logits, image_BCHW.shape[-2:], None, self.training)


# ------------------------------------------------------------------------------------------------------ CE-Net
class DACBlock(nn.Module):
    """Dense atrous convolution: x + ReLU(a1 x) + ReLU(c a3 x) + ReLU(c a3 a1 x) + ReLU(c a5 a3 a1 x), where a_d is
    a shared 3x3 conv with dilation d and c a shared 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.a1 = nn.Conv2d(c, c, 3, padding=1)
        self.a3 = nn.Conv2d(c, c, 3, padding=3, dilation=3)
        self.a5 = nn.Conv2d(c, c, 3, padding=5, dilation=5)
        self.c1 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.a1(x)
        y13 = self.a3(y1)
        b1 = F.relu(y1)
        b2 = F.relu(self.c1(self.a3(x)))
        b3 = F.relu(self.c1(y13))
        b4 = F.relu(self.c1(self.a5(y13)))
        return x + b1 + b2 + b3 + b4


class RMPBlock(nn.Module):
    """Residual multi-kernel pooling: max-pool (kernel = stride = 2, 3, 5, 6, clamped to the map size), a shared
    1x1 conv to one channel, upsample; output = cat(4 pooled maps, input) with c + 4 channels."""

    KERNELS = (2, 3, 5, 6)

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = []
        for k in self.KERNELS:
            kh, kw = min(k, h), min(k, w)
            p = self.conv(F.max_pool2d(x, (kh, kw), stride=(kh, kw)))
            pooled.append(F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(pooled + [x], dim=1)


class CEDecoderBlock(nn.Sequential):
    """1x1 (c -> c/4) + BN + ReLU, deconv 3x3 stride 2 + BN + ReLU, 1x1 (c/4 -> out) + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int):
        mid = c_in // 4
        super().__init__(nn.Conv2d(c_in, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


_RESNETS = {"resnet34": torchvision.models.resnet34, "resnet18": torchvision.models.resnet18}


class CENet(nn.Module):
    """CE-Net: ResNet encoder, DAC + RMP context encoder, decoder with additive skips, deconv head."""

    def __init__(self, in_channels: int, num_classes: int, backbone: str = "resnet34"):
        super().__init__()
        if backbone not in _RESNETS:
            raise ValueError(f"{_WHERE}: CE-Net backbone must be one of {sorted(_RESNETS)}, got {backbone!r}")
        r = _RESNETS[backbone](weights=None)
        if in_channels != 3:
            r.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.dac = DACBlock(512)
        self.rmp = RMPBlock(512)
        self.dec4 = CEDecoderBlock(516, 256)
        self.dec3 = CEDecoderBlock(256, 128)
        self.dec2 = CEDecoderBlock(128, 64)
        self.dec1 = CEDecoderBlock(64, 64)
        self.head = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(32, num_classes, 3, padding=1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, MULTIPLE, _WHERE)
        e1 = self.layer1(self.stem(image_BCHW))
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.rmp(self.dac(self.layer4(e3)))
        d4 = self.dec4(e4) + e3
        d3 = self.dec3(d4) + e2
        d2 = self.dec2(d3) + e1
        logits = self.head(self.dec1(d2))
        return seg_output(logits, image_BCHW.shape[-2:], None, self.training)


# ---------------------------------------------------------------------------------------------------- LightNet
def _last_out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class DSConv(nn.Sequential):
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (no biases)."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                         nn.ReLU(inplace=True), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                         nn.ReLU(inplace=True))


class LightNet(nn.Module):
    """MedPose's reading of the published zoo's "LightNet": MobileNetV2 encoder + light FPN-style decoder."""

    # slices of torchvision's mobilenet_v2().features ending at strides 2, 4, 8, 16, 32
    CUTS = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 19))

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0, dec_ch: int = 64):
        super().__init__()
        features = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult).features
        if in_channels != 3:
            first = features[0][0]
            features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=2, padding=1, bias=False)
        self.stages = nn.ModuleList([features[a:b] for a, b in self.CUTS])
        chans = [_last_out_channels(s) for s in self.stages]
        self.laterals = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, dec_ch, 1, bias=False), nn.BatchNorm2d(dec_ch), nn.ReLU(inplace=True))
            for c in chans])
        self.smooth = nn.ModuleList([DSConv(dec_ch) for _ in range(len(chans) - 1)])
        self.classifier = nn.Conv2d(dec_ch, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, MULTIPLE, _WHERE)
        feats = []
        h = image_BCHW
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        top = self.laterals[-1](feats[-1])
        for lateral, smooth, f in zip(self.laterals[-2::-1], self.smooth, feats[-2::-1]):
            lat = lateral(f)
            top = smooth(_up_to(top, lat) + lat)
        return seg_output(self.classifier(top), image_BCHW.shape[-2:], None, self.training)


# ------------------------------------------------------------------------------------------------------- specs
def build_hardnet(in_channels: int = 3, num_classes: int = 2, width: float = 1.0,
                  n_layers: Sequence[int] | None = None) -> HarDNetSeg:
    """HarDNet-68 encoder-decoder; `width` scales all widths (1.0 = paper), `n_layers` the 5 block depths."""
    return HarDNetSeg(in_channels, num_classes, width, n_layers)


def build_hardnet_mseg(in_channels: int = 3, num_classes: int = 2, width: float = 1.0, channel: int = 32,
                       n_layers: Sequence[int] | None = None) -> HarDNetMSEG:
    """HarDNet-MSEG; `channel` is the RFB / decoder width (32 in the paper)."""
    return HarDNetMSEG(in_channels, num_classes, width, channel, n_layers)


def build_cenet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet34") -> CENet:
    """CE-Net; `backbone` "resnet34" (paper) or "resnet18" (same widths, fewer blocks)."""
    return CENet(in_channels, num_classes, backbone)


def build_lightnet(in_channels: int = 3, num_classes: int = 2, width_mult: float = 1.0,
                   dec_ch: int = 64) -> LightNet:
    """LightNet (MedPose's reading); `width_mult` is MobileNetV2's width multiplier, `dec_ch` the decoder width."""
    return LightNet(in_channels, num_classes, width_mult, dec_ch)


SPECS_LIGHT: dict[str, SegSpec] = {
    "hardnet": SegSpec("hardnet", build_hardnet, MULTIPLE, "own",
                       "Chao et al., HarDNet: a low memory traffic network, ICCV 2019 (FC-HarDNet-style decoder)",
                       {"width": 1.0}),
    "hardnet_mseg": SegSpec("hardnet_mseg", build_hardnet_mseg, MULTIPLE, "own",
                            "Huang et al., HarDNet-MSEG, arXiv 2101.07172 (2021)", {"width": 1.0, "channel": 32}),
    "cenet": SegSpec("cenet", build_cenet, MULTIPLE, "torchvision",
                     "Gu et al., CE-Net: context encoder network for 2D medical image segmentation, IEEE TMI 2019",
                     {"backbone": "resnet34"}),
    "lightnet": SegSpec("lightnet", build_lightnet, MULTIPLE, "torchvision",
                        "MedPose's reading of the zoo's 'LightNet': MobileNetV2 (Sandler et al., CVPR 2018) encoder + "
                        "light FPN-style decoder", {"width_mult": 1.0, "dec_ch": 64}),
}
