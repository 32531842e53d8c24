import collections
import csv
import logging
import math
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from data_pipelines.batch import collate_samples
from data_pipelines.errors import DataError, OptionError
from data_pipelines.by_format import build_hc18_data
from data_pipelines.by_format import load_hc18_for_predict as load_for_predict
from data_pipelines.readers.hc18 import (HC18_COLUMNS, HC18_FLIP_PAIRS, HC18_KPT_NAMES, HC18Dataset, HC18Record,
                                         order_axis_points, read_mask, scan_hc18)
from data_pipelines.synthetic.hc18 import exam_plan, generate_hc18_dataset, ramanujan_perimeter, synth_hc18_sample
from data_pipelines.transforms import AugmentParams
from engine.config import DataConfig
from engine.tasks.fetal_head.ellipse import Ellipse, axis_endpoints, hc_mm_from_mask, rasterize_ellipse

HC18 = SHARED_DATA / "hc18"
needs_hc18 = pytest.mark.skipif(not HC18.is_dir(), reason="shared HC18 subset not present")
STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)
NO_INTENSITY = dict(brightness=0.0, contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), speckle_sigma_max=0.0,
                    blur_p=0.0)


def _rules_hold(k: np.ndarray) -> bool:
    """README: ofd1 = smaller x (ties: smaller y); bpd1 = smaller y (ties: smaller x)."""
    ofd = k[0, 0] < k[1, 0] or (k[0, 0] == k[1, 0] and k[0, 1] <= k[1, 1])
    bpd = k[2, 1] < k[3, 1] or (k[2, 1] == k[3, 1] and k[2, 0] <= k[3, 0])
    return bool(ofd and bpd)


# ------------------------------------------------------------------------------------------------ the real subset
@pytest.fixture(scope="module")
def real():
    records, skipped = scan_hc18(HC18)
    return records, skipped


@needs_hc18
def test_real_subset_loads_every_row_grouped_by_exam(real):
    records, skipped = real
    assert len(records) == 250 and skipped == []
    groups = collections.Counter(r.exam_id for r in records)
    assert len(groups) == 200
    assert groups["392"] == 3 and sorted(r.stem for r in records if r.exam_id == "392") == \
        ["392_2HC", "392_3HC", "392_HC"]
    assert sum(1 for r in records if r.stem.endswith("_2HC")) == 45
    assert all(r.stem.split("_")[0] == r.exam_id and int(r.exam_id) % 2 == 0 for r in records)
    sizes = collections.Counter((r.width, r.height) for r in records)
    assert sizes[(800, 540)] == 243 and all(w <= 800 and 540 <= h <= 544 for w, h in sizes)
    assert all(0.05 < r.pixel_size_mm < 0.3 for r in records)


@needs_hc18
def test_real_landmarks_follow_the_ordering_rules_and_the_ellipse(real):
    for r in real[0]:
        k = r.kpts_px_42
        assert _rules_hold(k), r.stem
        e = r.ellipse
        # the CSV's points are the ends of the CSV's axes (3 decimals in the file, angle to 0.01 deg)
        ends = axis_endpoints(e["center_x"], e["center_y"], e["semi_major_px"], e["semi_minor_px"], e["angle_deg"])
        assert np.abs(ends - k).max() < 0.05, r.stem
        assert np.hypot(*(k[1] - k[0])) >= np.hypot(*(k[3] - k[2]))     # ofd is the long axis
        hc_fit = ramanujan_perimeter(e["semi_major_px"], e["semi_minor_px"]) * r.pixel_size_mm
        assert abs(hc_fit - r.hc_fit_mm) < 0.006 and abs(r.hc_fit_mm - r.hc_mm) < 0.03, r.stem


@needs_hc18
def test_real_masks_are_binary_and_landmarks_lie_on_their_boundary(real):
    for r in real[0]:
        mask = read_mask(r)
        assert mask.dtype == np.uint8 and mask.max() == 1 and mask.min() == 0
        for x, y in r.kpts_px_42:
            # within 1.5 px of the landmark there are pixel centres both inside and outside the head
            x0, y0 = int(round(x)), int(round(y))
            ys, xs = np.mgrid[max(y0 - 2, 0):min(y0 + 3, r.height), max(x0 - 2, 0):min(x0 + 3, r.width)]
            near = np.hypot(xs - x, ys - y) <= 1.5
            vals = mask[ys[near], xs[near]]
            assert vals.min() == 0 and vals.max() == 1, (r.stem, x, y)


@needs_hc18
def test_real_sample_letterbox_geometry(real):
    records = real[0]
    ds = HC18Dataset(records[:3], input_hw=(224, 320), sigma_px=2.0, heatmap_peak=1.0)
    s, o = ds[0], ds.original(0)
    r = records[0]
    scale = 320 / r.width                                  # 0.4 for 800 px wide images
    pad_y = (224 - r.height * scale) / 2
    expected = (r.kpts_px_42 + 0.5) * scale - 0.5 + np.array([0.0, pad_y])
    np.testing.assert_allclose(s["kpts_px_K2"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(s["spacing_mm_2"].numpy(), r.pixel_size_mm / scale, rtol=1e-6)
    assert s["image_CHW"].shape == (3, 224, 320) and torch.equal(s["image_CHW"][0], s["image_CHW"][2])
    assert set(torch.unique(s["mask_HW"]).tolist()) == {0, 1}
    for k in range(4):      # each heatmap peaks at its landmark
        yy, xx = np.unravel_index(int(s["heatmap_KHW"][k].argmax()), (224, 320))
        assert abs(xx - expected[k, 0]) <= 0.5 and abs(yy - expected[k, 1]) <= 0.5
    assert o["hc_mm"] == r.hc_mm and o["ellipse"]["semi_major_px"] == r.ellipse["semi_major_px"]
    assert o["image_HW3"].shape == (r.height, r.width, 3) and ds.group_id(0) == r.exam_id and ds.stratum(0) is None
    np.testing.assert_array_equal(o["spacing_mm_2"], [r.pixel_size_mm] * 2)


@needs_hc18
def test_real_splits_never_cut_an_exam(tmp_path):
    cfg = DataConfig(root=str(HC18), synthetic=False, input_hw=(224, 320), augment=False, cache_decoded=False)
    data = build_hc18_data(cfg, tmp_path, STRATEGY, seed=0)
    part_of = {}
    for part in ("train", "val", "test"):
        ds = data[part]
        for i in range(len(ds)):
            assert part_of.setdefault(ds.group_id(i), part) == part
    assert sum(len(data[p]) for p in ("train", "val", "test")) == 250
    assert (tmp_path / "splits.json").is_file() and data["num_classes"] == 2
    assert data["kpt_names"] == list(HC18_KPT_NAMES) and data["class_names"] == ["background", "head"]


# ----------------------------------------------------------------------------------------- synthetic generator
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("hc18_synth")
    generate_hc18_dataset(root, 10, seed=3, image_hw=(90, 120))
    return root


def _rows(root):
    with open(root / "annotations.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_synthetic_annotations_satisfy_the_readme(synth):
    rows = _rows(synth)
    assert list(rows[0]) == list(HC18_COLUMNS) and len(rows) == 10
    sizes = collections.Counter(r["exam_id"] for r in rows)
    assert set(sizes.values()) <= {1, 2} and 2 in sizes.values()
    records, skipped = scan_hc18(synth)
    assert skipped == [] and len(records) == 10
    for r in records:
        e = r.ellipse
        assert _rules_hold(r.kpts_px_42)
        ends = axis_endpoints(e["center_x"], e["center_y"], e["semi_major_px"], e["semi_minor_px"], e["angle_deg"])
        np.testing.assert_allclose(ends, r.kpts_px_42, atol=2e-3)
        assert 0.1 <= r.pixel_size_mm <= 0.2
        assert r.hc_mm == pytest.approx(ramanujan_perimeter(e["semi_major_px"], e["semi_minor_px"])
                                        * r.pixel_size_mm, rel=1e-4)
        mask = read_mask(r)
        assert abs(hc_mm_from_mask(mask, r.pixel_size_mm) - r.hc_mm) < 0.01 * r.hc_mm
        drawn = rasterize_ellipse(mask.shape, Ellipse(e["center_x"], e["center_y"], e["semi_major_px"],
                                                      e["semi_minor_px"], e["angle_deg"]))
        assert (drawn != mask).mean() < 1e-3           # the CSV's rounded ellipse redraws the mask


def test_synthetic_samples_are_a_function_of_seed_and_index():
    a = synth_hc18_sample(4, seed=7, image_hw=(60, 80), n=5)
    b = synth_hc18_sample(4, seed=7, image_hw=(60, 80), n=50)        # the exam plan is prefix-stable
    c = synth_hc18_sample(4, seed=8, image_hw=(60, 80), n=5)
    assert np.array_equal(a["image_HW"], b["image_HW"]) and a["row"] == b["row"]
    assert not np.array_equal(a["image_HW"], c["image_HW"])
    assert exam_plan(30, 1)[:10] == exam_plan(10, 1)
    assert ramanujan_perimeter(3.0, 3.0) == pytest.approx(2 * math.pi * 3.0)


# --------------------------------------------------------------------------------------------- bad inputs
def _fresh(synth, tmp_path):
    root = tmp_path / "hc18"
    shutil.copytree(synth, root)
    return root


def _edit_csv(root, fn):
    rows = _rows(root)
    fields = list(rows[0])
    rows, fields = fn(rows, fields)
    with open(root / "annotations.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def _set(i, col, value):
    def fn(rows, fields):
        rows[i][col] = value
        return rows, fields
    return fn


def test_missing_column_names_the_csv_and_the_column(synth, tmp_path):
    root = _fresh(synth, tmp_path)
    _edit_csv(root, lambda rows, fields: (rows, [f for f in fields if f != "pixel_size_mm"]))
    with pytest.raises(DataError, match="missing column.*pixel_size_mm") as err:
        scan_hc18(root, skip_bad=True)      # a file-level problem is never skipped
    assert err.value.path == str(root / "annotations.csv")


@pytest.mark.parametrize("col,value,problem", [
    ("hc_mm", "abc", "row 3 .*column 'hc_mm' = 'abc' is not a number"),
    ("ofd1_x", "", "row 3 .*column 'ofd1_x' = '' is not a number"),
    ("pixel_size_mm", "0", "row 3 .*'pixel_size_mm' must be > 0"),
    ("pixel_size_mm", "-0.1", "row 3 .*'pixel_size_mm' must be > 0"),
    ("pixel_size_mm", "nan", "row 3 .*'pixel_size_mm' = 'nan' is not finite"),
    ("bpd2_x", "500", "row 3 .*landmark bpd2 \\(500, .*outside the 120x90 image"),
    ("width", "12.5", "row 3 .*'width' must be a positive integer"),
])
def test_bad_csv_values_name_the_row_and_column(synth, tmp_path, col, value, problem):
    root = _fresh(synth, tmp_path)
    _edit_csv(root, _set(1, col, value))           # second data row = line 3 of the file
    with pytest.raises(DataError, match=problem) as err:
        scan_hc18(root)
    assert err.value.path == str(root / "annotations.csv")


def _stem(root, i):
    return _rows(root)[i]["stem"]


@pytest.mark.parametrize("case,problem", [
    ("image_missing", "image not found"),
    ("image_garbage", "image does not decode"),
    ("image_size", "image is 60x90 \\(W x H\\) but annotations.csv row 4 says 120x90"),
    ("mask_missing", "mask not found"),
    ("mask_size", "mask is 120x80 \\(W x H\\) but the image is 120x90"),
    ("mask_values", "mask values must be 0/1, found \\[0, 255\\]"),
])
def test_bad_files_name_the_file(synth, tmp_path, case, problem):
    root = _fresh(synth, tmp_path)
    stem = _stem(root, 2)
    img, msk = root / "images" / f"{stem}.png", root / "masks" / f"{stem}.png"
    if case == "image_missing":
        img.unlink()
    elif case == "image_garbage":
        img.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif case == "image_size":
        Image.fromarray(np.zeros((90, 60), np.uint8)).save(img)
    elif case == "mask_missing":
        msk.unlink()
    elif case == "mask_size":
        Image.fromarray(np.zeros((80, 120), np.uint8)).save(msk)
    else:
        Image.fromarray(np.asarray(Image.open(msk)) * 255).save(msk)
    with pytest.raises(DataError, match=problem) as err:
        scan_hc18(root)
    assert err.value.path == str(msk if case.startswith("mask") else img)


def test_skip_bad_counts_and_logs(synth, tmp_path, caplog):
    root = _fresh(synth, tmp_path)
    _edit_csv(root, _set(0, "pixel_size_mm", ""))
    (root / "images" / f"{_stem(root, 5)}.png").unlink()
    with caplog.at_level(logging.WARNING):
        records, skipped = scan_hc18(root, skip_bad=True)
    assert len(records) == 8 and len(skipped) == 2
    assert skipped[0][0].endswith("annotations.csv") and "row 2" in skipped[0][1]
    assert skipped[1][0].endswith(f"{_stem(root, 5)}.png") and skipped[1][1] == "image not found"
    assert "skipped 2 bad" in caplog.text
    ds = HC18Dataset(records, skipped=skipped, input_hw=(64, 96))
    assert ds.skipped == skipped and len(ds) == 8


def test_duplicate_stem_and_missing_folder(synth, tmp_path):
    root = _fresh(synth, tmp_path)
    _edit_csv(root, _set(1, "stem", _stem(root, 0)))
    with pytest.raises(DataError, match="row 3: stem .* appears twice"):
        scan_hc18(root)
    with pytest.raises(DataError, match="annotations.csv not found"):
        scan_hc18(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ flips, order
def _record(tmp_path, angle_deg, hw=(90, 120), a=30.0, b=22.0, name="x"):
    """A one-image layout holding an ellipse at `angle_deg` through the image centre."""
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    cx, cy = (hw[1] - 1) / 2, (hw[0] - 1) / 2
    e = Ellipse(cx, cy, a, b, angle_deg)
    mask = rasterize_ellipse(hw, e)
    Image.fromarray(mask * 200 + 20).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    return HC18Record(name, "000", tmp_path / "images" / f"{name}.png", tmp_path / "masks" / f"{name}.png", hw[1],
                      hw[0], 0.1, 1.0, 1.0, axis_endpoints(cx, cy, a, b, angle_deg),
                      {"center_x": cx, "center_y": cy, "semi_major_px": a, "semi_minor_px": b,
                       "angle_deg": angle_deg}, 2)


def _flip_only(p=1.0):
    return AugmentParams(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, flip_p=p,
                         flip_pairs=HC18_FLIP_PAIRS, **NO_INTENSITY)


def test_horizontal_flip_swaps_ofd_and_keeps_bpd(tmp_path):
    rec = _record(tmp_path, 30.0)
    plain = HC18Dataset([rec], input_hw=(96, 128), heatmap_impl="numpy")[0]
    flip = HC18Dataset([rec], input_hw=(96, 128), augment=_flip_only(), heatmap_impl="numpy")[0]
    assert flip["meta"]["flipped"]
    mirror = (lambda k: np.stack([127 - k[:, 0], k[:, 1]], 1))
    p, f = plain["kpts_px_K2"].numpy(), flip["kpts_px_K2"].numpy()
    np.testing.assert_allclose(f[0], mirror(p)[1], atol=1e-4)      # new ofd1 = mirrored old ofd2
    np.testing.assert_allclose(f[1], mirror(p)[0], atol=1e-4)
    np.testing.assert_allclose(f[2:], mirror(p)[2:], atol=1e-4)    # bpd keeps its order (y unchanged)
    assert _rules_hold(f) and _rules_hold(p)
    np.testing.assert_array_equal(flip["mask_HW"].numpy(), plain["mask_HW"].numpy()[:, ::-1])
    yy, xx = np.unravel_index(int(flip["heatmap_KHW"][0].argmax()), (96, 128))
    assert abs(xx - f[0, 0]) <= 0.5 and abs(yy - f[0, 1]) <= 0.5


def test_flip_of_a_vertical_long_axis_keeps_ofd_by_the_tie_rule(tmp_path):
    # angle 90: both long-axis ends share x, so ofd1 is the upper end before and after a mirror; the flip pair alone
    # would swap them, the re-imposed README order puts them back
    rec = _record(tmp_path, 90.0)
    flip = HC18Dataset([rec], input_hw=(96, 128), augment=_flip_only(), heatmap_impl="numpy")[0]
    k = flip["kpts_px_K2"].numpy()
    assert abs(k[0, 0] - k[1, 0]) < 1e-3 and k[0, 1] < k[1, 1] and _rules_hold(k)


def test_rotation_across_the_vertical_keeps_the_order(tmp_path):
    rec = _record(tmp_path, 88.0)
    aug = AugmentParams(rotation_deg=10.0, scale_range=(1.0, 1.0), translate_frac=0.0, flip_p=0.5,
                        flip_pairs=HC18_FLIP_PAIRS, **NO_INTENSITY)
    ds = HC18Dataset([rec], input_hw=(96, 128), augment=aug, heatmap_impl="numpy")
    seen = set()
    for epoch in range(24):
        s = ds[(0, epoch)]
        k = s["kpts_px_K2"].numpy()
        assert _rules_hold(k)
        seen.add(bool(k[1, 1] > k[0, 1]))     # long axis falling or rising left to right: the side of vertical
    assert seen == {True, False}          # both leanings occurred, so the order really was re-imposed
    np.testing.assert_array_equal(order_axis_points(np.array([[5.0, 9.0], [3.0, 1.0], [0.0, 4.0], [1.0, 2.0]])),
                                  [[3.0, 1.0], [5.0, 9.0], [1.0, 2.0], [0.0, 4.0]])


# ---------------------------------------------------------------------------------------------- data builder
def test_build_generates_synthetic_data_and_splits_by_exam(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "synth"), synthetic=True, synth_n=14, synth_image_hw=(64, 96),
                     input_hw=(64, 96), num_folds=3, cache_decoded=True, flip_p=0.5)
    data = build_hc18_data(cfg, tmp_path, STRATEGY, seed=0)
    assert (tmp_path / "synth" / "annotations.csv").is_file()
    groups = {p: {data[p].group_id(i) for i in range(len(data[p]))} for p in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert data["train"].augment is not None and data["train"].augment.flip_pairs == HC18_FLIP_PAIRS
    batch = collate_samples([data["train"][i] for i in range(2)])
    assert batch.image_BCHW.shape == (2, 3, 64, 96) and batch.heatmap_BKHW.shape == (2, 4, 64, 96)
    assert batch.mask_BHW.dtype == torch.int64
    bad = DataConfig(root=str(tmp_path / "synth"), reader_args={"resize": True})
    with pytest.raises(OptionError, match="unknown option 'resize'"):
        build_hc18_data(bad, tmp_path, STRATEGY, seed=0)
    with pytest.raises(DataError, match="data.synthetic=false"):
        build_hc18_data(DataConfig(root=str(tmp_path / "none"), synthetic=False), tmp_path, STRATEGY, seed=0)


def test_load_for_predict_in_and_out_of_the_layout(synth, tmp_path):
    stem = _stem(synth, 0)
    cfg = DataConfig(input_hw=(64, 96))
    item = load_for_predict(synth / "images" / f"{stem}.png", cfg)
    rec = {r.stem: r for r in scan_hc18(synth)[0]}[stem]
    assert item["input_CHW"].shape == (3, 64, 96) and item["image_HW3"].shape == (90, 120, 3)
    np.testing.assert_array_equal(item["spacing_mm_2"], [rec.pixel_size_mm] * 2)
    np.testing.assert_allclose(item["truth"]["kpts_px_K2"], rec.kpts_px_42, atol=1e-4)
    assert item["truth"]["hc_mm"] == rec.hc_mm and item["truth"]["mask_HW"].shape == (90, 120)
    np.testing.assert_allclose(item["to_input_3x3"][0, 0], 0.7111111, rtol=1e-6)   # min(64/90, 96/120)
    lone = tmp_path / "lone.png"
    shutil.copy(synth / "images" / f"{stem}.png", lone)
    item = load_for_predict(lone, DataConfig(input_hw=(64, 96), spacing_mm=(0.15, 0.15)))
    assert item["truth"] is None and item["spacing_mm_2"].tolist() == [0.15, 0.15]
    assert np.isnan(load_for_predict(lone, cfg)["spacing_mm_2"]).all()
    with pytest.raises(DataError, match="image not found"):
        load_for_predict(tmp_path / "missing.png", cfg)
