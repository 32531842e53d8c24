"""Context/attention segmentation networks of the MedPose zoo (docs/systems/segmentation_zoo.md), part 2 of 2.

All but LRF-EANet sit on the shared dilated ResNet (models/seg/encoder_nets.py `DilatedResNet`, output stride 8,
resnet50 by default; `backbone="resnet18"` for small builds) and end in a 1x1 classifier whose logits are bilinearly
upsampled to the input:
  "danet":     Dual Attention Network (Fu et al., CVPR 2019): conv3x3 2048->512 reductions feeding a position
               attention module (PAM) and a channel attention module (CAM), each followed by conv3x3-BN-ReLU; the two
               are summed, dropout 0.1, 1x1 conv to classes. PAM/CAM outputs are gamma * attention + input with the
               scalar gamma initialised to 0, as in the paper.
  "ocnet":     OCNet with the base object-context block (Yuan & Wang, arXiv 1809.00916, 2018): conv3x3 2048->512,
               a self-attention object context (keys = queries from one 1x1 conv-BN-ReLU, 1x1 values, 1x1 output
               projection) concatenated with its input, 1x1 fusion conv-BN-ReLU, dropout, 1x1 classifier.
  "ocrnet":    OCRNet (Yuan et al., ECCV 2020): soft object regions from an auxiliary head on layer3, object-region
               representations (spatial softmax of the regions times the pixel representation), pixel-region
               relation (query/key transforms, softmax over regions), object contextual representation, augmented
               representation = 1x1 conv of [context, pixels]; the aux logits go out as "aux_logits_BCHW".
  "eanet":     External-attention network (Guo et al., "Beyond Self-attention: External Attention using Two Linear
               Layers", TPAMI 2022 / arXiv 2105.02358, 2021): conv3x3 2048->512, external attention with two memory
               units M_k, M_v (1D 1x1 convs 512->S->512, S = 64) and double normalisation (softmax over pixels, then
               l1 over memory slots), residual + ReLU, conv3x3 512->256, 1x1 classifier.
  "lrf_eanet": LRF-EANet. The original source is not available: this is MedPose's reading of the name, a UNet-style
               encoder-decoder on a torchvision ResNet-34 encoder with a large-receptive-field (LRF) block of
               parallel dilated 3x3 convs (rates 1, 2, 4, 8) and an external-attention block at the bottleneck.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import SegSpec, check_input, seg_output
from .encoder_nets import DilatedResNet, conv_bn_relu, plain_resnet

_MOD = "models/seg/context_nets.py"


# ---------------------------------------------------------------------------------------------------------- DANet
class PositionAttention(nn.Module):
    """PAM: B = 1x1 conv C->C/8 (query), C' = 1x1 conv C->C/8 (key), D = 1x1 conv C->C (value);
    S = softmax_j(B_i . C'_j) over all pixel pairs, out_i = gamma * sum_j S_ij D_j + x_i (gamma scalar, init 0).
    Parameters: 2 (C C/8 + C/8) + C^2 + C + 1."""

    def __init__(self, c: int):
        super().__init__()
        self.query = nn.Conv2d(c, c // 8, 1)
        self.key = nn.Conv2d(c, c // 8, 1)
        self.value = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)                    # B N C/8
        k = self.key(x).flatten(2)                                      # B C/8 N
        attn = torch.softmax(torch.bmm(q, k), dim=-1)                   # B N N (row i: weights over j)
        v = self.value(x).flatten(2)                                    # B C N
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """CAM: X = features (B, C, N); energy = X X^T (C x C); as in the paper's implementation the energy is turned
    into max(energy) - energy before the softmax over channels (numerically stable); out = gamma * A X + x.
    One parameter (gamma, init 0)."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = x.flatten(2)
        energy = torch.bmm(f, f.transpose(1, 2))
        energy = energy.amax(dim=-1, keepdim=True) - energy
        attn = torch.softmax(energy, dim=-1)
        return self.gamma * torch.bmm(attn, f).view(b, c, h, w) + x


class DANet(nn.Module):
    """DANet head on the dilated ResNet's layer4 (see module docstring). `head_channels` = 512 in the paper."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                 head_channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.backbone = DilatedResNet(in_channels, backbone, output_stride=8)
        c4, m = self.backbone.channels[3], head_channels
        self.pam_in, self.cam_in = conv_bn_relu(c4, m), conv_bn_relu(c4, m)
        self.pam, self.cam = PositionAttention(m), ChannelAttention()
        self.pam_out, self.cam_out = conv_bn_relu(m, m), conv_bn_relu(m, m)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(m, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} danet")
        f4 = self.backbone(image_BCHW)[3]
        fused = self.pam_out(self.pam(self.pam_in(f4))) + self.cam_out(self.cam(self.cam_in(f4)))
        return seg_output(self.classifier(fused), image_BCHW.shape[-2:], None, self.training)


# ---------------------------------------------------------------------------------------------------------- OCNet
class ObjectContext(nn.Module):
    """Base object context: query = key = f(x) (1x1 conv C->Ck, BN, ReLU, shared as in the paper), value = 1x1 conv
    C->Cv; weights softmax_j(q_i . k_j / sqrt(Ck)); context = W(sum_j w_ij v_j) with W a 1x1 conv Cv->C.
    Parameters: (C Ck + 2 Ck) + (C Cv + Cv) + (Cv C + C)."""

    def __init__(self, c: int, key_channels: int, value_channels: int):
        super().__init__()
        self.f_key = conv_bn_relu(c, key_channels, k=1)
        self.f_value = nn.Conv2d(c, value_channels, 1)
        self.out = nn.Conv2d(value_channels, c, 1)
        self.scale = key_channels ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qk = self.f_key(x).flatten(2)                                   # B Ck N
        v = self.f_value(x).flatten(2)                                  # B Cv N
        attn = torch.softmax(torch.bmm(qk.transpose(1, 2), qk) * self.scale, dim=-1)   # B N N
        ctx = torch.bmm(v, attn.transpose(1, 2)).view(b, -1, h, w)
        return self.out(ctx)


class OCNet(nn.Module):
    """Base-OC network: layer4 -> conv3x3-BN-ReLU (C4 -> 512) -> [object context, features] concatenated ->
    1x1 conv-BN-ReLU (1024 -> 512) -> dropout 0.05 -> 1x1 classifier. Key/value widths 256 as in the paper."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                 head_channels: int = 512, key_channels: int = 256, value_channels: int = 256,
                 dropout: float = 0.05):
        super().__init__()
        self.backbone = DilatedResNet(in_channels, backbone, output_stride=8)
        m = head_channels
        self.reduce = conv_bn_relu(self.backbone.channels[3], m)
        self.context = ObjectContext(m, key_channels, value_channels)
        self.fuse = conv_bn_relu(2 * m, m, k=1)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(m, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} ocnet")
        x = self.reduce(self.backbone(image_BCHW)[3])
        x = self.fuse(torch.cat([self.context(x), x], dim=1))
        return seg_output(self.classifier(x), image_BCHW.shape[-2:], None, self.training)


# --------------------------------------------------------------------------------------------------------- OCRNet
class OCRModule(nn.Module):
    """Object-contextual representations. Inputs: pixel features X (B, C, H, W), soft regions R (B, K, H, W).
    f_k = softmax over pixels of R_k; object representation g_k = sum_i f_ki X_i  (B, C, K).
    Relation w_ik = softmax_k(phi(X_i) . psi(g_k) / sqrt(Ck)), phi, psi = two 1x1 conv-BN-ReLU (C -> Ck -> Ck);
    context y_i = rho(sum_k w_ik delta(g_k)), delta = 1x1 conv-BN-ReLU C -> Ck, rho = 1x1 conv-BN-ReLU Ck -> C;
    augmented z_i = 1x1 conv-BN-ReLU([y_i, X_i]) (2C -> C)."""

    def __init__(self, c: int, key_channels: int):
        super().__init__()
        self.phi = nn.Sequential(conv_bn_relu(c, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.psi = nn.Sequential(conv_bn_relu(c, key_channels, 1), conv_bn_relu(key_channels, key_channels, 1))
        self.delta = conv_bn_relu(c, key_channels, 1)
        self.rho = conv_bn_relu(key_channels, c, 1)
        self.augment = conv_bn_relu(2 * c, c, 1)
        self.scale = key_channels ** -0.5

    def forward(self, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = torch.softmax(regions.flatten(2), dim=-1)                   # B K N
        g = torch.bmm(f, x.flatten(2).transpose(1, 2))                  # B K C
        g = g.transpose(1, 2).unsqueeze(-1)                             # B C K 1
        q = self.phi(x).flatten(2).transpose(1, 2)                      # B N Ck
        k = self.psi(g).flatten(2)                                      # B Ck K
        rel = torch.softmax(torch.bmm(q, k) * self.scale, dim=-1)       # B N K
        v = self.delta(g).flatten(2).transpose(1, 2)                    # B K Ck
        y = torch.bmm(rel, v).transpose(1, 2).reshape(b, -1, h, w)      # B Ck H W
        return self.augment(torch.cat([self.rho(y), x], dim=1))


class OCRNet(nn.Module):
    """OCRNet on the dilated ResNet: aux head (layer3: conv3x3-BN-ReLU C3 -> 512, 1x1 -> K) gives the soft object
    regions; pixel representation = conv3x3-BN-ReLU(layer4) C4 -> 512; OCR module (key width 256); dropout 0.05;
    1x1 classifier. Training output carries the aux logits (the paper weights their loss by 0.4)."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                 head_channels: int = 512, key_channels: int = 256, dropout: float = 0.05):
        super().__init__()
        self.backbone = DilatedResNet(in_channels, backbone, output_stride=8)
        c3, c4 = self.backbone.channels[2:]
        m = head_channels
        self.aux_head = nn.Sequential(conv_bn_relu(c3, m), nn.Conv2d(m, num_classes, 1))
        self.pixel = conv_bn_relu(c4, m)
        self.ocr = OCRModule(m, key_channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(m, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} ocrnet")
        _, _, f3, f4 = self.backbone(image_BCHW)
        aux = self.aux_head(f3)
        x = self.ocr(self.pixel(f4), aux)
        return seg_output(self.classifier(x), image_BCHW.shape[-2:], [aux], self.training)


# ---------------------------------------------------------------------------------------------------------- EANet
class ExternalAttention(nn.Module):
    """External attention block: 1x1 conv C->C (bias), M_k: 1D conv C->S (no bias), softmax over the N pixels, then
    l1-normalisation over the S memory slots (double normalisation), M_v: 1D conv S->C (no bias), 1x1 conv C->C
    (no bias) + BN, residual with the block input, ReLU. Parameters: C^2 + C + 2 C S + C^2 + 2C."""

    def __init__(self, c: int, memory_units: int = 64):
        super().__init__()
        self.conv_in = nn.Conv2d(c, c, 1)
        self.mk = nn.Conv1d(c, memory_units, 1, bias=False)
        self.mv = nn.Conv1d(memory_units, c, 1, bias=False)
        self.conv_out = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.mk(self.conv_in(x).flatten(2))                      # B S N
        attn = torch.softmax(attn, dim=-1)
        attn = attn / (attn.sum(dim=1, keepdim=True) + 1e-9)
        y = self.mv(attn).view(b, c, h, w)
        return F.relu(self.conv_out(y) + x)


class EANet(nn.Module):
    """EANet: layer4 -> conv3x3-BN-ReLU (C4 -> 512) -> external attention (S = 64) -> conv3x3-BN-ReLU (512 -> 256)
    -> dropout 0.1 -> 1x1 classifier."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50",
                 head_channels: int = 512, memory_units: int = 64, dropout: float = 0.1):
        super().__init__()
        self.backbone = DilatedResNet(in_channels, backbone, output_stride=8)
        m = head_channels
        self.head = nn.Sequential(conv_bn_relu(self.backbone.channels[3], m), ExternalAttention(m, memory_units),
                                  conv_bn_relu(m, m // 2), nn.Dropout2d(dropout), nn.Conv2d(m // 2, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} eanet")
        logits = self.head(self.backbone(image_BCHW)[3])
        return seg_output(logits, image_BCHW.shape[-2:], None, self.training)


# ------------------------------------------------------------------------------------------------------ LRF-EANet
class LargeReceptiveField(nn.Module):
    """LRF block: parallel 3x3 conv-BN-ReLU branches (C -> C/4 each) at dilation rates 1, 2, 4, 8, concatenated,
    1x1 conv-BN (-> C), residual with the input, ReLU."""

    def __init__(self, c: int, rates: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        b = c // len(rates)
        self.branches = nn.ModuleList(conv_bn_relu(c, b, dilation=r) for r in rates)
        self.fuse = nn.Sequential(nn.Conv2d(b * len(rates), c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fuse(torch.cat([br(x) for br in self.branches], dim=1)) + x)


class UpBlock(nn.Module):
    """Bilinear x2, concat with the skip (if any), two conv3x3-BN-ReLU."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(c_in + c_skip, c_out), conv_bn_relu(c_out, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.convs(x if skip is None else torch.cat([x, skip], dim=1))


class LRFEANet(nn.Module):
    """LRF-EANet (MedPose's reading of the name; the original source is not available): ResNet encoder (stem conv
    at stride 2 = skip 0, layers 1-4 at strides 4-32), bottleneck LRF block + external attention (S memory units)
    on layer4, UNet decoder (bilinear x2, concat skip, 2 x conv3x3-BN-ReLU) with `decoder_channels`
    (256, 128, 64, 32, 16 by default) down to full resolution, 1x1 classifier."""

    multiple = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet34",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), memory_units: int = 64):
        super().__init__()
        if backbone not in ("resnet18", "resnet34"):
            raise ValueError(f"{_MOD} lrf_eanet: backbone must be resnet18 or resnet34, got {backbone!r}")
        if len(decoder_channels) != 5:
            raise ValueError(f"{_MOD} lrf_eanet: decoder_channels needs 5 widths, got {tuple(decoder_channels)}")
        net = plain_resnet(backbone, in_channels)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.lrf = LargeReceptiveField(512)
        self.attention = ExternalAttention(512, memory_units)
        skips, c = (256, 128, 64, 64, 0), 512
        blocks = []
        for c_skip, c_out in zip(skips, decoder_channels):
            blocks.append(UpBlock(c, c_skip, c_out))
            c = c_out
        self.decoder = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_MOD} lrf_eanet")
        x0 = self.stem(image_BCHW)
        feats, x = [x0], self.pool(x0)
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        x = self.attention(self.lrf(feats[4]))
        skips = [feats[3], feats[2], feats[1], feats[0], None]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return seg_output(self.classifier(x), image_BCHW.shape[-2:], None, self.training)


def build_danet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", head_channels: int = 512,
                dropout: float = 0.1) -> nn.Module:
    """DANet; `backbone` resnet50 (default; the paper's best uses resnet101), `head_channels` 512 in the paper."""
    return DANet(in_channels, num_classes, backbone, head_channels, dropout)


def build_ocnet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", head_channels: int = 512,
                key_channels: int = 256, value_channels: int = 256, dropout: float = 0.05) -> nn.Module:
    """Base-OCNet; widths 512/256/256 as in the paper."""
    return OCNet(in_channels, num_classes, backbone, head_channels, key_channels, value_channels, dropout)


def build_ocrnet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", head_channels: int = 512,
                 key_channels: int = 256, dropout: float = 0.05) -> nn.Module:
    """OCRNet (ResNet variant of the paper: 512-channel pixel representation, 256-channel keys)."""
    return OCRNet(in_channels, num_classes, backbone, head_channels, key_channels, dropout)


def build_eanet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet50", head_channels: int = 512,
                memory_units: int = 64, dropout: float = 0.1) -> nn.Module:
    """EANet (memory size S = 64 as in the paper's segmentation experiments)."""
    return EANet(in_channels, num_classes, backbone, head_channels, memory_units, dropout)


def build_lrf_eanet(in_channels: int = 3, num_classes: int = 2, backbone: str = "resnet34",
                    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), memory_units: int = 64) -> nn.Module:
    """LRF-EANet, MedPose's reading of the name (see LRFEANet)."""
    return LRFEANet(in_channels, num_classes, backbone, decoder_channels, memory_units)


_DILATED = {"backbone": "resnet50", "head_channels": 512}
SPECS_CONTEXT: dict[str, SegSpec] = {
    "danet": SegSpec("danet", build_danet, 8, "own",
                     "Fu et al., Dual Attention Network for Scene Segmentation, CVPR 2019", dict(_DILATED)),
    "ocnet": SegSpec("ocnet", build_ocnet, 8, "own",
                     "Yuan & Wang, OCNet: Object Context Network for Scene Parsing, arXiv:1809.00916 (2018)",
                     dict(_DILATED, key_channels=256, value_channels=256)),
    "ocrnet": SegSpec("ocrnet", build_ocrnet, 8, "own",
                      "Yuan et al., Object-Contextual Representations for Semantic Segmentation, ECCV 2020",
                      dict(_DILATED, key_channels=256)),
    "eanet": SegSpec("eanet", build_eanet, 8, "own",
                     "Guo et al., Beyond Self-attention: External Attention using Two Linear Layers, "
                     "arXiv:2105.02358 (2021)", dict(_DILATED, memory_units=64)),
    "lrf_eanet": SegSpec("lrf_eanet", build_lrf_eanet, 32, "own",
                         "MedPose reading of LRF-EANet (source unavailable): UNet + large-receptive-field block + "
                         "external attention (Guo et al. 2021)",
                         {"backbone": "resnet34", "decoder_channels": (256, 128, 64, 32, 16), "memory_units": 64}),
}
