import math

import numpy as np
import pytest

from data_pipelines.heatmaps import render_heatmaps, render_heatmaps_numba, render_heatmaps_numpy


def test_values_at_hand_computed_pixels():
    hm = render_heatmaps_numpy(np.array([[10.3, 7.6]]), np.array([True]), (20, 25), sigma=2.0, peak=255.0)
    # window centred on round(kp) = (10, 8), r = ceil(3 * 2) = 6
    assert hm[0, 8, 10] == pytest.approx(255.0 * math.exp(-(0.3 ** 2 + 0.4 ** 2) / 8.0), abs=1e-4)
    assert hm[0, 8, 16] == pytest.approx(255.0 * math.exp(-(5.7 ** 2 + 0.4 ** 2) / 8.0), abs=1e-4)
    assert hm[0, 2, 4] == pytest.approx(255.0 * math.exp(-(6.3 ** 2 + 5.6 ** 2) / 8.0), abs=1e-4)
    assert hm[0, 8, 17] == 0.0 and hm[0, 1, 10] == 0.0 and hm[0, 15, 10] == 0.0   # just outside the window
    assert hm[0].max() == hm[0, 8, 10]


def test_half_rounds_away_from_zero_and_invisible_is_zero():
    hm = render_heatmaps_numpy(np.array([[2.5, 2.0], [3.0, 3.0]]), np.array([True, False]), (9, 12), sigma=1.0)
    # round(2.5) = 3 -> window x in [0, 6]; the Gaussian is centred on 2.5, so x = 2 and x = 3 are equal
    assert hm[0, 2, 6] > 0 and hm[0, 2, 7] == 0.0
    assert hm[0, 2, 2] == pytest.approx(hm[0, 2, 3])
    assert not hm[1].any()


def test_keypoint_outside_the_image_lights_the_part_of_its_window_inside():
    hm = render_heatmaps_numpy(np.array([[-3.0, 5.0]]), np.array([True]), (11, 9), sigma=2.0, peak=1.0)
    assert hm[0, 5, 0] == pytest.approx(math.exp(-9.0 / 8.0), abs=1e-6)
    assert hm[0, 5, 3] == pytest.approx(math.exp(-36.0 / 8.0), abs=1e-6)
    assert hm[0, 5, 4] == 0.0                                            # |4 - (-3)| = 7 > r = 6


@pytest.mark.parametrize("hw, sigma", [((37, 53), 2.0), ((1, 7), 1.5), ((64, 48), 0.7), ((31, 29), 3.3)])
def test_numba_matches_numpy_on_odd_sizes_and_borders(hw, sigma):
    rng = np.random.default_rng(hash(hw) % 1000)
    h, w = hw
    pts = np.concatenate([
        rng.uniform([-4, -4], [w + 4, h + 4], size=(12, 2)),              # inside, near and beyond the borders
        np.array([[-0.5, -0.5], [w - 0.5, h - 0.5], [2.5, 1.5], [-20.0, 3.0], [np.nan, 1.0]]),
    ])
    vis = rng.random(len(pts)) < 0.8
    vis[-5:] = True
    ref = render_heatmaps_numpy(pts, vis, hw, sigma)
    got = render_heatmaps_numba(pts, vis, hw, sigma)
    assert got.dtype == np.float32 and got.shape == (len(pts), h, w)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert ref[-2].sum() == 0.0 and ref[-1].sum() == 0.0                # far outside / non-finite


def test_dispatch_and_argument_checks():
    pts, vis = np.array([[4.2, 3.9]]), np.array([True])
    a = render_heatmaps(pts, vis, (9, 9), 1.0, impl="numpy")
    b = render_heatmaps(pts, vis, (9, 9), 1.0, impl="numba")
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.unravel_index(a[0].argmax(), a[0].shape) == (4, 4)
    with pytest.raises(ValueError, match="impl"):
        render_heatmaps(pts, vis, (9, 9), 1.0, impl="cuda")
    with pytest.raises(ValueError, match="sigma"):
        render_heatmaps(pts, vis, (9, 9), 0.0)
