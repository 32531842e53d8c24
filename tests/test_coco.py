import copy
import json
import logging
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.readers.coco import (CocoDataset, flip_pairs_from_names, read_coco, resolve_flip_pairs, rle_decode,
                                 sample_mask)
from data_pipelines.by_format import build_coco_data
from data_pipelines.by_format import load_coco_for_predict as load_for_predict
from data_pipelines.readers.coco_export import dataset_to_coco, export_coco, rle_encode
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.labelme import rasterize_polygons
from data_pipelines.splits import read_splits
from data_pipelines.transforms import AugmentParams, letterbox_matrix, warp_points
from engine.config import DataConfig

HW = (24, 32)                                         # (H, W) of every fixture image
NAMES = ["left_hip", "right_hip", "sacrum"]
STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)


def _image(seed: int, hw=HW) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=hw, dtype=np.uint8)


def _write_images(folder, n, hw=HW):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_image(i, hw)).save(folder / f"img{i}.png")


def _doc(n=4, patients=None):
    """n images img{i}.png (24 x 32), one 'pelvis' annotation each (id 10 + i), COCO coordinates."""
    images, anns = [], []
    for i in range(n):
        img = {"id": i + 1, "file_name": f"img{i}.png", "width": HW[1], "height": HW[0]}
        if patients is not None:
            img["patient_id"] = patients[i]
        images.append(img)
        kp = [4.5 + i, 6.5, 2, 20.25, 8.0, 1, 0, 0, 0]
        anns.append({"id": 10 + i, "image_id": i + 1, "category_id": 7, "keypoints": kp, "num_keypoints": 2,
                     "bbox": [4.5, 6.5, 15.75, 1.5], "iscrowd": 0,
                     "segmentation": [[2.0, 3.0, 7.0, 3.0, 7.0, 5.0, 2.0, 5.0]]})
    cats = [{"id": 7, "name": "pelvis", "keypoints": NAMES, "skeleton": [[1, 3], [2, 3]]}]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp_path, doc, n_images=4, name="annotations.json"):
    _write_images(tmp_path, n_images)
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _cfg(root, **over):
    args = dict(root=str(root), synthetic=False, input_hw=(32, 64), test_frac=0.25, num_folds=2, augment=False,
                num_workers=0, cache_decoded=False, format="coco")
    args.update(over)
    return DataConfig(**args)


# ---------------------------------------------------------------------------------------------------------------
# Reading, conventions, round trip
# ---------------------------------------------------------------------------------------------------------------

def test_pixel_offset_maps_coco_pixel_centre_to_medpose_integer_and_visibility_codes(tmp_path):
    path = _write(tmp_path, _doc())
    s = read_coco(path).samples[0]
    # COCO (4.5, 6.5) is the centre of pixel (row 6, column 4) -> MedPose (4, 6); v=1 counts as visible
    np.testing.assert_array_equal(s.kpts_px_K2, np.array([[4.0, 6.0], [19.75, 7.5], [0.0, 0.0]], np.float32))
    np.testing.assert_array_equal(s.kpts_visible_K, [True, True, False])
    raw = read_coco(path, pixel_offset=0.0).samples[0]
    np.testing.assert_array_equal(raw.kpts_px_K2[:2], [[4.5, 6.5], [20.25, 8.0]])
    out = export_coco([{"file_name": "a.png", "width": 32, "height": 24, "kpts_px_K2": s.kpts_px_K2,
                        "kpts_visible_K": s.kpts_visible_K}], tmp_path / "out.json", NAMES)
    ann = json.loads(out.read_text())["annotations"][0]
    assert ann["keypoints"] == [4.5, 6.5, 2, 20.25, 8.0, 2, 0.0, 0.0, 0]      # inverse offset; v=1 written as 2
    assert ann["num_keypoints"] == 2 and ann["bbox"] == [4.5, 6.5, 15.75, 1.5] and ann["area"] == 15.75 * 1.5


def test_round_trip_export_then_read_gives_points_visibility_masks_and_fields(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        kpts = np.stack([rng.uniform(-0.5, HW[1] - 0.5, 3), rng.uniform(-0.5, HW[0] - 0.5, 3)], 1).astype(np.float32)
        vis = np.array([True, i != 1, i != 2])
        mask = np.zeros(HW, bool)
        mask[2 + i:9, 3:12 + i] = True
        mask[0, 31] = i == 0                          # a corner pixel: runs at both ends of the RLE
        Image.fromarray(_image(i)).save(tmp_path / f"img{i}.png")
        samples.append({"file_name": f"img{i}.png", "width": 32, "height": 24, "kpts_px_K2": kpts,
                        "kpts_visible_K": vis, "mask_HW": mask, "patient_id": f"p{i % 2}",
                        "spacing_mm": (0.25, 0.5)})
    path = export_coco(samples, tmp_path / "annotations.json", NAMES, "pelvis", skeleton=[("left_hip", 2), (1, 2)])
    doc = json.loads(path.read_text())
    assert doc["categories"][0]["skeleton"] == [[1, 3], [2, 3]]
    index = read_coco(path, masks=True)
    assert index.category.skeleton == ((0, 2), (1, 2)) and len(index.samples) == 3
    for s, want in zip(index.samples, samples):
        vis = want["kpts_visible_K"]
        np.testing.assert_array_equal(s.kpts_visible_K, vis)
        np.testing.assert_allclose(s.kpts_px_K2[vis], want["kpts_px_K2"][vis], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(sample_mask(s.segments, s.hw), want["mask_HW"].astype(np.uint8))
        assert s.patient_id == want["patient_id"] and list(s.spacing_mm) == [0.25, 0.5]
    ann = doc["annotations"][0]                        # bbox covers the mask's pixels (0..31 wide, rows 0..8)
    assert ann["area"] == samples[0]["mask_HW"].sum() and ann["bbox"][0] <= 3.0 and ann["bbox"][1] == 0.0


def test_rle_encode_decode_by_hand():
    mask = np.array([[0, 1, 0], [1, 1, 1]], bool)
    rle = rle_encode(mask)
    assert rle == {"size": [2, 3], "counts": [1, 3, 1, 1]}     # column-major: 0,1 | 1,1 | 0,1
    np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_encode(np.ones((1, 2), bool))["counts"] == [0, 2]


def test_mask_from_polygon_equals_labelme_rasteriser(tmp_path):
    doc = _doc(1)
    poly = [1.2, 2.7, 15.5, 4.1, 20.0, 18.3, 6.4, 21.9, 3.3, 12.0]
    doc["annotations"][0]["segmentation"] = [[2.0, 3.0, 7.0, 3.0, 7.0, 5.0, 2.0, 5.0], poly]
    s = read_coco(_write(tmp_path, doc, 1), masks=True).samples[0]
    mask = sample_mask(s.segments, s.hw)
    polys = [(1, np.array([[2.0, 3.0], [7.0, 3.0], [7.0, 5.0], [2.0, 5.0]]) - 0.5),
             (1, np.asarray(poly).reshape(-1, 2) - 0.5)]
    np.testing.assert_array_equal(mask, rasterize_polygons(polys, HW))
    # the COCO rectangle [2, 7] x [3, 5] is exactly the pixels of columns 2..6, rows 3..4
    rect = sample_mask(s.segments[:1], s.hw)
    assert rect.sum() == 10 and rect[3:5, 2:7].all()


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def _set(path, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


BAD_CASES = {
    "missing_top_level_key": (lambda d: d.pop("categories"), "", "missing top-level key 'categories'"),
    "keypoints_length": (_set(["annotations", 1, "keypoints"], [1, 2, 2] * 2), "annotations[1] (id 11)",
                         "expected 3 x 3 = 9"),
    "visibility_3": (_set(["annotations", 2, "keypoints", 5], 3), "annotations[2] (id 12)", "visibility 3"),
    "unknown_image": (_set(["annotations", 3, "image_id"], 99), "annotations[3] (id 13)", "unknown image_id 99"),
    "unknown_category": (_set(["annotations", 0, "category_id"], 5), "annotations[0] (id 10)",
                         "unknown category_id 5"),
    "duplicate_annotation_id": (_set(["annotations", 2, "id"], 10), "annotations[0] (id 10)", "duplicate id 10"),
    "duplicate_image_id": (_set(["images", 1, "id"], 1), "images[0] (id 1)", "duplicate id 1"),
    "image_missing": (_set(["images", 2, "file_name"], "gone.png"), "images[2] (id 3)", "image file not found"),
    "size_mismatch": (_set(["images", 1, "width"], 33), "images[1] (id 2)", "is 32x24 but the entry says"),
    "point_outside": (_set(["annotations", 1, "keypoints", 0], 32.5), "annotations[1] (id 11)",
                      "('left_hip') at (32.5, 6.5) lies outside the 32x24 image"),
    "num_keypoints": (_set(["annotations", 0, "num_keypoints"], 3), "annotations[0] (id 10)", "num_keypoints is 3"),
    "two_subjects": (lambda d: d["annotations"].append({**copy.deepcopy(d["annotations"][0]), "id": 99}),
                     "images[0] (id 1)", "2 annotations of category 'pelvis'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_the_json_file_and_the_entry(tmp_path, case):
    edit, entry, problem = BAD_CASES[case]
    doc = _doc()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(DataError) as err:
        read_coco(path, masks=True)
    assert err.value.path == str(path)
    assert entry in err.value.problem and problem in err.value.problem, err.value.problem


def test_not_json_and_unreadable_image(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"annotations\.json: invalid JSON"):
        read_coco(path)
    path = _write(tmp_path, _doc())
    (tmp_path / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataError) as err:
        read_coco(path)
    assert err.value.path == str(path) and "images[1] (id 2)" in err.value.problem
    assert "does not decode" in err.value.problem


def test_skip_bad_counts_and_logs_bad_annotations_and_images(tmp_path, caplog):
    doc = _doc(6)
    doc["annotations"][1]["keypoints"][2] = 7                   # bad visibility
    doc["annotations"][2]["image_id"] = 42                      # unknown image
    doc["images"][4]["height"] = 25                             # file is 24 high
    path = _write(tmp_path, doc, 6)
    index = read_coco(path, skip_bad=True)
    assert [s.id for s in index.samples] == ["img0", "img3", "img5"]
    assert len(index.skipped) == 3 and all(p == str(path) for p, _ in index.skipped)
    assert [problem.split(":")[0] for _, problem in index.skipped] == [
        "annotations[1] (id 11)", "annotations[2] (id 12)", "images[4] (id 5) 'img4.png'"]
    assert index.unannotated == ["images[1] (id 2)", "images[2] (id 3)"]    # their one annotation was bad
    with caplog.at_level(logging.WARNING, logger="medpose"):
        ds = CocoDataset(index, input_hw=(32, 64))
    assert len(ds) == 3 and len(ds.skipped) == 3 and "skipped 3 bad entries" in caplog.text


def test_crowd_regions_are_left_out_and_one_per_image_false_gives_one_sample_per_annotation(tmp_path):
    doc = _doc(2)
    second = {**copy.deepcopy(doc["annotations"][0]), "id": 99, "keypoints": [1.0, 1.0, 2] * 3, "num_keypoints": 3}
    crowd = {**copy.deepcopy(doc["annotations"][1]), "id": 98, "iscrowd": 1,
             "segmentation": {"size": [24, 32], "counts": "PPYo0"}}    # compressed RLE: not read, not needed
    doc["annotations"] += [second, crowd]
    path = _write(tmp_path, doc, 2)
    index = read_coco(path, one_per_image=False, masks=True)
    assert [s.id for s in index.samples] == ["img0#10", "img0#99", "img1#11"]
    np.testing.assert_array_equal(index.samples[1].kpts_px_K2, np.full((3, 2), 0.5, np.float32))
    ds = CocoDataset(index, input_hw=(32, 64))
    assert ds.group_id(0) == ds.group_id(1) == "img0"
    doc["annotations"][1]["segmentation"] = {"size": [24, 32], "counts": "PPYo0"}
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 11\): segmentation is compressed RLE"):
        read_coco(_write(tmp_path, doc, 2), masks=True, one_per_image=False)


def test_image_broken_after_validation_fails_naming_json_and_entry(tmp_path):
    path = _write(tmp_path, _doc(2), 2)
    ds = CocoDataset(read_coco(path), input_hw=(32, 64))
    (tmp_path / "img1.png").write_bytes(b"not a png")
    assert ds[0]["image_CHW"].shape == (3, 32, 64)
    with pytest.raises(DataError) as err:
        ds[1]
    assert err.value.path == str(path) and err.value.problem.startswith("images[1] (id 2): image file")


def test_category_choice_by_name_or_id(tmp_path):
    doc = _doc()
    doc["categories"].append({"id": 8, "name": "knee", "keypoints": ["a"], "skeleton": []})
    doc["annotations"].append({"id": 50, "image_id": 1, "category_id": 8, "keypoints": [3.0, 4.0, 2]})
    path = _write(tmp_path, doc)
    with pytest.raises(DataError, match="2 categories .*choose one"):
        read_coco(path)
    assert [s.id for s in read_coco(path, category="knee").samples] == ["img0"]
    assert len(read_coco(path, category=7).samples) == 4


# ---------------------------------------------------------------------------------------------------------------
# Flip pairs
# ---------------------------------------------------------------------------------------------------------------

def test_flip_pairs_inferred_from_names():
    names = ["nose", "left_eye", "right_eye", "femur_l", "femur_r", "Left-Knee", "Right-Knee", "l_ear", "r_ear",
             "left_only", "hip_left", "hip_right"]
    assert flip_pairs_from_names(names) == ((1, 2), (3, 4), (5, 6), (7, 8), (10, 11))
    assert resolve_flip_pairs([["femur_l", "femur_r"], [1, 2]], names) == ((3, 4), (1, 2))
    with pytest.raises(OptionError, match="flip_pairs"):
        resolve_flip_pairs([["femur_l", "femur_l"]], names)
    with pytest.raises(OptionError, match="flip_pairs"):
        resolve_flip_pairs([[1, 2], [2, 3]], names)


def test_horizontal_flip_mirrors_points_and_swaps_left_right(tmp_path):
    index = read_coco(_write(tmp_path, _doc(1), 1))
    flip = AugmentParams(rotation_deg=0, scale_range=(1, 1), translate_frac=0, flip_p=1.0, brightness=0,
                         contrast_range=(1, 1), gamma_range=(1, 1), speckle_sigma_max=0, blur_p=0,
                         flip_pairs=flip_pairs_from_names(NAMES))
    plain = CocoDataset(index, input_hw=(24, 32))[0]
    flipped = CocoDataset(index, input_hw=(24, 32), augment=flip)[0]
    assert flipped["meta"]["flipped"]
    # left_hip (4, 6) mirrors to x = 31 - 4 = 27 and becomes right_hip; right_hip takes left's slot
    np.testing.assert_allclose(flipped["kpts_px_K2"][1], [27.0, 6.0], atol=1e-5)
    np.testing.assert_allclose(flipped["kpts_px_K2"][0], [31 - 19.75, 7.5], atol=1e-5)
    torch.testing.assert_close(flipped["image_CHW"], plain["image_CHW"].flip(-1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Dataset, builder, prediction input, dataset -> COCO
# ---------------------------------------------------------------------------------------------------------------

def test_sample_heatmap_peak_sits_at_letterboxed_keypoint(tmp_path):
    index = read_coco(_write(tmp_path, _doc(1), 1), masks=True)
    ds = CocoDataset(index, input_hw=(64, 64), sigma_px=1.5, heatmap_peak=1.0)
    s = ds[0]
    m = letterbox_matrix(HW, (64, 64))                # s = 2, pad 8 rows: x' = 2x + 0.5, y' = 2y + 8.5
    np.testing.assert_allclose(s["meta"]["to_input_3x3"], m)
    want = warp_points(np.array([[4.0, 6.0], [19.75, 7.5]]), m)
    np.testing.assert_allclose(want, [[8.5, 20.5], [40.0, 23.5]])
    for k in range(2):
        hm = s["heatmap_KHW"][k]
        r, c = divmod(int(hm.argmax()), hm.shape[1])
        x, y = s["kpts_px_K2"][k].tolist()
        assert (x, y) == pytest.approx(tuple(want[k]))
        assert abs(c - x) <= 0.5 and abs(r - y) <= 0.5
        d2 = (c - x) ** 2 + (r - y) ** 2
        assert float(hm.max()) == pytest.approx(np.exp(-d2 / (2 * 1.5 ** 2)), rel=1e-5)
    assert float(s["heatmap_KHW"][2].sum()) == 0.0 and not s["kpts_visible_K"][2]
    assert s["image_CHW"].shape == (3, 64, 64) and torch.equal(s["image_CHW"][0], s["image_CHW"][2])
    assert s["mask_HW"].sum() == 40                   # the 10-pixel rectangle, scaled x2 in each direction
    assert torch.isnan(s["spacing_mm_2"]).all()          # no spacing_mm field: unknown (distances are reported in px)
    o = ds.original(0)
    assert o["image_HW3"].shape == (24, 32, 3) and np.array_equal(o["image_HW3"][..., 0], _image(0))
    assert ds.group_id(0) == "img0" and ds.stratum(0) is None and ds.class_names == ("background", "pelvis")


def test_builder_splits_are_grouped_by_patient_id(tmp_path):
    patients = [f"pat{i // 3}" for i in range(12)]
    _write(tmp_path, _doc(12, patients), 12)
    cfg = _cfg(tmp_path, reader_args={"masks": True})
    data = build_coco_data(cfg, tmp_path / "run", STRATEGY, seed=3)
    assert data["num_classes"] == 2 and data["class_names"] == ["background", "pelvis"]
    assert data["kpt_names"] == NAMES and data["skipped"] == []
    parts = {name: {data[name].group_id(i) for i in range(len(data[name]))} for name in ("train", "val", "test")}
    assert parts["train"].isdisjoint(parts["val"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"]) and len(set().union(*parts.values())) == 4
    assert sum(len(data[n]) for n in ("train", "val", "test")) == 12
    assert read_splits(tmp_path / "run" / "splits.json")["test"] == data["splits"]["test"]
    assert data["train"].augment is None and data["train"][0]["mask_HW"].dtype == torch.int64


def test_builder_uses_split_fields_and_rejects_unknown_options(tmp_path):
    doc = _doc(6)
    for img, split in zip(doc["images"], ["train", "train", "val", "test", "train", "val"]):
        img["split"] = split
    _write(tmp_path, doc, 6)
    data = build_coco_data(_cfg(tmp_path, augment=True, flip_p=0.5), tmp_path / "run", STRATEGY, seed=0)
    assert data["train"].augment.flip_pairs == ((0, 1),) and data["val"].augment is None    # left_hip <-> right_hip
    assert data["splits"]["train"] == ["img0", "img1", "img4"] and data["splits"]["val"] == ["img2", "img5"]
    assert [data["test"].sample_id(i) for i in range(len(data["test"]))] == ["img3"]
    assert data["num_classes"] == 0 and data["class_names"] is None
    with pytest.raises(OptionError, match="unknown option 'mask'"):
        build_coco_data(_cfg(tmp_path, reader_args={"mask": True}), tmp_path / "run", STRATEGY, seed=0)


def test_builder_reads_separate_split_files(tmp_path):
    doc = _doc(6)
    for name, keep in (("train", [0, 1, 2]), ("val", [3, 4]), ("test", [5])):
        part = copy.deepcopy(doc)
        part["images"] = [doc["images"][i] for i in keep]
        part["annotations"] = [doc["annotations"][i] for i in keep]
        _write(tmp_path, part, 6, name=f"{name}.json")
    cfg = _cfg(tmp_path, reader_args={"splits_from": {"train": "train.json", "val": "val.json", "test": "test.json"}})
    data = build_coco_data(cfg, tmp_path / "run", STRATEGY, seed=0)
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (3, 2, 1)
    assert data["splits"]["test"] == ["img5"]


def test_load_for_predict_matches_evaluation_sample_and_finds_truth(tmp_path):
    doc = _doc(3)
    doc["images"][1]["spacing_mm"] = [0.2, 0.3]
    path = _write(tmp_path, doc, 3)
    cfg = _cfg(tmp_path, reader_args={"masks": True})
    out = load_for_predict(tmp_path / "img1.png", cfg)
    ds = CocoDataset(read_coco(path, masks=True), input_hw=cfg.input_hw, channels=1)     # grey images: 1 channel
    torch.testing.assert_close(out["input_CHW"], ds[1]["image_CHW"], atol=0, rtol=0)
    np.testing.assert_allclose(out["to_input_3x3"], ds[1]["meta"]["to_input_3x3"])
    np.testing.assert_array_equal(out["truth"]["kpts_px_K2"], ds.original(1)["kpts_px_K2"])
    assert out["truth"]["mask_HW"].sum() == 10 and out["kpt_names"] == NAMES
    np.testing.assert_allclose(out["spacing_mm_2"], [0.2, 0.3])
    Image.fromarray(_image(9)).save(tmp_path / "new.png")
    other = load_for_predict(tmp_path / "new.png", cfg)
    assert other["truth"] is None and other["kpt_names"] == NAMES and np.isnan(other["spacing_mm_2"]).all()


def test_synthetic_hip_phantom_becomes_coco_and_reads_back(tmp_path):
    cfg = _cfg(tmp_path / "coco", synthetic=True, synth_n=6, synth_image_hw=(60, 80),
               reader_args={"masks": True, "images": "images"})
    data = build_coco_data(cfg, tmp_path / "run", STRATEGY, seed=0)
    assert data["kpt_names"] == ["P1", "P2", "P3", "P4", "P5", "P6"] and data["class_names"][1] == "hip"
    doc = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(doc["images"]) == 6 and all(img["spacing_mm"] == [0.2, 0.2] for img in doc["images"])
    index = read_coco(tmp_path / "coco" / "annotations.json", tmp_path / "coco" / "images", masks=True)
    again = dataset_to_coco(CocoDataset(index), tmp_path / "again.json", tmp_path / "coco" / "images")
    index2 = read_coco(again, tmp_path / "coco" / "images", masks=True)
    for a, b in zip(index.samples, index2.samples):
        assert a.file_name == b.file_name and a.patient_id == b.patient_id   # images reused, not rewritten
        np.testing.assert_array_equal(a.kpts_px_K2, b.kpts_px_K2)
        np.testing.assert_array_equal(sample_mask(a.segments, a.hw), sample_mask(b.segments, b.hw))
