"""Metrics from sums and counts (engine/metrics.py): hand-computed cases and the cross-rank reduction."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.metrics import confusion_matrix, hd95, iou_from_confusion, pearson_r_from_sums
from engine.tasks.hip_us.metrics import MetricAccumulator


def hip_kpts(alpha_deg: float, beta_deg: float) -> np.ndarray:
    """Six landmarks, vertical baseline P1-P2, roof lines at the requested angles to it (as in test_geometry)."""
    a, b = math.radians(alpha_deg), math.radians(beta_deg)
    p3, p4 = np.array([60.0, 180.0]), np.array([130.0, 100.0])
    p5 = p3 + 40.0 * np.array([math.sin(a), -math.cos(a)])
    p6 = p4 + 30.0 * np.array([-math.sin(b), math.cos(b)])
    return np.stack([[100.0, 20.0], [100.0, 110.0], p3, p4, p5, p6])


def _square(h, w, r0, c0, size):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def _close(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-12), k


# --------------------------------------------------------------------------------------------------- segmentation
TRUE_4x4 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
PRED_4x4 = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 3], [2, 3, 3, 3]])


def test_confusion_matrix_and_iou_on_a_4x4_case():
    cm = confusion_matrix(PRED_4x4[None], TRUE_4x4[None], 4)[0]
    np.testing.assert_array_equal(cm, [[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 3, 1], [0, 0, 1, 3]])
    np.testing.assert_allclose(iou_from_confusion(cm), [3 / 4, 4 / 5, 3 / 5, 3 / 5])
    acc = MetricAccumulator(num_classes=4, class_names=["bg", "a", "b", "c"], hd95=False)
    acc.update(PRED_4x4[None], TRUE_4x4[None], None, None, None, np.ones((1, 2)))
    r = acc.compute()
    assert r["seg_miou"] == pytest.approx((0.8 + 0.6 + 0.6) / 3)
    assert r["seg_miou_with_bg"] == pytest.approx((0.75 + 0.8 + 0.6 + 0.6) / 4)
    assert r["seg_iou_a"] == pytest.approx(0.8) and r["seg_iou_bg"] == pytest.approx(0.75)
    assert r["seg_pixel_acc"] == pytest.approx(13 / 16)
    # per-image Dice: 2*3/(4+3), 2*4/(4+5), 2*3/(4+4), 2*3/(4+4); seg_dice averages the foreground ones
    assert r["seg_dice_bg"] == pytest.approx(6 / 7)
    assert r["seg_dice"] == pytest.approx((8 / 9 + 0.75 + 0.75) / 3)
    assert math.isnan(r["landmark_mre_px"]) and math.isnan(r["alpha_mae_deg"]) and r["num_images"] == 1.0


def test_class_absent_from_whole_split_has_nan_iou_and_is_left_out_of_miou():
    true = np.array([[[0, 1], [1, 1]]])
    pred = np.array([[[0, 1], [1, 0]]])
    acc = MetricAccumulator(num_classes=3, hd95=False)
    acc.update(pred, true, None, None, None, np.ones((1, 2)))
    r = acc.compute()
    assert math.isnan(r["seg_iou_class2"])
    assert r["seg_miou"] == pytest.approx(2 / 3)  # class 1 only: TP 2, FN 1
    assert math.isnan(r["seg_dice_class2"])


def test_dice_of_known_masks_skips_classes_absent_in_both():
    h = w = 6
    true = np.zeros((2, h, w), np.int64)
    pred = np.zeros((2, h, w), np.int64)
    true[0, 0, 0:4] = 1           # image 0: class 1 four pixels, prediction overlaps two of them
    pred[0, 0, 2:6] = 1           # -> Dice 2*2/(4+4) = 0.5; class 2 absent in both -> skipped
    true[1, 2:4, 2:4] = 1         # image 1: class 1 perfect, class 2 perfect
    pred[1, 2:4, 2:4] = 1
    true[1, 5, :] = 2
    pred[1, 5, :] = 2
    true[1, 0, 0] = 3             # class 3 in truth only -> Dice 0 (counted)
    acc = MetricAccumulator(num_classes=4, hd95=False)
    acc.update(pred, true, None, None, None, np.ones((2, 2)))
    r = acc.compute()
    assert r["seg_dice_class1"] == pytest.approx(0.75)
    assert r["seg_dice_class2"] == pytest.approx(1.0)
    assert r["seg_dice_class3"] == pytest.approx(0.0)
    assert r["seg_dice"] == pytest.approx((0.5 + 1.0 + 1.0 + 0.0) / 4)
    assert acc.records[0]["dice"]["class1"] == pytest.approx(0.5) and math.isnan(acc.records[0]["dice"]["class2"])


def test_hd95_of_squares_offset_by_3px_is_3_and_identical_is_0():
    a = _square(30, 40, 5, 5, 10)
    b = _square(30, 40, 5, 8, 10)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(b, a) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0
    corner = _square(12, 12, 0, 0, 5)  # touching the image border: the frame edge is a boundary too
    assert hd95(corner, corner) == 0.0
    assert math.isnan(hd95(a, np.zeros_like(a)))


def test_hd95_is_a_percentile_not_the_maximum():
    a = _square(40, 40, 2, 2, 10)
    b = a.copy()
    b[35, 35] = True  # one far-away stray pixel: Hausdorff ~ 33 px, HD95 ignores it
    assert hd95(a, b) == 0.0


def test_hd95_mm_uses_spacing_per_axis():
    a = _square(30, 40, 5, 5, 10)
    b = _square(30, 40, 5, 8, 10)  # 3 px along x
    assert hd95(a, b, sampling_yx=(2.0, 0.5)) == pytest.approx(1.5)
    true = a.astype(np.int64)[None]
    pred = b.astype(np.int64)[None]
    acc = MetricAccumulator(num_classes=2)
    acc.update(pred, true, None, None, None, np.array([[0.5, 2.0]]))  # spacing is (x, y)
    r = acc.compute()
    assert r["seg_hd95_px"] == pytest.approx(3.0) and r["seg_hd95_mm"] == pytest.approx(1.5)


def test_hd95_mean_over_pairs_present_in_both():
    true = np.zeros((2, 30, 40), np.int64)
    pred = np.zeros((2, 30, 40), np.int64)
    true[0][_square(30, 40, 5, 5, 10)] = 1
    pred[0][_square(30, 40, 5, 8, 10)] = 1      # HD95 3
    true[1][_square(30, 40, 5, 5, 10)] = 1
    pred[1][_square(30, 40, 5, 5, 10)] = 1      # HD95 0
    true[1][_square(30, 40, 20, 20, 5)] = 2     # class 2 only in truth: no HD95 pair
    acc = MetricAccumulator(num_classes=3)
    acc.update(pred, true, None, None, None, np.full((2, 2), 0.25))
    r = acc.compute()
    assert r["seg_hd95_px"] == pytest.approx(1.5) and r["seg_hd95_mm"] == pytest.approx(0.375)


def test_mask_values_out_of_range_raise():
    acc = MetricAccumulator(num_classes=3)
    with pytest.raises(ValueError, match="engine/metrics.py.*outside"):
        acc.update(np.full((1, 2, 2), 3), np.zeros((1, 2, 2), np.int64), None, None, None, np.ones((1, 2)))


# ------------------------------------------------------------------------------------------------------ landmarks
def _landmark_case():
    """Three images, K = 6; known offsets on visible points, garbage on invisible ones."""
    true = np.full((3, 6, 2), 50.0)
    pred = true.copy()
    vis = np.zeros((3, 6), bool)
    pred[0, 0] += [0.0, 0.5]
    pred[0, 1] += [3.0, 4.0]
    pred[1, 2] += [6.0, -8.0]
    vis[0, 0] = vis[0, 1] = vis[1, 2] = True
    pred[2, 3] += [400.0, 400.0]  # invisible: must not count
    return pred, true, vis


def test_landmark_errors_and_sdr_on_constructed_distances():
    pred, true, vis = _landmark_case()
    acc = MetricAccumulator(num_classes=2, sdr_radii_mm=(0.5, 1.25, 2.0, 3.0))
    acc.update(None, None, pred, true, vis, np.full((3, 2), 0.25))  # distances 0.5, 5, 10 px
    r = acc.compute()
    assert r["landmark_mre_px"] == pytest.approx((0.5 + 5 + 10) / 3)
    assert r["landmark_mre_mm"] == pytest.approx((0.125 + 1.25 + 2.5) / 3)
    assert r["landmark_mre_px_1"] == pytest.approx(0.5) and r["landmark_mre_px_3"] == pytest.approx(10.0)
    assert math.isnan(r["landmark_mre_px_4"])
    assert r["landmark_abs_dx_px"] == pytest.approx(9 / 3) and r["landmark_abs_dy_px"] == pytest.approx(12.5 / 3)
    # 0.125, 1.25, 2.5 mm: within 0.5 -> 1, within 1.25 (inclusive) -> 2, within 2 -> 2, within 3 -> 3
    assert [r[f"sdr_{k}mm"] for k in ("0.5", "1.25", "2", "3")] == pytest.approx([100 / 3, 200 / 3, 200 / 3, 100])
    assert np.isnan(acc.records[2]["kpt_err_px"]).all()


def test_landmark_mm_scales_each_axis():
    true = np.zeros((1, 6, 2))
    pred = true.copy()
    pred[0, 0] = [3.0, 4.0]
    vis = np.zeros((1, 6), bool)
    vis[0, 0] = True
    acc = MetricAccumulator(num_classes=2)
    acc.update(None, None, pred, true, vis, np.array([[2.0, 0.5]]))
    assert acc.compute()["landmark_mre_mm"] == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2))


# --------------------------------------------------------------------------------------------------------- angles
ALPHA_TRUE_PRED = [(65.0, 62.0), (55.0, 58.5), (70.0, 70.0), (58.0, 61.0), (62.0, 59.0)]
BETA_TRUE_PRED = [(70.0, 71.0), (72.0, 72.0), (74.0, 73.0), (76.0, 77.0), (78.0, 78.0)]


def _angle_batch():
    true = np.stack([hip_kpts(a, b) for (a, _), (b, _) in zip(ALPHA_TRUE_PRED, BETA_TRUE_PRED)])
    pred = np.stack([hip_kpts(a, b) for (_, a), (_, b) in zip(ALPHA_TRUE_PRED, BETA_TRUE_PRED)])
    return pred, true, np.ones((5, 6), bool)


def test_alpha_beta_mae_tolerances_and_screening_on_constructed_points():
    pred, true, vis = _angle_batch()
    acc = MetricAccumulator(num_classes=2, angle_tolerances_deg=(1, 3.2, 5))
    acc.update(None, None, pred, true, vis, np.ones((5, 2)))
    r = acc.compute()
    assert r["alpha_mae_deg"] == pytest.approx((3 + 3.5 + 0 + 3 + 3) / 5)
    assert r["beta_mae_deg"] == pytest.approx(3 / 5)
    assert [r["alpha_within_1deg"], r["alpha_within_3.2deg"], r["alpha_within_5deg"]] == pytest.approx([20, 80, 100])
    assert r["beta_within_3.2deg"] == pytest.approx(100.0)  # errors 1, 0, 1, 1, 0
    # type II = alpha < 60: TP (55->58.5), FN (58->61), FP (62->59), TN x2
    assert r["screening_accuracy"] == pytest.approx(3 / 5)
    assert r["screening_precision"] == pytest.approx(0.5) and r["screening_recall"] == pytest.approx(0.5)
    t, p = np.array(ALPHA_TRUE_PRED).T
    assert r["alpha_pearson_r"] == pytest.approx(np.corrcoef(t, p)[0, 1], abs=1e-9)
    t, p = np.array(BETA_TRUE_PRED).T
    assert r["beta_pearson_r"] == pytest.approx(np.corrcoef(t, p)[0, 1], abs=1e-9)
    assert acc.records[1]["alpha_true_deg"] == pytest.approx(55.0)


def test_angles_need_all_six_landmarks_and_screening_is_nan_safe():
    pred, true, vis = _angle_batch()
    vis[1:, 3] = False  # only image 0 keeps all six landmarks: true 65, pred 62 (TN)
    acc = MetricAccumulator(num_classes=2)
    acc.update(None, None, pred, true, vis, np.ones((5, 2)))
    r = acc.compute()
    assert r["alpha_mae_deg"] == pytest.approx(3.0)
    assert r["screening_accuracy"] == pytest.approx(1.0)
    assert math.isnan(r["screening_precision"]) and math.isnan(r["screening_recall"])  # 0/0
    assert math.isnan(r["alpha_pearson_r"])  # one pair
    assert math.isnan(acc.records[2]["alpha_pred_deg"])


def test_pearson_from_sums_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(60, 8, 50)
    y = 0.7 * x + rng.normal(0, 3, 50)
    got = pearson_r_from_sums(50, x.sum(), y.sum(), (x * y).sum(), (x * x).sum(), (y * y).sum())
    assert got == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-10)


# ----------------------------------------------------------------------------------------------------- cross-rank
def _mixed_batch():
    """Four images with segmentation, landmarks (uneven visibility) and angles."""
    pred_k, true_k, _ = _angle_batch()
    pred_k, true_k = pred_k[:4], true_k[:4]
    vis = np.ones((4, 6), bool)
    vis[3, :4] = False
    pred_k = pred_k + np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0], [0.5, 0.5]])[:, None, :]
    true_m = np.zeros((4, 30, 40), np.int64)
    pred_m = np.zeros((4, 30, 40), np.int64)
    for i in range(4):
        true_m[i][_square(30, 40, 5, 5, 10)] = 1
        pred_m[i][_square(30, 40, 5, 5 + i, 10 + i)] = 1
        true_m[i][_square(30, 40, 18, 20 + i, 6)] = 2
        pred_m[i][_square(30, 40, 18, 20, 6)] = 2
    spacing = np.array([[0.1, 0.1], [0.2, 0.1], [0.1, 0.3], [0.25, 0.25]])
    return pred_m, true_m, pred_k, true_k, vis, spacing


def _split_accumulators(split: int):
    full, a, b = (MetricAccumulator(num_classes=3, class_names=["bg", "head", "labrum"]) for _ in range(3))
    batch = _mixed_batch()
    full.update(*batch, ids=list("abcd"))
    a.update(*(x[:split] for x in batch))
    b.update(*(x[split:] for x in batch))
    return full, a, b


def test_summed_states_equal_one_accumulator_over_the_whole_batch():
    full, a, b = _split_accumulators(split=1)
    sa, sb = a.state(), b.state()
    assert all(v.dtype == torch.float64 for v in sa.values())
    merged = MetricAccumulator(num_classes=3, class_names=["bg", "head", "labrum"])
    merged.load_state({k: sa[k] + sb[k] for k in sa})
    want = full.compute()
    _close(want, merged.compute())
    # what a per-rank mean would give is different: rank a holds 1 image with 6 points, rank b 3 with 14 points
    ra, rb = a.compute(), b.compute()
    for key in ("landmark_mre_px", "alpha_mae_deg", "seg_dice", "seg_hd95_px"):
        assert abs((ra[key] + rb[key]) / 2 - want[key]) > 1e-3, key


def test_state_is_a_copy_and_load_state_checks_keys_and_shapes():
    acc = MetricAccumulator(num_classes=3)
    s = acc.state()
    s["num_images_1"] += 5
    assert acc.compute()["num_images"] == 0.0
    with pytest.raises(ValueError, match="missing"):
        acc.load_state({k: v for k, v in s.items() if k != "confusion_CC"})
    bad = dict(s, confusion_CC=torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="confusion_CC"):
        acc.load_state(bad)


def _rank_worker(rank: int, init_file: str, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    _, a, b = _split_accumulators(split=3)
    acc = a if rank == 0 else b
    state = acc.state()
    for v in state.values():
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
    acc.load_state(state)
    out[rank] = acc.compute()
    dist.destroy_process_group()


def test_gloo_all_reduce_of_two_ranks_matches_single_process(tmp_path):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    want = _split_accumulators(split=3)[0].compute()
    _close(want, dict(out[0]))
    _close(want, dict(out[1]))
