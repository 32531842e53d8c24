import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from data_pipelines.readers.labelme import HIP_LABELS, read_labelme
from data_pipelines.synthetic.hip import (CLASS_LABELS_ZH, LANDMARK_CLASS, POINT_LABELS_ZH, acute_angle_deg,
                                      generate_hip_dataset, graf_angles_deg, render_phantom)


@pytest.fixture(scope="module")
def phantoms():
    return [render_phantom(np.random.default_rng(100 + i), "I" if i % 2 else "II") for i in range(12)]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate_hip_dataset(out, 9, seed=4, type2_ratio=0.4)


def test_acute_angle_between_lines():
    assert acute_angle_deg((0, 0), (1, 0), (0, 0), (1, 1)) == pytest.approx(45.0)
    assert acute_angle_deg((0, 0), (1, 0), (5, 5), (4, 4)) == pytest.approx(45.0)     # lines, not rays
    assert acute_angle_deg((0, 0), (0, 2), (3, 1), (-2, 1)) == pytest.approx(90.0)
    assert acute_angle_deg((0, 0), (1, 0), (0, 0), (-1, 0.5)) == pytest.approx(np.degrees(np.arctan(0.5)))


def test_graf_type_follows_alpha_and_angles_come_from_the_points(phantoms):
    for s in phantoms:
        alpha, beta = graf_angles_deg(s.kpts_px_K2)
        assert (alpha, beta) == (s.alpha_deg, s.beta_deg)
        if s.hip_type == "I":
            assert s.alpha_deg >= 60.0
        else:
            assert 48.0 <= s.alpha_deg < 60.0
        assert 20.0 < s.beta_deg < 60.0


def test_landmarks_sit_on_their_structures(phantoms):
    for s in phantoms:
        img = s.image_HW.astype(float)
        background_median = np.median(img[s.mask_HW == 0])
        for k, p in enumerate(s.kpts_px_K2):
            x, y = np.round(p).astype(int)
            assert s.mask_HW[y, x] == LANDMARK_CLASS[k], k            # P3 Y cartilage, P4 labrum, P6 roof
            if LANDMARK_CLASS[k] == 0:        # P1, P2, P5 on the bright bone line (speckle darkens single pixels)
                assert (img[y - 1:y + 2, x - 1:x + 2] > 2.5 * background_median).sum() >= 3, k


def test_structures_large_distinguishable_and_lines_long(phantoms):
    for s in phantoms:
        h, w = s.mask_HW.shape
        area = np.bincount(s.mask_HW.ravel(), minlength=8) / s.mask_HW.size
        assert area[1:].min() >= 0.009
        img = s.image_HW.astype(float)
        for c in range(1, 8):
            inside = binary_erosion(s.mask_HW == c, iterations=2)
            ring = binary_dilation(s.mask_HW == c, iterations=5) & ~binary_dilation(s.mask_HW == c, iterations=2)
            assert abs(img[inside].mean() - img[ring].mean()) > 15.0, c          # visible boundary contrast
        p = s.kpts_px_K2
        assert np.linalg.norm(p[1] - p[0]) >= 0.2 * w and np.linalg.norm(p[4] - p[2]) >= 0.2 * w
        assert (p >= 0).all() and (p[:, 0] <= w - 1).all() and (p[:, 1] <= h - 1).all()
        assert all((poly >= 0).all() and (poly[:, 0] <= w - 1).all() and (poly[:, 1] <= h - 1).all()
                   for poly in s.polygons.values())
    # echo texture per class: labrum/perichondrium bright, cartilage dark, relative to soft tissue
    s = phantoms[0]
    mean = [s.image_HW[s.mask_HW == c].mean() for c in range(8)]
    assert mean[3] > 2 * mean[0] and mean[6] > 1.5 * mean[0] and mean[4] < 0.6 * mean[0] and mean[1] < 0.7 * mean[0]


def test_render_is_deterministic_and_scales_to_other_sizes():
    a = render_phantom(np.random.default_rng(3), "I")
    b = render_phantom(np.random.default_rng(3), "I")
    np.testing.assert_array_equal(a.image_HW, b.image_HW)
    np.testing.assert_array_equal(a.kpts_px_K2, b.kpts_px_K2)
    big = render_phantom(np.random.default_rng(3), "II", image_hw=(384, 512))
    assert big.image_HW.shape == (384, 512) and big.alpha_deg < 60.0
    assert (np.bincount(big.mask_HW.ravel(), minlength=8)[1:] > 0.009 * 384 * 512).all()


def test_files_follow_labelme_and_dataset_json(small_set):
    out, paths = small_set
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["spacing_mm"] == [0.2, 0.2] and len(meta["samples"]) == len(paths) == 9
    orders = set()
    for row, path in zip(meta["samples"], paths):
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert set(doc) >= {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
        assert doc["imageData"] is None and (out / doc["imagePath"]).is_file()
        kinds = [(s["shape_type"], s["label"]) for s in doc["shapes"]]
        assert sorted(k for k, _ in kinds) == ["point"] * 6 + ["polygon"] * 7 + ["rectangle"]
        assert {lab for k, lab in kinds if k == "polygon"} == set(CLASS_LABELS_ZH.values())
        assert {lab for k, lab in kinds if k == "point"} == set(POINT_LABELS_ZH)
        assert all(s["group_id"] is None and s["flags"] == {} for s in doc["shapes"])
        orders.add(tuple(lab for _, lab in kinds))
        patient = int(row["id"].split("_")[0])
        assert row["patient_id"] == str(patient) and (patient > 1000) == (row["hip_type"] == "II")
        rec = read_labelme(path, HIP_LABELS)
        assert graf_angles_deg(rec.kpts_px_K2.astype(np.float64))[0] == pytest.approx(row["alpha_deg"], abs=1e-3)
        assert (rec.image_HW3[..., 0] == rec.image_HW3[..., 2]).all()
    assert len(orders) > 1                                            # shapes come in no fixed order
    per_patient = np.unique([r["patient_id"] for r in meta["samples"]], return_counts=True)[1]
    assert set(per_patient) <= {1, 2} and 2 in per_patient
    assert sum(r["hip_type"] == "II" for r in meta["samples"]) in (3, 4)


def test_generation_is_deterministic_and_english_labels(tmp_path, small_set):
    out, paths = small_set
    again = generate_hip_dataset(tmp_path / "again", 9, seed=4, type2_ratio=0.4)
    for a, b in zip(paths, again):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".png").read_bytes() == b.with_suffix(".png").read_bytes()
    other = generate_hip_dataset(tmp_path / "other", 2, seed=5, english_labels=True)
    doc = json.loads(other[0].read_text(encoding="utf-8"))
    labels = {s["label"] for s in doc["shapes"]}
    assert {"femoral_head", "labrum", "labrum_centre", "echo_loss", "rectangle"} <= labels
    assert read_labelme(other[0]).kpts_visible_K.all()
    assert other[0].with_suffix(".png").read_bytes() != paths[0].with_suffix(".png").read_bytes()
