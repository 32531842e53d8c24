"""U²-Net and U²-Net† ("u2net", "u2net_small") for the segmentation zoo (docs/systems/segmentation_zoo.md).

Qin, Zhang, Huang, Dehghan, Zaiane, Jagersand, "U²-Net: Going deeper with nested U-structure for salient object
detection", Pattern Recognition 106 (2020). Written here from the paper's description:

* ReSidual U-blocks RSU-L(C_in, M, C_out): an input 3x3 conv C_in->C_out (x_in); a small U-Net on x_in with L-1
  encoder convs (3x3, M channels, 2x2 max-pooling between them), one dilated (d=2) conv at the bottom, L-2 decoder
  convs 2M->M and a last decoder conv 2M->C_out (each decoder conv sees the upsampled deeper map concatenated with
  the same-level encoder map); output = U-Net(x_in) + x_in.
* RSU-4F: the same without pooling; dilations 1, 2, 4 going down, 8 at the bottom, 4, 2, 1 coming up.
* Every conv is Conv3x3 (with bias) + BatchNorm + ReLU ("REBNCONV").
* Outer U: six encoder stages RSU-7, RSU-6, RSU-5, RSU-4, RSU-4F, RSU-4F (2x2 max-pooling, ceil mode, between
  them), five decoder stages RSU-4F, RSU-4, RSU-5, RSU-6, RSU-7 on [upsampled deeper map, skip]; a 3x3 conv side
  output on each of the six deepest-to-shallowest maps, upsampled to the input size, and a 1x1 conv fusing the six
  side outputs into the final logits. In training the six side outputs are returned as "aux_logits_BCHW" (the
  paper supervises all seven maps).

Widths (Table 1 of the paper) are written in units of `base` (16 by default):
  full  ("u2net"):       encoder (mid, out) = (2b,4b) (2b,8b) (4b,16b) (8b,32b) (16b,32b) (16b,32b);
                          decoder (mid, out) = (16b,32b) (8b,16b) (4b,8b) (2b,4b) (b,4b)    -> 44.0 M params
  small ("u2net_small"): every stage (mid, out) = (b, 4b)                                   ->  1.1 M params
The published sizes (44.0 M / 176.3 MB and 1.1 M / 4.7 MB) are for 3 input channels and one output map; the
paper's sigmoid is left to the loss (the forward returns logits).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.seg.common import SegSpec, check_input, seg_output

_WHERE = "models.seg.u2net"
MULTIPLE = 32


class REBNConv(nn.Sequential):
    """Conv3x3 (bias, dilation d, padding d) + BatchNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """RSU-L (height >= 3): L-1 encoder convs with L-2 max-poolings, a d=2 bottom conv, L-1 decoder convs."""

    def __init__(self, height: int, c_in: int, mid: int, c_out: int):
        super().__init__()
        if height < 3:
            raise ValueError(f"{_WHERE}: RSU height must be >= 3, got {height}")
        self.conv_in = REBNConv(c_in, c_out)
        self.enc = nn.ModuleList([REBNConv(c_out, mid)] + [REBNConv(mid, mid) for _ in range(height - 2)])
        self.bottom = REBNConv(mid, mid, dilation=2)
        self.dec = nn.ModuleList([REBNConv(2 * mid, mid) for _ in range(height - 2)] + [REBNConv(2 * mid, c_out)])
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips = []
        h = x_in
        for i, conv in enumerate(self.enc):
            if i > 0:
                h = self.pool(h)
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for conv, skip in zip(self.dec, reversed(skips)):
            h = conv(torch.cat([_up_to(h, skip), skip], dim=1))
        return h + x_in


class RSU4F(nn.Module):
    """RSU-4F: no pooling; dilations 1, 2, 4 going down, 8 at the bottom, 4, 2, 1 coming up."""

    def __init__(self, c_in: int, mid: int, c_out: int):
        super().__init__()
        self.conv_in = REBNConv(c_in, c_out)
        self.enc = nn.ModuleList([REBNConv(c_out, mid, 1), REBNConv(mid, mid, 2), REBNConv(mid, mid, 4)])
        self.bottom = REBNConv(mid, mid, 8)
        self.dec = nn.ModuleList([REBNConv(2 * mid, mid, 4), REBNConv(2 * mid, mid, 2), REBNConv(2 * mid, c_out, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips = []
        h = x_in
        for conv in self.enc:
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for conv, skip in zip(self.dec, reversed(skips)):
            h = conv(torch.cat([h, skip], dim=1))
        return h + x_in


def _block(height: int, c_in: int, mid: int, c_out: int) -> nn.Module:
    """height 4..7 -> RSU-height; 0 stands for RSU-4F."""
    return RSU4F(c_in, mid, c_out) if height == 0 else RSU(height, c_in, mid, c_out)


_ENC_HEIGHTS = (7, 6, 5, 4, 0, 0)
_DEC_HEIGHTS = (0, 4, 5, 6, 7)   # deepest decoder stage first


class U2Net(nn.Module):
    """Outer U of RSU blocks with six side outputs fused by a 1x1 conv.

    enc: six (mid, out) pairs, shallowest first; dec: five (mid, out) pairs, deepest first."""

    def __init__(self, in_channels: int, num_classes: int, enc: Sequence[tuple[int, int]],
                 dec: Sequence[tuple[int, int]]):
        super().__init__()
        if len(enc) != 6 or len(dec) != 5:
            raise ValueError(f"{_WHERE}: need 6 encoder and 5 decoder (mid, out) pairs, got {len(enc)}, {len(dec)}")
        self.encoder = nn.ModuleList()
        c_prev = in_channels
        for height, (mid, out) in zip(_ENC_HEIGHTS, enc):
            self.encoder.append(_block(height, c_prev, mid, out))
            c_prev = out
        enc_out = [out for _, out in enc]
        self.decoder = nn.ModuleList()
        for i, (height, (mid, out)) in enumerate(zip(_DEC_HEIGHTS, dec)):
            skip_ch = enc_out[4 - i]
            self.decoder.append(_block(height, c_prev + skip_ch, mid, out))
            c_prev = out
        # side outputs: decoder maps shallowest first (stage1d .. stage5d), then the deepest encoder map (stage6)
        side_in = [out for _, out in reversed(dec)] + [enc_out[-1]]
        self.sides = nn.ModuleList([nn.Conv2d(c, num_classes, 3, padding=1) for c in side_in])
        self.fuse = nn.Conv2d(6 * num_classes, num_classes, 1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, MULTIPLE, _WHERE)
        skips = []
        h = image_BCHW
        for i, stage in enumerate(self.encoder):
            if i > 0:
                h = self.pool(h)
            h = stage(h)
            skips.append(h)
        feats = [h]                                    # stage6, deepest first
        for i, stage in enumerate(self.decoder):
            skip = skips[4 - i]
            h = stage(torch.cat([_up_to(h, skip), skip], dim=1))
            feats.append(h)
        feats = feats[::-1]                            # stage1d (full resolution) .. stage6
        hw = image_BCHW.shape[-2:]
        side = []
        for conv, f in zip(self.sides, feats):
            s = conv(f)
            if s.shape[-2:] != hw:
                s = F.interpolate(s, size=hw, mode="bilinear", align_corners=False)
            side.append(s)
        fused = self.fuse(torch.cat(side, dim=1))
        return seg_output(fused, hw, side, self.training)


def build_u2net(in_channels: int = 3, num_classes: int = 2, base: int = 16) -> U2Net:
    """Full U²-Net (paper Table 1); `base` = 16 gives the published widths (44.0 M params for 3 in / 1 out)."""
    b = base
    enc = [(2 * b, 4 * b), (2 * b, 8 * b), (4 * b, 16 * b), (8 * b, 32 * b), (16 * b, 32 * b), (16 * b, 32 * b)]
    dec = [(16 * b, 32 * b), (8 * b, 16 * b), (4 * b, 8 * b), (2 * b, 4 * b), (b, 4 * b)]
    return U2Net(in_channels, num_classes, enc, dec)


def build_u2net_small(in_channels: int = 3, num_classes: int = 2, base: int = 16) -> U2Net:
    """U²-Net† (small): every stage has mid = base and out = 4 * base (1.1 M params at base 16, 3 in / 1 out)."""
    return U2Net(in_channels, num_classes, [(base, 4 * base)] * 6, [(base, 4 * base)] * 5)


_PAPER = "Qin et al., U2-Net: going deeper with nested U-structure for salient object detection, Pattern Recogn. 2020"

SPECS_U2: dict[str, SegSpec] = {
    "u2net": SegSpec("u2net", build_u2net, MULTIPLE, "own", _PAPER, {"base": 16}),
    "u2net_small": SegSpec("u2net_small", build_u2net_small, MULTIPLE, "own", _PAPER + " (U2-Net-small)",
                           {"base": 16}),
}
