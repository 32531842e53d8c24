"""Heatmap landmark networks (models/landmark_nets.py): shapes for any K, the head's working stride, gradients,
learning a dot, argument errors, registry, parameter counts, local weights."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from models.codecs import decode_outputs, render_heatmaps_torch
from models.landmark_nets import build_landmark_hrnet, build_landmark_unet
from models.losses_kpt import HeatmapCoordLoss
from models.registry import CRITERIA, MODELS, build_criterion

TINY_UNET = {"width": 4, "depth": 3}          # input multiple 8
UNET_HW = (16, 24)
HRNET_HW = (64, 96)                            # multiple 32


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- shapes and strides
@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("k", [1, 5, 19])
def test_unet_heatmaps_are_at_input_resolution(k, in_channels, stride):
    torch.manual_seed(0)
    model = build_landmark_unet(num_keypoints=k, in_channels=in_channels, heatmap_stride=stride, **TINY_UNET)
    out = model(torch.randn(2, in_channels, *UNET_HW))
    assert set(out) == {"heatmap_BKHW"} and out["heatmap_BKHW"].shape == (2, k, *UNET_HW)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("k", [1, 5, 19])
def test_hrnet_heatmaps_are_at_input_resolution(k, in_channels):
    torch.manual_seed(0)
    model = build_landmark_hrnet(num_keypoints=k, in_channels=in_channels, head_channels=8)
    out = model(torch.randn(2, in_channels, *HRNET_HW))
    assert set(out) == {"heatmap_BKHW"} and out["heatmap_BKHW"].shape == (2, k, *HRNET_HW)


def _last_conv(model):
    return model.head if isinstance(model.head, torch.nn.Conv2d) else model.head[-1]


@pytest.mark.parametrize("build,stride,hw", [
    (lambda: build_landmark_unet(num_keypoints=3, heatmap_stride=1, heatmap_peak=7.0, **TINY_UNET), 1, UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=3, heatmap_stride=2, heatmap_peak=7.0, **TINY_UNET), 2, UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=3, heatmap_stride=4, heatmap_peak=7.0, **TINY_UNET), 4, UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=3, heatmap_stride=4, heatmap_peak=7.0, width=4,
                                 encoder="smp:resnet18"), 4, (64, 96)),
    (lambda: build_landmark_hrnet(num_keypoints=3, head_channels=8, heatmap_peak=7.0), 4, HRNET_HW),
])
def test_the_head_works_at_its_stride_and_is_upsampled_bilinearly(build, stride, hw):
    """The last conv's own output (caught by a hook) is (H/s, W/s), and the model's map is exactly its bilinear
    upsampling times heatmap_peak."""
    torch.manual_seed(0)
    model = build().eval()
    head, seen = _last_conv(model), {}
    torch.nn.init.normal_(head.weight)           # away from the near-zero start, so the comparison means something
    handle = head.register_forward_hook(lambda m, args, out: seen.update(map=out))
    with torch.no_grad():
        heat = model(torch.randn(2, model.in_channels, *hw))["heatmap_BKHW"]
    handle.remove()
    small = seen["map"]
    assert small.shape[-2:] == (hw[0] // stride, hw[1] // stride) and heat.shape[-2:] == hw
    expected = small if stride == 1 else F.interpolate(small, size=hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(heat, 7.0 * expected)
    assert small.std() > 0


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("build,hw", [
    (lambda: build_landmark_unet(num_keypoints=5, heatmap_stride=1, norm="gn", **TINY_UNET), UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=5, heatmap_stride=2, norm="none", **TINY_UNET), UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=5, heatmap_stride=4, **TINY_UNET), UNET_HW),
    (lambda: build_landmark_unet(num_keypoints=5, width=4, encoder="smp:resnet18"), (64, 96)),
    (lambda: build_landmark_unet(num_keypoints=5, width=4, heatmap_stride=4, encoder="smp:efficientnet-b0"),
     (64, 96)),
    (lambda: build_landmark_hrnet(num_keypoints=5, head_channels=8), HRNET_HW),
    (lambda: build_landmark_hrnet(num_keypoints=5, head_channels=8, fuse=False), HRNET_HW),
])
def test_every_parameter_gets_a_finite_gradient_from_the_registered_loss(build, hw):
    torch.manual_seed(0)
    model = build()
    h, w = hw
    kpts = torch.rand(2, 5, 2) * torch.tensor([w - 1.0, h - 1.0])
    visible = torch.tensor([[True, True, False, True, True], [True] * 5])
    crit = HeatmapCoordLoss(sigma_px=2.0, heatmap_peak=255.0)          # renders its targets (data.targets=device)
    loss = crit(model(torch.randn(2, model.in_channels, h, w)), {"kpts_px_BK2": kpts, "kpts_visible_BK": visible})
    loss["loss"].backward()
    assert torch.isfinite(loss["loss"])
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]     # no parameter outside the forward path (DDP needs none unused)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _dots(n, hw, g):
    """Grey images with one bright Gaussian dot (sigma 1.5) anywhere 4 px inside the border, plus noise."""
    h, w = hw
    xy = torch.rand(n, 1, 2, generator=g) * torch.tensor([w - 9.0, h - 9.0]) + 4.0
    image = render_heatmaps_torch(xy, torch.ones(n, 1, dtype=torch.bool), hw, 1.5, 1.0)
    return image + 0.05 * torch.randn(n, 1, *hw, generator=g), xy


@pytest.mark.parametrize("stride,depth,sigma", [(2, 2, 1.5), (4, 3, 3.0)])
def test_a_tiny_unet_learns_to_place_a_dot(stride, depth, sigma):
    """40 Adam steps on 8 fresh images each; then sub-2-px on unseen images. The target sigma grows with the head's
    stride: a stride-4 head cannot draw a 1.5-px Gaussian (its error then stays ~1 px after these steps)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_landmark_unet(num_keypoints=1, in_channels=1, width=8, depth=depth, heatmap_stride=stride)
    crit = build_criterion("landmark_unet", sigma_px=sigma, heatmap_peak=255.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        image, xy = _dots(8, (32, 32), g)
        loss = crit(model(image), {"kpts_px_BK2": xy, "kpts_visible_BK": torch.ones(8, 1, dtype=torch.bool)})
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    image, xy = _dots(16, (32, 32), g)                                  # unseen images
    with torch.no_grad():
        pred = decode_outputs(model.eval()(image), "dark", sigma=sigma, peak=255.0)["kpts_px_BK2"]
    err = (pred - xy).norm(dim=-1)
    assert float(err.mean()) < 1.0 and float(err.max()) < 2.0, err.flatten()


# ------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("kwargs,name", [
    ({"num_keypoints": 0}, "num_keypoints"), ({"in_channels": 0}, "in_channels"), ({"width": 0}, "width"),
    ({"heatmap_stride": 3}, "heatmap_stride"), ({"norm": "ln"}, "norm"), ({"heatmap_peak": 0.0}, "heatmap_peak"),
    ({"depth": 2, "heatmap_stride": 4}, "depth"), ({"encoder": "vgg16"}, "encoder"),
    ({"encoder": "smp:no_such_encoder"}, "encoder"), ({"encoder": "smp:resnet18", "depth": 4}, "depth"),
])
def test_unet_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_landmark_unet(**{**TINY_UNET, **kwargs})


@pytest.mark.parametrize("kwargs,name", [
    ({"num_keypoints": 0}, "num_keypoints"), ({"backbone": "resnet18"}, "backbone"),
    ({"backbone": "hrnet_w999"}, "backbone"), ({"head_channels": 0}, "head_channels"),
    ({"in_channels": 0}, "in_channels"),
])
def test_hrnet_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_landmark_hrnet(**kwargs)


def test_bad_inputs_name_the_input_size_and_channels():
    unet = build_landmark_unet(num_keypoints=2, in_channels=1, **TINY_UNET)
    with pytest.raises(ValueError, match="divisible by 8.*data.input_hw"):
        unet(torch.zeros(1, 1, 20, 24))
    with pytest.raises(ValueError, match="in_channels=1"):
        unet(torch.zeros(1, 3, 16, 24))
    hrnet = build_landmark_hrnet(num_keypoints=2, in_channels=1, head_channels=8)
    with pytest.raises(ValueError, match="divisible by 32.*data.input_hw"):
        hrnet(torch.zeros(1, 1, 48, 64))


# ---------------------------------------------------------------------------------------- registry and counts
def test_registry_builds_both_and_their_loss_takes_the_data_sigma_and_peak():
    for name, hw in (("landmark_unet", (32, 32)), ("landmark_hrnet", (64, 64))):
        model = MODELS[name](num_keypoints=4, in_channels=3)
        assert model(torch.zeros(2, 3, *hw))["heatmap_BKHW"].shape == (2, 4, *hw)
        assert CRITERIA[name] is HeatmapCoordLoss
        # engine/run.make_criterion fills these two from the data section when the loss takes them
        assert {"sigma_px", "heatmap_peak"} <= set(inspect.signature(CRITERIA[name]).parameters)
        crit = build_criterion(name, sigma_px=2.0, heatmap_peak=255.0)
        assert crit.sigma_px == 2.0 and crit.heatmap_peak == 255.0


def _double_conv(a: int, b: int) -> int:
    return 9 * a * b + 9 * b * b + 4 * b          # two bias-free 3x3 convs + two affine norms


def test_unet_parameter_count_matches_the_hand_count():
    # width 4, depth 3, stride 2, 1 input channel, K = 5, GroupNorm: channels 8 / 16 / 32 at levels 1 / 2 / 3
    stem = (16 * 1 * 8 + 2 * 8) + _double_conv(8, 8)                  # stride-2 4x4 conv 1 -> 8, refine 8 -> 8
    down = _double_conv(8, 16) + _double_conv(16, 32)
    up = _double_conv(32 + 16, 16) + _double_conv(16 + 8, 8)
    head = 8 * 5 + 5
    # by hand: 144 + 1184 | 3520 + 13952 | 9280 + 2336 | 45
    assert (stem, down, up, head) == (144 + 1184, 3520 + 13952, 9280 + 2336, 45)
    model = build_landmark_unet(num_keypoints=5, in_channels=1, width=4, depth=3, heatmap_stride=2, norm="gn")
    assert _n(model) == stem + down + up + head == 30461
    # stride 1 is the plain UNet encoder/decoder (models/unet.py) with a heatmap head only
    full = build_landmark_unet(num_keypoints=5, in_channels=1, width=4, depth=3, heatmap_stride=1, norm="gn")
    enc = _double_conv(1, 4) + _double_conv(4, 8) + _double_conv(8, 16) + _double_conv(16, 32)
    dec = _double_conv(48, 16) + _double_conv(24, 8) + _double_conv(12, 4)
    assert _n(full) == enc + dec + 4 * 5 + 5


def test_hrnet_head_parameter_count():
    model = build_landmark_hrnet(num_keypoints=19, in_channels=1, head_channels=64)
    c, d, k = 16 + 32 + 64 + 128, 64, 19                                # hrnet_w18_small branches
    assert _n(model.head) == c * d + 9 * d * d + 4 * d + d * k + k
    alone = build_landmark_hrnet(num_keypoints=19, in_channels=1, head_channels=64, fuse=False)
    assert _n(alone.head) == 16 * d + 9 * d * d + 4 * d + d * k + k
    assert _n(alone.backbone) < _n(model.backbone)      # the last unit's coarse outputs are not built


# --------------------------------------------------------------------------------------------- local weights
def test_rgb_weights_load_into_a_grey_network_with_the_stem_summed(tmp_path):
    torch.manual_seed(0)
    rgb = build_landmark_unet(num_keypoints=2, in_channels=3, width=4, encoder="smp:resnet18").eval()
    path = tmp_path / "resnet18.pt"
    torch.save(rgb.encoder.net.state_dict(), path)
    grey = build_landmark_unet(num_keypoints=2, in_channels=1, width=4, encoder="smp:resnet18",
                               weights=str(path)).eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want, got = rgb.encoder(image.repeat(1, 3, 1, 1)), grey.encoder(image)
    for a, b in zip(want[1:], got[1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)
    hr_rgb = build_landmark_hrnet(num_keypoints=2, in_channels=3, head_channels=8).eval()
    torch.save({"state_dict": hr_rgb.backbone.state_dict()}, tmp_path / "hrnet.pt")
    hr_grey = build_landmark_hrnet(num_keypoints=2, in_channels=1, head_channels=8,
                                   weights=str(tmp_path / "hrnet.pt")).eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hr_grey.backbone(image)[0], hr_rgb.backbone(image.repeat(1, 3, 1, 1))[0],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        build_landmark_hrnet(weights=str(tmp_path / "missing.pt"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="none of its"):
        build_landmark_unet(encoder="smp:resnet18", weights=str(tmp_path / "foreign.pt"))
