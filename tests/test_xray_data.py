"""Hip X-ray data side (docs/systems/hip_xray_efficientnet.md): the CSV format, its layout, the phantom and the
reader Dataset/builder."""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.errors import DataError, OptionError
from data_pipelines.synthetic.xray import HEAD_R, generate_xray_dataset, render_xray_phantom
from data_pipelines.transforms import AugmentParams
from data_pipelines.readers.xray_csv import (XRAY_FLIP_PAIRS, XRAY_KPT_NAMES, equalize_hist, find_xray_samples,
                                     parse_xray_points, read_xray_csv, validate_xray_pair, write_xray_csv)
from data_pipelines.by_format import build_xray_csv_data
from data_pipelines.by_format import load_xray_for_predict as load_for_predict
from data_pipelines.readers.xray_csv import XrayDataset, group_of, stretch_matrix
from engine.config import DataConfig

# A plausible 12-point annotation of a 200 x 100 (W x H) image.
KPTS = np.array([[20, 30], [35, 38], [50, 45], [40, 60], [35, 50], [25, 62],
                 [150, 45], [165, 38], [180, 30], [160, 60], [165, 50], [175, 62]], dtype=np.float64)
STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), format="xray_csv", synthetic=False, input_hw=(64, 64), synth_image_hw=(128, 128),
                num_folds=3, test_frac=0.2, augment=False, cache_decoded=False, num_workers=0)
    return DataConfig(**{**base, **kw})


def _write_pair(base: Path, name: str, kpts=KPTS, hw=(100, 200), image=None) -> tuple[Path, Path]:
    (base / "images").mkdir(parents=True, exist_ok=True)
    img = image if image is not None else np.random.default_rng(len(name)).integers(0, 256, hw, dtype=np.uint8)
    Image.fromarray(img, mode="L").save(base / "images" / f"{name}.png")
    return base / "images" / f"{name}.png", write_xray_csv(base / "annotations" / f"{name}.csv", kpts)


def _local_ai(k: np.ndarray) -> tuple[float, float]:
    def ang(a, b):
        return math.degrees(math.acos(float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))))
    v_h = k[6] - k[2]
    return ang(v_h, k[2] - k[0]), ang(-v_h, k[6] - k[8])


def _local_grade(k: np.ndarray, lateral: int, a: int, b: int, mirror: bool) -> int:
    u = (k[6] - k[2]) / np.linalg.norm(k[6] - k[2])
    o = k[2] + ((k[lateral] - k[2]) @ u) * u
    d = (k[a] + k[b]) / 2 - o
    x, y = (-1 if mirror else 1) * d @ u, d @ np.array([-u[1], u[0]])
    return 4 if y <= 0 else 1 if x < 0 else 2 if y > x else 3


# ----------------------------------------------------------------------------------------------------------------
# CSV format
# ----------------------------------------------------------------------------------------------------------------

def test_csv_round_trip_writes_the_published_line(tmp_path):
    path = write_xray_csv(tmp_path / "a.csv", KPTS + 0.3)          # rounded to the nearest integer pixel
    text = path.read_text()
    assert text.startswith('"(20, 30)","(35, 38)","(50, 45)"') and text.endswith('"(175, 62)"\n')
    np.testing.assert_array_equal(read_xray_csv(path), KPTS)
    np.testing.assert_array_equal(parse_xray_points(text.replace('"', "")), KPTS)      # unquoted tuples too
    assert XRAY_KPT_NAMES[0] == "p1" and XRAY_KPT_NAMES[-1] == "p12"


def test_csv_parsing_tolerates_whitespace_floats_no_quotes_bom_and_blank_lines(tmp_path):
    body = ",".join(f"( {x}.5 ,{y}  )" for x, y in KPTS.astype(int))
    path = tmp_path / "b.csv"
    path.write_text("\ufeff  " + body + "  \n\n", encoding="utf-8")
    np.testing.assert_array_equal(read_xray_csv(path), KPTS + [0.5, 0.0])


@pytest.mark.parametrize("text, problem", [
    (",".join(['"(1, 2)"'] * 11), "wrong number of points: expected 12, found 11"),
    (",".join(['"(1, 2)"'] * 13), "wrong number of points: expected 12, found 13"),
    ('"(55a, 424)",' + ",".join(['"(1, 2)"'] * 11), "unparsable point p1: '55a' is not a number"),
    (",".join(['"(1, 2)"'] * 5 + ['"(3, 4, 5)"'] + ['"(1, 2)"'] * 6), "unparsable point p6"),
    (",".join(['"(1, 2)"'] * 11 + ['"(nan, 2)"']), "p12: 'nan' is not a finite number"),
    (",".join(['"(1, 2)"'] * 12) + ",oops", "unparsable text outside the point tuples: 'oops'"),
    (",".join(['"(1, 2)"'] * 12) + "\n" + ",".join(['"(1, 2)"'] * 12), "found 2 non-empty lines"),
    ("\n  \n", "empty annotation"),
])
def test_bad_csv_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_xray_csv(path)
    assert err.value.path == str(path) and problem in err.value.problem


def test_point_outside_the_image_is_an_error_the_edge_is_not(tmp_path):
    k = KPTS.copy()
    k[2] = [199.5, 99.5]                                           # the image extent's corner: allowed
    image, csv = _write_pair(tmp_path, "edge", k)
    csv.write_text(",".join(f'"({x}, {y})"' for x, y in k))     # floats (the writer would round to integers)
    np.testing.assert_array_equal(validate_xray_pair(image, csv).kpts_px_K2, k)
    k[2] = [200, 50]                                               # x > W - 0.5
    image, csv = _write_pair(tmp_path, "out", k)
    with pytest.raises(DataError, match=r"out\.csv: point p3 \(200, 50\) lies outside the 200x100 image"):
        validate_xray_pair(image, csv)


def test_missing_image_and_missing_annotation_name_the_file(tmp_path):
    _write_pair(tmp_path, "ok")
    write_xray_csv(tmp_path / "annotations" / "orphan.csv", KPTS)
    with pytest.raises(DataError) as err:
        find_xray_samples(tmp_path)
    assert err.value.path.endswith("orphan.csv") and "missing image" in err.value.problem
    (tmp_path / "annotations" / "orphan.csv").unlink()
    Image.fromarray(np.zeros((100, 200), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(DataError) as err:
        find_xray_samples(tmp_path)
    assert err.value.path.endswith("lonely.png") and "missing annotation" in err.value.problem
    with pytest.raises(DataError, match="missing image"):
        validate_xray_pair(tmp_path / "images" / "gone.png", tmp_path / "annotations" / "ok.csv")


def test_corrupt_png_bytes_are_an_error_naming_the_image(tmp_path):
    image, csv = _write_pair(tmp_path, "broken")
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = b"\x00" * 16       # IDAT bytes change: the chunk CRC fails
    image.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        validate_xray_pair(image, csv)
    assert err.value.path == str(image) and "image does not decode" in err.value.problem
    image.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png: image does not decode"):
        XrayDataset([(image, csv)])


def test_skip_bad_counts_every_bad_sample(tmp_path):
    for i in range(4):
        _write_pair(tmp_path, f"good{i}")
    _write_pair(tmp_path, "short")
    (tmp_path / "annotations" / "short.csv").write_text(",".join(['"(1, 2)"'] * 11))
    image, _ = _write_pair(tmp_path, "corrupt")
    image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((100, 200), np.uint8)).save(tmp_path / "images" / "noann.png")
    with pytest.raises(DataError):
        find_xray_samples(tmp_path)
    layout, skipped = find_xray_samples(tmp_path, skip_bad=True)
    ds = XrayDataset([(i, c) for i, c in layout[None]], skip_bad=True)
    skipped += ds.skipped
    assert len(ds) == 4 and sorted(ds.sample_id(i) for i in range(4)) == [f"good{i}" for i in range(4)]
    assert sorted(Path(p).name for p, _ in skipped) == ["corrupt.png", "noann.png", "short.csv"]
    with pytest.raises(DataError, match="corrupt.png: image does not decode"):      # the first bad one, sorted
        XrayDataset([(i, c) for i, c in layout[None]])


def test_histogram_equalisation_equals_opencv():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 53), dtype=np.uint8),
              rng.normal(90, 12, (64, 48)).clip(0, 255).astype(np.uint8),       # narrow histogram
              rng.choice(np.array([3, 77, 200], np.uint8), (20, 30)),            # three levels
              rng.integers(100, 104, (1, 7), dtype=np.uint8),
              np.full((5, 6), 9, np.uint8)]                                      # constant: unchanged
    for img in images:
        np.testing.assert_array_equal(equalize_hist(img), cv2.equalizeHist(img))


# ----------------------------------------------------------------------------------------------------------------
# The Dataset: resize matrices, flips
# ----------------------------------------------------------------------------------------------------------------

def _blob_image(hw, centre, sigma=6.0):
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    return np.rint(250 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))).astype(np.uint8)


@pytest.mark.parametrize("resize, expect", [
    # point (101, 49); W 200 -> 50 (s_x = 0.25), H 100 -> 50 (s_y = 0.5): x' = (x + .5) s_x - .5 = 24.875,
    # y' = (49 + .5) 0.5 - .5 = 24.25
    ("stretch", (24.875, 24.25)),
    # s = min(0.5, 0.25) = 0.25, pad_y = (50 - 25) / 2 = 12.5: y' = (49 + .5) 0.25 - .5 + 12.5 = 24.375
    ("letterbox", (24.875, 24.375)),
])
def test_resize_matrices_move_points_and_pixels_together(tmp_path, resize, expect):
    k = KPTS.copy()
    k[4] = [101, 49]
    image, csv = _write_pair(tmp_path, "blob", k, image=_blob_image((100, 200), k[4]))
    ds = XrayDataset([(image, csv)], input_hw=(50, 50), resize=resize, equalize=False)
    s = ds[0]
    np.testing.assert_allclose(s["kpts_px_K2"][4].numpy(), expect, atol=1e-5)
    img = s["image_CHW"][0].numpy().astype(np.float64)
    w = img * (img > 0.05)
    yy, xx = np.mgrid[0:50, 0:50]
    centroid = (float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum()))
    np.testing.assert_allclose(centroid, expect, atol=0.1)        # the blob's centre moved with the landmark
    sx, sy = (0.25, 0.5) if resize == "stretch" else (0.25, 0.25)
    np.testing.assert_allclose(s["spacing_mm_2"].numpy(), [1.0 / sx, 1.0 / sy], rtol=1e-6)
    np.testing.assert_allclose(stretch_matrix((100, 200), (50, 50)) @ [199.5, 99.5, 1], [49.5, 49.5, 1])


def test_flip_swaps_hips_and_keeps_points_on_their_anatomy(tmp_path):
    generate_xray_dataset(tmp_path, 3, seed=4)
    quiet = dict(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, brightness=0.0,
                 contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), speckle_sigma_max=0.0, blur_p=0.0,
                 flip_pairs=XRAY_FLIP_PAIRS)
    csvs = sorted((tmp_path / "annotations").glob("*.csv"))
    plain = XrayDataset(csvs, input_hw=(128, 128), resize="stretch")
    flipped = XrayDataset(csvs, input_hw=(128, 128), resize="stretch", augment=AugmentParams(flip_p=1.0, **quiet))
    for i in range(len(csvs)):
        a, b = plain[i], flipped[i]
        assert b["meta"]["flipped"] and not a["meta"]["flipped"]
        torch.testing.assert_close(b["image_CHW"], torch.flip(a["image_CHW"], dims=[-1]), atol=1e-5, rtol=0)
        mirrored = a["kpts_px_K2"].clone()
        mirrored[:, 0] = 127 - mirrored[:, 0]
        for p, q in XRAY_FLIP_PAIRS:                                # p1 of the flip is where p9 was, mirrored
            torch.testing.assert_close(b["kpts_px_K2"][p], mirrored[q], atol=1e-4, rtol=0)
            torch.testing.assert_close(b["kpts_px_K2"][q], mirrored[p], atol=1e-4, rtol=0)
        x = b["kpts_px_K2"][:, 0]
        assert x[0] < x[2] < x[6] < x[8]                            # p1, p3 image-left; p7, p9 image-right
        img = b["image_CHW"][0]
        for head in (4, 10):                                        # femoral-head centres land on the head discs
            hx, hy = (int(round(float(v))) for v in b["kpts_px_K2"][head])
            assert float(img[hy, hx]) > float(img.mean()) + 0.15


def test_dataset_contract_original_group_and_normalisation(tmp_path):
    image, csv = _write_pair(tmp_path, "pat7_2")
    ds = XrayDataset([csv], input_hw=(32, 64), resize="stretch", normalize="imagenet", heatmaps=True,
                     sigma_px=1.5, heatmap_peak=1.0, spacing_mm=(0.5, 0.5))
    s, o = ds[0], ds.original(0)
    assert ds.group_id(0) == "pat7" and ds.stratum(0) is None and ds.sample_id(0) == "pat7_2"
    assert o["image_HW3"].shape == (100, 200, 3) and o["kpts_visible_K"].all() and o["csv"] == str(csv)
    np.testing.assert_array_equal(o["kpts_px_K2"], KPTS)
    plain = XrayDataset([csv], input_hw=(32, 64), resize="stretch")[0]["image_CHW"]
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[0], plain[2])       # grey replicated
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(s["image_CHW"], (plain - mean[:, None, None]) / std[:, None, None])
    assert s["heatmap_KHW"].shape == (12, 32, 64) and float(s["heatmap_KHW"].max()) == pytest.approx(1.0, abs=0.2)
    np.testing.assert_allclose(s["spacing_mm_2"].numpy(), [0.5 * 200 / 64, 0.5 * 100 / 32], rtol=1e-6)
    assert [group_of(n) for n in ("xr0001_2", "a_b", "p_1_2", "17")] == ["xr0001", "a_b", "p_1", "17"]
    with pytest.raises(OptionError, match="resize"):
        XrayDataset([csv], resize="crop")


# ----------------------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------------------

def test_builder_keeps_published_split_folders(tmp_path):
    root = tmp_path / "data"
    generate_xray_dataset(root, 12, seed=1, image_hw=(128, 128), split_fracs=(0.5, 0.25, 0.25))
    out = build_xray_csv_data(_cfg(root), tmp_path / "run", STRATEGY, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    for split in ("train", "val", "test"):
        given = sorted(r["id"] for r in meta["samples"] if r["split"] == split)
        assert out["splits"][split] == given and len(out[split]) == len(given) > 0
        assert sorted(p.stem for p in (root / split / "annotations").glob("*.csv")) == given
    assert out["splits"]["source"] == "folders" and out["num_classes"] == 0 and out["class_names"] is None
    assert out["kpt_names"] == list(XRAY_KPT_NAMES)
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["test"] == out["splits"]["test"]
    groups = {s: {group_of(i) for i in out["splits"][s]} for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"])


def test_builder_makes_grouped_splits_for_a_flat_layout_and_generates_the_phantom(tmp_path):
    root = tmp_path / "flat"
    cfg = _cfg(root, synthetic=True, synth_n=24, synth_seed=3, reader_args={"resize": "letterbox"})
    out = build_xray_csv_data(cfg, tmp_path / "run", STRATEGY, seed=0)
    assert (root / "images").is_dir() and len(list((root / "annotations").glob("*.csv"))) == 24
    sp = out["splits"]
    assert sp["source"] == "grouped" and sorted(sp["train"] + sp["val"] + sp["test"]) == \
        sorted(p.stem for p in (root / "images").glob("*.png"))
    groups = {s: {group_of(i) for i in sp[s]} for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    assert any(len([i for i in sp["train"] + sp["val"] + sp["test"] if group_of(i) == g]) == 2
               for g in groups["train"] | groups["val"] | groups["test"])   # two-view patients exist
    item = out["test"][0]
    assert out["test"].pre.resize == "letterbox" and item["image_CHW"].shape == (3, 64, 64) and "heatmap_KHW" not in item
    pred = load_for_predict(out["test"].original(0)["csv"], cfg)
    torch.testing.assert_close(pred["input_CHW"], item["image_CHW"])   # predict input == evaluation sample
    np.testing.assert_allclose(pred["to_input_3x3"], item["meta"]["to_input_3x3"])
    np.testing.assert_array_equal(pred["truth"]["kpts_px_K2"], out["test"].original(0)["kpts_px_K2"])
    pred_img = load_for_predict(out["test"].original(0)["image"], cfg)
    assert pred_img["truth"] is None
    torch.testing.assert_close(pred_img["input_CHW"], item["image_CHW"])
    np.testing.assert_allclose(pred_img["spacing_mm_2"], json.loads((root / "dataset.json").read_text())["spacing_mm"])
    with pytest.raises(OptionError, match="unknown option 'crop'"):
        build_xray_csv_data(_cfg(root, reader_args={"crop": 1}), tmp_path / "run2", STRATEGY, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# The phantom
# ----------------------------------------------------------------------------------------------------------------

def test_phantom_is_deterministic_and_prefix_stable(tmp_path):
    generate_xray_dataset(tmp_path / "a", 5, seed=7)
    generate_xray_dataset(tmp_path / "b", 8, seed=7)
    generate_xray_dataset(tmp_path / "c", 5, seed=8)
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
        csv = Path(name).with_suffix(".csv")
        assert (tmp_path / "a/annotations" / csv).read_text() == (tmp_path / "b/annotations" / csv).read_text()
    a = np.asarray(Image.open(next((tmp_path / "a" / "images").iterdir())))
    c = np.asarray(Image.open(next((tmp_path / "c" / "images").iterdir())))
    assert a.shape == c.shape == (256, 256) and not np.array_equal(a, c)


def test_phantom_design_values_match_the_written_points(tmp_path):
    generate_xray_dataset(tmp_path, 40, seed=2)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    grades = []
    for row in meta["samples"]:
        k = read_xray_csv(tmp_path / row["csv"])
        ai_l, ai_r = _local_ai(k)
        assert abs(ai_l - row["ai_left_deg"]) < 1.0 and abs(ai_r - row["ai_right_deg"]) < 1.0
        assert ai_l == pytest.approx(row["ai_left_deg_points"], abs=1e-9)
        assert 10.0 <= row["ai_left_deg"] <= 40.0 and 10.0 <= row["ai_right_deg"] <= 40.0
        assert _local_grade(k, 0, 3, 5, True) == row["ihdi_left"] and _local_grade(k, 8, 9, 11, False) == \
            row["ihdi_right"]
        grades += [row["ihdi_left"], row["ihdi_right"]]
    assert grades.count(1) > len(grades) / 2 and set(grades) - {1}                 # mostly I, not only I
    rots = [abs(r["rot_deg"]) for r in meta["samples"]]
    assert max(rots) > 3.0 and max(rots) <= 8.0                                     # the pelvis is tilted


def test_phantom_landmarks_lie_on_the_drawn_structures():
    roof_brighter, head_contrast = [], []
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(20):
        ph = render_xray_phantom(np.random.default_rng([11, i]))
        img, k = ph.image_HW.astype(np.float64), ph.kpts_px_K2
        r = HEAD_R * ph.pose["scale"]
        for head in (4, 10):             # femoral-head centre: brighter than a ring around the disc
            d = np.hypot(xx - k[head, 0], yy - k[head, 1])
            head_contrast.append(img[d <= 0.5 * r].mean() - img[(d >= 1.3 * r) & (d <= 1.8 * r)].mean())
        for lat, mid, tri in ((0, 1, 2), (8, 7, 6)):   # roof midpoint: on the bright sourcil, above the socket
            t = (k[tri] - k[lat]) / np.linalg.norm(k[tri] - k[lat])
            n = np.array([-t[1], t[0]]) * (1 if t[0] > 0 else -1)   # the roof normal pointing into the socket
            x0, y0 = np.rint(k[mid]).astype(int)
            x1, y1 = np.rint(k[mid] + 6 * n).astype(int)
            roof_brighter.append(img[y0 - 1:y0 + 2, x0 - 1:x0 + 2].mean() > img[y1 - 1:y1 + 2, x1 - 1:x1 + 2].mean())
    assert min(head_contrast) > 20.0
    assert np.mean(roof_brighter) >= 0.9
