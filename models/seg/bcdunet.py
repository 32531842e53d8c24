"""BCDU-Net for the segmentation zoo (docs/systems/segmentation_zoo.md): "bcdunet".

Azad, Asadi-Aghbolaghi, Fathy, Escalera, "Bi-Directional ConvLSTM U-Net with Densely Connected Convolutions",
ICCV Workshops 2019 (arXiv:1909.00166). Written here from the paper and the layer list of the authors' released
model (BCDU_net_D3); no code is shared with it.

Layout (widths base * 2^l, base = 64 in the paper; 3 max-poolings, so H and W must be multiples of 8):
* encoder levels 0..2: Conv3x3 (+bias) -> ReLU, twice (64, 128, 256); no BN in the encoder, as published;
* bottleneck (level 3, width 512): `dense_blocks` (d = 3 in the paper) blocks of two Conv3x3 + ReLU, each followed by
  dropout; block k > 1 reads the concatenation of all earlier blocks' outputs (dense connectivity: block 2 reads
  D1, block 3 reads [D2, D1], 1024 channels); d = 1 is the plain U-Net bottleneck;
* decoder level l: 2x2 stride-2 transposed conv (width l+1 -> width l) + BN + ReLU gives X_up; the skip X_e and X_up
  form a 2-step sequence that a ConvLSTM with width_l / 2 hidden channels (3x3 kernels) reads. With
  `bidirectional=True` (the paper) one ConvLSTM reads (X_e, X_up) and a second one (X_up, X_e); their last hidden
  states are merged as Y = tanh(W_f * H_fwd + W_b * H_bwd + b), written as one conv over [H_fwd, H_bwd] (the
  paper does not state the kernel of W; 1x1 here). With `bidirectional=False` a single ConvLSTM reads the sequence
  backwards (X_up, X_e), which is what the authors' released model does. Then Conv3x3 + ReLU twice (width l);
* head: Conv3x3 (64 -> 2) + ReLU, then Conv1x1 to the classes (logits; the paper's sigmoid is the loss's business).

Dropout (0.5 in the paper) follows the level-2 skip and every dense block, as in the released model.

Parameter count: 20.7 M is the figure quoted for the released BCDU_net_D3 (Keras, one input channel); counting its
layers by hand gives 20,659,717 (20,660,869 with 3 input channels). `bidirectional=False` at base 64 rebuilds that
graph (the test compares it, within 0.5 %, and the bidirectional default against the layer formula). The ConvLSTM
gates use the logistic sigmoid of the paper's equations (the released Keras layer defaulted to a hard sigmoid) and
have no peephole terms (neither has the released layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import SegSpec, check_input, seg_output

_WHERE = "models/seg/bcdunet.py"


class ConvLSTMCell(nn.Module):
    """ConvLSTM cell (Shi et al. 2015, without peepholes): one conv over [x, h] gives the four gate pre-activations
    (input i, forget f, candidate g, output o, in that channel order);
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g),   h' = sigmoid(o) * tanh(c').
    Parameters: k*k*(C_in + C_h)*4*C_h + 4*C_h."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def run(self, steps: list[torch.Tensor]) -> torch.Tensor:
        """The last hidden state after reading `steps` in order from zero states (a fixed-length Python loop)."""
        b, _, hh, ww = steps[0].shape
        h = steps[0].new_zeros(b, self.hidden_channels, hh, ww)
        c = h
        for x in steps:
            h, c = self.forward(x, h, c)
        return h


class BConvLSTM(nn.Module):
    """Combines the encoder skip X_e and the up-sampled decoder map X_up (both `channels` wide) into `hidden`
    channels: bidirectional (forward and backward ConvLSTMs, merged by tanh of a 1x1 conv over both last hidden
    states) or, with bidirectional=False, one ConvLSTM reading (X_up, X_e) as the released model does."""

    def __init__(self, channels: int, hidden: int, bidirectional: bool = True):
        super().__init__()
        self.bidirectional = bidirectional
        self.backward_lstm = ConvLSTMCell(channels, hidden)
        if bidirectional:
            self.forward_lstm = ConvLSTMCell(channels, hidden)
            self.merge = nn.Conv2d(2 * hidden, hidden, 1)

    def forward(self, x_e: torch.Tensor, x_up: torch.Tensor) -> torch.Tensor:
        h_bwd = self.backward_lstm.run([x_up, x_e])
        if not self.bidirectional:
            return h_bwd
        h_fwd = self.forward_lstm.run([x_e, x_up])
        return torch.tanh(self.merge(torch.cat([h_fwd, h_bwd], dim=1)))


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv_relu(cin, cout), _conv_relu(cout, cout))


class BCDUNet(nn.Module):
    """BCDU-Net (see the module docstring). base: level-0 width (64 in the paper; widths base * 2^l);
    dense_blocks: densely connected blocks at the bottleneck (3 in the paper's best model, 1 = plain);
    bidirectional: two-direction ConvLSTM skips (the paper) or the released model's single backward one."""

    multiple = 8

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 64, dense_blocks: int = 3,
                 bidirectional: bool = True, dropout: float = 0.5):
        super().__init__()
        if base < 2 or base % 2:
            raise ValueError(f"{_WHERE}: base must be an even number >= 2 (the ConvLSTMs use base/2), got {base}")
        if dense_blocks < 1:
            raise ValueError(f"{_WHERE}: dense_blocks must be >= 1, got {dense_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{_WHERE}: dropout must be in [0, 1), got {dropout}")
        w = [base * 2 ** i for i in range(4)]
        self.encoders = nn.ModuleList(_double(in_channels if i == 0 else w[i - 1], w[i]) for i in range(3))
        self.dense = nn.ModuleList(
            _double(w[2] if k == 0 else k * w[3], w[3]) for k in range(dense_blocks))
        self.drop = nn.Dropout(dropout)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2), nn.BatchNorm2d(w[i]), nn.ReLU(inplace=True))
            for i in range(3))
        self.skips = nn.ModuleList(BConvLSTM(w[i], w[i] // 2, bidirectional) for i in range(3))
        self.decoders = nn.ModuleList(_double(w[i] // 2, w[i]) for i in range(3))
        self.head = nn.Sequential(_conv_relu(w[0], 2), nn.Conv2d(2, num_classes, 1))

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        check_input(image_BCHW, self.multiple, f"{_WHERE} (bcdunet)")
        skips, h = [], image_BCHW
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        skips[2] = self.drop(skips[2])
        h = F.max_pool2d(h, 2)
        dense: list[torch.Tensor] = []
        for k, block in enumerate(self.dense):
            # block 1 reads the pooled level-2 map, block 2 reads D1, block k > 2 reads [D_{k-1}, ..., D1]
            inp = h if k == 0 else torch.cat(dense[::-1], dim=1)
            dense.append(self.drop(block(inp)))
        h = dense[-1]
        for i in reversed(range(3)):
            h = self.decoders[i](self.skips[i](skips[i], self.ups[i](h)))
        return seg_output(self.head(h), image_BCHW.shape[-2:], None, self.training)


def build_bcdunet(in_channels: int = 3, num_classes: int = 2, base: int = 64, dense_blocks: int = 3,
                  bidirectional: bool = True, dropout: float = 0.5) -> nn.Module:
    """BCDU-Net (d = dense_blocks). base 64 is the paper's width; the HC18 table trains base 32."""
    return BCDUNet(in_channels, num_classes, base, dense_blocks, bidirectional, dropout)


SPECS_BCDUNET: dict[str, SegSpec] = {
    "bcdunet": SegSpec("bcdunet", build_bcdunet, 8, "own",
                       "Azad et al., Bi-Directional ConvLSTM U-Net with Densely Connected Convolutions, ICCVW 2019",
                       {"base": 64, "dense_blocks": 3, "bidirectional": True, "dropout": 0.5}),
}
