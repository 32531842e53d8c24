import json
import math

import numpy as np
import pytest
import torch

from data_pipelines.heatmaps import render_heatmaps
from models.skeleton import SkeletonPrior, decode_discs, fit_skeleton, heatmap_candidates, select_candidates

SIGMA = math.sqrt(5.0)          # published: Gaussian with covariance 5 I
HW = (224, 128)
K = 11


def base_skeleton() -> np.ndarray:
    """11 discs 16 px apart down a gently curved spine (x, y)."""
    k = np.arange(K, dtype=np.float64)
    return np.stack([60.0 + 8.0 * np.sin(k / 4.0), 20.0 + 16.0 * k + 0.3 * k * k], axis=1)


def transformed(scale: float, angle_deg: float, shift: tuple[float, float], mirror: bool = False) -> np.ndarray:
    p = base_skeleton() - base_skeleton().mean(axis=0)
    if mirror:
        p[:, 0] = -p[:, 0]
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return scale * p @ rot.T + np.array([64.0, 112.0]) + np.array(shift)


def render(kpts_K2: np.ndarray, visible_K: np.ndarray | None = None, peak: float = 1.0) -> np.ndarray:
    vis = np.ones(len(kpts_K2), dtype=bool) if visible_K is None else visible_K
    return render_heatmaps(kpts_K2, vis, HW, SIGMA, peak=peak, impl="numpy")


@pytest.fixture(scope="module")
def prior() -> SkeletonPrior:
    # translated and scaled copies of the base skeleton with 0.5 px noise: the prior's spread stays under the
    # 0.05 floor, so the decoder's tolerance is 0.05 x the disc0-disc4 distance (~3.4 px)
    rng = np.random.default_rng(0)
    base = base_skeleton()
    kpts = np.stack([base * rng.uniform(0.9, 1.1) + rng.uniform(-5, 5, 2) + rng.normal(0, 0.5, base.shape)
                     for _ in range(30)])
    vis = np.ones((30, K), dtype=bool)
    vis[:5, 10] = False
    return fit_skeleton(kpts, vis)


def test_candidates_subpixel_peaks_order_and_thresholds():
    hm = np.zeros((4, 64, 64), dtype=np.float32)
    hm[0] = render_heatmaps(np.array([[20.3, 15.7]]), np.ones(1, bool), (64, 64), SIGMA, peak=1.0, impl="numpy")[0]
    hm[1] = render_heatmaps(np.array([[40.55, 30.2]]), np.ones(1, bool), (64, 64), SIGMA, peak=1.0, impl="numpy")[0]
    two = render_heatmaps(np.array([[10.2, 50.4], [50.7, 10.1]]), np.ones(2, bool), (64, 64), SIGMA, peak=1.0,
                          impl="numpy")
    hm[2] = np.maximum(two[0], 0.8 * two[1])
    hm[3] = 0.05 * hm[0]                              # max 0.05 < abs_threshold 0.1 x peak 1: no candidate
    cands = heatmap_candidates(hm)
    assert [len(c) for c in cands] == [1, 1, 2, 0]
    for got, true in [(cands[0][0], (20.3, 15.7)), (cands[1][0], (40.55, 30.2)), (cands[2][0], (10.2, 50.4)),
                      (cands[2][1], (50.7, 10.1))]:
        assert abs(got[0] - true[0]) < 0.1 and abs(got[1] - true[1]) < 0.1, (got, true)
        # the parabola on log values is exact for a Gaussian: far better than the 0.1 px asked for
        assert abs(got[0] - true[0]) < 1e-3 and abs(got[1] - true[1]) < 1e-3
    # score = the component's sampled peak: exp(-(0.2^2 + 0.4^2) / 10) for the stronger blob of channel 2
    assert cands[2][0][2] == pytest.approx(math.exp(-(0.2 ** 2 + 0.4 ** 2) / 10.0), rel=1e-5)
    assert cands[2][1][2] < cands[2][0][2]
    assert [len(c) for c in heatmap_candidates(hm, max_per_channel=1)] == [1, 1, 1, 0]
    # with a target peak of 255 the same maps are all below 0.1 x 255
    assert heatmap_candidates(hm, peak=255.0) == [[], [], [], []]


def test_fit_skeleton_recovers_known_skeleton_with_missing_discs():
    base = base_skeleton()
    expected = (base - base[0]) / np.linalg.norm(base[4] - base[0])
    scales, shifts = [0.8, 1.0, 1.3, 1.1, 0.9, 1.2], [(0, 0), (5, -3), (-7, 2), (3, 3), (10, -10), (-2, 8)]
    kpts = np.stack([s * base + np.array(t) for s, t in zip(scales, shifts)])
    vis = np.ones((6, K), dtype=bool)
    vis[1, 0] = False          # no disc 0: enters through the similarity alignment
    vis[2, 4] = False          # no disc 4: same
    vis[3, 8:] = False         # field of view cut
    vis[:, 9] = False          # never seen
    kpts[3, 8:] = np.nan       # missing labels may carry NaN
    p = fit_skeleton(kpts, vis)
    known = np.ones(K, dtype=bool)
    known[9] = False
    np.testing.assert_array_equal(p.known_K, known)
    np.testing.assert_allclose(p.offsets_K2[known], expected[known], atol=1e-9)
    assert np.isnan(p.offsets_K2[9]).all() and np.isnan(p.spread_K[9])
    np.testing.assert_array_equal(p.count_K, [5, 6, 6, 6, 5, 6, 6, 6, 5, 0, 5])
    np.testing.assert_allclose(p.spread_K[known], 0.0, atol=1e-9)
    q = SkeletonPrior.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_array_equal(q.offsets_K2, p.offsets_K2)
    np.testing.assert_array_equal(q.count_K, p.count_K)
    assert q.ref == p.ref == (0, 4)
    with pytest.raises(ValueError, match="both disc 0 and disc 4"):
        fit_skeleton(kpts[1:3], vis[1:3])


def test_decode_rendered_targets_returns_true_points(prior):
    truth = np.stack([transformed(1.0, 0.0, (0, 0)), transformed(0.85, 12.0, (4, -6))])
    hm = torch.from_numpy(np.stack([render(t) for t in truth]))
    for method, tol in (("argmax", 1e-3), ("softargmax", 0.05)):
        kpts, present = decode_discs(hm, prior, method=method)
        assert kpts.dtype == torch.float32 and present.dtype == torch.bool and present.all()
        err = np.abs(kpts.numpy() - truth).max()
        assert err < tol, (method, err)


def test_prior_rejects_a_spurious_second_blob_even_rotated_and_mirrored(prior):
    truth = transformed(1.1, -15.0, (2, 3), mirror=True)
    hm = render(truth)
    hm[5] *= 0.6                                                  # the true disc 5 is the weaker blob
    fake = truth[5] + np.array([30.0, 8.0])
    hm[5] = np.maximum(hm[5], render(fake[None])[0])              # a brighter spurious blob in the same channel
    hm[8] = render(truth[8:9] + np.array([[0.0, 18.0]]))[0]      # disc 8's only blob sits where disc 9 is
    hm_B = torch.from_numpy(hm[None])
    naive, _ = decode_discs(hm_B, None)
    np.testing.assert_allclose(naive[0, 5].numpy(), fake, atol=1e-3)    # without the prior the bright one wins
    kpts, present = decode_discs(hm_B, prior)
    np.testing.assert_allclose(kpts[0, 5].numpy(), truth[5], atol=1e-3)
    assert not present[0, 8] and torch.isnan(kpts[0, 8]).all()
    assert present[0, [k for k in range(K) if k != 8]].all()


def test_missing_discs_are_absent_and_never_read_from_truth(prior):
    truth = transformed(0.9, 5.0, (0, 0))
    vis = np.ones(K, dtype=bool)
    vis[[7, 9, 10]] = False                       # a gap and a cut field of view
    hm = torch.from_numpy(render(truth, vis)[None])
    kpts, present = decode_discs(hm, prior)
    np.testing.assert_array_equal(present[0].numpy(), vis)
    np.testing.assert_allclose(kpts[0, vis].numpy(), truth[vis], atol=1e-3)
    assert torch.isnan(kpts[0, ~torch.from_numpy(vis)]).all()
    # a blob 5 px off (~1.6 sigma_px: 0.05 x the 62 px disc0-disc4 distance) costs (1.6)^2 ~ 2.6 to keep: a
    # confident one (drop penalty 4 x score 1) is kept where it is, a weak one (4 x 0.15 = 0.6) is dropped
    off = truth[7:8] + np.array([[5.0, 0.0]])
    for score, kept in ((1.0, True), (0.15, False)):
        hm2 = hm.clone()
        hm2[0, 7] = torch.from_numpy(score * render(off)[0])
        kpts2, present2 = decode_discs(hm2, prior)
        assert bool(present2[0, 7]) is kept
        if kept:
            np.testing.assert_allclose(kpts2[0, 7].numpy(), off[0], atol=1e-3)


def test_selection_fallbacks_and_errors(prior):
    cands = [[(1.0, 2.0, 0.9), (5.0, 5.0, 0.3)]] + [[] for _ in range(K - 1)]
    # one channel with candidates: no similarity can be fitted, the best candidate is kept
    assert select_candidates(cands, prior) == [0] + [-1] * (K - 1)
    with pytest.raises(ValueError, match="prior has 11 discs"):
        select_candidates(cands[:5], prior)
    with pytest.raises(ValueError, match="method"):
        decode_discs(torch.zeros(1, K, 8, 8), prior, method="dark")
