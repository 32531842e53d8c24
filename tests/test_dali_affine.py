"""The DALI warps (data_pipelines/dali/affine.py, CPU-only pipeline) move images, masks and landmarks the same way
as the torch path (data_pipelines/transforms.py): landmarks within 0.05 px, masks >= 0.99 agreement, images within
interpolation rounding; the fn.transforms.* chain builds the torch path's matrix from the same draws."""
import numpy as np
import pytest

from data_pipelines.transforms import (AffineDraw, affine_from_draw, draw_affine, letterbox_matrix, warp_image,
                                       warp_mask, warp_points)

pytestmark = pytest.mark.dali

SRC_HW, OUT_HW = (40, 52), (32, 48)


def _samples(n, seed=0):
    """Smooth images (a blob + two ramps, float [0, 1], HWC), masks with three classes, 6 landmarks each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SRC_HW[0], 0:SRC_HW[1]]
    images, masks, points = [], [], []
    for i in range(n):
        cx, cy = rng.uniform(15, 37), rng.uniform(12, 28)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 60.0)
        images.append(np.stack([blob, xx / (SRC_HW[1] - 1), yy / (SRC_HW[0] - 1)], -1).astype(np.float32))
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < 100).astype(np.uint8) * (1 + i % 2)
        mask[(xx < 12) & (yy < 10)] = 3
        masks.append(mask)
        points.append(rng.uniform([0, 0], [SRC_HW[1] - 1, SRC_HW[0] - 1], size=(6, 2)).astype(np.float32))
    return images, masks, points


def _torch_path(image, mask, pts, m):
    return (warp_image(image.transpose(2, 0, 1), m, OUT_HW).numpy().transpose(1, 2, 0),
            warp_mask(mask, m, OUT_HW).numpy(), warp_points(pts, m))


def _assert_same_motion(dali_out, images, masks, points, matrices):
    image, mask, pts, _ = dali_out
    for i, m in enumerate(matrices):
        ref_image, ref_mask, ref_pts = _torch_path(images[i], masks[i], points[i], m)
        assert np.abs(pts[i] - ref_pts).max() < 0.05                       # the bound; measured ~3e-6 px
        assert (mask[i] == ref_mask).mean() >= 0.99
        assert np.abs(image[i] - ref_image).max() < 1e-3                    # measured ~3e-5
        assert mask[i].max() > 0 and len(np.unique(mask[i])) >= 2           # the warp kept the structures


def test_dali_cpu_warps_match_the_torch_path_for_fixed_matrices():
    from data_pipelines.dali.affine import DaliWarper
    images, masks, points = _samples(4)
    lb = letterbox_matrix(SRC_HW, OUT_HW)
    draws = [AffineDraw(False, 0.0, 1.0, 0.0, 0.0, 0.0), AffineDraw(True, 12.0, 1.15, 0.0, 2.0, -1.5),
             AffineDraw(False, -20.0, 0.85, 8.0, -3.0, 2.0), AffineDraw(True, 5.0, 1.0, -6.0, 0.5, 0.5)]
    matrices = [affine_from_draw(OUT_HW, d) @ lb for d in draws]
    out = DaliWarper(OUT_HW, batch_size=4).run(images, masks, points, matrices)
    _assert_same_motion(out, images, masks, points, matrices)
    # the identity draw is the plain letterbox: landmarks land where the letterbox puts them
    np.testing.assert_allclose(out[2][0], warp_points(points[0], lb), atol=1e-4)


def test_fn_transforms_chain_builds_the_torch_matrix_from_the_same_draws():
    from data_pipelines.dali.affine import DaliWarper
    images, masks, points = _samples(4, seed=1)
    rng = np.random.default_rng(7)
    draws = [draw_affine(rng, OUT_HW, rotation_deg=20, scale_range=(0.8, 1.2), translate_frac=0.1, shear_deg=10,
                         flip_p=p) for p in (0.0, 1.0, 0.0, 1.0)]
    assert [d.flipped for d in draws] == [False, True, False, True]
    lb = letterbox_matrix(SRC_HW, OUT_HW)
    matrices = [affine_from_draw(OUT_HW, d) @ lb for d in draws]
    out = DaliWarper(OUT_HW, batch_size=4, from_draws=True).run(images, masks, points, [lb] * 4, draws=draws,
                                                                  frame_hw=OUT_HW)
    for i, m in enumerate(matrices):
        np.testing.assert_allclose(out[3][i], m[:2], atol=1e-4)
    _assert_same_motion(out, images, masks, points, matrices)


def test_warper_rejects_a_batch_of_the_wrong_size():
    from data_pipelines.dali.affine import DaliWarper
    images, masks, points = _samples(3)
    warper = DaliWarper(OUT_HW, batch_size=2)
    with pytest.raises(ValueError, match="a batch needs 1 to 2"):
        warper.run(images, masks, points, [np.eye(3)] * 3)
    with pytest.raises(ValueError, match="as many of each"):
        warper.run(images[:2], masks[:2], points[:1], [np.eye(3)] * 2)
    images, masks, points = _samples(2)
    with pytest.raises(ValueError, match="AffineDraw"):
        DaliWarper(OUT_HW, batch_size=2, from_draws=True).run(images, masks, points, [np.eye(3)] * 2)
