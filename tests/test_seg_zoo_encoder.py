"""Encoder/backbone-based zoo models (models/seg/encoder_nets.py, models/seg/context_nets.py; issue 7).

Small builds (resnet18 backbones, narrow heads, a 1-layer ViT) on (B, 1, 32, 64) inputs keep this file fast.
Default (published-width) parameter counts are checked on models built on the meta device (no memory, no init cost)
against counts computed from the layer formulas below; the backbone figures are torchvision's published model-card
totals minus the ImageNet classifier: ResNet-50 25,557,032 - (2048*1000 + 1000) = 23,508,032; ResNet-34 21,797,672
- 513,000 = 21,284,672; VGG11 132,863,336 - classifier (25088*4096+4096 + 4096*4096+4096 + 4096*1000+1000)
= 9,220,480.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from models.seg.context_nets import SPECS_CONTEXT
from models.seg.encoder_nets import SPECS_ENCODER

SPECS = {**SPECS_ENCODER, **SPECS_CONTEXT}
MODULES = {**{n: "models/seg/encoder_nets.py" for n in SPECS_ENCODER},
           **{n: "models/seg/context_nets.py" for n in SPECS_CONTEXT}}
H, W = 32, 64
SMALL = {
    "deeplabv3plus": dict(encoder_name="resnet18", decoder_channels=32),
    "deeplabv2": dict(backbone="resnet18"),
    "pspnet": dict(encoder_name="resnet18", psp_out_channels=32),
    # cSE hidden width is C // 16: >= 3 units per block so no block starts with all its ReLUs dead
    "scse_unet": dict(encoder_name="resnet18", decoder_channels=(64, 64, 64, 48, 48)),
    "hrnet": dict(variant="hrnet_w18_small"),
    "setr": dict(input_hw=(H, W), embed_dim=32, depth=1, num_heads=2, decoder_channels=16),
    "dlinknet": dict(backbone="resnet18"),
    "ternausnet": dict(num_filters=8),
    "danet": dict(backbone="resnet18", head_channels=32),
    "ocnet": dict(backbone="resnet18", head_channels=32, key_channels=16, value_channels=16),
    "ocrnet": dict(backbone="resnet18", head_channels=32, key_channels=16),
    "eanet": dict(backbone="resnet18", head_channels=32, memory_units=8),
    "lrf_eanet": dict(backbone="resnet18", decoder_channels=(32, 32, 16, 16, 16), memory_units=8),
}
NAMES = sorted(SPECS)


def build_small(name: str, in_channels: int = 1, num_classes: int = 2):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SPECS[name].build(in_channels, num_classes, **SMALL[name])


def test_registry_complete():
    assert set(SPECS) == set(SMALL) and not set(SPECS_ENCODER) & set(SPECS_CONTEXT)
    for name, spec in SPECS.items():
        assert spec.name == name and spec.multiple in (8, 16, 32) and spec.paper
        assert spec.source in ("own", "smp", "timm", "torchvision")


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name):
    model = build_small(name, num_classes=3).train()
    out = model(torch.randn(2, 1, H, W))
    assert out["seg_logits_BCHW"].shape == (2, 3, H, W)
    for aux in out.get("aux_logits_BCHW", []):
        assert aux.shape == (2, 3, H, W)
    if name == "ocrnet":
        assert len(out["aux_logits_BCHW"]) == 1
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, H, W))
    assert out["seg_logits_BCHW"].shape == (1, 3, H, W) and "aux_logits_BCHW" not in out
    assert torch.isfinite(out["seg_logits_BCHW"]).all()


def _loss(out: dict, target: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out["seg_logits_BCHW"], target)
    for aux in out.get("aux_logits_BCHW", []):
        loss = loss + 0.4 * F.cross_entropy(aux, target)
    return loss


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = build_small(name).train()
    # DANet's PAM/CAM scale their attention by a scalar gamma initialised to 0 (as in the paper), which makes the
    # gradients of the PAM query/key/value convs exactly 0 at initialisation; give gamma a non-zero value so the test
    # checks that those branches are wired into the graph. No other exceptions.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.fill_(0.5)
    torch.manual_seed(1)
    x = torch.randn(2, 1, H, W)
    target = (torch.rand(2, H, W) > 0.5).long()
    _loss(model(x), target).backward()
    bad = [n for n, p in model.named_parameters() if p.requires_grad and
           (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not bad, f"{name}: parameters without a useful gradient: {bad}"


def _disc_data(n: int = 2):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    images, masks = [], []
    for i in range(n):
        cy, cx = 10.0 + 12 * i, 20.0 + 20 * i
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < 8.0 ** 2
        images.append(0.3 * torch.randn(1, H, W, generator=g) + mask.float())
        masks.append(mask.long())
    return torch.stack(images), torch.stack(masks)


# TernausNet has no normalisation layers and learns the small disc more slowly than the BN models.
TRAIN_STEPS = {"ternausnet": 16}


@pytest.mark.parametrize("name", NAMES)
def test_training_reduces_loss(name):
    model = build_small(name).train()
    x, y = _disc_data()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(TRAIN_STEPS.get(name, 10)):
        out = model(x)
        losses.append(F.cross_entropy(out["seg_logits_BCHW"], y).item())
        opt.zero_grad()
        _loss(out, y).backward()
        opt.step()
    assert min(losses[-3:]) < 0.7 * losses[0], f"{name}: losses {[round(v, 3) for v in losses]}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_size_names_module(name):
    model = build_small(name).eval()
    m = SPECS[name].multiple
    with pytest.raises(ValueError, match=MODULES[name]):
        model(torch.randn(1, 1, 2 * m + 4, W))


def test_setr_rejects_other_size_than_input_hw():
    model = build_small("setr").eval()
    with pytest.raises(ValueError, match="models/seg/encoder_nets.py setr.*input_hw"):
        model(torch.randn(1, 1, H, W + 16))


# --------------------------------------------------------------------------------- default parameter counts
R50, R34, VGG11 = 23_508_032, 21_284_672, 9_220_480
K = 2  # num_classes of the default build


def conv(ci, co, k=1, bias=True, groups=1):
    return k * k * ci * co // groups + (co if bias else 0)


def cbr(ci, co, k=3):  # conv (no bias) + BN affine
    return conv(ci, co, k, bias=False) + 2 * co


def ext_attention(c, s):
    return conv(c, c) + 2 * c * s + conv(c, c, bias=False) + 2 * c


def link_block(ci, co):
    m = ci // 4
    return conv(ci, m) + 2 * m + conv(m, m, 3) + 2 * m + conv(m, co) + 2 * co


def ternaus_block(ci, mid, co):
    return conv(ci, mid, 3) + conv(mid, co, 3)


def r34_to_layer2():  # stem + layer1 + layer2 of ResNet-34 (PSPNet's depth-3 encoder)
    stem = conv(3, 64, 7, bias=False) + 128
    layer1 = 3 * (2 * cbr(64, 64))
    layer2 = cbr(64, 128) + cbr(128, 128) + cbr(64, 128, 1) + 3 * 2 * cbr(128, 128)
    return stem + layer1 + layer2


def scse(c):
    r = c // 16
    return conv(c, r) + conv(r, c) + conv(c, 1)


def sep(ci, co):  # depthwise 3x3 + pointwise, no biases
    return conv(ci, ci, 3, bias=False, groups=ci) + conv(ci, co, bias=False)


def vit(d, depth, tokens, c_in=3):
    return conv(c_in, d, 16) + d + (tokens + 1) * d + depth * (12 * d * d + 13 * d) + 2 * d


EXPECTED = {
    "deeplabv2": R50 + 4 * conv(2048, K, 3),
    "danet": (R50 + 2 * cbr(2048, 512) + 2 * conv(512, 64) + conv(512, 512) + 1 + 1 + 2 * cbr(512, 512)
              + conv(512, K)),
    "ocnet": (R50 + cbr(2048, 512) + cbr(512, 256, 1) + conv(512, 256) + conv(256, 512) + cbr(1024, 512, 1)
              + conv(512, K)),
    "ocrnet": (R50 + cbr(1024, 512) + conv(512, K) + cbr(2048, 512) + 2 * (cbr(512, 256, 1) + cbr(256, 256, 1))
               + cbr(512, 256, 1) + cbr(256, 512, 1) + cbr(1024, 512, 1) + conv(512, K)),
    "eanet": R50 + cbr(2048, 512) + ext_attention(512, 64) + cbr(512, 256) + conv(256, K),
    "lrf_eanet": (R34 + 4 * cbr(512, 128) + cbr(512, 512, 1) + ext_attention(512, 64)
                  + sum(cbr(ci + cs, co) + cbr(co, co) for ci, cs, co in
                        [(512, 256, 256), (256, 128, 128), (128, 64, 64), (64, 64, 32), (32, 0, 16)])
                  + conv(16, K)),
    "dlinknet": (R34 + 4 * conv(512, 512, 3) + link_block(512, 256) + link_block(256, 128) + link_block(128, 64)
                 + link_block(64, 64) + conv(64, 32, 4) + conv(32, 32, 3) + conv(32, K, 3)),
    "ternausnet": (VGG11 + ternaus_block(512, 512, 256) + ternaus_block(768, 512, 256) + ternaus_block(768, 512, 128)
                   + ternaus_block(384, 256, 64) + ternaus_block(192, 128, 32) + conv(96, 32, 3) + conv(32, K)),
    "setr": (vit(1024, 24, (256 // 16) ** 2) + cbr(1024, 256) + 3 * cbr(256, 256) + conv(256, K)),
    "pspnet": (r34_to_layer2() + conv(128, 32) + 3 * cbr(128, 32, 1) + cbr(256, 512, 1) + conv(512, K, 3)),
    "deeplabv3plus": (R34 + cbr(512, 256, 1) + 3 * (sep(512, 256) + 512) + cbr(512, 256, 1) + cbr(1280, 256, 1)
                      + sep(256, 256) + 512 + cbr(64, 48, 1) + sep(304, 256) + 512 + conv(256, K)),
    "scse_unet": (R34 + sum((scse(ci + cs) if cs else 0) + cbr(ci + cs, co) + cbr(co, co) + scse(co) for ci, cs, co in
                            [(512, 256, 256), (256, 128, 128), (128, 64, 64), (64, 64, 32), (32, 0, 16)])
                  + conv(16, K, 3)),  # last block: no skip, so no pre-conv attention
}
# HRNetV2-W18-Small-v1: Wang et al. (TPAMI 2020, Cityscapes table) state 1.5M parameters for the segmentation
# network; the head alone (1x1 conv 240->240 + BN, 1x1 conv 240->K on the 16+32+64+128 = 240 concatenated
# channels) is checked exactly below.
HRNET_PAPER_RANGE = (1_450_000, 1_550_000)


@pytest.mark.parametrize("name", NAMES)
def test_default_parameter_count(name):
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = SPECS[name].build(3, K)
    total = sum(p.numel() for p in model.parameters())
    if name == "hrnet":
        assert sum(p.numel() for p in model.head.parameters()) == cbr(240, 240, 1) + conv(240, K)
        assert HRNET_PAPER_RANGE[0] <= total <= HRNET_PAPER_RANGE[1], total
    else:
        assert total == EXPECTED[name], f"{name}: {total} != {EXPECTED[name]}"
