"""The hip X-ray task (engine/tasks/hip_xray.py): accumulator figures by hand, the cross-rank sum rule, figures,
predict rows, the decoder."""
import math
import types

import numpy as np
import pytest
import torch

from _xray_cases import hand_pelvis
from engine.tasks.hip_xray import HipXrayAccumulator, HipXrayTask

H, W = 300, 400  # diagonal exactly 500 px
AI_L = math.degrees(math.atan2(30, 40))  # 36.87 deg (see _truth)
AI_R = math.degrees(math.atan2(20, 40))  # 26.57 deg


def _truth() -> np.ndarray:
    return hand_pelvis()  # tests/_xray_cases.py: AI and IHDI worked out by hand there


def _orig(vis=None, spacing=(0.1, 0.2)):
    return {"image_HW3": np.zeros((H, W, 3), np.uint8), "kpts_px_K2": _truth(),
            "kpts_visible_K": np.ones(12, bool) if vis is None else vis, "spacing_mm_2": np.array(spacing)}


def _samples():
    """A: every point shifted by (3, 4) (5 px each; AI and grades unchanged).
    B: p1 -> (60, 60) (10 px; AI_left = 45 deg) and p12 -> (270, 130) (20 px; h_r = (260, 120): x = y = 20 -> III).
    C: exact prediction, p9 invisible in the truth (right AI and grade not scored), spacing unknown (NaN)."""
    a = _truth() + np.array([3.0, 4.0])
    b = _truth()
    b[0], b[11] = (60, 60), (270, 130)
    vis_c = np.ones(12, bool)
    vis_c[8] = False
    return [({"kpts_px_K2": a}, _orig(), {"id": "A", "index": 0}),
            ({"kpts_px_K2": b}, _orig(), {"id": "B", "index": 1}),
            ({"kpts_px_K2": _truth()}, _orig(vis_c, (float("nan"), float("nan"))), {"id": "C", "index": 2})]


def _run(samples) -> HipXrayAccumulator:
    acc = HipXrayAccumulator()
    for s in samples:
        acc.update_sample(*s)
    return acc


def test_accumulator_figures_match_hand_computed_values():
    fig = _run(_samples()).compute()
    n = 12 + 12 + 11
    assert fig["landmark_mre_px"] == pytest.approx((12 * 5 + 10 + 20) / n)
    assert fig["landmark_mre_pct_diag"] == pytest.approx(100 * 90 / 500 / n)
    mm_a = math.hypot(3 * 0.1, 4 * 0.2)
    assert fig["landmark_mre_mm"] == pytest.approx((12 * mm_a + 10 * 0.2 + 20 * 0.1) / 24)  # C has no spacing
    assert fig["landmark_mre_px_1"] == pytest.approx((5 + 10 + 0) / 3)
    assert fig["landmark_mre_px_9"] == pytest.approx(5 / 2)           # invisible in C
    assert fig["landmark_mre_px_12"] == pytest.approx(25 / 3)
    err_b = 45.0 - AI_L
    assert fig["ai_mae_left_deg"] == pytest.approx(err_b / 3)
    assert fig["ai_mae_right_deg"] == 0.0
    assert fig["ai_mae_deg"] == pytest.approx(err_b / 5)
    assert math.isnan(fig["ai_pearson_r_left"])                        # the true left AI never varies
    t = [AI_L, AI_L, AI_L, AI_R, AI_R]
    p = [AI_L, 45.0, AI_L, AI_R, AI_R]
    assert fig["ai_pearson_r"] == pytest.approx(np.corrcoef(t, p)[0, 1], abs=1e-12)
    assert fig["ihdi_accuracy"] == pytest.approx(4 / 5)
    assert fig["ihdi_accuracy_left"] == 1.0 and fig["ihdi_accuracy_right"] == 0.5
    assert fig["num_images"] == 3 and fig["num_hips_ihdi"] == 5
    for key in HipXrayTask.headline:
        assert key in fig


def test_records_and_confusion_matrices():
    acc = _run(_samples())
    b = acc.records[1]
    assert b["id"] == "B" and b["index"] == 1
    assert b["ai_pred_left_deg"] == pytest.approx(45.0) and b["ai_true_left_deg"] == pytest.approx(AI_L)
    assert (b["ihdi_true_left"], b["ihdi_pred_left"], b["ihdi_true_right"], b["ihdi_pred_right"]) == (1, 1, 2, 3)
    assert b["kpt_err_px"][0] == pytest.approx(10) and b["kpt_err_px"][11] == pytest.approx(20)
    assert b["mre_px"] == pytest.approx(2.5) and b["mre_pct_diag"] == pytest.approx(0.5)
    c = acc.records[2]
    assert math.isnan(c["kpt_err_px"][8]) and math.isnan(c["ai_true_right_deg"]) and c["ihdi_true_right"] == 0
    cm = acc.confusion()
    assert cm[0].tolist() == [[3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert cm[1].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_state_sum_of_two_ranks_equals_one_accumulator():
    s = _samples()
    whole = _run(s).compute()
    r0, r1 = _run(s[:2]), _run(s[2:])
    summed = {k: v + r1.state()[k] for k, v in r0.state().items()}
    merged = HipXrayAccumulator()
    merged.load_state(summed)
    got = merged.compute()
    assert set(got) == set(whole)
    for k in whole:
        assert (math.isnan(got[k]) and math.isnan(whole[k])) or got[k] == pytest.approx(whole[k], abs=1e-12), k
    bad = dict(summed)
    bad.pop("num_images_1")
    with pytest.raises(ValueError, match="num_images_1"):
        merged.load_state(bad)


def test_undefined_prediction_counts_as_wrong_not_absent():
    pred = _truth()
    pred[6] = pred[2]  # p7 == p3: no Hilgenreiner line in the prediction
    acc = _run([({"kpts_px_K2": pred}, _orig(), {"id": "D", "index": 0})])
    fig = acc.compute()
    assert fig["ai_undefined_pred"] == 2 and math.isnan(fig["ai_mae_deg"])
    assert fig["ihdi_undefined_pred"] == 2 and fig["ihdi_accuracy"] == 0.0 and fig["num_hips_ihdi"] == 2
    with pytest.raises(ValueError, match="want pred/true"):
        acc.update_sample({"kpts_px_K2": np.zeros((6, 2))}, _orig(), {"id": "E"})


class _FakeDataset:
    kpt_names = [f"p{k}" for k in range(1, 13)]

    def original(self, i):
        img = np.tile(np.linspace(0, 255, W, dtype=np.uint8)[None, :, None], (H, 1, 3))
        return {**_orig(), "image_HW3": img, "id": "ABC"[i]}


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_figures_are_written_from_records(tmp_path):
    acc = _run(_samples())
    task = HipXrayTask(comparisons_per_bin=1)
    paths = task.write_figures(tmp_path, acc.compute(), acc.records, None, None, _FakeDataset(), None)
    names = sorted(p.name for p in paths)
    for expected in ("landmark_error_px.png", "ai_error.png", "ihdi_confusion_left.png", "ihdi_confusion_right.png",
                     "ihdi_confusion_all.png", "ai_scatter_left.png", "ai_scatter_right.png", "ai_scatter_all.png",
                     "pixel_vs_angle_error.png", "best_1_C.png", "median_1_B.png", "worst_1_A.png"):
        assert expected in names, (expected, names)
    assert all(_is_png(p) for p in paths)
    assert task.write_figures(tmp_path / "none", {}, [], None, None, None, None) == []


def test_predict_row_draw_prediction_and_summary(tmp_path):
    task = HipXrayTask()
    row = task.predict_row({"kpts_px_K2": _truth()}, {"kpt_names": None})
    assert row["ai_left_deg"] == round(AI_L, 2) and row["ai_right_deg"] == round(AI_R, 2)
    assert (row["ihdi_left"], row["ihdi_right"]) == ("I", "II")
    assert (row["p1_x"], row["p1_y"], row["p12_x"], row["p12_y"]) == (60.0, 70.0, 250.0, 130.0)
    vis = np.ones(12, bool)
    vis[4] = False
    out = task.draw_prediction(np.zeros((H, W, 3), np.uint8), {"kpts_px_K2": _truth() + 2},
                               {"kpts_px_K2": _truth(), "kpts_visible_K": vis}, tmp_path / "one.png", title="x")
    assert _is_png(out)
    lines = task.summary_lines(_run(_samples()).compute())
    assert any("80 %" in line for line in lines) and any("MRE 2.57 px" in line for line in lines)


def test_decoder_passes_regression_and_decodes_heatmaps():
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(decode="argmax"),
                                data=types.SimpleNamespace(sigma_px=2.0, heatmap_peak=1.0))
    decode = HipXrayTask().decoder(cfg)
    k = torch.rand(2, 12, 2)
    assert torch.equal(decode({"kpts_px_BK2": k})["kpts_px_BK2"], k)
    heat = torch.zeros(1, 12, 16, 20)
    heat[0, :, 5, 7] = 1.0
    out = decode({"heatmap_BKHW": heat})
    assert torch.equal(out["kpts_px_BK2"][0], torch.tensor([[7.0, 5.0]] * 12))
    with pytest.raises(KeyError):
        decode({"seg_logits_BCHW": heat})
