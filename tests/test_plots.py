"""Report figures (engine/plots.py): each writes a PNG of a sensible size; curves only for logged fields."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from engine.plots import _line_across, plot_overlay, plot_per_class_bars, plot_sdr_curve, plot_training_curves
from engine.tasks.hip_us.plots import plot_angle_agreement


def _open_png(path, min_wh=(300, 200), max_wh=(3000, 2000)) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_wh[0] <= w <= max_wh[0] and min_wh[1] <= h <= max_wh[1], im.size
        return np.asarray(im.convert("RGB"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_curves_only_for_fields_present(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 2.0 / (s + 1), "lr": 1e-3} for s in range(0, 60, 2)]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    assert [p.name for p in plot_training_curves(path, tmp_path / "a")] == ["curve_loss.png"]

    rows += [{"step": 20, "split": "val", "loss": 0.3, "seg_miou": 0.4, "alpha_mae_deg": 4.0, "beta_mae_deg": None,
              "landmark_mre_px": None},   # null = NaN written by the run logger: not a field that exists
             {"step": 40, "split": "val", "loss": 0.2, "seg_miou": 0.6, "alpha_mae_deg": 3.0}]
    path = _write_jsonl(tmp_path / "b.jsonl", rows)
    written = plot_training_curves(path, tmp_path / "b")
    assert [p.name for p in written] == ["curve_loss.png", "curve_miou.png", "curve_angles.png"]
    for p in written:
        _open_png(p)

    rows.append({"step": 40, "split": "val", "landmark_mre_px": 3.5, "landmark_mre_mm": 0.4})
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    assert [p.name for p in plot_training_curves(path, tmp_path / "c")] == [
        "curve_loss.png", "curve_landmark_error.png", "curve_miou.png", "curve_angles.png"]


def test_training_curves_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 2"):
        plot_training_curves(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path)


def test_line_across_clips_to_the_image_frame():
    seg = _line_across(np.array([3.0, 5.0]), np.array([4.0, 5.0]), w=20, h=10)  # horizontal through y = 5
    np.testing.assert_allclose(seg, [[-0.5, 5.0], [19.5, 5.0]])
    seg = _line_across(np.array([0.0, 0.0]), np.array([1.0, 1.0]), w=10, h=10)  # the diagonal
    np.testing.assert_allclose(seg, [[-0.5, -0.5], [9.5, 9.5]])
    assert _line_across(np.array([1.0, 1.0]), np.array([1.0, 1.0]), w=10, h=10) is None
    assert _line_across(np.array([0.0, 50.0]), np.array([1.0, 50.0]), w=10, h=10) is None


def _hip_kpts():
    return np.array([[100, 20], [100, 110], [60, 180], [130, 100], [95, 150], [105, 108]], dtype=np.float64)


def test_overlay_draws_mask_colours_landmarks_and_truth(tmp_path):
    h, w = 200, 260
    image = np.zeros((h, w), np.uint8)
    mask = np.zeros((h, w), np.int64)
    mask[120:180, 100:180] = 1
    plain = _open_png(plot_overlay(image, np.zeros_like(mask), _hip_kpts(), tmp_path / "plain.png"))
    drawn = _open_png(plot_overlay(image, mask, _hip_kpts(), tmp_path / "o.png", true_mask_HW=np.roll(mask, 4, 1),
                                   true_kpts_K2=_hip_kpts() + 2.0, class_names=["bg", "femoral head"],
                                   title="hip 7"))
    # class 1 is #e6194b at alpha 0.42 over black: about (97, 10, 32); absent from the empty-mask figure
    def reddish(a):
        return ((a[..., 0] > 70) & (a[..., 0] < 130) & (a[..., 1] < 30) & (a[..., 2] > 15) & (a[..., 2] < 50)).sum()
    assert reddish(drawn) > 2000 and reddish(plain) < 50
    # three RGB overlay (H, W, 3) works too
    _open_png(plot_overlay(np.zeros((h, w, 3), np.uint8), mask, _hip_kpts()[:4], tmp_path / "rgb.png"))


def test_overlay_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        plot_overlay(np.zeros((10, 10), np.float32), np.zeros((10, 10)), _hip_kpts(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="pred_mask_HW"):
        plot_overlay(np.zeros((10, 10), np.uint8), np.zeros((10, 12)), _hip_kpts(), tmp_path / "x.png")


def test_angle_agreement_sdr_and_bars_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.uniform(45, 75, 60)
    pred = true + rng.normal(0, 2, 60)
    pred[0] = math.nan  # dropped
    _open_png(plot_angle_agreement(true, pred, tmp_path / "alpha.png", name="alpha"), min_wh=(800, 350))
    _open_png(plot_angle_agreement(true, pred, tmp_path / "beta.png", name="beta"), min_wh=(800, 350))
    dist = np.append(rng.gamma(2.0, 0.5, 200), math.nan)
    _open_png(plot_sdr_curve(dist, tmp_path / "sdr.png"))
    _open_png(plot_per_class_bars({"femoral head": 0.94, "labrum": 0.81, "Y cartilage": math.nan},
                                  tmp_path / "sub" / "bars.png", ylabel="Dice"))
    with pytest.raises(ValueError, match="no pair"):
        plot_angle_agreement([math.nan], [1.0], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no finite distance"):
        plot_sdr_curve([math.nan], tmp_path / "none.png")
