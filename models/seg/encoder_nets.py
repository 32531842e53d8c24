"""Encoder/backbone-based segmentation networks of the MedPose zoo (docs/systems/segmentation_zoo.md), part 1 of 2.

Models here (name -> reference):
  "deeplabv3plus": smp.DeepLabV3Plus, ResNet-34 encoder, output stride 16 (Chen et al., ECCV 2018).
  "deeplabv2":     dilated ResNet (output stride 8) + ASPP of four parallel 3x3 atrous convs, rates 6/12/18/24, whose
                   class-score maps are summed, bilinear upsampling (Chen et al., TPAMI 2017).
  "pspnet":        smp.PSPNet, ResNet-34 encoder (Zhao et al., CVPR 2017).
  "scse_unet":     smp.Unet with concurrent spatial and channel squeeze & excitation in the decoder
                   (Roy et al., MICCAI 2018).
  "hrnet":         timm HRNet branches (hrnet_w18_small) upsampled to the stride-4 branch, concatenated, then the
                   HRNetV2 head 1x1 conv-BN-ReLU-1x1 (Wang et al., TPAMI 2020).
  "setr":          SETR-PUP: timm ViT encoder (patch 16) + progressive upsampling, 4 x [conv3x3-BN-ReLU, x2]
                   (Zheng et al., CVPR 2021). The ViT's position embedding fixes the input size (`input_hw`).
  "dlinknet":      D-LinkNet: ResNet-34 encoder, dilated centre (cascaded rates 1/2/4/8, all summed), LinkNet decoder
                   blocks (Zhou et al., CVPRW 2018).
  "ternausnet":    TernausNet-11: VGG11 encoder + transposed-conv decoder (Iglovikov & Shvets, arXiv 1801.05746).
The dilated-ResNet backbone helper `DilatedResNet` is shared with models/seg/context_nets.py (DANet, OCNet, OCRNet,
EANet). No weights are downloaded (torchvision weights=None, smp encoder_weights=None, timm pretrained=False).

Parameter counts used by tests/test_seg_zoo_encoder.py: torchvision ResNet-50 without its fc has 23,508,032
parameters, ResNet-34 21,284,672, ResNet-18 11,176,512; VGG11 `features` 9,220,480.
"""
from __future__ import annotations

from typing import Sequence

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers as vgg_make_layers

from .common import SegSpec, TensorToSeg, check_input, seg_output

_MOD = "models/seg/encoder_nets.py"
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv(k x k, 'same' padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def plain_resnet(name: str, in_channels: int, replace_stride_with_dilation: Sequence[bool] | None = None):
    """torchvision ResNet `name` (weights=None); conv1 rebuilt for `in_channels` != 3. Its avgpool/fc are unused."""
    if name not in RESNETS:
        raise ValueError(f"{_MOD}: unknown ResNet backbone {name!r} (choose from {RESNETS})")
    net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=replace_stride_with_dilation)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return net


def _dilate_basic_layer(layer: nn.Sequential, first_dilation: int, dilation: int) -> None:
    """Turn a BasicBlock layer's stride 2 into dilation, following torchvision's replace_stride_with_dilation
    convention (which torchvision refuses for BasicBlock): the first block keeps the previous dilation with stride 1,
    the following blocks use `dilation` in both 3x3 convs."""
    for i, block in enumerate(layer):
        d = first_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


class DilatedResNet(nn.Module):
    """torchvision ResNet (weights=None) whose last stages trade stride for dilation.

    output_stride 8: layer3 and layer4 dilated (rates 2 and 4); 16: layer4 dilated (rate 2); 32: plain ResNet.
    Bottleneck ResNets (50/101/152) use torchvision's `replace_stride_with_dilation`; BasicBlock ResNets (18/34, used
    for small test builds) are dilated in place with the same convention. forward -> [layer1, layer2, layer3, layer4]
    features; `channels` lists their widths."""

    def __init__(self, in_channels: int = 3, name: str = "resnet50", output_stride: int = 8):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"{_MOD}: DilatedResNet output_stride must be 8, 16 or 32, got {output_stride}")
        flags = [False, output_stride == 8, output_stride in (8, 16)]
        bottleneck = name in ("resnet50", "resnet101", "resnet152")
        net = plain_resnet(name, in_channels, flags if bottleneck else None)
        if not bottleneck:
            if flags[1]:
                _dilate_basic_layer(net.layer3, 1, 2)
            if flags[2]:
                prev = 2 if flags[1] else 1
                _dilate_basic_layer(net.layer4, prev, prev * 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        e = 4 if bottleneck else 1
        self.channels = (64 * e, 128 * e, 256 * e, 512 * e)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3, self.layer4(f3)]


# ----------------------------------------------------------------------------------------------- smp-based models
class SmpSeg(TensorToSeg):
    """TensorToSeg with the zoo's input check (the smp model's stride) in front."""

    def __init__(self, net: nn.Module, multiple: int, where: str):
        super().__init__(net)
        self.multiple, self.where = multiple, where

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, self.where)
        return super().forward(image_BCHW)


def build_deeplabv3plus(in_channels: int = 3, num_classes: int = 2, encoder_name: str = "resnet34",
                        encoder_output_stride: int = 16, decoder_channels: int = 256) -> nn.Module:
    """smp.DeepLabV3Plus; `decoder_channels` (256 in the paper) is the ASPP/decoder width."""
    net = smp.DeepLabV3Plus(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
                            classes=num_classes, encoder_output_stride=encoder_output_stride,
                            decoder_channels=decoder_channels)
    return SmpSeg(net, 16, f"{_MOD} deeplabv3plus")


def build_pspnet(in_channels: int = 3, num_classes: int = 2, encoder_name: str = "resnet34",
                 psp_out_channels: int = 512) -> nn.Module:
    """smp.PSPNet (encoder depth 3, output stride 8, pyramid bins 1/2/3/6); `psp_out_channels` is the fused width.
    smp builds the whole ResNet but an encoder of depth 3 never runs layer3/layer4: they are replaced by Identity so
    the model holds no unused parameters."""
    net = smp.PSPNet(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=num_classes,
                     psp_out_channels=psp_out_channels)
    if encoder_name.startswith("resnet"):
        net.encoder.layer3, net.encoder.layer4 = nn.Identity(), nn.Identity()
    return SmpSeg(net, 8, f"{_MOD} pspnet")


def build_scse_unet(in_channels: int = 3, num_classes: int = 2, encoder_name: str = "resnet34",
                    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)) -> nn.Module:
    """smp.Unet with decoder_attention_type="scse" (Roy et al. 2018's concurrent sSE + cSE after each decoder block).
    smp's last decoder block has no skip and never runs its first (pre-conv) attention: it is replaced by Identity
    so the model holds no unused parameters. cSE bottlenecks are C // 16 wide (smp's reduction)."""
    net = smp.Unet(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=num_classes,
                   decoder_attention_type="scse", decoder_channels=tuple(decoder_channels))
    net.decoder.blocks[-1].attention1 = nn.Identity()
    return SmpSeg(net, 32, f"{_MOD} scse_unet")


# ------------------------------------------------------------------------------------------------------ DeepLab v2
class DeepLabV2(nn.Module):
    """Dilated ResNet (output stride 8) + ASPP-L: four 3x3 atrous convs (rates 6, 12, 18, 24) straight to class
    scores, summed, then bilinear upsampling to the input. Parameters on top of the backbone: 4 (9 C4 K + K)."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                 rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.backbone = DilatedResNet(in_channels, backbone, output_stride=8)
        c4 = self.backbone.channels[3]
        self.aspp = nn.ModuleList(nn.Conv2d(c4, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} deeplabv2")
        f4 = self.backbone(image_BCHW)[3]
        logits = sum(branch(f4) for branch in self.aspp)
        return seg_output(logits, image_BCHW.shape[-2:], None, self.training)


# ---------------------------------------------------------------------------------------------------------- HRNet
class HRNetSeg(nn.Module):
    """HRNetV2 segmentation: the four parallel branches (strides 4..32) of a timm HRNet (features_only, raw branch
    outputs via feature_location="") are bilinearly upsampled to stride 4, concatenated (C = sum of branch widths)
    and mixed by 1x1 conv-BN-ReLU (C -> C), then a 1x1 conv to classes. Head parameters: C^2 + 2C + C K + K."""

    multiple = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 2, variant: str = "hrnet_w18_small"):
        super().__init__()
        self.body = timm.create_model(variant, features_only=True, pretrained=False, in_chans=in_channels,
                                      feature_location="", out_indices=(1, 2, 3, 4))
        c = sum(self.body.feature_info.channels())
        self.head = nn.Sequential(conv_bn_relu(c, c, k=1), nn.Conv2d(c, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} hrnet")
        feats = self.body(image_BCHW)
        size = feats[0].shape[-2:]
        x = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                    for f in feats[1:]], dim=1)
        return seg_output(self.head(x), image_BCHW.shape[-2:], None, self.training)


# ------------------------------------------------------------------------------------------------------ SETR-PUP
class SETRPUP(nn.Module):
    """SETR-PUP. Encoder: timm VisionTransformer (patch 16, class token, learned position embedding for `input_hw`);
    the patch tokens are reshaped to (B, D, H/16, W/16). Decoder: 4 x [conv3x3 (no bias) -> BN -> ReLU -> bilinear
    x2] with `decoder_channels` (256 in the paper), then a 1x1 conv to classes. Defaults are ViT-Large (D 1024,
    24 layers, 16 heads) as in the paper's SETR-PUP. The position embedding is fixed to `input_hw`, so any other
    input size raises ValueError."""

    multiple = 16

    def __init__(self, in_channels: int = 3, num_classes: int = 2, input_hw: Sequence[int] = (256, 256),
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_channels: int = 256):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        if self.input_hw[0] % 16 or self.input_hw[1] % 16:
            raise ValueError(f"{_MOD} setr: input_hw {self.input_hw} must be multiples of the patch size 16")
        self.vit = VisionTransformer(img_size=self.input_hw, patch_size=16, in_chans=in_channels, num_classes=0,
                                     embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_pool="")
        stages, c = [], embed_dim
        for _ in range(4):
            stages += [conv_bn_relu(c, decoder_channels),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            c = decoder_channels
        self.decoder = nn.Sequential(*stages, nn.Conv2d(c, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} setr")
        hw = tuple(image_BCHW.shape[-2:])
        if hw != self.input_hw:
            raise ValueError(f"{_MOD} setr: input {hw[0]}x{hw[1]} differs from input_hw {self.input_hw}; the ViT "
                             f"position embedding is built for input_hw (rebuild with input_hw={hw})")
        tokens = self.vit.forward_features(image_BCHW)[:, self.vit.num_prefix_tokens:]
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, hw[0] // 16, hw[1] // 16)
        return seg_output(self.decoder(x), hw, None, self.training)


# ------------------------------------------------------------------------------------------------------ D-LinkNet
class LinkDecoderBlock(nn.Sequential):
    """LinkNet decoder block: 1x1 conv (c -> c/4) -> BN -> ReLU -> 3x3 transposed conv stride 2 -> BN -> ReLU ->
    1x1 conv (c/4 -> out) -> BN -> ReLU. Convs carry biases as in LinkNet."""

    def __init__(self, c_in: int, c_out: int):
        m = c_in // 4
        super().__init__(nn.Conv2d(c_in, m, 1), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
                         nn.ConvTranspose2d(m, m, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(m),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(m, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DilatedCentre(nn.Module):
    """D-LinkNet centre: cascaded 3x3 convs with rates 1, 2, 4, 8 (each with bias and ReLU); the output is the input
    plus every intermediate map (receptive fields 3, 7, 15, 31 at the bottleneck, in parallel)."""

    def __init__(self, c: int, rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, y = x, x
        for conv in self.convs:
            y = F.relu(conv(y))
            out = out + y
        return out


class DLinkNet(nn.Module):
    """D-LinkNet34: ResNet encoder (stem + layers 1-4), dilated centre, LinkNet decoder blocks with additive skips,
    then a 4x4 transposed conv (stride 2) to 32 channels, a 3x3 conv and a 3x3 conv to classes."""

    multiple = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet34"):
        super().__init__()
        if backbone not in ("resnet18", "resnet34"):
            raise ValueError(f"{_MOD} dlinknet: backbone must be resnet18 or resnet34, got {backbone!r}")
        net = plain_resnet(backbone, in_channels)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.encoders = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.centre = DilatedCentre(512)
        self.decoders = nn.ModuleList([LinkDecoderBlock(512, 256), LinkDecoderBlock(256, 128),
                                       LinkDecoderBlock(128, 64), LinkDecoderBlock(64, 64)])
        self.final = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(32, num_classes, 3, padding=1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} dlinknet")
        x = self.stem(image_BCHW)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = self.centre(x)
        for i, dec in enumerate(self.decoders):
            x = dec(x)
            if i < 3:
                x = x + skips[2 - i]
        return seg_output(self.final(x), image_BCHW.shape[-2:], None, self.training)


# ----------------------------------------------------------------------------------------------------- TernausNet
class TernausDecoderBlock(nn.Sequential):
    """conv3x3 (c_in -> mid) + ReLU, then a 3x3 transposed conv (stride 2, mid -> out) + ReLU: doubles the size."""

    def __init__(self, c_in: int, mid: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, mid, 3, padding=1), nn.ReLU(inplace=True),
                         nn.ConvTranspose2d(mid, c_out, 3, stride=2, padding=1, output_padding=1),
                         nn.ReLU(inplace=True))


class TernausNet(nn.Module):
    """TernausNet-11: torchvision VGG11 `features` (no BN) split at its five max-pools into encoder stages of 64,
    128, 256, 512, 512 channels; a centre block after the fifth pool; five decoder steps, each concatenating the
    upsampled map with the encoder stage of the same size, as in the paper's Fig. 1 (with `num_filters` f = 32:
    centre 512->16f->8f, then [16f+8f]->16f->8f, [16f+8f]->16f->4f, [8f+4f]->8f->2f, [4f+2f]->4f->f, a final 3x3
    conv [2f+f]->f and a 1x1 conv to classes). No normalisation, as in the paper."""

    multiple = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 2, num_filters: int = 32):
        super().__init__()
        # torchvision's VGG11 `features` (configuration "A"), built without the 123M-parameter classifier that
        # vgg11() would allocate and discard; initialised as torchvision.models.VGG initialises its convs
        feats = vgg_make_layers(vgg_cfgs["A"], batch_norm=False)
        if in_channels != 3:
            feats[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        for m in feats.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        pools = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        starts = [0] + [p + 1 for p in pools[:-1]]
        self.stages = nn.ModuleList(nn.Sequential(*list(feats)[s:p]) for s, p in zip(starts, pools))
        self.pool = nn.MaxPool2d(2, 2)
        f = num_filters
        self.centre = TernausDecoderBlock(512, 16 * f, 8 * f)
        self.decoders = nn.ModuleList([TernausDecoderBlock(512 + 8 * f, 16 * f, 8 * f),
                                       TernausDecoderBlock(512 + 8 * f, 16 * f, 4 * f),
                                       TernausDecoderBlock(256 + 4 * f, 8 * f, 2 * f),
                                       TernausDecoderBlock(128 + 2 * f, 4 * f, f)])
        self.dec1 = nn.Sequential(nn.Conv2d(64 + f, f, 3, padding=1), nn.ReLU(inplace=True))
        self.final = nn.Conv2d(f, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} ternausnet")
        skips, x = [], image_BCHW
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.centre(self.pool(x))
        for dec, skip in zip(self.decoders, reversed(skips[1:])):
            x = dec(torch.cat([x, skip], dim=1))
        x = self.dec1(torch.cat([x, skips[0]], dim=1))
        return seg_output(self.final(x), image_BCHW.shape[-2:], None, self.training)


def build_deeplabv2(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                    rates: Sequence[int] = (6, 12, 18, 24)) -> nn.Module:
    """DeepLab v2 (ASPP-L); `backbone`: resnet50 (default; the paper's best uses resnet101) or resnet18/34 for tests."""
    return DeepLabV2(in_channels, num_classes, backbone, rates)


def build_hrnet(in_channels: int = 3, num_classes: int = 2, variant: str = "hrnet_w18_small") -> nn.Module:
    """HRNetV2 segmentation on a timm HRNet `variant` (hrnet_w18_small = HRNetV2-W18-Small-v1)."""
    return HRNetSeg(in_channels, num_classes, variant)


def build_setr(in_channels: int = 3, num_classes: int = 2, input_hw: Sequence[int] = (256, 256),
               embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_channels: int = 256) -> nn.Module:
    """SETR-PUP; defaults ViT-Large. Small test builds: e.g. embed_dim=64, depth=2, num_heads=4."""
    return SETRPUP(in_channels, num_classes, input_hw, embed_dim, depth, num_heads, decoder_channels)


def build_dlinknet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet34") -> nn.Module:
    """D-LinkNet34 (`backbone` resnet18 for a smaller build)."""
    return DLinkNet(in_channels, num_classes, backbone)


def build_ternausnet(in_channels: int = 3, num_classes: int = 2, num_filters: int = 32) -> nn.Module:
    """TernausNet-11 with decoder base width `num_filters` (32 in the paper)."""
    return TernausNet(in_channels, num_classes, num_filters)


SPECS_ENCODER: dict[str, SegSpec] = {
    "deeplabv3plus": SegSpec("deeplabv3plus", build_deeplabv3plus, 16, "smp",
                             "Chen et al., Encoder-Decoder with Atrous Separable Convolution, ECCV 2018",
                             {"encoder_name": "resnet34", "encoder_output_stride": 16, "decoder_channels": 256}),
    "deeplabv2": SegSpec("deeplabv2", build_deeplabv2, 8, "torchvision",
                         "Chen et al., DeepLab: Semantic Image Segmentation with ... Atrous Convolution, TPAMI 2017",
                         {"backbone": "resnet50", "rates": (6, 12, 18, 24)}),
    "pspnet": SegSpec("pspnet", build_pspnet, 8, "smp", "Zhao et al., Pyramid Scene Parsing Network, CVPR 2017",
                      {"encoder_name": "resnet34", "psp_out_channels": 512}),
    "scse_unet": SegSpec("scse_unet", build_scse_unet, 32, "smp",
                         "Roy et al., Concurrent Spatial and Channel Squeeze & Excitation, MICCAI 2018",
                         {"encoder_name": "resnet34", "decoder_channels": (256, 128, 64, 32, 16)}),
    "hrnet": SegSpec("hrnet", build_hrnet, 32, "timm",
                     "Wang et al., Deep High-Resolution Representation Learning, TPAMI 2020",
                     {"variant": "hrnet_w18_small"}),
    "setr": SegSpec("setr", build_setr, 16, "timm",
                    "Zheng et al., Rethinking Semantic Segmentation ... with Transformers (SETR), CVPR 2021",
                    {"input_hw": (256, 256), "embed_dim": 1024, "depth": 24, "num_heads": 16,
                     "decoder_channels": 256}),
    "dlinknet": SegSpec("dlinknet", build_dlinknet, 32, "own",
                        "Zhou et al., D-LinkNet: LinkNet with Pretrained Encoder and Dilated Convolution, CVPRW 2018",
                        {"backbone": "resnet34"}),
    "ternausnet": SegSpec("ternausnet", build_ternausnet, 32, "own",
                          "Iglovikov & Shvets, TernausNet: U-Net with VGG11 Encoder, arXiv:1801.05746 (2018)",
                          {"num_filters": 32}),
}
