import numpy as np
import pytest
import torch

from models.losses import MultiHipPoseCriterion
from models.unet import MODELS_UNET, build_unet_multitask


def _double_conv_params(c_in: int, c: int, norm: bool) -> int:
    # two 3x3 convs (9 c_in c + 9 c c) + two affine norms (2c each) or two conv biases (c each)
    return 9 * c_in * c + 9 * c * c + (4 * c if norm else 2 * c)


@pytest.mark.parametrize("norm", ["gn", "bn", "none"])
def test_parameter_count_matches_the_hand_derived_formula(norm):
    # width 4, depth 2, 3 input channels, 2 classes, 4 landmarks: channels 4 / 8 / 16 on the way down
    has_norm = norm != "none"
    expected = (_double_conv_params(3, 4, has_norm) + _double_conv_params(4, 8, has_norm)
                + _double_conv_params(8, 16, has_norm)                 # encoder
                + _double_conv_params(16 + 8, 8, has_norm) + _double_conv_params(8 + 4, 4, has_norm)  # decoder
                + (4 * 2 + 2) + (4 * 4 + 4))                            # 1x1 heads with bias
    # written out for gn: 3*4*9+4*4*9+16 = 268; 4*8*9+8*8*9+32 = 896; 8*16*9+16*16*9+64 = 3520;
    # 24*8*9+8*8*9+32 = 2336; 12*4*9+4*4*9+16 = 592; heads 10 + 20  -> 7642
    if norm == "gn":
        assert expected == 7642
    model = build_unet_multitask(width=4, depth=2, norm=norm)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("depth,hw", [(2, (20, 28)), (3, (24, 40)), (1, (6, 10))])
def test_outputs_are_at_input_resolution_for_odd_multiples(depth, hw):
    torch.manual_seed(0)
    model = build_unet_multitask(in_channels=3, num_classes=2, num_keypoints=4, width=4, depth=depth)
    out = model(torch.randn(2, 3, *hw))
    assert set(out) == {"seg_logits_BCHW", "heatmap_BKHW"}
    assert out["seg_logits_BCHW"].shape == (2, 2, *hw)
    assert out["heatmap_BKHW"].shape == (2, 4, *hw)


def test_input_not_divisible_is_an_error_and_heads_are_optional():
    model = build_unet_multitask(width=4, depth=3)
    with pytest.raises(ValueError, match="divisible by 2\\^depth = 8"):
        model(torch.zeros(1, 3, 20, 32))
    seg_only = build_unet_multitask(width=4, depth=2, heatmap_head=False, num_classes=3)
    assert set(seg_only(torch.zeros(1, 3, 8, 8))) == {"seg_logits_BCHW"}
    with pytest.raises(ValueError, match="norm"):
        build_unet_multitask(norm="ln")
    assert MODELS_UNET["unet_multitask"] is build_unet_multitask


def _tiny_batch(hw=(32, 32)):
    """Two images with a bright disc; mask = disc, landmarks = the disc's left/right/top/bottom ends."""
    h, w = hw
    ys, xs = np.mgrid[0:h, 0:w]
    images, masks, heat, kpts = [], [], [], []
    for cx, cy, r in ((12.0, 15.0, 7.0), (19.0, 16.0, 8.0)):
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        images.append(np.repeat(disc[None].astype(np.float32), 3, 0) * 0.8 + 0.1)
        masks.append(disc.astype(np.int64))
        pts = np.array([[cx - r, cy], [cx + r, cy], [cx, cy - r], [cx, cy + r]])
        kpts.append(pts)
        heat.append(np.exp(-((xs[None] - pts[:, 0, None, None]) ** 2 + (ys[None] - pts[:, 1, None, None]) ** 2)
                           / (2 * 1.5 ** 2)))
    image = torch.tensor(np.stack(images))
    targets = {"mask_BHW": torch.tensor(np.stack(masks)), "heatmap_BKHW": torch.tensor(np.stack(heat)).float(),
               "kpts_px_BK2": torch.tensor(np.stack(kpts)).float(), "kpts_visible_BK": torch.ones(2, 4, dtype=bool)}
    return image, targets


def test_backward_gives_finite_gradients_everywhere():
    torch.manual_seed(0)
    model = build_unet_multitask(width=4, depth=2)
    crit = MultiHipPoseCriterion(num_classes=2, class_weights=[1.0, 5.0], balance="fixed", heatmap_peak=1.0)
    image, targets = _tiny_batch()
    loss = crit(model(image), targets)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum() > 0) for p in model.parameters()) == len(list(model.parameters()))


def test_a_few_adam_steps_reduce_the_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_unet_multitask(width=8, depth=2, norm="gn")
    crit = MultiHipPoseCriterion(num_classes=2, class_weights=[1.0, 5.0], balance="fixed", heatmap_peak=1.0)
    image, targets = _tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        out = crit(model(image), targets)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        pred = model(image)["seg_logits_BCHW"].argmax(1)
    inter = ((pred == 1) & (targets["mask_BHW"] == 1)).sum().item()
    dice = 2 * inter / ((pred == 1).sum().item() + (targets["mask_BHW"] == 1).sum().item())
    assert dice > 0.8
