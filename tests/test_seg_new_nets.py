"""TMUnet (models/seg/tmunet.py) and BCDU-Net (models/seg/bcdunet.py): parameter counts against the publication
(BCDU-Net) and the layer formulas (both), the ConvLSTM cell against a hand computation, the bidirectional skip
against its definition, the transformer's attention against softmax(QK^T / sqrt(d)) V, long-range context across
patches, shapes and the input-size error, and a few training steps on a fixed tiny batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.seg import SEG_SPECS, build_seg_model
from models.seg.bcdunet import BConvLSTM, ConvLSTMCell
from models.seg.tmunet import SelfAttention

# tiny builds for the functional tests (tests/test_seg_zoo_e2e.py trains each of them one step through the engine)
SMALL = {
    "tmunet": {"backbone": "resnet18", "embed_dim": 16, "heads": 2, "patch_widths": [4, 8], "dec_widths": [16, 16]},
    "bcdunet": {"base": 4},
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c          # weight and bias (torch); Keras also lists its 2 moving statistics


def lstm(cin: int, hidden: int, k: int = 3) -> int:
    return conv(cin + hidden, 4 * hidden, k)


def bcdunet_formula(in_ch: int, classes: int, base: int = 64, d: int = 3, bidirectional: bool = True) -> int:
    w = [base * 2 ** i for i in range(4)]
    n = sum(conv(in_ch if i == 0 else w[i - 1], w[i]) + conv(w[i], w[i]) for i in range(3))
    n += sum(conv(w[2] if k == 0 else k * w[3], w[3]) + conv(w[3], w[3]) for k in range(d))   # dense blocks
    for i in range(3):
        n += w[i + 1] * w[i] * 4 + w[i] + bn(w[i])                       # 2x2 transposed conv + BN
        n += (2 if bidirectional else 1) * lstm(w[i], w[i] // 2)          # one ConvLSTM per direction
        n += conv(w[i], w[i] // 2, 1) if bidirectional else 0             # merge of the two directions
        n += conv(w[i] // 2, w[i]) + conv(w[i], w[i])                     # decoder convs
    return n + conv(w[0], 2) + conv(2, classes, 1)


# torchvision's published totals (ResNet-50 25,557,032; ResNet-18 11,689,512) less the unused 1000-class fc
RESNET_FEATURES = {"resnet50": (25_557_032 - (2048 * 1000 + 1000), [256, 512, 1024, 2048]),
                   "resnet18": (11_689_512 - (512 * 1000 + 1000), [64, 128, 256, 512])}


def tmunet_formula(in_ch: int, classes: int, backbone: str = "resnet50", embed: int = 512, depth: int = 4,
                   patch_widths=(128, 256), dec=(128, 64), ctx: int = 64, grid: int = 16) -> int:
    def cbr(cin, cout, k=3):
        return conv(cin, cout, k) + bn(cout)

    def up(cin, skip, cout):
        return cin * cout * 4 + cout + cbr(cout + skip, cout) + cbr(cout, cout)

    n, c = RESNET_FEATURES[backbone]
    n += 2 * cbr(c[3], c[3])                                                # bridge
    n += up(c[3], c[2], c[2]) + up(c[2], c[1], c[1]) + up(c[1], c[0], c[0]) + up(c[0], 64, dec[0])
    n += up(dec[0], in_ch, dec[1])
    widths, cin = [*patch_widths, embed], in_ch
    for w in widths:                                                        # patch CNN
        n += cbr(cin, w) + cbr(w, w)
        cin = w
    n += embed + embed + embed * grid * grid                                # class token, its position, grid
    e = embed
    n += depth * (2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e))
    n += conv(e, ctx, 1) + bn(ctx)                                          # global contextual map
    n += conv(dec[1], 32, 1) + bn(32) + 32                                  # boundary head
    n += 2 * dec[1] * (dec[1] // 16)                                        # squeeze-excitation (no bias)
    return n + conv(dec[1] + ctx, classes, 1)


def test_registered_in_the_zoo():
    assert SEG_SPECS["tmunet"].multiple == 32 and SEG_SPECS["tmunet"].source == "torchvision"
    assert SEG_SPECS["bcdunet"].multiple == 8 and SEG_SPECS["bcdunet"].source == "own"
    for name in SMALL:
        assert "Azad" in SEG_SPECS[name].paper


def test_bcdunet_parameters_match_the_publication_and_the_formula():
    # the released BCDU_net_D3 (d = 3, one backward ConvLSTM per skip, 1 input channel, 1 output): quoted as
    # 20.7 M; the Keras graph counts 20,659,717 including 896 BN moving statistics that torch keeps as buffers.
    released = build_seg_model("bcdunet", in_channels=1, num_classes=1, bidirectional=False)
    assert n_params(released) == bcdunet_formula(1, 1, bidirectional=False) == 20_659_717 - 896
    assert abs(n_params(released) - 20.7e6) / 20.7e6 < 0.005
    # the paper's bidirectional skips add a second ConvLSTM and a 1x1 merge per level
    assert n_params(build_seg_model("bcdunet")) == bcdunet_formula(3, 2)
    for kw in ({"base": 16}, {"base": 8, "dense_blocks": 1}, {"base": 4, "dense_blocks": 4}):
        model = build_seg_model("bcdunet", in_channels=2, num_classes=3, **kw)
        assert n_params(model) == bcdunet_formula(2, 3, kw["base"], kw.get("dense_blocks", 3)), kw


def test_tmunet_parameters_match_the_formula():
    # no published count was found (see models/seg/tmunet.py); the default build is counted on the meta device
    with torch.device("meta"):
        default = build_seg_model("tmunet")
        small = build_seg_model("tmunet", backbone="resnet18", embed_dim=64, heads=4, patch_widths=[16, 32],
                                dec_widths=[32, 16])
    assert n_params(default) == tmunet_formula(3, 2)
    assert round(n_params(default) / 1e6, 1) == 165.2
    assert n_params(small) == tmunet_formula(3, 2, "resnet18", 64, 4, (16, 32), (32, 16))


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_convlstm_cell_matches_a_hand_computation():
    cell = ConvLSTMCell(1, 1, kernel_size=1)
    # gate order i, f, g, o; each gate = a * x + b * h + bias
    a, b, bias = [0.5, -0.3, 0.8, 0.2], [0.1, 0.4, -0.6, 0.7], [0.05, 1.0, -0.1, 0.3]
    with torch.no_grad():
        cell.gates.weight.copy_(torch.tensor([[[[a[g]]], [[b[g]]]] for g in range(4)]))
        cell.gates.bias.copy_(torch.tensor(bias))
    xs = [1.5, -0.7]
    h = c = 0.0
    for x in xs:
        pre = [a[g] * x + b[g] * h + bias[g] for g in range(4)]
        c = _sig(pre[1]) * c + _sig(pre[0]) * math.tanh(pre[2])
        h = _sig(pre[3]) * math.tanh(c)
    got = cell.run([torch.full((1, 1, 2, 3), x) for x in xs])
    assert got.shape == (1, 1, 2, 3)
    assert torch.allclose(got, torch.full_like(got, h), atol=1e-6), (got.flatten()[0].item(), h)


def test_bidirectional_skip_is_both_directions_merged():
    torch.manual_seed(0)
    skip = BConvLSTM(4, 2, bidirectional=True)
    x_e, x_up = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    h_fwd = skip.forward_lstm.run([x_e, x_up])
    h_bwd = skip.backward_lstm.run([x_up, x_e])
    want = torch.tanh(F.conv2d(torch.cat([h_fwd, h_bwd], 1), skip.merge.weight, skip.merge.bias))
    assert torch.allclose(skip(x_e, x_up), want, atol=1e-6)
    # the order matters (a recurrence, not a symmetric sum): reading the sequence the other way differs
    assert not torch.allclose(skip.backward_lstm.run([x_e, x_up]), h_bwd, atol=1e-4)
    single = BConvLSTM(4, 2, bidirectional=False)
    assert torch.allclose(single(x_e, x_up), single.backward_lstm.run([x_up, x_e]))


def test_self_attention_matches_the_reference_formula():
    torch.manual_seed(0)
    attn = SelfAttention(8, heads=2)
    x = torch.randn(2, 5, 8)
    wq, wk, wv = attn.qkv.weight.split(8)
    bq, bk, bv = attn.qkv.bias.split(8)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    heads = []
    for hd in range(2):
        s = slice(4 * hd, 4 * hd + 4)
        energy = q[..., s] @ k[..., s].transpose(1, 2) / 2.0               # sqrt(head dim 4)
        weights = energy.exp() / energy.exp().sum(-1, keepdim=True)
        heads.append(weights @ v[..., s])
    want = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), want, atol=1e-5)


def test_tmunet_patch_context_is_long_range_and_per_patch():
    torch.manual_seed(0)
    model = build_seg_model("tmunet", in_channels=1, img_size=64, **SMALL["tmunet"]).eval()
    branch = model.transformer
    # at the reference input size the position grid is used as is
    pos = F.interpolate(branch.pos_grid, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(pos, branch.pos_grid)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ctx, region = branch(x)
        x2 = x.clone()
        x2[..., :16, :16] += 3.0                 # change only the top-left patch
        ctx2, region2 = branch(x2)
    assert ctx.shape == (1, 64, 64, 64) and region.shape == (1, 1, 64, 64)
    # each patch's value covers its 16 x 16 pixels
    tile = ctx[..., 16:32, 32:48]
    assert torch.equal(tile, tile[..., :1, :1].expand_as(tile))
    # self-attention carries the change to the far (bottom-right) patch
    assert (ctx2[..., 48:, 48:] - ctx[..., 48:, 48:]).abs().max() > 1e-4
    assert (region2[..., 48:, 48:] - region[..., 48:, 48:]).abs().max() > 1e-6


@pytest.mark.parametrize("name,hw", [("tmunet", (64, 96)), ("bcdunet", (24, 40))])
def test_shapes_any_channels_and_the_input_size_error(name, hw):
    torch.manual_seed(0)
    model = build_seg_model(name, in_channels=1, num_classes=3, **SMALL[name])
    out = model.train()(torch.randn(2, 1, *hw))
    assert out["seg_logits_BCHW"].shape == (2, 3, *hw) and "aux_logits_BCHW" not in out
    model.eval()
    with torch.no_grad():
        a = model(torch.randn(1, 1, hw[1], hw[0]))["seg_logits_BCHW"]
    assert a.shape == (1, 3, hw[1], hw[0]) and torch.isfinite(a).all()
    m = SEG_SPECS[name].multiple
    with pytest.raises(ValueError, match=f"divisible by {m}"):
        model(torch.randn(1, 1, hw[0] + m // 2, hw[1]))


@pytest.mark.parametrize("name,hw,steps", [("tmunet", (32, 64), 12), ("bcdunet", (16, 24), 25)])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(name, hw, steps):
    torch.manual_seed(0)
    model = build_seg_model(name, in_channels=1, num_classes=2, **SMALL[name]).train()
    if name == "bcdunet":
        model.drop.p = 0.0            # a deterministic objective, so the decrease is not dropout noise
    x = torch.randn(2, 1, *hw)
    yy, xx = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")
    target = ((yy - hw[0] / 2) ** 2 + (xx - hw[1] / 2) ** 2 < (hw[0] / 3) ** 2).long().expand(2, -1, -1)
    x = x + 2.0 * target[:, None].float()      # the disc is visible in the image
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x)["seg_logits_BCHW"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.7 * losses[0], losses
