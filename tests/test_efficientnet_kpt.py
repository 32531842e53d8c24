"""EfficientNet keypoint models, CBAM and their losses (models/efficientnet_kpt.py, models/cbam.py,
models/losses_kpt.py; docs/systems/hip_xray_efficientnet.md)."""
import math

import pytest
import torch
from torch import nn

from models.cbam import CBAM
from models.codecs import render_heatmaps_torch
from models.efficientnet_kpt import (MODELS_KPT, build_efficientnet, build_efficientnet_cbam,
                                     build_efficientnet_heatmap, build_efficientnet_ms_cbam_3scales)
from models.losses_kpt import CRITERIA_KPT, CoordinateLoss, HeatmapCoordLoss

TINY = "timm:test_efficientnet"
HW = (64, 64)


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _cbam_params(c: int, r: int = 16) -> int:
    return 2 * c * max(c // r, 1) + 2 * 7 * 7  # bias-free MLP C -> C/r -> C, bias-free 7x7 conv on 2 maps


# ---------------------------------------------------------------------------------------------- published sizes
V2M_FEATURES = 52_858_356  # torchvision efficientnet_v2_m: 54,139,356 total minus its Linear(1280, 1000) classifier
assert V2M_FEATURES == 54_139_356 - (1280 * 1000 + 1000)


def test_published_configurations_parameter_counts():
    torch.manual_seed(0)
    plain = build_efficientnet()
    assert plain.backbone.channels[-3:] == [304, 512, 1280]       # the published 304/512/1280 of V2-M
    assert plain.backbone.strides[-3:] == [32, 32, 32]            # 7x7 at 224
    assert _n(plain.backbone) == V2M_FEATURES
    assert _n(plain) == V2M_FEATURES + 1280 * 24 + 24             # Dropout + Linear(1280 -> 24)
    assert isinstance(plain.head[0], nn.Dropout) and plain.head[0].p == 0.3
    del plain
    ms = build_efficientnet_ms_cbam_3scales()
    assert ms.concat_width == 2096 and ms.head[0].normalized_shape == (2096,)
    head = 2 * 2096 + (2096 * 512 + 512) + (512 * 24 + 24)       # LayerNorm + Linear(2096, 512) + Linear(512, 24)
    cbams = _cbam_params(304) + _cbam_params(512) + _cbam_params(1280)
    assert _n(ms) == V2M_FEATURES + cbams + head == 54_197_938
    del ms
    cb = build_efficientnet_cbam()
    assert _n(cb) == V2M_FEATURES + _cbam_params(1280) + 1280 * 24 + 24


# ------------------------------------------------------------------------------------------------ tiny backbones
@pytest.mark.parametrize("name", sorted(MODELS_KPT))
def test_forward_backward_tiny_backbone_has_finite_grads(name):
    torch.manual_seed(0)
    model = MODELS_KPT[name](backbone=TINY, input_hw=HW)
    x = torch.randn(2, 3, *HW)
    out = model(x)
    targets = {"kpts_px_BK2": torch.rand(2, 12, 2) * 60, "kpts_visible_BK": torch.ones(2, 12, dtype=torch.bool)}
    kw = {"sigma_px": 2.0} if name == "efficientnet_heatmap" else {}
    losses = CRITERIA_KPT[name](**kw)(out, targets)
    losses["loss"].backward()
    if name == "efficientnet_heatmap":
        assert out["heatmap_BKHW"].shape == (2, 12, *HW)
    else:
        assert out["kpts_px_BK2"].shape == (2, 12, 2)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)  # every stage and head parameter is on the loss path
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ms_cbam_concatenation_width_on_tiny_backbone():
    model = build_efficientnet_ms_cbam_3scales(backbone=TINY, input_hw=HW)
    chans = model.backbone.channels[-3:]
    assert chans == [48, 64, 256] and model.concat_width == 368
    seen = {}

    def hook(module, inp, out):
        seen["w"] = tuple(inp[0].shape)  # returns None: the output is left alone

    model.head[0].register_forward_hook(hook)
    model.eval()(torch.randn(3, 3, *HW))
    assert seen["w"] == (3, 368)


def test_normalized_coordinates_map_to_pixel_edges():
    model = build_efficientnet(backbone=TINY, input_hw=(64, 96), dropout=0.0)
    lin = model.head[1]
    with torch.no_grad():
        lin.weight.zero_()
        bias = torch.zeros(24)
        bias[0:2] = torch.tensor([-1.0, -1.0])   # P1 at the top-left pixel edge
        bias[2:4] = torch.tensor([1.0, 1.0])     # P2 at the bottom-right edge
        lin.bias.copy_(bias)                     # the rest u = 0: the centre
    k = model.eval()(torch.randn(1, 3, 64, 96))["kpts_px_BK2"][0]
    torch.testing.assert_close(k[0], torch.tensor([-0.5, -0.5]))
    torch.testing.assert_close(k[1], torch.tensor([95.5, 63.5]))
    torch.testing.assert_close(k[2], torch.tensor([47.5, 31.5]))  # (W - 1) / 2, (H - 1) / 2
    pix = build_efficientnet(backbone=TINY, input_hw=(64, 96), coords="pixels")
    with torch.no_grad():
        pix.head[1].weight.zero_()
        pix.head[1].bias.fill_(7.0)
    assert torch.all(pix.eval()(torch.randn(1, 3, 64, 96))["kpts_px_BK2"] == 7.0)
    with pytest.raises(ValueError, match="input_hw"):
        model(torch.randn(1, 3, 64, 64))


def test_cbam_matches_hand_written_reference():
    torch.manual_seed(3)
    c, r = 8, 4
    cbam = CBAM(c, reduction=r)
    x = torch.randn(2, c, 5, 6)
    w1 = cbam.channel.mlp[0].weight[:, :, 0, 0]          # (C/r, C)
    w2 = cbam.channel.mlp[2].weight[:, :, 0, 0]          # (C, C/r)
    mlp = lambda v: torch.relu(v @ w1.T) @ w2.T          # noqa: E731
    avg, mx = x.mean(dim=(2, 3)), x.flatten(2).max(dim=2).values
    xc = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    pooled = torch.stack([xc.mean(1), xc.max(1).values], dim=1)   # (B, 2, H, W)
    k = cbam.spatial.conv.weight[0]                               # (2, 7, 7)
    pad = torch.nn.functional.pad(pooled, (3, 3, 3, 3))
    s = torch.zeros(2, 5, 6)
    for i in range(5):
        for j in range(6):
            s[:, i, j] = (pad[:, :, i:i + 7, j:j + 7] * k).sum(dim=(1, 2, 3))
    expected = xc * torch.sigmoid(s)[:, None]
    torch.testing.assert_close(cbam(x), expected, atol=1e-6, rtol=1e-5)
    assert _n(cbam) == 2 * c * (c // r) + 98


def test_weights_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    a = build_efficientnet(backbone=TINY, input_hw=HW)
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": a.backbone.net.state_dict()}, path)
    torch.manual_seed(2)
    b = build_efficientnet(backbone=TINY, input_hw=HW, weights=str(path))
    for (ka, va), (kb, vb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randn(1, 3, *HW)
    torch.testing.assert_close(a.backbone.eval()(x)[-1], b.backbone.eval()(x)[-1])
    grey = build_efficientnet(backbone=TINY, input_hw=HW, in_channels=1, weights=path)  # stem skipped (shape)
    assert torch.equal(grey.backbone.net.blocks[0][0].conv.weight, a.backbone.net.blocks[0][0].conv.weight)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_efficientnet(backbone=TINY, input_hw=HW, weights=missing)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        build_efficientnet(backbone=TINY, input_hw=HW, weights=bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"other.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*none of its 1 tensors"):
        build_efficientnet(backbone=TINY, input_hw=HW, weights=foreign)


def test_bad_backbone_names():
    with pytest.raises(ValueError, match="unknown torchvision backbone"):
        build_efficientnet(backbone="efficientnet_v9_xxl")
    with pytest.raises(ValueError, match="not an EfficientNet-family"):
        build_efficientnet(backbone="timm:test_resnet", input_hw=HW)


def test_tiny_regression_model_learns_two_images():
    torch.manual_seed(0)
    model = build_efficientnet(backbone=TINY, input_hw=HW, dropout=0.0)
    x = torch.randn(2, 3, *HW)
    targets = {"kpts_px_BK2": torch.rand(2, 12, 2) * 50 + 5, "kpts_visible_BK": torch.ones(2, 12, dtype=torch.bool)}
    crit = CoordinateLoss(normalize_hw=HW)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = crit(model(x), targets)
        first = first if first is not None else float(out["mre_px"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["mre_px"]) < 0.5 * first


def test_tiny_heatmap_model_learns_soft_argmax_points():
    torch.manual_seed(0)
    model = build_efficientnet_heatmap(backbone=TINY, input_hw=HW, head_channels=32)
    x = torch.randn(2, 3, *HW)
    targets = {"kpts_px_BK2": torch.rand(2, 12, 2) * 50 + 5, "kpts_visible_BK": torch.ones(2, 12, dtype=torch.bool)}
    crit = HeatmapCoordLoss(sigma_px=3.0, heatmap_peak=1.0, coord_weight=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mre = []
    for _ in range(30):
        out = crit(model(x), targets)
        mre.append(float(out["mre_px"]))  # soft-argmax of the output heatmaps vs the points
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].shape == () and mre[-1] < 0.6 * mre[0]


# --------------------------------------------------------------------------------------------------------- losses
def _coord_case():
    pred = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]], requires_grad=True)
    true = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    return pred, true


@pytest.mark.parametrize("kind, both, first_only", [
    ("mse", (1 + 1 + 9 + 16) / 4, 1.0),
    ("l1", (1 + 1 + 3 + 4) / 4, 1.0),
    ("smooth_l1", (0.5 + 0.5 + 2.5 + 3.5) / 4, 0.5),   # |d| >= beta = 1: |d| - 0.5
])
def test_coordinate_loss_hand_computed(kind, both, first_only):
    pred, true = _coord_case()
    crit = CoordinateLoss(kind=kind)
    out = crit({"kpts_px_BK2": pred}, {"kpts_px_BK2": true, "kpts_visible_BK": torch.tensor([[True, True]])})
    assert float(out["loss"].detach()) == pytest.approx(both)
    assert float(out["mre_px"]) == pytest.approx((math.sqrt(2) + 5) / 2)
    true_nan = true.clone()
    true_nan[0, 1] = float("nan")  # invisible target may hold NaN
    out = crit({"kpts_px_BK2": pred}, {"kpts_px_BK2": true_nan, "kpts_visible_BK": torch.tensor([[True, False]])})
    assert float(out["loss"].detach()) == pytest.approx(first_only)
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad[0, 1] == 0)


def test_coordinate_loss_normalised_by_input_size():
    pred, true = _coord_case()
    out = CoordinateLoss(normalize_hw=(10, 20))({"kpts_px_BK2": pred},
                                               {"kpts_px_BK2": true, "kpts_visible_BK": torch.ones(1, 2, dtype=bool)})
    expected = ((1 / 20) ** 2 + (1 / 10) ** 2 + (3 / 20) ** 2 + (4 / 10) ** 2) / 4  # x / W, y / H
    assert float(out["loss"].detach()) == pytest.approx(expected)


def test_heatmap_coord_loss_hand_computed():
    heat = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, 0, 0] = 1.0
    target[0, 1] = 5.0                                         # invisible map: ignored
    vis = torch.tensor([[True, False]])
    kpts = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])
    t = {"heatmap_BKHW": target, "kpts_px_BK2": kpts, "kpts_visible_BK": vis}
    out = HeatmapCoordLoss()({"heatmap_BKHW": heat}, t)
    assert float(out["loss"].detach()) == pytest.approx(1 / 16) and float(out["loss_coord"]) == 0.0
    # soft-argmax of a flat map is the centre (1.5, 1.5); L1 to (0, 0) over x and y = 1.5
    out = HeatmapCoordLoss(coord_weight=2.0)({"heatmap_BKHW": heat}, t)
    assert float(out["loss_coord"]) == pytest.approx(1.5)
    assert float(out["loss"].detach()) == pytest.approx(1 / 16 + 2.0 * 1.5)
    assert float(out["mre_px"]) == pytest.approx(1.5 * math.sqrt(2))
    out["loss"].backward()
    assert torch.isfinite(heat.grad).all() and torch.all(heat.grad[0, 1] == 0)


def test_heatmap_loss_renders_target_from_points():
    kpts = torch.tensor([[[5.0, 6.0], [10.0, 3.0]]])
    vis = torch.ones(1, 2, dtype=torch.bool)
    exact = render_heatmaps_torch(kpts, vis, (16, 16), sigma=2.0, peak=1.0)
    crit = HeatmapCoordLoss(sigma_px=2.0, heatmap_peak=1.0)
    out = crit({"heatmap_BKHW": exact}, {"kpts_px_BK2": kpts, "kpts_visible_BK": vis})
    assert float(out["loss"].detach()) == 0.0
    with pytest.raises(KeyError, match="sigma_px"):
        HeatmapCoordLoss()({"heatmap_BKHW": exact}, {"kpts_px_BK2": kpts, "kpts_visible_BK": vis})
