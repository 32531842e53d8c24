import math

import numpy as np
import pytest
import torch

from data_pipelines.synthetic.hip import LANDMARK_CLASS, render_phantom
from data_pipelines.transforms import (AugmentParams, add_speckle_noise, adjust_brightness_contrast, adjust_gamma,
                                       apply_flip_pairs, augment_intensity, gaussian_blur, letterbox_matrix,
                                       points_in_frame, random_affine_matrix, warp_image, warp_mask, warp_points)


def test_letterbox_wide_target_pads_x_only():
    m = letterbox_matrix((100, 100), (128, 160))       # s = 1.28, 128 px wide image centred in 160: pad_x = 16
    np.testing.assert_allclose(m, [[1.28, 0, 0.64 - 0.5 + 16], [0, 1.28, 0.64 - 0.5], [0, 0, 1]])
    # the image extent [-0.5, 99.5]^2 maps onto [15.5, 143.5] x [-0.5, 127.5]
    np.testing.assert_allclose(warp_points([[-0.5, -0.5], [99.5, 99.5]], m), [[15.5, -0.5], [143.5, 127.5]])


def test_letterbox_tall_target_pads_y_only_never_x():
    m = letterbox_matrix((240, 320), (128, 160))       # s = 0.5, 120 rows centred in 128: pad_y = 4
    np.testing.assert_allclose(m, [[0.5, 0, -0.25], [0, 0.5, -0.25 + 4], [0, 0, 1]])
    np.testing.assert_allclose(warp_points([[0.0, 0.0], [319.0, 239.0]], m), [[-0.25, 3.75], [159.25, 123.25]])


def _blob_image(centres, hw, sigma=2.0):
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float64)
    return sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in centres)


def _centroid(img, near, radius=5):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    win = (np.abs(xx - near[0]) <= radius) & (np.abs(yy - near[1]) <= radius)
    w = np.where(win, img, 0.0)
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


def _random_warp(seed, src_hw, out_hw):
    m, _ = random_affine_matrix(np.random.default_rng(seed), out_hw, rotation_deg=30, scale_range=(0.8, 1.25),
                                translate_frac=0.1)
    return m @ letterbox_matrix(src_hw, out_hw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bright_spot_centroid_follows_its_point(seed):
    src_hw, out_hw = (60, 80), (64, 96)
    pts = np.array([[20.0, 15.0], [55.0, 40.0], [40.0, 30.0]])
    m = _random_warp(seed, src_hw, out_hw)
    out = warp_image(_blob_image(pts, src_hw)[None].astype(np.float32), m, out_hw, pad_value=0.0)[0].numpy()
    for p in warp_points(pts, m):
        # a half-pixel convention error would shift every spot by >= 0.5 px; the centroid agrees to ~0.05 px
        assert np.linalg.norm(_centroid(out, np.round(p).astype(int)) - p) < 0.15


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_point_on_bright_pixel_stays_on_the_bright_pixel(seed):
    src_hw, out_hw = (60, 80), (64, 96)
    m = _random_warp(seed, src_hw, out_hw)
    targets = np.array([[30, 20], [50, 40], [70, 25]])          # destination pixel centres
    src_pts = warp_points(targets, np.linalg.inv(m))              # sub-pixel spots in the source
    out = warp_image(_blob_image(src_pts, src_hw, sigma=1.2)[None].astype(np.float32), m, out_hw, 0.0)[0].numpy()
    yy, xx = np.mgrid[0:out_hw[0], 0:out_hw[1]]
    for q, p in zip(targets, warp_points(src_pts, m)):
        near = np.hypot(xx - q[0], yy - q[1]) < 5
        r, c = np.unravel_index(np.argmax(np.where(near, out, -1.0)), out.shape)
        assert (c, r) == tuple(q)                                 # the brightest pixel is the target pixel
        assert np.all(np.abs(p - (c, r)) <= 0.5)                  # and the warped point lies on it


def test_mask_class_at_warped_landmarks_is_preserved():
    sample = render_phantom(np.random.default_rng(5), "II")
    for seed in range(4):
        m, _ = random_affine_matrix(np.random.default_rng(seed), (240, 320), rotation_deg=25,
                                    scale_range=(0.7, 1.2), translate_frac=0.05)
        warped = warp_mask(sample.mask_HW, m, (200, 280)).numpy()
        for k, p in enumerate(warp_points(sample.kpts_px_K2, m)):
            before = sample.mask_HW[tuple(np.round(sample.kpts_px_K2[k][::-1]).astype(int))]
            assert before == LANDMARK_CLASS[k]
            assert warped[int(round(p[1])), int(round(p[0]))] == before, (seed, k)


def test_identity_warp_reproduces_image_and_translation_pads():
    img = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
    np.testing.assert_allclose(warp_image(img, np.eye(3), (7, 9)).numpy(), img, atol=1e-5)
    shift = np.array([[1.0, 0, 3], [0, 1, 0], [0, 0, 1]])
    out = warp_image(img, shift, (7, 9), pad_value=0.25).numpy()
    np.testing.assert_allclose(out[:, :, :3], 0.25, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 3:], img[:, :, :6], atol=1e-5)
    mask = np.arange(63).reshape(7, 9) % 8
    assert torch.equal(warp_mask(mask, shift, (7, 9))[:, 3:], torch.as_tensor(mask[:, :6], dtype=torch.int64))
    assert warp_mask(mask, shift, (7, 9))[:, :3].eq(0).all()


def test_flip_matrix_mirrors_image_points_and_swaps_pairs():
    rng = np.random.default_rng(0)
    m, flipped = random_affine_matrix(rng, (5, 8), rotation_deg=0, scale_range=(1, 1), translate_frac=0, flip_p=1.0)
    assert flipped
    np.testing.assert_allclose(m, [[-1, 0, 7], [0, 1, 0], [0, 0, 1]], atol=1e-12)
    img = rng.random((1, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(warp_image(img, m, (5, 8)).numpy(), img[:, :, ::-1], atol=1e-5)
    pts = warp_points([[1.0, 2.0], [6.0, 3.0], [4.0, 4.0]], m)
    np.testing.assert_allclose(pts, [[6, 2], [1, 3], [3, 4]])
    swapped, vis = apply_flip_pairs(pts, np.array([True, False, True]), ((0, 1),))
    np.testing.assert_allclose(swapped, [[1, 3], [6, 2], [3, 4]])
    assert vis.tolist() == [False, True, True]


def test_random_affine_is_seeded_and_within_bounds():
    a, _ = random_affine_matrix(np.random.default_rng(7), (64, 80), 10, (0.9, 1.1), 0.0)
    b, _ = random_affine_matrix(np.random.default_rng(7), (64, 80), 10, (0.9, 1.1), 0.0)
    np.testing.assert_array_equal(a, b)
    for seed in range(20):
        m, flipped = random_affine_matrix(np.random.default_rng(seed), (64, 80), 10, (0.9, 1.1), 0.0)
        scale = math.sqrt(np.linalg.det(m[:2, :2]))
        angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
        assert 0.9 <= scale <= 1.1 and abs(angle) <= 10 and not flipped
        np.testing.assert_allclose(warp_points([[39.5, 31.5]], m), [[39.5, 31.5]], atol=1e-9)  # centre fixed


def test_points_leaving_the_frame_are_flagged():
    vis = points_in_frame(np.array([[-0.5, 0.0], [-0.51, 3.0], [9.5, 4.5], [9.6, 1.0], [3.0, 4.6]]), (5, 10))
    assert vis.tolist() == [True, False, True, False, False]


def test_intensity_functions_hand_values():
    img = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(adjust_brightness_contrast(img, 0.1, 2.0), [[0.0, 0.1, 0.6, 1.0]], atol=1e-6)
    np.testing.assert_allclose(adjust_gamma(img, 2.0), [[0.0, 0.0625, 0.25, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(add_speckle_noise(img, np.random.default_rng(0), 0.0), img)
    noisy = add_speckle_noise(np.full((200, 200), 0.5, np.float32), np.random.default_rng(0), 0.1)
    assert abs(noisy.std() - 0.05) < 0.003 and abs(noisy.mean() - 0.5) < 0.003     # 0.5 * (1 + 0.1 n)
    delta = np.zeros((1, 15, 15), np.float32)
    delta[0, 7, 7] = 1.0
    blurred = gaussian_blur(delta, 1.0)
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k /= k.sum()
    assert blurred[0, 7, 7] == pytest.approx(k[3] ** 2, rel=1e-5)
    assert blurred[0, 7, 9] == pytest.approx(k[3] * k[5], rel=1e-5)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-5)


def test_augment_intensity_is_driven_by_the_generator():
    img = np.random.default_rng(1).random((1, 30, 40)).astype(np.float32)
    p = AugmentParams()
    a = augment_intensity(img, np.random.default_rng(3), p)
    b = augment_intensity(img, np.random.default_rng(3), p)
    c = augment_intensity(img, np.random.default_rng(4), p)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and a.min() >= 0.0 and a.max() <= 1.0


def test_augment_params_defaults_and_validation():
    p = AugmentParams()
    assert p.enabled and p.rotation_deg == 10 and p.scale_range == (0.9, 1.1) and p.flip_p == 0.0
    with pytest.raises(ValueError, match="scale_range"):
        AugmentParams(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="flip_p"):
        AugmentParams(flip_p=1.5)
    assert AugmentParams(flip_pairs=[[0, 1]]).flip_pairs == ((0, 1),)
