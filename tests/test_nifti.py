"""NIfTI reader (data_pipelines/readers/nifti.py), spine phantom (synth_spine.py) and SpineDataset / build_nifti_data."""
import gzip
import json
import logging
import shutil
import struct
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.nifti import load_sagittal, load_volume, sagittal_image, zscore
from data_pipelines.by_format import build_nifti_data
from data_pipelines.by_format import load_nifti_for_predict as load_for_predict
from data_pipelines.readers.nifti_reader import SpineDataset, label_path_for
from data_pipelines.synthetic.spine import generate_spine_dataset
from data_pipelines.transforms import AugmentParams, warp_points
from engine.config import DataConfig

FIXTURE = SHARED_DATA / "spine_fixture"
needs_fixture = pytest.mark.skipif(not (FIXTURE / "t2.nii.gz").is_file(), reason="spine fixture not available")
STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def _volume_and_labels(tmp_path, labels):
    """A 6x8x10 random volume and a label volume with the given {(x, y, z): value} voxels."""
    rng = np.random.default_rng(0)
    img = _save(tmp_path / "img.nii.gz", rng.normal(100, 10, (6, 8, 10)).astype(np.float32))
    lab = np.zeros((6, 8, 10), np.int16)
    for vox, value in labels.items():
        lab[vox] = value
    return img, _save(tmp_path / "lab.nii.gz", lab)


# ------------------------------------------------------------------------------------------------- bad inputs
def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        load_volume(tmp_path / "nope.nii.gz")
    assert err.value.path == str(tmp_path / "nope.nii.gz")


def test_corrupt_gzip_is_named(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(1).random((20, 20, 20)).astype(np.float32))
    blob = bytearray(good.read_bytes())
    blob[len(blob) * 3 // 4:len(blob) * 3 // 4 + 64] = b"\xff" * 64        # damage the deflate stream
    (tmp_path / "bad.nii.gz").write_bytes(bytes(blob))
    (tmp_path / "trunc.nii.gz").write_bytes(good.read_bytes()[:len(blob) // 2])
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume" * 40)
    for name, problem in (("bad.nii.gz", "CRC check failed"), ("trunc.nii.gz", "ended before the end-of-stream"),
                          ("junk.nii.gz", "not a NIfTI-1/2 file")):
        with pytest.raises(DataError, match=problem) as err:
            load_volume(tmp_path / name)
        assert err.value.path == str(tmp_path / name)


def test_two_d_volume_is_rejected_and_singleton_4d_accepted(tmp_path):
    with pytest.raises(DataError, match=r"expected a 3-D volume, got shape \(5, 6\)"):
        load_volume(_save(tmp_path / "flat.nii.gz", np.zeros((5, 6), np.float32)))
    vol = load_volume(_save(tmp_path / "t1.nii.gz", np.ones((3, 4, 5, 1), np.float32)))
    assert vol.data_XYZ.shape == (3, 4, 5)


def test_zero_pixdim_is_rejected(tmp_path):
    # nibabel repairs a zero pixdim when saving and when loading, so the bytes are written by hand
    img = nib.Nifti1Image(np.random.default_rng(2).random((4, 5, 6)).astype(np.float32), np.eye(4))
    raw = bytearray(img.header.binaryblock) + b"\0" * 4 + np.asarray(img.dataobj).tobytes(order="F")
    raw[80:84] = struct.pack("<f", 0.0)                                         # pixdim[1]
    (tmp_path / "zero.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"missing or zero voxel spacing \(pixdim\[1:4\] = \[0.0, 1.0, 1.0\]\)"):
        load_volume(tmp_path / "zero.nii.gz")


def test_duplicate_label_value_names_file_and_value(tmp_path):
    img, lab = _volume_and_labels(tmp_path, {(1, 2, 3): 3, (2, 2, 3): 3, (1, 2, 7): 4})
    with pytest.raises(DataError, match="duplicate label value 3: 2 voxels") as err:
        load_sagittal(img, lab)
    assert err.value.path == str(lab)


def test_out_of_range_label_errors_or_is_skipped(tmp_path, caplog):
    img, lab = _volume_and_labels(tmp_path, {(1, 2, 3): 12, (1, 2, 7): 4})
    with pytest.raises(DataError, match=r"label value 12 is outside \[1, 11\]"):
        load_sagittal(img, lab)
    with caplog.at_level(logging.WARNING):
        s = load_sagittal(img, lab, out_of_range="skip")
    assert s.dropped_values == [12] and s.kpts_visible_K.tolist() == [False] * 3 + [True] + [False] * 7
    assert "skipped label value(s) [12]" in caplog.text
    # first_label shifts the channels: value 4 becomes channel 0 with first_label=4, value 12 channel 8
    s = load_sagittal(img, lab, first_label=4, num_keypoints=9)
    assert np.flatnonzero(s.kpts_visible_K).tolist() == [0, 8]


def test_label_grid_mismatch_and_non_integer_values(tmp_path):
    img, _ = _volume_and_labels(tmp_path, {})
    small = _save(tmp_path / "small.nii.gz", np.zeros((6, 8, 9), np.int16))
    with pytest.raises(DataError, match="differs from the image"):
        load_sagittal(img, small)
    frac = np.zeros((6, 8, 10), np.float32)
    frac[1, 1, 1] = 2.5
    with pytest.raises(DataError, match="label value 2.5 is not an integer"):
        load_sagittal(img, _save(tmp_path / "frac.nii.gz", frac))


# --------------------------------------------------------------------------------------------- reorientation
def _world_equivalent_files(tmp_path):
    """One RAS volume (with labels) stored three ways: RAS, PSR and LPI, affines written by hand."""
    rng = np.random.default_rng(5)
    nx, ny, nz = 7, 9, 11
    sx, sy, sz = 2.5, 1.0, 1.25
    ras = rng.normal(0, 1, (nx, ny, nz)).astype(np.float32)
    lab = np.zeros((nx, ny, nz), np.int16)
    lab[3, 2, 8], lab[4, 5, 4], lab[2, 6, 1] = 1, 2, 3
    a_ras = np.diag([sx, sy, sz, 1.0])
    a_ras[:3, 3] = [-10.0, 5.0, 20.0]
    # PSR: stored (i, j, k) = (P index, S index, R index) = (ny-1-y, z, x); world = a_ras @ (x, y, z)
    a_psr = np.array([[0, 0, sx, -10.0], [-sy, 0, 0, 5.0 + sy * (ny - 1)], [0, sz, 0, 20.0], [0, 0, 0, 1]])
    # LPI: stored (i, j, k) = (nx-1-x, ny-1-y, nz-1-z)
    a_lpi = np.diag([-sx, -sy, -sz, 1.0])
    a_lpi[:3, 3] = [-10.0 + sx * (nx - 1), 5.0 + sy * (ny - 1), 20.0 + sz * (nz - 1)]
    out = []
    for name, fn, aff in (("ras", lambda a: a, a_ras), ("psr", lambda a: a.transpose(1, 2, 0)[::-1], a_psr),
                          ("lpi", lambda a: a[::-1, ::-1, ::-1], a_lpi)):
        out.append((_save(tmp_path / f"{name}.nii.gz", np.ascontiguousarray(fn(ras)), aff),
                    _save(tmp_path / f"{name}_lab.nii.gz", np.ascontiguousarray(fn(lab)), aff)))
    return out, ras


def test_three_orientations_give_identical_images_and_points(tmp_path):
    files, ras = _world_equivalent_files(tmp_path)
    samples = [load_sagittal(img, lab, slab=3, num_keypoints=3) for img, lab in files]
    assert [s.source_axcodes for s in samples] == ["RAS", "PSR", "LPI"]
    for s in samples[1:]:
        np.testing.assert_array_equal(s.image_HW, samples[0].image_HW)
        np.testing.assert_array_equal(s.kpts_px_K2, samples[0].kpts_px_K2)
        np.testing.assert_allclose(s.spacing_mm_2, [1.0, 1.25])
        assert s.slab_range == samples[0].slab_range
    # hand check: labels at x = 3, 4, 2 -> median 3 -> slices 2..4; (x, y, z) -> (col, row) = (8 - y, 10 - z)
    s = samples[0]
    assert s.slab_range == (2, 5)
    np.testing.assert_array_equal(s.kpts_px_K2, [[6, 2], [3, 6], [2, 9]])
    np.testing.assert_allclose(s.lateral_mm_K, [0.0, 2.5, 2.5])
    expected = zscore(ras[2:5].mean(0)[::-1, ::-1].T)
    np.testing.assert_allclose(s.image_HW, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- real fixture
@needs_fixture
def test_fixture_centre_labels_geometry():
    s = load_sagittal(FIXTURE / "t2.nii.gz", FIXTURE / "t2_labeled_center_manual.nii.gz")
    assert s.source_axcodes == "PSR" and s.image_HW.shape == (55, 60)     # rows S-I (axis 1), columns A-P (axis 0)
    assert np.flatnonzero(s.kpts_visible_K).tolist() == [2, 3, 4]          # values 3, 4, 5
    # README voxels (i, j, k) = (31, 44, 25), (31, 26, 25), (32, 9, 25); PSR -> RAS (x, y, z) = (k, 59 - i, j);
    # 2-D (col, row) = (59 - y, 54 - z) = (i, 54 - j)
    pts = s.kpts_px_K2[[2, 3, 4]]
    np.testing.assert_array_equal(pts, [[31, 10], [31, 28], [32, 45]])
    gaps_mm = np.hypot(*(np.diff(pts, axis=0) * s.spacing_mm_2).T)
    assert np.all((gaps_mm >= 17.0) & (gaps_mm <= 18.1))
    assert np.all(np.diff(pts[:, 1]) > 0)                                   # superior -> inferior
    assert np.all((pts >= 0) & (pts < [60, 55]))
    np.testing.assert_allclose(s.spacing_mm_2, [1.0, 1.0])
    assert s.slab_range == (22, 28) and np.allclose(s.lateral_mm_K[[2, 3, 4]], 0.5)
    assert np.isfinite(s.image_HW).all()
    assert abs(float(s.image_HW.mean())) < 1e-5 and float(s.image_HW.std()) == pytest.approx(1.0, abs=1e-5)


@needs_fixture
def test_fixture_single_slice_matches_readme_display_and_cord():
    # README: "Display it with data[:, ::-1, k].T to put superior at the top and anterior on the left"
    raw = np.asarray(nib.load(str(FIXTURE / "t2.nii.gz")).dataobj).astype(np.float32)
    s = load_sagittal(FIXTURE / "t2.nii.gz", FIXTURE / "t2_labeled_center_manual.nii.gz", slab=1)
    assert s.slab_range == (25, 26)
    np.testing.assert_allclose(s.image_HW, zscore(raw[:, ::-1, 25].T), atol=1e-5)
    # the centre labels lie on the cord: the cord mask, projected the same way, is 1 at every point
    seg = load_volume(FIXTURE / "t2_seg-manual.nii.gz")
    seg_2d = sagittal_image(seg.data_XYZ, 25, 26)
    for x, y in s.kpts_px_K2[s.kpts_visible_K].astype(int):
        assert seg_2d[y, x] == 1.0


@needs_fixture
def test_fixture_two_labels_file():
    s = load_sagittal(FIXTURE / "t2.nii.gz", FIXTURE / "labels.nii.gz")
    assert np.flatnonzero(s.kpts_visible_K).tolist() == [2, 4]
    np.testing.assert_array_equal(s.kpts_px_K2[[2, 4]], [[31, 10], [32, 45]])
    assert s.slab_range == (23, 29)                                          # median k = 26


@needs_fixture
def test_fixture_through_the_dataset_and_predict_input(tmp_path):
    ds = SpineDataset([FIXTURE / "t2.nii.gz"], input_hw=(128, 128), label_suffix="_labeled_center_manual")
    sample, orig = ds[0], ds.original(0)
    assert orig["id"] == "t2" and ds.group_id(0) == "t2"
    np.testing.assert_array_equal(orig["kpts_px_K2"][[2, 3, 4]], [[31, 10], [31, 28], [32, 45]])
    s = 128 / 60                                                      # 55 x 60 letterboxed into 128 x 128
    np.testing.assert_allclose(sample["kpts_px_K2"][2].numpy(), [(31 + 0.5) * s - 0.5, (10 + 0.5) * s - 0.5
                                                                 + (128 - 55 * s) / 2], rtol=1e-5)
    cfg = DataConfig(input_hw=(128, 128), reader_args={"label_suffix": "_labeled_center_manual"})
    item = load_for_predict(FIXTURE / "t2.nii.gz", cfg)
    torch.testing.assert_close(item["input_CHW"], sample["image_CHW"])
    assert item["truth"]["kpts_visible_K"].sum() == 3 and item["kpt_names"][2] == "disc3"


# ---------------------------------------------------------------------------------------------- the phantom
def _labels(p):
    return label_path_for(p, "_labels-disc")


def test_generator_is_deterministic_and_non_canonical(tmp_path):
    a = generate_spine_dataset(tmp_path / "a", 3, seed=4, shape=(8, 160, 96))
    b = generate_spine_dataset(tmp_path / "b", 3, seed=4, shape=(8, 160, 96))
    c = generate_spine_dataset(tmp_path / "c", 1, seed=5, shape=(8, 160, 96))
    assert [p.relative_to(tmp_path / "a").as_posix() for p in a] == \
        [f"sub-00{i}/sub-00{i}_T2w.nii.gz" for i in range(3)]
    for pa, pb in zip(a, b):
        for fa, fb in ((pa, pb), (_labels(pa), _labels(pb))):
            np.testing.assert_array_equal(np.asarray(nib.load(str(fa)).dataobj), np.asarray(nib.load(str(fb)).dataobj))
    assert not np.array_equal(np.asarray(nib.load(str(a[0])).dataobj), np.asarray(nib.load(str(c[0])).dataobj))
    img = nib.load(str(a[0]))
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("P", "S", "R")
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.25, 2.5))    # (A-P, S-I, L-R) stored as PSR
    assert nib.aff2axcodes(nib.load(str(a[1])).affine) == ("L", "P", "I")
    assert json.loads((tmp_path / "a" / "synth_spine.json").read_text())["subjects"][1]["orientation"] == "LPI"


def test_generated_discs_sit_on_intensity_minima_between_bodies(tmp_path):
    paths = generate_spine_dataset(tmp_path, 8, seed=0, shape=(8, 208, 112))
    missing = 0
    for p in paths:
        s = load_sagittal(p, _labels(p), slab=2)
        vis = s.kpts_visible_K
        n = int(vis.sum())
        assert vis.tolist() == [True] * n + [False] * (11 - n) and n >= 8  # only the lowest discs may be absent
        missing += 11 - n
        pts = s.kpts_px_K2[vis]

        def patch(x, y):
            x, y = int(round(x)), int(round(y))
            return float(s.image_HW[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].mean())
        for k in range(n):
            gap = pts[k + 1] - pts[k] if k + 1 < n else pts[k] - pts[k - 1]
            above, below = pts[k] - gap / 2, pts[k] + gap / 2                   # vertebral body centres
            inside = [q for q in (above, below) if 0 <= q[1] <= s.image_HW.shape[0] - 1]
            assert inside and all(patch(*pts[k]) < patch(*q) - 0.5 for q in inside), (p.name, k)
    assert missing > 0                                                          # some subjects lack low discs


# ------------------------------------------------------------------------------------------ dataset / builder
def _cfg(root, **kw):
    base = dict(root=str(root), synth_n=9, synth_image_hw=(160, 96), input_hw=(128, 128), sigma_px=2.0,
                heatmap_peak=1.0, num_folds=3, test_frac=0.25, num_workers=0, flip_p=0.5)
    base.update(kw)
    return DataConfig(**base)


def test_builder_generates_and_splits_by_subject(tmp_path):
    root = tmp_path / "data"
    build_nifti_data(_cfg(root, synth_n=8), tmp_path / "run0", STRATEGY, seed=0)     # generates into the empty root
    # a second session of sub-000 and sub-003: the same subject must stay in one part
    for sub in ("sub-000", "sub-003"):
        for suffix in ("_T2w.nii.gz", "_T2w_labels-disc.nii.gz"):
            shutil.copy(root / sub / f"{sub}{suffix}", root / sub / f"{sub}_ses-2{suffix}")
    run = tmp_path / "run"
    run.mkdir()
    data = build_nifti_data(_cfg(root), run, STRATEGY, seed=0)
    parts = {name: {data[name].group_id(i) for i in range(len(data[name]))} for name in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
    assert not (parts["val"] & parts["test"])
    assert sum(len(data[n]) for n in ("train", "val", "test")) == 10
    ids = {data[n].sample_id(i): n for n in ("train", "val", "test") for i in range(len(data[n]))}
    assert ids["sub-000_T2w"] == ids["sub-000_ses-2_T2w"] and ids["sub-003_T2w"] == ids["sub-003_ses-2_T2w"]
    assert json.loads((run / "splits.json").read_text())["test"] == data["splits"]["test"]
    assert data["num_classes"] == 0 and data["class_names"] is None and data["kpt_names"][0] == "disc1"
    assert data["train"].augment is not None and data["val"].augment is None


def test_samples_letterbox_heatmaps_spacing_and_predict_input(tmp_path):
    paths = generate_spine_dataset(tmp_path, 2, seed=1, shape=(6, 160, 96))
    ds = SpineDataset(paths, input_hw=(128, 128), sigma_px=2.0, heatmap_peak=1.0)
    sample, orig = ds[0], ds.original(0)
    m = np.asarray(sample["meta"]["to_input_3x3"])
    assert m[0, 0] == pytest.approx(0.8) and sample["image_CHW"].shape == (1, 128, 128)   # 160 rows -> 128
    np.testing.assert_allclose(sample["kpts_px_K2"].numpy(), warp_points(orig["kpts_px_K2"], m), atol=1e-4)
    np.testing.assert_allclose(sample["spacing_mm_2"].numpy(), orig["spacing_mm_2"] / 0.8, rtol=1e-6)
    hm, vis = sample["heatmap_KHW"].numpy(), sample["kpts_visible_K"].numpy()
    assert hm.max() <= 1.0 and not hm[~vis].any()
    for k in np.flatnonzero(vis):
        y, x = np.unravel_index(hm[k].argmax(), hm[k].shape)
        assert abs(x - sample["kpts_px_K2"][k, 0]) <= 0.5 and abs(y - sample["kpts_px_K2"][k, 1]) <= 0.5
    assert orig["image_HW3"].dtype == np.uint8 and orig["image_HW3"].shape == (160, 96, 3)
    assert orig["volume"] == str(paths[0])
    item = load_for_predict(paths[0], _cfg(tmp_path, input_hw=(128, 128)))
    torch.testing.assert_close(item["input_CHW"], sample["image_CHW"])
    np.testing.assert_array_equal(item["truth"]["kpts_px_K2"], orig["kpts_px_K2"])
    rgb = SpineDataset(paths[:1], input_hw=(128, 128), channels=3)[0]["image_CHW"]
    assert rgb.shape == (3, 128, 128) and torch.equal(rgb[0], rgb[2])


def test_flip_augmentation_is_seeded_and_mirrors_points(tmp_path):
    paths = generate_spine_dataset(tmp_path, 1, seed=2, shape=(6, 160, 96))
    flip = AugmentParams(rotation_deg=0, scale_range=(1, 1), translate_frac=0, flip_p=1.0, brightness=0,
                         contrast_range=(1, 1), gamma_range=(1, 1), speckle_sigma_max=0, blur_p=0)
    plain = SpineDataset(paths, input_hw=(128, 128))[0]
    flipped = SpineDataset(paths, input_hw=(128, 128), augment=flip)[0]
    assert flipped["meta"]["flipped"]
    vis = plain["kpts_visible_K"]
    np.testing.assert_allclose(flipped["kpts_px_K2"][vis, 0], 127 - plain["kpts_px_K2"][vis, 0], atol=1e-4)
    torch.testing.assert_close(flipped["image_CHW"], plain["image_CHW"].flip(-1), atol=1e-4, rtol=1e-4)
    rnd = SpineDataset(paths, input_hw=(128, 128), augment=AugmentParams(flip_p=0.5), seed=3)
    assert torch.equal(rnd[(0, 1)]["image_CHW"], rnd[(0, 1)]["image_CHW"])
    assert not torch.equal(rnd[(0, 1)]["image_CHW"], rnd[(0, 2)]["image_CHW"])
    aug = rnd[(0, 1)]["image_CHW"]
    assert aug.abs().max() < 50 and float(aug.std()) > 0.3                  # re-z-scored after intensity changes


def test_bad_volumes_raise_or_are_skipped(tmp_path):
    paths = generate_spine_dataset(tmp_path, 3, seed=0, shape=(6, 160, 96))
    paths[1].write_bytes(b"broken")
    _labels(paths[2]).unlink()
    with pytest.raises(DataError) as err:
        SpineDataset(paths)
    assert err.value.path == str(paths[1])
    ds = SpineDataset(paths, skip_bad=True)
    assert len(ds) == 1 and [p for p, _ in ds.skipped] == [str(paths[1]), str(_labels(paths[2]))]
    assert "label volume not found" in ds.skipped[1][1]
    with pytest.raises(OptionError, match="unknown option 'slabs'"):
        build_nifti_data(_cfg(tmp_path, reader_args={"slabs": 4}), tmp_path, STRATEGY, seed=0)
    with pytest.raises(OptionError, match="channels"):
        build_nifti_data(_cfg(tmp_path, reader_args={"channels": 2}), tmp_path, STRATEGY, seed=0)
    with pytest.raises(DataError, match="no volumes matching"):
        build_nifti_data(_cfg(tmp_path / "empty", synthetic=False), tmp_path, STRATEGY, seed=0)
