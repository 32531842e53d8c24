import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter, maximum_filter, sobel

from data_pipelines.synthetic.ceph import (CEPH_NAMES, assign_splits, ceph_sample, generate_ceph_dataset,
                                           patient_plan, resolve_names, spacing_for)
from data_pipelines.synthetic.writers import table_header, write_coco, write_labelme, write_layout, write_table

HW = (240, 200)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _toy_samples(k, n=3, dtype=np.uint8):
    """Arbitrary (non-ceph) samples: random pixels, random points, one landmark of sample 1 not labelled."""
    rng = np.random.default_rng(k)
    out = []
    for i in range(n):
        h, w = 30 + 4 * i, 40
        vis = np.ones(k, dtype=bool)
        if i == 1:
            vis[k // 2] = False
        out.append({"id": f"toy_{i}", "image_HW": rng.integers(0, 200, (h, w)).astype(dtype),
                    "kpts_px_K2": rng.uniform([-0.5, -0.5], [w - 0.5, h - 0.5], size=(k, 2)), "kpts_visible_K": vis,
                    "spacing_mm": 0.25, "patient_id": f"p{i // 2}", "split": ("train", "val", "test")[i % 3]})
    return out


@pytest.fixture(scope="module")
def samples():
    return [ceph_sample(i, seed=3, image_hw=HW) for i in range(6)]


def test_names_are_the_standard_set_and_subsets_take_the_first_k():
    assert len(CEPH_NAMES) == 19 and CEPH_NAMES[0] == "sella" and CEPH_NAMES[-1] == "articulare"
    assert CEPH_NAMES[4:6] == ("subspinale", "supramentale")
    assert all(n == n.lower() and " " not in n for n in CEPH_NAMES)
    assert resolve_names(5) == list(CEPH_NAMES[:5])
    assert resolve_names(names=["menton", "sella"]) == ["menton", "sella"]
    for bad in ({"num_landmarks": 0}, {"num_landmarks": 20}, {"names": ["sella", "sella"]}, {"names": ["chin"]}):
        with pytest.raises(ValueError):
            resolve_names(**bad)


def test_spacing_scales_with_width_and_the_anatomy_keeps_its_size_in_mm():
    assert spacing_for((1200, 1000)) == pytest.approx(0.1)
    assert spacing_for(HW) == pytest.approx(0.5)
    assert spacing_for((600, 500)) == pytest.approx(0.2)
    small, large = ceph_sample(2, seed=1, image_hw=HW), ceph_sample(2, seed=1, image_hw=(480, 400))
    assert (small["spacing_mm"], large["spacing_mm"]) == (pytest.approx(0.5), pytest.approx(0.25))

    def dist_mm(s):
        p = s["kpts_px_K2"] * s["spacing_mm"]
        return np.linalg.norm(p[:, None] - p[None], axis=-1)

    np.testing.assert_allclose(dist_mm(small), dist_mm(large), atol=1e-6)
    sn_mm = dist_mm(small)[0, 1]
    assert 0.68 * 68 * 0.85 < sn_mm < 0.68 * 68 * 1.15           # sella-nasion at the model scale, in mm


def test_sample_is_a_pure_function_of_seed_and_index():
    forward = {i: ceph_sample(i, seed=9, image_hw=HW) for i in (0, 2, 3)}
    backward = {i: ceph_sample(i, seed=9, image_hw=HW) for i in (3, 2, 0)}
    for i in forward:
        np.testing.assert_array_equal(forward[i]["image_HW"], backward[i]["image_HW"])
        np.testing.assert_array_equal(forward[i]["kpts_px_K2"], backward[i]["kpts_px_K2"])
    assert not np.array_equal(forward[0]["image_HW"], forward[2]["image_HW"])
    assert not np.array_equal(forward[0]["image_HW"], ceph_sample(0, seed=10, image_hw=HW)["image_HW"])


def test_same_seed_writes_identical_files(tmp_path):
    for name in ("a", "b"):
        generate_ceph_dataset(tmp_path / name, 4, seed=5, image_hw=HW, split_fracs=(0.5, 0.25, 0.25))
    generate_ceph_dataset(tmp_path / "c", 4, seed=6, image_hw=HW, split_fracs=(0.5, 0.25, 0.25))
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 4 + 2 and a == b
    assert a["images/ceph0001_1.png"] != c["images/ceph0001_1.png"]
    # the written image is the sample's image, whichever order it is rendered in
    written = np.asarray(Image.open(tmp_path / "a" / "images" / "ceph0003_1.png"))
    np.testing.assert_array_equal(written, ceph_sample(2, seed=5, image_hw=HW)["image_HW"])


def test_landmarks_lie_inside_the_image(samples):
    h, w = HW
    for s in samples:
        p = s["kpts_px_K2"]
        assert p.shape == (19, 2) and s["kpts_visible_K"].all()
        assert (p[:, 0] >= 0.03 * w).all() and (p[:, 0] <= w - 1 - 0.03 * w).all()
        assert (p[:, 1] >= 0.03 * w).all() and (p[:, 1] <= h - 1 - 0.03 * w).all()


def test_landmarks_sit_on_image_features(samples):
    """Every landmark but sella lies within 2 px of a strong edge (smoothed gradient > 5x the image median); random
    points do so less than 60 % of the time, so random landmarks would fail. Sella is the centre of a dark pit
    ringed by the bright sella floor."""
    random_hits = []
    for n, s in enumerate(samples):
        img = gaussian_filter(s["image_HW"].astype(np.float64), 1.0)
        grad = np.hypot(sobel(img, 0), sobel(img, 1))
        thresh = 5.0 * np.median(grad)
        grad = maximum_filter(grad, size=5)
        xy = np.rint(s["kpts_px_K2"]).astype(int)
        on_edge = grad[xy[1:, 1], xy[1:, 0]] > thresh
        assert on_edge.all(), [CEPH_NAMES[1 + k] for k in np.flatnonzero(~on_edge)]
        rng = np.random.default_rng(n)
        rx, ry = rng.integers(0, HW[1], 400), rng.integers(0, HW[0], 400)
        random_hits.append(grad[ry, rx] > thresh)
        sx, sy = xy[0]
        ring = img[max(sy - 12, 0):sy + 13, max(sx - 12, 0):sx + 13]
        assert ring.max() - img[sy, sx] > 40.0                    # bright sella floor around a darker centre
    assert np.mean(random_hits) < 0.6


def test_patients_share_anatomy_and_stay_in_one_split():
    plan = patient_plan(12, seed=4, patients_per_image=(1, 3))
    assert plan == patient_plan(20, seed=4, patients_per_image=(1, 3))[:12]       # prefix-stable
    sizes = np.bincount([p for p, _ in plan])[1:]
    assert sizes.min() >= 1 and sizes[:-1].max() <= 3 and sizes.max() >= 2
    split = assign_splits(plan, (0.6, 0.2, 0.2), seed=4)
    assert set(split) == {p for p, _ in plan} and set(split.values()) == {"train", "val", "test"}
    by_patient = {}
    for i, (p, view) in enumerate(plan[:7]):
        s = ceph_sample(i, seed=4, image_hw=HW, patients_per_image=(1, 3))
        assert s["patient_id"] == f"ceph{p:04d}" and s["id"] == f"ceph{p:04d}_{view}"
        d = np.linalg.norm(s["kpts_px_K2"][:, None] - s["kpts_px_K2"][None], axis=-1)
        by_patient.setdefault(p, []).append(d / d[0, 1])     # shape up to the pose's rotation and scale
    twins = [v for v in by_patient.values() if len(v) > 1]
    assert twins
    for views in twins:
        np.testing.assert_allclose(views[1], views[0], atol=1e-9)
    firsts = [v[0] for v in by_patient.values()]
    assert not np.allclose(firsts[0], firsts[1], atol=1e-3)


def test_coco_layout_round_trip(tmp_path):
    files = generate_ceph_dataset(tmp_path, 3, seed=2, image_hw=HW, layout="coco", split_fracs=(0.34, 0.33, 0.33))
    assert files == [tmp_path / "annotations.json"]
    doc = json.loads(files[0].read_text())
    cat = doc["categories"][0]
    assert cat["keypoints"] == list(CEPH_NAMES) and cat["skeleton"] == []
    assert len(doc["images"]) == len(doc["annotations"]) == 3
    for i, (im, ann) in enumerate(zip(doc["images"], doc["annotations"])):
        s = ceph_sample(i, seed=2, image_hw=HW)
        assert im["file_name"] == f"{s['id']}.png" and (tmp_path / "images" / im["file_name"]).is_file()
        assert (im["height"], im["width"]) == HW and im["spacing_mm"] == [0.5, 0.5]
        assert im["patient_id"] == s["patient_id"] and im["split"] in ("train", "val", "test")
        assert ann["image_id"] == im["id"] and ann["num_keypoints"] == 19
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(19, 3)
        assert (kp[:, 2] == 2).all()
        np.testing.assert_allclose(kp[:, :2] - 0.5, s["kpts_px_K2"], atol=1e-6)
        lo, hi = kp[:, :2].min(axis=0), kp[:, :2].max(axis=0)
        np.testing.assert_allclose(ann["bbox"], [lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], atol=1e-9)
    assert sorted(im["split"] for im in doc["images"]) == ["test", "train", "val"]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["generator"] == "data_pipelines.synthetic.ceph" and meta["seed"] == 2 and meta["n"] == 3
    assert meta["image_hw"] == list(HW) and meta["names"] == list(CEPH_NAMES) and meta["spacing_mm"] == [0.5, 0.5]


def test_table_layout_round_trip_and_k5_subset(tmp_path):
    full = generate_ceph_dataset(tmp_path / "k19", 3, seed=8, image_hw=HW, layout="table")[0]
    five = generate_ceph_dataset(tmp_path / "k5", 3, seed=8, image_hw=HW, layout="table", num_landmarks=5)[0]
    assert full == tmp_path / "k19" / "points.csv"
    rows19, rows5 = (list(csv.reader(open(p, newline=""))) for p in (full, five))
    assert rows19[0] == table_header(CEPH_NAMES, with_split=False)
    assert rows5[0] == ["image", "sella_x", "sella_y", "nasion_x", "nasion_y", "orbitale_x", "orbitale_y",
                        "porion_x", "porion_y", "subspinale_x", "subspinale_y", "spacing_mm", "patient_id"]
    for i, (r19, r5) in enumerate(zip(rows19[1:], rows5[1:])):
        s = ceph_sample(i, seed=8, image_hw=HW)
        assert r19[0] == f"images/{s['id']}.png" and (full.parent / r19[0]).is_file()
        xy = np.asarray(r19[1:39], dtype=np.float64).reshape(19, 2)
        np.testing.assert_allclose(xy, s["kpts_px_K2"], atol=1e-3 / 2 + 1e-9)
        assert r5[1:11] == r19[1:11] and r5[0] == r19[0]              # the subset changes columns, not pixels
        assert float(r19[-2]) == 0.5 and r19[-1] == s["patient_id"]
    assert _files(tmp_path / "k19")["images/ceph0002_1.png"] == _files(tmp_path / "k5")["images/ceph0002_1.png"]


def test_labelme_layout_round_trip(tmp_path):
    files = generate_ceph_dataset(tmp_path, 2, seed=1, image_hw=HW, layout="labelme", names=["menton", "sella"])
    assert [p.name for p in files] == ["ceph0001_1.json", "ceph0002_1.json"]
    for i, path in enumerate(files):
        doc = json.loads(path.read_text())
        s = ceph_sample(i, seed=1, image_hw=HW)
        assert doc["version"] == "5.2.1" and doc["flags"] == {} and doc["imageData"] is None
        assert doc["imagePath"] == f"{s['id']}.png" and (tmp_path / doc["imagePath"]).is_file()
        assert (doc["imageHeight"], doc["imageWidth"]) == HW
        assert [sh["label"] for sh in doc["shapes"]] == ["menton", "sella"]
        assert all(sh["shape_type"] == "point" and sh["group_id"] is None for sh in doc["shapes"])
        got = np.array([sh["points"][0] for sh in doc["shapes"]])
        np.testing.assert_array_equal(got, s["kpts_px_K2"][[CEPH_NAMES.index("menton"), 0]])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["spacing_mm"] == [0.5, 0.5] and meta["generator"] == "data_pipelines.synthetic.ceph"
    assert [r["json"] for r in meta["samples"]] == [p.name for p in files]


def test_sixteen_bit_png_and_jpeg(tmp_path):
    generate_ceph_dataset(tmp_path / "b16", 1, seed=0, image_hw=HW, bit_depth=16)
    generate_ceph_dataset(tmp_path / "b8", 1, seed=0, image_hw=HW)
    im16 = Image.open(tmp_path / "b16" / "images" / "ceph0001_1.png")
    assert im16.mode == "I;16"
    a16 = np.asarray(im16).astype(np.int64)
    a8 = np.asarray(Image.open(tmp_path / "b8" / "images" / "ceph0001_1.png")).astype(np.int64)
    assert a16.max() > 255 and len(np.unique(a16)) > 4 * len(np.unique(a8))
    assert np.abs(a16 / 257.0 - a8).max() <= 0.51                     # the same picture, 256x finer levels
    generate_ceph_dataset(tmp_path / "jpg", 1, seed=0, image_hw=HW, image_format="jpg", layout="labelme")
    jpg = Image.open(tmp_path / "jpg" / "ceph0001_1.jpg")
    assert jpg.format == "JPEG" and jpg.mode == "L"
    assert np.abs(np.asarray(jpg).astype(np.int64) - a8).mean() < 4.0
    with pytest.raises(ValueError):
        generate_ceph_dataset(tmp_path / "bad", 1, image_hw=HW, bit_depth=16, image_format="jpg")


@pytest.mark.parametrize("k", [5, 19])
def test_writers_take_arbitrary_samples(tmp_path, k):
    names = [f"pt{j}" for j in range(k)]
    toys = _toy_samples(k)
    coco = write_coco(tmp_path / "coco", iter(toys), names)
    table = write_table(tmp_path / "table", iter(toys), names)
    labelme = write_labelme(tmp_path / "labelme", iter(toys), names)
    doc = json.loads(coco.read_text())
    rows = list(csv.DictReader(open(table, newline="")))
    hidden = k // 2
    for i, s in enumerate(toys):
        kp = np.asarray(doc["annotations"][i]["keypoints"], dtype=np.float64).reshape(k, 3)
        vis = s["kpts_visible_K"]
        np.testing.assert_allclose(kp[vis, :2] - 0.5, s["kpts_px_K2"][vis], atol=1e-6)
        assert doc["images"][i]["split"] == s["split"] and doc["annotations"][i]["num_keypoints"] == vis.sum()
        xy = np.array([[float(rows[i][f"{n}_x"] or "nan"), float(rows[i][f"{n}_y"] or "nan")] for n in names])
        np.testing.assert_allclose(xy[vis], s["kpts_px_K2"][vis], atol=5e-4 + 1e-9)
        assert rows[i]["split"] == s["split"] and rows[i]["spacing_mm"] == "0.25"
        shapes = json.loads(labelme[i].read_text())["shapes"]
        assert [sh["label"] for sh in shapes] == [n for n, v in zip(names, vis) if v]
        saved = np.asarray(Image.open(tmp_path / "labelme" / f"toy_{i}.png"))
        np.testing.assert_array_equal(saved, s["image_HW"])
    assert kp is not None and list(doc["annotations"][1]["keypoints"][3 * hidden:3 * hidden + 3]) == [0.0, 0.0, 0]
    assert rows[1][f"pt{hidden}_x"] == "" and rows[1][f"pt{hidden}_y"] == ""


def test_writers_reject_bad_samples(tmp_path):
    toys = _toy_samples(5, n=2)
    with pytest.raises(ValueError, match="duplicate id"):
        write_layout("coco", tmp_path / "a", [toys[0], toys[0]], [f"p{j}" for j in range(5)])
    outside = dict(toys[0], kpts_px_K2=toys[0]["kpts_px_K2"] + [100.0, 0.0])
    with pytest.raises(ValueError, match="outside"):
        write_layout("table", tmp_path / "b", [outside], [f"p{j}" for j in range(5)])
    with pytest.raises(ValueError, match="do not match"):
        write_layout("labelme", tmp_path / "c", [toys[0]], ["only_one"])
    with pytest.raises(ValueError, match="layout"):
        write_layout("voc", tmp_path / "d", toys, [f"p{j}" for j in range(5)])
    with pytest.raises(ValueError, match="one spacing_mm column"):
        write_table(tmp_path / "e", [dict(toys[0], spacing_mm=(0.2, 0.3))], [f"p{j}" for j in range(5)])
