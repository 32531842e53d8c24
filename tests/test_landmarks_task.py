"""The generic landmark task (engine/tasks/landmarks): options through build_task, the headline's SDR key, figures
for K = 5 and K = 19 with a fake model and dataset, a 68-landmark overlay of a 2500 px image, predict rows, the
optional segmentation figures and the cross-rank sum of the whole accumulator."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError
from engine.tasks import TASKS, build_task
from engine.tasks.landmarks import LandmarksTask
from engine.tasks.landmarks.geometry import mean_shape, similarity_fit
from engine.tasks.landmarks.plots import MAX_DRAWN_SIDE_PX, drawable_image
from models.codecs import decode_outputs

H, W = 120, 160


class _FakeDataset:
    """K landmarks on n gradient images; the network input is the image at half size (to_input = scale 0.5)."""

    def __init__(self, k: int, n: int = 5, spacing=(0.2, 0.2), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kpt_names = [f"lm{i + 1}" for i in range(k)]
        self.truth = rng.uniform(10, [W - 10, H - 10], (n, k, 2))
        self.visible = rng.random((n, k)) > 0.1
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.image = np.tile(np.linspace(0, 255, W, dtype=np.uint8)[None, :, None], (H, 1, 3))

    def __len__(self):
        return len(self.truth)

    def sample_id(self, i):
        return f"img/{i}"

    def original(self, i):
        return {"id": self.sample_id(i), "image_HW3": self.image, "kpts_px_K2": self.truth[i],
                "kpts_visible_K": self.visible[i], "spacing_mm_2": self.spacing}

    def __getitem__(self, i):
        return {"image_CHW": torch.zeros(3, H // 2, W // 2),
                "meta": {"id": self.sample_id(i), "index": i, "to_input_3x3": np.diag([0.5, 0.5, 1.0])}}


class _FixedPoints(torch.nn.Module):
    """Regresses the same points (input frame) for every image."""

    def __init__(self, kpts_K2: np.ndarray):
        super().__init__()
        self.kpts = torch.nn.Parameter(torch.as_tensor(kpts_K2, dtype=torch.float32))

    def forward(self, image_BCHW):
        return {"kpts_px_BK2": self.kpts[None].expand(image_BCHW.shape[0], -1, -1)}


def _decode(outputs):
    return decode_outputs(outputs, method="argmax", sigma=2.0, peak=1.0)


def _evaluated(task: LandmarksTask, ds: _FakeDataset, noise_px: float = 2.0):
    acc = task.accumulator(None, {"kpt_names": ds.kpt_names})
    rng = np.random.default_rng(1)
    for i in range(len(ds)):
        o = ds.original(i)
        acc.update_sample({"kpts_px_K2": o["kpts_px_K2"] + rng.normal(0, noise_px * (i + 1) / 3, o["kpts_px_K2"].shape),
                           "kpt_score_K": np.full(len(ds.kpt_names), 0.9)}, o, {"id": o["id"], "index": i})
    return acc


def _png_size(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 3000, path
    with Image.open(path) as im:
        return im.size


def test_registered_options_and_headline():
    assert TASKS["landmarks"] is LandmarksTask
    task = build_task("landmarks", {"sdr_radii": [1, 2]})
    assert task.sdr_radii == (1.0, 2.0) and task.best_metric == "landmark_mre_px" and task.best_mode == "min"
    assert task.default_format == "coco"
    assert task.headline == ("landmark_mre_px", "landmark_mre_mm", "landmark_median_mm", "sdr_1mm", "pck")
    assert task.headline_keys({"sdr_1px": 50.0, "sdr_2px": 70.0})[3] == "sdr_1px"      # no spacing: px
    assert task.headline_keys({"sdr_1mm": 50.0})[3] == "sdr_1mm"
    with pytest.raises(ConfigError, match="unknown option 'radius'"):
        build_task("landmarks", {"radius": 3})
    for bad, match in (({"sdr_radii": []}, "sdr_radii"), ({"pck_ref": "torso"}, "pck_ref"),
                       ({"pck_thr": 0}, "pck_thr"), ({"num_overlays": -1}, "num_overlays")):
        with pytest.raises(ValueError, match=match):
            build_task("landmarks", bad)
    with pytest.raises(ValueError, match="not among the landmark names"):
        build_task("landmarks", {"pck_ref": ["lm1", "nose"]}).accumulator(None, {"kpt_names": ["lm1", "lm2"]})
    with pytest.raises(ValueError, match="needs the reader's landmark names"):
        build_task("landmarks").accumulator(None, {"kpt_names": []})


def test_figures_summary_and_unit():
    ds = _FakeDataset(4)
    f = _evaluated(LandmarksTask(sdr_radii=(1, 2)), ds).compute()
    assert "sdr_1mm" in f and f["num_images"] == 5 and f["num_landmarks_scored"] == ds.visible.sum()
    nan_ds = _FakeDataset(4, spacing=(np.nan, np.nan))
    g = _evaluated(LandmarksTask(sdr_radii=(1, 2)), nan_ds).compute()
    assert "sdr_1px" in g and math.isnan(g["landmark_mre_mm"])
    assert g["landmark_mre_px"] == pytest.approx(f["landmark_mre_px"])        # same errors, no spacing
    lines = "\n".join(LandmarksTask(sdr_radii=(1, 2)).summary_lines(g))
    assert f"MRE {g['landmark_mre_px']:.3g} px" in lines and "@1px" in lines and "= n/a ± n/a" in lines
    assert "missed 0" in lines and "PCK@0.05 of the bbox distance" in lines


@pytest.mark.parametrize("k", [5, 19])
def test_write_figures_names_the_files_it_writes(k, tmp_path):
    ds = _FakeDataset(k)
    task = LandmarksTask()
    acc = _evaluated(task, ds)
    model = _FixedPoints(ds.truth[0] * 0.5)               # image 0's truth in the input frame
    paths = task.write_figures(tmp_path, acc.compute(), acc.records, None, model, ds, _decode)
    names = sorted(p.name for p in paths)
    mre = sorted((r["mre_px"], r["id"]) for r in acc.records)
    best, median, worst = (mre[i][1].replace("/", "_") for i in (0, 2, 4))
    assert names == sorted(["landmark_error_boxes.png", "sdr_curve.png", "error_heatmap.png",
                            f"overlay_best_{best}.png", f"overlay_median_{median}.png", f"overlay_worst_{worst}.png"])
    for p in paths:
        w, h = _png_size(p)
        assert 300 <= w <= 2500 and 200 <= h <= 2000, (p.name, w, h)
    assert _png_size(tmp_path / "landmark_error_boxes.png")[0] == round(100 * max(6.0, 0.28 * k + 2.0))  # widens
    assert task.write_figures(tmp_path / "none", {}, [], None, None, None, None) == []


def test_overlay_of_68_landmarks_on_a_2500_px_image(tmp_path):
    img = np.zeros((2500, 2400, 3), np.uint8)
    small = drawable_image(img)
    assert max(small.shape[:2]) == MAX_DRAWN_SIDE_PX and small.shape[:2] == (1600, 1536)
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 2400, (68, 2))
    present = np.ones(68, bool)
    present[5] = False
    out = LandmarksTask().draw_prediction(img, {"kpts_px_K2": truth + 15, "kpt_present_K": present},
                                          {"kpts_px_K2": truth, "kpts_visible_K": np.ones(68, bool)},
                                          tmp_path / "big.png", title="68 points")
    w, h = _png_size(out)
    assert w == 800 and 800 <= h <= 900                     # 8 in at 100 dpi, whatever the image size


def test_predict_row_names_confidence_and_absent_points():
    task = LandmarksTask()
    pred = {"kpts_px_K2": np.array([[10.123, 20.5], [30.0, 40.0], [1.0, 2.0]]),
            "kpt_score_K": np.array([0.91234, 0.5, 0.1]), "kpt_present_K": np.array([True, True, False])}
    row = task.predict_row(pred, {"kpt_names": ["nasion", "sella", "menton"]})
    assert row == {"nasion_x": 10.12, "nasion_y": 20.5, "nasion_conf": 0.9123, "sella_x": 30.0, "sella_y": 40.0,
                   "sella_conf": 0.5, "menton_x": None, "menton_y": None, "menton_conf": 0.1}
    row = task.predict_row({"kpts_px_K2": np.ones((2, 2))}, {})
    assert row == {"L1_x": 1.0, "L1_y": 1.0, "L2_x": 1.0, "L2_y": 1.0}          # no names, no scores
    task.load_state_dict({"kpt_names": ["a", "b"]})                              # names from the checkpoint
    assert list(task.predict_row({"kpts_px_K2": np.ones((2, 2))}, {})) == ["a_x", "a_y", "b_x", "b_y"]
    assert LandmarksTask().state_dict() == {"kpt_names": []} and task.state_dict() == {"kpt_names": ["a", "b"]}


def test_segmentation_figures_when_the_reader_has_masks_and_cross_rank_sum():
    ds = _FakeDataset(3)
    task = LandmarksTask()
    data = {"kpt_names": ds.kpt_names, "num_classes": 2, "class_names": ["background", "object"]}
    whole, r0, r1 = (task.accumulator(None, data) for _ in range(3))
    mask = np.zeros((H, W), np.int64)
    mask[20:60, 30:90] = 1
    for i in range(len(ds)):
        o = {**ds.original(i), "mask_HW": mask}
        pred = {"kpts_px_K2": o["kpts_px_K2"] + i, "mask_HW": np.roll(mask, i, axis=1)}
        for acc in (whole, r0 if i < 2 else r1):
            acc.update_sample(pred, o, {"id": o["id"]})
    s0, s1 = r0.state(), r1.state()
    assert any(k.startswith("seg.") for k in s0) and any(k.startswith("landmarks.") for k in s0)
    merged = task.accumulator(None, data)
    merged.load_state({k: s0[k] + s1[k] for k in s0})
    a, b = whole.compute(), merged.compute()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12, nan_ok=True), key
    # shifts 0..4 px of a 60 px wide box: TP 60 - i columns of 40 rows, Dice (whole split) from the summed counts
    tp = sum(40 * (60 - i) for i in range(5))
    assert a["seg_dice"] == pytest.approx(2 * tp / (2 * 5 * 2400))
    assert "seg_dice" not in task.accumulator(None, {"kpt_names": ds.kpt_names}).compute()


def test_mean_shape_undoes_a_similarity_transform():
    base = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 5.0], [0.0, 8.0]])
    angle = math.radians(30)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = 2.5 * base @ rot.T + [40.0, -7.0]
    s, r, t = similarity_fit(moved, base)
    assert s == pytest.approx(0.4) and r == pytest.approx(rot.T) and (s * moved @ r.T + t) == pytest.approx(base)
    hidden = moved.copy()
    hidden[3] = np.nan                                      # invisible in one image: aligned on the other three
    np.testing.assert_allclose(mean_shape(np.stack([base, moved, hidden])), base, atol=1e-9)
    assert mean_shape(np.array([[[3.0, 4.0]], [[5.0, 6.0]]])) == pytest.approx(np.array([[4.0, 5.0]]))  # K = 1
