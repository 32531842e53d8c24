"""spine_disc task: DTT / FNR / FPR / PCK / MRE on hand-computed cases, cross-rank sums, figures, predict rows."""
import math
import types

import numpy as np
import pytest
import torch

from engine.tasks.spine_disc import SpineDiscAccumulator, SpineDiscTask

NAN = float("nan")


def _orig(true, visible, width, height=160, spacing=(0.5, 0.5)):
    return {"kpts_px_K2": np.asarray(true, dtype=np.float32), "kpts_visible_K": np.asarray(visible, dtype=bool),
            "spacing_mm_2": np.asarray(spacing, dtype=np.float64),
            "image_HW3": np.zeros((height, width, 3), np.uint8)}


def _pred(kpts, present):
    return {"kpts_px_K2": np.asarray(kpts, dtype=np.float32), "kpt_present_K": np.asarray(present, dtype=bool)}


# Four images, K = 4 discs, spacing 0.5 mm/px on both axes (hand computation in the comments).
IMAGES = [
    # 1: W = 200 -> PCK threshold 0.5 * 200 / 10 = 10 px.
    #    truth d0 (50,20) d1 (50,60) d2 (50,100); preds p0 (53,24) p1 (50,74) p2 absent (placed ON d2) p3 (50,120).
    #    d0: nearest p0 5 px = 2.5 mm, dy 2 mm -> found.  d1: p1 dy 14 px = 7.0 mm exactly -> found (boundary), DTT 7.
    #    d2: p3 dy 10 mm, p1 dy 13 mm -> FN; DTT 10.  p3: 10.0 mm from d2 exactly -> not FP (boundary).
    #    matched: d0-p0 5 px (PCK hit), d1-p1 14 px (miss), d2 absent prediction (miss).
    ("a", _pred([[53, 24], [50, 74], [50, 100], [50, 120]], [1, 1, 0, 1]),
     _orig([[50, 20], [50, 60], [50, 100], [0, 0]], [1, 1, 1, 0], width=200)),
    # 2: W = 100 -> threshold 5 px.  truth d0 (30,30) d1 (30,70); preds p0 (34,33) p1 absent p2 (30,90.2) p3 (30,50).
    #    d0: p0 5 px = 2.5 mm, found.  d1: p3 dy 10 mm, p2 dy 10.1 mm -> FN; DTT 10.
    #    p2: 10.1 mm from d1 -> FP.  p3: 10.0 mm from both -> not FP.  d0-p0 5 px: 5 / 10 = 0.5, not < 0.5 -> miss.
    ("b", _pred([[34, 33], [0, 0], [30, 90.2], [30, 50]], [1, 0, 1, 1]),
     _orig([[30, 30], [30, 70], [0, 0], [0, 0]], [1, 1, 0, 0], width=100)),
    # 3: no predictions at all: the true disc is a FN with no DTT (dtt_undefined).
    ("c", _pred(np.zeros((4, 2)), [0, 0, 0, 0]), _orig([[10, 10], [0, 0], [0, 0], [0, 0]], [1, 0, 0, 0], width=100)),
    # 4: no true discs: the one prediction is a FP.
    ("d", _pred([[0, 0], [0, 0], [20, 20], [0, 0]], [0, 0, 1, 0]), _orig(np.zeros((4, 2)), [0, 0, 0, 0], width=100)),
]


def _fed(images, **kw):
    acc = SpineDiscAccumulator(num_keypoints=4, **kw)
    for name, pred, orig in images:
        acc.update_sample(pred, orig, {"id": name})
    return acc


def test_hand_computed_figures_over_four_images():
    out = _fed(IMAGES).compute()
    assert out["num_true_discs"] == 6 and out["num_fn"] == 3
    assert out["fnr_pct"] == pytest.approx(50.0)
    assert out["num_predictions"] == 7 and out["num_fp"] == 2
    assert out["fpr_pct"] == pytest.approx(200.0 / 7.0)
    assert out["dtt_mm"] == pytest.approx((2.5 + 7.0 + 10.0 + 2.5 + 10.0) / 5)
    assert out["dtt_undefined"] == 1
    assert out["landmark_mre_mm"] == pytest.approx((2.5 + 7.0 + 2.5) / 3)
    assert out["landmark_mre_px"] == pytest.approx((5 + 14 + 5) / 3)
    assert out["pck"] == pytest.approx(1 / 6)
    assert out["num_images"] == 4
    assert (out["dtt_mm_1"], out["dtt_mm_2"], out["dtt_mm_3"]) == pytest.approx((2.5, 8.5, 10.0))
    assert math.isnan(out["dtt_mm_4"])
    assert out["fnr_pct_1"] == pytest.approx(100 / 3) and out["fnr_pct_2"] == pytest.approx(50.0)


def test_per_image_records():
    acc = _fed(IMAGES)
    a, b, c, d = acc.records
    assert a["id"] == "a" and a["num_fn"] == 1 and a["num_fp"] == 0
    assert a["fn"] == [False, False, True, None] and a["fp"] == [False, False, None, False]
    assert a["dtt_mm"][:3] == pytest.approx([2.5, 7.0, 10.0])
    assert a["dtt_mm"][3] is None and a["pred_px"][2] is None and a["true_px"][3] is None
    assert b["fp"] == [False, None, True, False] and b["err_mm"][0] == pytest.approx(2.5)
    assert c["dtt_mm"][0] is None and c["fn"][0] is True and c["num_pred"] == 0
    assert d["num_true"] == 0 and d["num_fp"] == 1


def test_boundaries_move_with_the_configured_thresholds():
    strict = _fed(IMAGES[:2], fn_si_mm=6.99, fp_si_mm=9.99).compute()
    # d1 of image a (7.0 mm) becomes a FN; p3 of a and p3 of b (10.0 mm) become FPs.
    assert strict["num_fn"] == 3 and strict["num_fp"] == 3
    loose = _fed(IMAGES[:2], pck_thr=0.51).compute()       # 5 px / 10 px = 0.5 < 0.51 now hits too
    assert loose["pck"] == pytest.approx(2 / 5)


def test_absent_predictions_are_not_predictions():
    # the absent channel sits exactly on the truth: counted, it would give DTT 0 and no FN
    pred = _pred([[0, 0], [50, 100]], [0, 0])
    acc = SpineDiscAccumulator(num_keypoints=2)
    acc.update_sample(pred, _orig([[0, 0], [50, 100]], [0, 1], width=100), {"id": "x"})
    out = acc.compute()
    assert out["num_fn"] == 1 and out["num_predictions"] == 0 and math.isnan(out["dtt_mm"])
    assert math.isnan(out["fpr_pct"]) and out["pck"] == 0.0
    # without kpt_present_K every channel counts as predicted
    acc2 = SpineDiscAccumulator(num_keypoints=2)
    acc2.update_sample({"kpts_px_K2": np.array([[0, 0], [50, 100]], np.float32)},
                       _orig([[0, 0], [50, 100]], [0, 1], width=100), {"id": "y"})
    assert acc2.compute()["dtt_mm"] == 0.0 and acc2.compute()["num_fp"] == 1    # (0, 0) is 50 mm away


def test_anisotropic_spacing_uses_si_spacing_for_fn_fp():
    # spacing x 2 mm, y 0.25 mm: a prediction 20 px below (5 mm S-I) and 4 px aside (8 mm A-P) is found, not FP
    acc = SpineDiscAccumulator(num_keypoints=1)
    acc.update_sample(_pred([[14, 40]], [1]), _orig([[10, 20]], [1], width=100, spacing=(2.0, 0.25)), {"id": "s"})
    out = acc.compute()
    assert out["num_fn"] == 0 and out["num_fp"] == 0
    assert out["dtt_mm"] == pytest.approx(math.hypot(8.0, 5.0))


def test_cross_rank_sum_of_two_accumulators_equals_one():
    one = _fed(IMAGES)
    rank0, rank1 = _fed(IMAGES[:1]), _fed(IMAGES[1:])
    summed = {k: rank0.state()[k] + rank1.state()[k] for k in rank0.state()}
    merged = SpineDiscAccumulator(num_keypoints=4)
    merged.load_state(summed)
    a, b = merged.compute(), one.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k]), k
    # a per-rank mean of DTT would differ: rank 0 alone is 19.5 / 3, rank 1 is 12.5 / 2
    assert (rank0.compute()["dtt_mm"] + rank1.compute()["dtt_mm"]) / 2 != pytest.approx(b["dtt_mm"])
    with pytest.raises(ValueError, match="keys differ"):
        merged.load_state({"true_K": torch.zeros(4)})


def test_bad_inputs_name_the_problem():
    acc = SpineDiscAccumulator(num_keypoints=3)
    with pytest.raises(ValueError, match="expected 3 discs"):
        acc.update_sample(_pred(np.zeros((2, 2)), [1, 1]), _orig(np.zeros((3, 2)), [1, 1, 1], 10), {"id": "z"})
    with pytest.raises(ValueError, match="non-finite prediction"):
        acc.update_sample(_pred([[NAN, 1], [1, 1], [1, 1]], [1, 1, 1]), _orig(np.zeros((3, 2)), [1, 1, 1], 10), {})
    with pytest.raises(ValueError, match="fn/fp"):
        SpineDiscTask(fn_si_mm=-1.0)


def test_task_headline_and_summary():
    task = SpineDiscTask()
    assert task.name == "spine_disc" and task.default_format == "nifti" and task.best_metric == "dtt_mm"
    assert task.headline == ("dtt_mm", "fnr_pct", "fpr_pct", "pck", "landmark_mre_mm")
    acc = task.accumulator(None, {"kpt_names": ["d1", "d2", "d3", "d4"]})
    for name, pred, orig in IMAGES:
        acc.update_sample(pred, orig, {"id": name})
    lines = "\n".join(task.summary_lines(acc.compute()))
    assert "DTT 6.4 mm" in lines and "FNR 50 %" in lines and "FPR 28.6 %" in lines


def test_predict_row_in_pixels_and_mm():
    task = SpineDiscTask()
    row = task.predict_row(_pred([[10, 20], [30.456, 40]], [1, 0]),
                           {"spacing_mm_2": np.array([0.5, 2.0]), "kpt_names": ["disc1", "disc2"]})
    assert row == {"num_discs": 1, "disc1_present": True, "disc1_x": 10.0, "disc1_y": 20.0, "disc1_x_mm": 5.0,
                   "disc1_y_mm": 40.0, "disc2_present": False, "disc2_x": None, "disc2_y": None, "disc2_x_mm": None,
                   "disc2_y_mm": None}


class _FakeDataset:
    kpt_names = ["disc1", "disc2", "disc3", "disc4"]

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def sample_id(self, i):
        return self.images[i][0]

    def original(self, i):
        return self.images[i][2]


def _png_ok(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_figures_written(tmp_path):
    task = SpineDiscTask()
    acc = _fed(IMAGES)
    paths = task.write_figures(tmp_path, acc.compute(), acc.records, None, None, _FakeDataset(IMAGES), None)
    assert sorted(p.name for p in paths) == ["dtt_per_disc.png", "fn_fp_summary.png", "sagittal_overlays.png"]
    assert all(_png_ok(p) for p in paths)
    name, pred, orig = IMAGES[0]
    one = task.draw_prediction(orig["image_HW3"], pred, orig, tmp_path / "one.png", title=name)
    assert _png_ok(one)


def test_decoder_and_prior_fitted_on_the_training_labels(tmp_path):
    import models.skeleton  # noqa: F401  (the decoder's module: a broken import must fail here, not skip)
    from data_pipelines.readers.nifti_reader import SpineDataset
    from data_pipelines.synthetic.spine import generate_spine_dataset
    paths = generate_spine_dataset(tmp_path / "d", 4, seed=3, shape=(6, 160, 96))
    ds = SpineDataset(paths, input_hw=(128, 128), sigma_px=2.0)
    task = SpineDiscTask()
    task.fit(ds)
    state = task.state_dict()
    task2 = SpineDiscTask()
    task2.load_state_dict(state)
    np.testing.assert_allclose(task2.prior.offsets_K2, task.prior.offsets_K2)
    kpts, vis = ds.keypoints_original()     # disc 5 (the reference) sits at offset (0, 1) after normalisation
    assert task.prior.offsets_K2[4, 1] == pytest.approx(1.0, abs=0.05) and vis.shape == (4, 11)
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(decode="argmax"),
                                data=types.SimpleNamespace(heatmap_peak=1.0))
    sample = ds[0]
    out = task2.decoder(cfg)({"heatmap_BKHW": sample["heatmap_KHW"][None]})
    vis = sample["kpts_visible_K"].numpy()
    present = np.asarray(out["kpt_present_BK"][0], dtype=bool)
    assert present[vis].all() and not present[~vis].any()
    err = np.abs(np.asarray(out["kpts_px_BK2"][0])[vis] - sample["kpts_px_K2"].numpy()[vis])
    assert err.max() <= 0.75     # argmax of a rendered Gaussian: within rounding of the true point


def test_summary_lines_print_the_counts_and_rates():
    from engine.tasks.spine_disc import SpineDiscTask
    lines = SpineDiscTask().summary_lines({"dtt_mm": 1.40186, "fnr_pct": 1.6529, "fpr_pct": float("nan"), "pck": 0.7,
                                           "num_true_discs": 121.0, "num_predictions": 123.0})
    text = "\n".join(lines)
    assert "DTT 1.4 mm" in text and "FNR 1.65 %" in text and "FPR n/a" in text
    assert "true discs 121 " in text and text.rstrip().endswith("predictions 123")
