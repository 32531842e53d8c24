import math

import pytest
import torch

from models import decode_outputs, render_heatmaps_torch
from models.codecs import (argmax_decode, dark_decode, dark_kernel_size, decode_heatmaps, gaussian_blur,
                           softargmax_decode)


def _one(kx, ky, hw, sigma, peak=255.0, truncate=3.0):
    return render_heatmaps_torch(torch.tensor([[[kx, ky]]]), torch.tensor([[True]]), hw, sigma, peak, truncate)


def test_render_matches_definition_with_window_rounded_half_away_from_zero():
    # sigma 1, truncate 1 -> r = 1; kx = 2.5 rounds to 3 (half away from zero, as the loader's numba targets), so the
    # window is x in [2, 4]: x = 4 (1.5 px away) is inside, x = 1 (also 1.5 px away) is outside.
    hm = _one(2.5, 1.0, (3, 6), sigma=1.0, peak=255.0, truncate=1.0)[0, 0]
    assert hm.dtype == torch.float32 and hm.shape == (3, 6)
    assert hm[1, 4].item() == pytest.approx(255.0 * math.exp(-1.5 ** 2 / 2), rel=1e-6)
    assert hm[1, 2].item() == pytest.approx(255.0 * math.exp(-0.25 / 2), rel=1e-6)
    assert hm[0, 3].item() == pytest.approx(255.0 * math.exp(-(0.25 + 1.0) / 2), rel=1e-6)
    assert hm[1, 1].item() == 0.0 and hm[1, 5].item() == 0.0
    # kx = 3.5 rounds to 4 either way: window [3, 5], so x = 5 (1.5 px away) is inside and x = 2 is not
    hm2 = _one(3.5, 1.0, (3, 6), sigma=1.0, truncate=1.0)[0, 0]
    assert hm2[1, 5].item() == pytest.approx(255.0 * math.exp(-1.5 ** 2 / 2), rel=1e-6)
    assert hm2[1, 2].item() == 0.0


def test_render_truncates_at_ceil_truncate_sigma_and_zeroes_invisible():
    kpts = torch.tensor([[[10.0, 10.0], [float("nan"), float("nan")]]])
    hm = render_heatmaps_torch(kpts, torch.tensor([[True, False]]), (21, 21), sigma=1.5, peak=1.0)
    r = math.ceil(3.0 * 1.5)                                  # 5
    assert hm[0, 0, 10, 10 + r].item() == pytest.approx(math.exp(-r * r / 4.5), rel=1e-6)
    assert hm[0, 0, 10, 10 + r + 1].item() == 0.0 and hm[0, 0, 10 - r - 1, 10].item() == 0.0
    assert torch.count_nonzero(hm[0, 0]).item() == (2 * r + 1) ** 2
    assert torch.all(hm[0, 1] == 0) and not torch.isnan(hm).any()


def test_dark_recovers_subpixel_positions_within_005px():
    for sigma, hw in [(7.0, (96, 128)), (2.0, (48, 64))]:
        for kx, ky in [(40.3, 30.7), (31.5, 23.25), (20.0, 21.0), (33.9, 27.12), (25.45, 30.55), (12.8, 9.49)]:
            hm = _one(kx, ky, hw, sigma)
            xy, score = dark_decode(hm, sigma=sigma)
            assert torch.allclose(xy, torch.tensor([[[kx, ky]]]), atol=0.05), (sigma, kx, ky, xy)
            assert score.item() == pytest.approx(hm.max().item())


def test_dark_beats_argmax_on_offgrid_point():
    hm = _one(30.4, 20.4, (48, 64), sigma=3.0)
    xy_arg, _ = argmax_decode(hm)
    xy_dark, _ = dark_decode(hm, sigma=3.0)
    target = torch.tensor([30.4, 20.4])
    assert torch.allclose(xy_arg[0, 0], torch.tensor([30.0, 20.0]))
    assert (xy_dark[0, 0] - target).norm() < 0.02 < (xy_arg[0, 0] - target).norm()


def test_argmax_exact_on_integer_positions():
    pts = torch.tensor([[[3.0, 5.0], [0.0, 0.0], [15.0, 11.0]]])
    hm = render_heatmaps_torch(pts, torch.ones(1, 3, dtype=torch.bool), (12, 16), sigma=2.0)
    xy, score = argmax_decode(hm)
    assert torch.equal(xy, pts) and torch.allclose(score, torch.full((1, 3), 255.0))


def test_softargmax_of_sharp_peak_and_of_gaussian():
    hm = torch.zeros(1, 2, 10, 12)
    hm[0, 0, 3, 5] = 255.0
    hm[0, 1, 7, 2] = 255.0
    xy = softargmax_decode(hm, beta=1.0)
    assert torch.allclose(xy, torch.tensor([[[5.0, 3.0], [2.0, 7.0]]]), atol=1e-4)
    g = _one(20.3, 14.6, (32, 40), sigma=3.0)
    assert torch.allclose(softargmax_decode(g, beta=20.0 / 255.0), torch.tensor([[[20.3, 14.6]]]), atol=0.01)


def test_border_peaks_and_flat_maps_do_not_crash_or_nan():
    pts = torch.tensor([[[0.0, 0.0], [63.0, 47.0], [-2.0, 20.3], [30.2, 47.0]]])
    hm = render_heatmaps_torch(pts, torch.ones(1, 4, dtype=torch.bool), (48, 64), sigma=2.0)
    for method in ("dark", "argmax", "softargmax"):
        xy, score = decode_heatmaps(hm, method, sigma=2.0)
        assert torch.isfinite(xy).all() and torch.isfinite(score).all()
        assert (xy[..., 0] >= -0.5).all() and (xy[..., 0] <= 63.5).all()
        assert (xy[..., 1] >= -0.5).all() and (xy[..., 1] <= 47.5).all()
    xy, _ = dark_decode(hm, sigma=2.0)
    assert torch.allclose(xy[0, 0], torch.tensor([0.0, 0.0])) and torch.allclose(xy[0, 1], torch.tensor([63., 47.]))
    assert xy[0, 2, 0].item() == 0.0 and abs(xy[0, 2, 1].item() - 20.3) < 0.1   # refined along the border only
    assert abs(xy[0, 3, 0].item() - 30.2) < 0.05 and xy[0, 3, 1].item() == 47.0
    for flat in (torch.zeros(2, 3, 8, 8), -torch.ones(1, 1, 8, 8), torch.full((1, 1, 8, 8), 1e-30)):
        xy, score = dark_decode(flat, sigma=2.0)
        assert torch.isfinite(xy).all() and torch.isfinite(score).all()


def test_dark_kernel_default_scales_with_sigma_and_blur_keeps_constants():
    assert dark_kernel_size(7.0) == 11 and dark_kernel_size(2.0) == 3 and dark_kernel_size(14.0) == 21
    const = torch.full((1, 2, 9, 7), 3.0)
    assert torch.allclose(gaussian_blur(const, 5), const)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(const, 4)


def test_decode_outputs_contract():
    logits = torch.zeros(2, 3, 32, 32)
    logits[:, 2, :16] = 5.0
    logits[:, 1, 16:] = 5.0
    pts = torch.tensor([[10.25, 7.5], [20.0, 3.75]]).expand(2, 2, 2)
    heat = render_heatmaps_torch(pts, torch.ones(2, 2, dtype=torch.bool), (32, 32), sigma=2.0)
    out = decode_outputs({"seg_logits_BCHW": logits, "heatmap_BKHW": heat}, method="dark", sigma=2.0)
    assert out["mask_BHW"].dtype == torch.int64 and out["mask_BHW"].shape == (2, 32, 32)
    assert (out["mask_BHW"][:, :16] == 2).all() and (out["mask_BHW"][:, 16:] == 1).all()
    assert out["kpts_px_BK2"].dtype == torch.float32 and out["kpt_score_BK"].dtype == torch.float32
    assert torch.allclose(out["kpts_px_BK2"], pts, atol=0.05)
    assert (out["kpt_score_BK"] > 0.9).all() and (out["kpt_score_BK"] <= 1.0).all()
    with pytest.raises(ValueError, match="decode method"):
        decode_outputs({"seg_logits_BCHW": logits, "heatmap_BKHW": heat}, method="median")
    with pytest.raises(KeyError, match="heatmap_BKHW"):
        decode_outputs({"seg_logits_BCHW": logits})


def test_decode_outputs_passes_regressed_coordinates_through_and_needs_no_mask():
    kpts = torch.tensor([[[3.5, 7.25], [100.0, -2.0]]])
    out = decode_outputs({"kpts_px_BK2": kpts}, method="dark")
    assert torch.equal(out["kpts_px_BK2"], kpts) and torch.equal(out["kpt_score_BK"], torch.ones(1, 2))
    assert "mask_BHW" not in out


def test_render_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kpts_px_BK2"):
        render_heatmaps_torch(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool), (8, 8), 2.0)
    with pytest.raises(ValueError, match="sigma"):
        render_heatmaps_torch(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), (8, 8), 0.0)
