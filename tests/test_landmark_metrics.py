"""Landmark metrics shared by every task (engine/tasks/landmarks/metrics.py): hand-computed figures, the SDR unit,
PCK references, misses, the histogram median, the cross-rank sum rule, and each seed task's landmark keys against
the formulas those tasks used before they shared this implementation."""
import math

import numpy as np
import pytest
import torch

from engine.tasks.fetal_head import FetalHeadAccumulator
from engine.tasks.hip_us.metrics import MetricAccumulator
from engine.tasks.hip_xray import HipXrayAccumulator
from engine.tasks.landmarks.metrics import (HIST_LO, LandmarkMetrics, check_pck_ref, histogram_counts,
                                            histogram_median)
from engine.tasks.spine_disc import SpineDiscAccumulator

TRUE_K2 = np.array([[100.0, 100.0], [200.0, 100.0], [100.0, 200.0]])
HW = (300, 400)                                    # diagonal 500 px


def _two_images():
    """A: spacing 0.5 mm, errors (3, 4) 5 px, (0, 1) 1 px, (6, 8) 10 px -> 2.5, 0.5, 5 mm.
    B: spacing (1, 2) mm, errors (0, 2) 2 px = 4 mm, (-8, 6) 10 px = sqrt(8^2 + 12^2) mm; L3 invisible (garbage)."""
    pred = np.stack([TRUE_K2 + [[3, 4], [0, 1], [6, 8]], TRUE_K2 + [[0, 2], [-8, 6], [500, 500]]])
    vis = np.array([[1, 1, 1], [1, 1, 0]], bool)
    spacing = np.array([[0.5, 0.5], [1.0, 2.0]])
    return pred, np.stack([TRUE_K2, TRUE_K2]), vis, spacing, np.array([HW, HW], float)


def _fed(**kw) -> LandmarkMetrics:
    acc = LandmarkMetrics(3, ["L1", "L2", "L3"], **kw)
    acc.update(*_two_images(), ids=["A", "B"])
    return acc


def test_hand_computed_figures():
    f = _fed(sdr_radii=(2, 4, 10)).compute()
    px = np.array([5.0, 1.0, 10.0, 2.0, 10.0])
    mm = np.array([2.5, 0.5, 5.0, 4.0, math.hypot(8, 12)])
    assert f["landmark_mre_px"] == pytest.approx(28 / 5) and f["landmark_mre_mm"] == pytest.approx(mm.mean())
    assert f["landmark_sd_px"] == pytest.approx(np.std(px, ddof=1), rel=1e-12)
    assert f["landmark_sd_mm"] == pytest.approx(np.std(mm, ddof=1), rel=1e-12)
    assert f["landmark_median_px"] == pytest.approx(5.0, rel=1e-3)     # stated resolution: 0.1 %
    assert f["landmark_median_mm"] == pytest.approx(4.0, rel=1e-3)
    assert (f["landmark_mre_px_1"], f["landmark_mre_px_2"], f["landmark_mre_px_3"]) == pytest.approx((3.5, 5.5, 10))
    assert f["landmark_mre_mm_2"] == pytest.approx((0.5 + math.hypot(8, 12)) / 2)
    assert f["landmark_abs_dx_px"] == pytest.approx(17 / 5) and f["landmark_abs_dy_px"] == pytest.approx(21 / 5)
    assert f["landmark_mre_pct_diag"] == pytest.approx(100 * 28 / 500 / 5)
    # mm values 0.5, 2.5, 4, 5, 14.4: within 2 -> 1, within 4 (inclusive) -> 3, within 10 -> 4; one beyond 10
    assert [f["sdr_2mm"], f["sdr_4mm"], f["sdr_10mm"]] == pytest.approx([20.0, 60.0, 80.0])
    assert f["landmark_outlier_pct"] == pytest.approx(20.0)
    # bbox PCK: A's diagonal 141.4 -> 7.07 px (5 and 1 hit); B's visible L1, L2 span 100 px -> 5 px (2 hits)
    assert f["pck"] == pytest.approx(3 / 5)
    assert (f["num_images"], f["num_landmarks_scored"], f["landmark_missed"]) == (2.0, 5.0, 0.0)


def test_records_per_image():
    pred, true, vis, spacing, hw = _two_images()
    recs = LandmarkMetrics(3).update(pred, true, vis, spacing, hw, score_BK=np.full((2, 3), 0.87654))
    a, b = recs
    assert a["kpt_err_px"] == pytest.approx([5, 1, 10]) and a["mre_px"] == pytest.approx(16 / 3)
    assert a["mre_mm"] == pytest.approx(8 / 3) and a["mre_pct_diag"] == pytest.approx(100 * 16 / 3 / 500)
    assert math.isnan(b["kpt_err_px"][2]) and math.isnan(b["kpt_err_mm"][2]) and math.isnan(b["kpts_true_px"][2][0])
    assert b["kpts_pred_px"][2] == [600.0, 700.0] and b["kpt_score"] == [0.8765] * 3
    assert (b["num_scored"], b["num_missed"]) == (2, 0)


def test_unit_is_mm_only_when_every_scored_image_has_a_spacing():
    pred, true, vis, spacing, hw = _two_images()
    spacing[1] = np.nan                                    # B has no spacing: SDR falls back to px
    acc = LandmarkMetrics(3, sdr_radii=(2, 5))
    acc.update(pred, true, vis, spacing, hw)
    f = acc.compute()
    # px errors 5, 1, 10, 2, 10: within 2 px -> 2, within 5 px -> 3; two beyond 5 px
    assert "sdr_2mm" not in f and [f["sdr_2px"], f["sdr_5px"]] == pytest.approx([40.0, 60.0])
    assert f["landmark_outlier_pct"] == pytest.approx(40.0)
    assert f["landmark_mre_mm"] == pytest.approx(8 / 3) and f["landmark_mre_px"] == pytest.approx(28 / 5)
    assert f["landmark_mre_mm_3"] == pytest.approx(5.0)                     # A's only: B has no spacing
    # an image without spacing whose landmarks are all invisible does not force px
    only_a = LandmarkMetrics(3, sdr_radii=(2,))
    only_a.update(pred, true, np.array([[1, 1, 1], [0, 0, 0]], bool), spacing, hw)
    assert "sdr_2mm" in only_a.compute()
    forced = LandmarkMetrics(3, sdr_radii=(2,), sdr_unit="mm")             # mm over images with a spacing only
    forced.update(pred, true, vis, spacing, hw)
    assert forced.compute()["sdr_2mm"] == pytest.approx(100 / 3)
    none = LandmarkMetrics(3)
    none.update(pred, true, vis, np.full((2, 2), np.nan), None)
    f = none.compute()
    assert math.isnan(f["landmark_mre_mm"]) and math.isnan(f["landmark_median_mm"])
    assert math.isnan(f["landmark_mre_pct_diag"]) and "sdr_2px" in f


def test_pck_references():
    assert _fed(pck_ref="image").compute()["pck"] == 1.0                  # 0.05 x 500 = 25 px: every error
    assert _fed(pck_ref="image", pck_thr=0.015).compute()["pck"] == pytest.approx(3 / 5)   # 7.5 px
    # L1-L3 are 100 px apart in the truth -> 5 px; B has no L3, so only A counts: 5 (inclusive) and 1 hit
    assert _fed(pck_ref=["L1", "L3"]).compute()["pck"] == pytest.approx(2 / 3)
    assert _fed(pck_ref=(0, 2)).compute()["pck"] == pytest.approx(2 / 3)
    for bad in ("head", ["L1"], ["L1", "L1"], ["L1", "nose"], [0, 7], 0.1):
        with pytest.raises(ValueError, match="pck_ref"):
            _fed(pck_ref=bad)
    check_pck_ref(["any", "names"])                                        # the form only, before names are known


def test_missed_landmarks_are_counted_not_scored():
    acc = LandmarkMetrics(3)
    pred = TRUE_K2 + [[3, 4], [np.nan, np.nan], [0, 0]]                    # L2 predicted absent (no coordinates)
    rec = acc.update_sample({"kpts_px_K2": pred, "kpt_present_K": np.array([1, 0, 1], bool)},
                            {"kpts_px_K2": TRUE_K2, "kpts_visible_K": np.ones(3, bool),
                             "spacing_mm_2": np.array([0.5, 0.5]), "image_HW3": np.zeros((*HW, 3), np.uint8)},
                            {"id": "m", "index": 4})
    f = acc.compute()
    assert f["landmark_missed"] == 1 and f["num_landmarks_scored"] == 2
    assert f["landmark_mre_px"] == pytest.approx(2.5) and math.isnan(f["landmark_mre_px_2"])
    assert rec["id"] == "m" and rec["index"] == 4 and rec["num_missed"] == 1
    assert math.isnan(rec["kpts_pred_px"][1][0]) and acc.records == [rec]
    with pytest.raises(ValueError, match="sample m2: non-finite prediction"):
        acc.update_sample({"kpts_px_K2": pred}, {"kpts_px_K2": TRUE_K2}, {"id": "m2"})
    with pytest.raises(ValueError, match=r"sample t: non-finite truth coordinates at visible landmarks \[0\]"):
        acc.update_sample({"kpts_px_K2": TRUE_K2}, {"kpts_px_K2": TRUE_K2 * [[np.nan], [1], [1]]}, {"id": "t"})
    with pytest.raises(ValueError, match=r"samples \['w'\].*\(B, 3, 2\)"):
        acc.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.ones((1, 2), bool), ids=["w"])


@pytest.mark.parametrize("n", [1, 2, 7, 10, 501, 2000])
def test_histogram_median_within_its_resolution_of_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.lognormal(0.5, 1.5, n)
    assert histogram_median(histogram_counts(x)) == pytest.approx(np.median(x), rel=1e-3)


def test_histogram_median_edges():
    assert math.isnan(histogram_median(histogram_counts([])))
    assert 0 <= histogram_median(histogram_counts([0.0, 0.0, 0.0])) < HIST_LO       # exact predictions: underflow
    assert histogram_median(histogram_counts([1e6, 2e6, 3e6])) == pytest.approx(1e5, rel=2e-3)  # overflow reads 1e5
    assert histogram_median(histogram_counts([1.0, 3.0])) == pytest.approx(2.0, rel=1e-3)    # mean of the middle two


def test_summed_states_equal_one_accumulator():
    rng = np.random.default_rng(5)
    B, K = 9, 5
    true = rng.uniform(0, 300, (B, K, 2))
    pred = true + rng.normal(0, 4, (B, K, 2))
    vis, pres = rng.random((B, K)) > 0.2, rng.random((B, K)) > 0.1
    spacing = rng.uniform(0.1, 0.5, (B, 2))
    spacing[3] = np.nan
    hw = np.tile([400.0, 500.0], (B, 1))
    whole, r0, r1 = (LandmarkMetrics(K, sdr_radii=(1, 3, 8)) for _ in range(3))
    whole.update(pred, true, vis, spacing, hw, pres)
    r0.update(pred[:2], true[:2], vis[:2], spacing[:2], hw[:2], pres[:2])       # uneven shards
    r1.update(pred[2:], true[2:], vis[2:], spacing[2:], hw[2:], pres[2:])
    s0, s1 = r0.state(), r1.state()
    assert all(v.dtype == torch.float64 for v in s0.values())
    merged = LandmarkMetrics(K, sdr_radii=(1, 3, 8))
    merged.load_state({k: s0[k] + s1[k] for k in s0})
    a, b = whole.compute(), merged.compute()
    assert a.keys() == b.keys() and "sdr_1px" in a                              # image 3 has no spacing
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-12, nan_ok=True), k
    # a mean of per-rank MREs is not the MRE
    assert abs((r0.compute()["landmark_mre_px"] + r1.compute()["landmark_mre_px"]) / 2 - a["landmark_mre_px"]) > 1e-3
    with pytest.raises(ValueError, match="keys differ"):
        merged.load_state({"count_K": torch.zeros(K)})


def test_bad_configuration_names_the_problem():
    with pytest.raises(ValueError, match="num_keypoints"):
        LandmarkMetrics(0)
    with pytest.raises(ValueError, match="sdr_radii"):
        LandmarkMetrics(2, sdr_radii=(1, -2))
    with pytest.raises(ValueError, match="sdr_unit"):
        LandmarkMetrics(2, sdr_unit="cm")
    with pytest.raises(ValueError, match="pck_thr"):
        LandmarkMetrics(2, pck_thr=0)
    with pytest.raises(ValueError, match="3 landmark names for 2"):
        LandmarkMetrics(2, ["a", "b", "c"])


# ------------------------------------------------------------------------ seed tasks: the keys they always reported
def _old_errors(pred, true, vis, spacing):
    """What the seed tasks computed themselves: distances at visible points, zeros elsewhere (px, mm)."""
    d = np.where(vis[..., None], pred - true, 0.0)
    return d, np.hypot(d[..., 0], d[..., 1]), np.hypot(d[..., 0] * spacing[:, None, 0], d[..., 1] * spacing[:, None, 1])


def _random_case(B, K, seed):
    rng = np.random.default_rng(seed)
    true = rng.uniform(20, 180, (B, K, 2))
    return true + rng.normal(0, 3, (B, K, 2)), true, rng.random((B, K)) > 0.25, rng.uniform(0.1, 0.6, (B, 2))


def test_hip_ultrasound_landmark_keys_unchanged():
    pred, true, vis, spacing = _random_case(5, 6, 1)
    acc = MetricAccumulator(num_classes=2, hd95=False, sdr_radii_mm=(0.5, 1.0, 2.0))
    acc.update(None, None, pred, true, vis, spacing)
    f = acc.compute()
    d, px, mm = _old_errors(pred, true, vis, spacing)
    n = vis.sum()
    assert f["landmark_mre_px"] == pytest.approx(px.sum() / n, rel=1e-12)
    assert f["landmark_mre_mm"] == pytest.approx(mm.sum() / n, rel=1e-12)
    for k in range(6):
        assert f[f"landmark_mre_px_{k + 1}"] == pytest.approx(px[:, k].sum() / vis[:, k].sum(), rel=1e-12)
    assert f["landmark_abs_dx_px"] == pytest.approx(np.abs(d[..., 0]).sum() / n, rel=1e-12)
    assert f["landmark_abs_dy_px"] == pytest.approx(np.abs(d[..., 1]).sum() / n, rel=1e-12)
    for r in (0.5, 1.0, 2.0):
        assert f[f"sdr_{r:g}mm"] == pytest.approx(100 * (mm[vis] <= r).sum() / n, rel=1e-12)
    assert f["landmark_median_mm"] == pytest.approx(np.median(mm[vis]), rel=1e-3)
    assert f["num_landmarks_scored"] == n and "landmarks.count_K" in acc.state()
    assert acc.records[0]["kpt_err_mm"] == pytest.approx(np.where(vis[0], mm[0], np.nan).tolist(), nan_ok=True)


def test_hip_xray_landmark_keys_unchanged():
    pred, true, vis, spacing = _random_case(4, 12, 2)
    vis[0] = True                                            # every landmark seen at least once
    spacing[2] = np.nan                                      # left out of the mm figures only
    hw = [(300, 400), (310, 390), (320, 380), (330, 370)]
    acc = HipXrayAccumulator()
    for b in range(4):
        acc.update_sample({"kpts_px_K2": pred[b]}, {"kpts_px_K2": true[b], "kpts_visible_K": vis[b],
                                                    "spacing_mm_2": spacing[b],
                                                    "image_HW3": np.zeros((*hw[b], 3), np.uint8)},
                          {"id": f"x{b}", "index": b})
    f = acc.compute()
    _, px, mm = _old_errors(pred, true, vis, np.nan_to_num(spacing))
    diag = np.array([math.hypot(*s) for s in hw])
    n, mm_ok = vis.sum(), np.isfinite(spacing).all(1)
    assert f["landmark_mre_px"] == pytest.approx(px.sum() / n, rel=1e-12)
    assert f["landmark_mre_pct_diag"] == pytest.approx((100 * px / diag[:, None]).sum() / n, rel=1e-12)
    assert f["landmark_mre_mm"] == pytest.approx(mm[mm_ok].sum() / vis[mm_ok].sum(), rel=1e-12)
    for k in range(12):
        assert f[f"landmark_mre_px_{k + 1}"] == pytest.approx(px[:, k].sum() / vis[:, k].sum(), rel=1e-12)
    assert acc.records[1]["mre_px"] == pytest.approx(px[1].sum() / vis[1].sum(), rel=1e-12)
    assert "sdr_2px" in f and "landmark_sd_px" in f                  # image 2 has no spacing: SDR in px


def test_spine_matched_mre_unchanged():
    pred, true, vis, spacing = _random_case(3, 5, 3)
    pres = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    acc = SpineDiscAccumulator(num_keypoints=5)
    for b in range(3):
        acc.update_sample({"kpts_px_K2": pred[b], "kpt_present_K": pres[b]},
                          {"kpts_px_K2": true[b], "kpts_visible_K": vis[b], "spacing_mm_2": spacing[b],
                           "image_HW3": np.zeros((200, 120, 3), np.uint8)}, {"id": f"s{b}"})
    f = acc.compute()
    matched = vis & pres
    _, px, mm = _old_errors(pred, true, matched, spacing)
    assert f["landmark_mre_px"] == pytest.approx(px.sum() / matched.sum(), rel=1e-12)
    assert f["landmark_mre_mm"] == pytest.approx(mm.sum() / matched.sum(), rel=1e-12)
    assert f["landmark_missed"] == (vis & ~pres).sum() and "sdr_2mm" in f
    # the task's own PCK (width / 10, threshold 0.5, misses count against it) is not the generic one
    hits = matched & (px / (120 / 10) < 0.5)
    assert f["pck"] == pytest.approx(hits.sum() / vis.sum())


def test_fetal_head_landmark_keys_unchanged():
    pred, true, vis, spacing = _random_case(3, 4, 4)
    vis[:] = True
    true[1, 2] = np.nan                                      # the reader could not place it: not visible
    spacing = np.repeat(spacing[:, :1], 2, axis=1)           # HC18 pixels are isotropic
    acc = FetalHeadAccumulator()
    mask = np.zeros((200, 220), np.int64)
    for b in range(3):
        acc.update_sample({"kpts_px_K2": pred[b]}, {"kpts_px_K2": true[b], "kpts_visible_K": vis[b],
                                                    "spacing_mm_2": spacing[b], "mask_HW": mask, "hc_mm": 100.0},
                          {"id": f"f{b}"})
    f = acc.compute()
    seen = vis & np.isfinite(true).all(-1)
    _, px, mm = _old_errors(pred, np.nan_to_num(true), seen, spacing)
    assert f["landmark_mre_px"] == pytest.approx(px.sum() / seen.sum(), rel=1e-12)
    assert f["landmark_mre_mm"] == pytest.approx(mm.sum() / seen.sum(), rel=1e-12)
    for k in range(4):
        assert f[f"landmark_mre_px_{k + 1}"] == pytest.approx(px[:, k].sum() / seen[:, k].sum(), rel=1e-12)
        assert f[f"landmark_mre_mm_{k + 1}"] == pytest.approx(mm[:, k].sum() / seen[:, k].sum(), rel=1e-12)
    assert f["num_landmarks_scored"] == 11 and math.isnan(acc.records[1]["kpt_err_px"][2])
