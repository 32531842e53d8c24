import pytest
import torch
from torch import nn

from models.seg.common import check_input, seg_output
from models.seg.stn import SpatialTransformer, STNSeg, invert_affine, warp


class _TinySeg(nn.Module):
    """A two-conv stand-in for a zoo model (same output contract)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, num_classes, 1))

    def forward(self, image_BCHW):
        check_input(image_BCHW, 4, "tests.test_stn._TinySeg")
        logits = self.net(image_BCHW)
        return seg_output(logits, image_BCHW.shape[-2:], [logits], self.training)


def test_localisation_net_layout_and_identity_init():
    stn = SpatialTransformer(3)
    convs = [m for m in stn.localisation if isinstance(m, nn.Sequential)]
    assert [(c[0].in_channels, c[0].out_channels, c[0].kernel_size) for c in convs] == \
        [(3, 8, (3, 3)), (8, 16, (3, 3)), (16, 32, (3, 3)), (32, 64, (3, 3))]
    assert all(isinstance(c[1], nn.BatchNorm2d) and isinstance(c[2], nn.ReLU) for c in convs)
    linears = [m for m in stn.localisation if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 32), (32, 6)]
    assert torch.count_nonzero(stn.theta_head.weight) == 0
    assert stn.theta_head.bias.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("train", [True, False])
def test_identity_at_initialisation(train):
    torch.manual_seed(0)
    stn = SpatialTransformer(1).train(train)
    x = torch.randn(2 if train else 1, 1, 24, 40)
    warped, theta = stn(x)
    assert theta.shape == (x.shape[0], 2, 3)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand_as(theta))
    torch.testing.assert_close(warped, x, atol=1e-5, rtol=0)


def test_hand_set_theta_round_trip_is_exact_in_the_interior():
    h, w = 40, 56
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    # bilinear sampling reproduces an affine intensity ramp exactly, so any error comes from the geometry
    image = (0.3 * xs - 0.7 * ys + 5.0).expand(2, 1, h, w).contiguous()
    theta = torch.tensor([[[0.8, 0.0, 0.1], [0.0, 0.8, -0.05]],
                          [[0.8, 0.1, -0.08], [-0.1, 0.8, 0.06]]], dtype=torch.float64)
    warped = warp(image, theta)
    assert not torch.allclose(warped, image)                      # the warp really moved things
    back = warp(warped, invert_affine(theta))
    # the zoomed (0.8) view covers roughly the central 80 %; compare well inside it
    interior = (slice(None), slice(None), slice(10, h - 10), slice(12, w - 12))
    torch.testing.assert_close(back[interior], image[interior], atol=1e-9, rtol=0)
    # inverse composed with theta is the identity
    a = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(2, 1, 3)], 1)
    ainv = torch.cat([invert_affine(theta), a[:, 2:]], 1)
    torch.testing.assert_close(ainv @ a, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


def test_stnseg_outputs_in_input_frame_and_theta():
    torch.manual_seed(0)
    model = STNSeg(_TinySeg(1, 3), in_channels=1).train()
    x = torch.randn(2, 1, 32, 48)
    out = model(x)
    assert out["seg_logits_BCHW"].shape == (2, 3, 32, 48)
    assert out["stn_theta_B23"].shape == (2, 2, 3)
    assert [a.shape for a in out["aux_logits_BCHW"]] == [(2, 3, 32, 48)]
    model.eval()
    out = model(x[:1])
    assert out["seg_logits_BCHW"].shape == (1, 3, 32, 48) and "aux_logits_BCHW" not in out
    # identity at init: the wrapper gives the bare model's logits
    torch.testing.assert_close(out["seg_logits_BCHW"], model.model(x[:1])["seg_logits_BCHW"], atol=1e-5, rtol=0)


def test_stnseg_maps_logits_back_with_a_hand_set_theta():
    torch.manual_seed(0)
    h, w = 40, 48
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    image = (0.2 * xs + 0.1 * ys).expand(1, 1, h, w).contiguous()
    # an identity "model": logits = the image itself, so mapped-back logits must equal the input in the interior
    ident = nn.Module()
    ident.forward = lambda im: seg_output(im, im.shape[-2:])
    model = STNSeg(ident, in_channels=1).double().eval()
    with torch.no_grad():
        model.stn.theta_head.bias.copy_(torch.tensor([0.8, 0.0, 0.1, 0.0, 0.8, -0.1]))
    out = model(image)
    interior = (slice(None), slice(None), slice(10, h - 10), slice(10, w - 10))
    torch.testing.assert_close(out["seg_logits_BCHW"][interior], image[interior], atol=1e-9, rtol=0)


def test_gradients_reach_the_localisation_head():
    torch.manual_seed(0)
    model = STNSeg(_TinySeg(1, 2), in_channels=1).train()
    x = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.5).long()
    loss = nn.functional.cross_entropy(model(x)["seg_logits_BCHW"], target)
    loss.backward()
    head = model.stn.theta_head
    for p in (head.weight, head.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_bad_theta_shape_names_the_module():
    with pytest.raises(ValueError, match="models.seg.stn"):
        warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 6))
