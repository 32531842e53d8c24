import collections
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.errors import DataError
from data_pipelines.readers.labelme_reader import HipDataset, find_labelme_files
from data_pipelines.readers.labelme import read_labelme
from data_pipelines.synthetic.hip import LANDMARK_CLASS, generate_hip_dataset
from data_pipelines.transforms import AugmentParams, warp_points

AUG = AugmentParams(rotation_deg=10, scale_range=(0.9, 1.1), translate_frac=0.05)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("hip")
    generate_hip_dataset(out, 8, seed=1, type2_ratio=0.5)
    return out


def _copy(src, dst, names=None):
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if names is None or p.stem in names:
            shutil.copy(p, dst / p.name)
    return dst


def _first_error(loader):
    """Iterate until the loader raises; drop the iterator at once so its workers stop now, not at exit."""
    it = iter(loader)
    try:
        collections.deque(it, maxlen=0)  # drain
    except Exception as exc:        # noqa: BLE001 - returned for the caller to check its type
        exc.__traceback__ = None
        return exc
    finally:
        del it
    return None


def test_dataloader_with_workers_yields_batches_with_landmarks_on_their_structures(synth):
    ds = HipDataset(find_labelme_files(synth), input_hw=(128, 160), augment=AUG, sigma_px=2.0, seed=3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b, Batch) for b in batches)
    b = batches[0]
    assert b.image_BCHW.shape == (4, 3, 128, 160) and b.mask_BHW.dtype == torch.int64
    assert b.heatmap_BKHW.shape == (4, 6, 128, 160)
    assert torch.cat([x.kpts_visible_BK for x in batches]).float().mean() > 0.9
    for batch in batches:
        for i in range(batch.size):
            for k, (x, y) in enumerate(batch.kpts_px_BK2[i].tolist()):
                if not batch.kpts_visible_BK[i, k]:      # pushed out of the frame by the augmentation
                    assert not (-0.5 <= x <= 159.5 and -0.5 <= y <= 127.5)
                    assert batch.heatmap_BKHW[i, k].sum() == 0
                    continue
                if LANDMARK_CLASS[k]:                    # P3 in the Y cartilage, P4 in the labrum, P6 in the roof
                    assert batch.mask_BHW[i, round(y), round(x)] == LANDMARK_CLASS[k], (i, k)
                hm = batch.heatmap_BKHW[i, k]
                r, c = divmod(int(hm.argmax()), hm.shape[1])
                assert abs(c - x) <= 1.0 and abs(r - y) <= 1.0
                assert hm.max() == pytest.approx(255.0, rel=0.15)


def test_sample_frame_meta_and_spacing_without_augmentation(synth):
    paths = find_labelme_files(synth)
    ds = HipDataset(paths, input_hw=(128, 160), augment=None)
    s = ds[3]
    assert s["meta"]["index"] == 3
    m = np.array(s["meta"]["to_input_3x3"])
    np.testing.assert_allclose(m, [[0.5, 0, -0.25], [0, 0.5, 3.75], [0, 0, 1]])   # 240x320 -> 120x160, pad 4 rows
    rec = read_labelme(paths[3])
    np.testing.assert_allclose(s["kpts_px_K2"].numpy(), warp_points(rec.kpts_px_K2, m), atol=1e-4)
    np.testing.assert_allclose(s["image_CHW"][:, :3].numpy(), 128 / 255, atol=1e-6)     # letterbox padding rows
    np.testing.assert_allclose(s["spacing_mm_2"].numpy(), [0.4, 0.4], rtol=1e-6)        # 0.2 mm / 0.5
    meta = next(r for r in json.loads((synth / "dataset.json").read_text())["samples"] if r["json"] == paths[3].name)
    assert s["meta"]["id"] == meta["id"] and s["meta"]["patient_id"] == meta["patient_id"]
    assert s["meta"]["hip_type"] == meta["hip_type"] == ds.hip_type(3) and ds.patient_id(3) == meta["patient_id"]
    assert s["meta"]["orig_hw"] == (240, 320) and s["meta"]["image"].endswith(".png")
    assert (s["mask_HW"][:4] == 0).all() and (s["mask_HW"] > 0).any()
    # the original frame, for evaluation at original resolution
    orig = ds.original(s["meta"]["index"])
    np.testing.assert_array_equal(orig["image_HW3"], rec.image_HW3)
    np.testing.assert_array_equal(orig["mask_HW"], rec.mask_HW)
    np.testing.assert_array_equal(orig["kpts_px_K2"], rec.kpts_px_K2)
    np.testing.assert_allclose(orig["spacing_mm_2"], [0.2, 0.2])


def test_augmentation_is_a_function_of_seed_epoch_index_not_of_workers(synth):
    ds = HipDataset(find_labelme_files(synth), input_hw=(64, 96), augment=AUG, seed=11, cache_decoded=True)
    ds.set_epoch(2)
    serial = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples)
    parallel = torch.cat([b.image_BCHW for b in loader])
    torch.testing.assert_close(parallel, torch.stack([s["image_CHW"] for s in serial]), rtol=0, atol=0)
    assert torch.equal(ds[(1, 2)]["kpts_px_K2"], serial[1]["kpts_px_K2"])      # (index, epoch) addressing
    ds.set_epoch(3)
    assert not torch.equal(ds[1]["kpts_px_K2"], serial[1]["kpts_px_K2"])
    no_cache = HipDataset(find_labelme_files(synth), input_hw=(64, 96), augment=AUG, seed=11, cache_decoded=False)
    no_cache.set_epoch(2)
    assert torch.equal(no_cache[1]["image_CHW"], serial[1]["image_CHW"])
    # an oversampled list repeats a file: one decoded copy, but each index gets its own augmentation
    dup = HipDataset([ds.json_paths[0]] * 2 + [ds.json_paths[1]], input_hw=(64, 96), augment=AUG, cache_decoded=True)
    assert len(dup) == 3 and dup.working(0) is dup.working(1)
    assert not torch.equal(dup[0]["kpts_px_K2"], dup[1]["kpts_px_K2"])
    # mm per input pixel follows the letterbox and the augmentation's scale
    scale = np.sqrt(abs(np.linalg.det(np.array(serial[1]["meta"]["to_input_3x3"])[:2, :2])))
    assert serial[1]["spacing_mm_2"][0].item() == pytest.approx(0.2 / scale, rel=1e-5)


def test_bad_files_raise_or_are_skipped_and_counted(synth, tmp_path, caplog):
    bad = _copy(synth, tmp_path / "bad")
    (bad / "1_1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    doc = json.loads((bad / "2_1.json").read_text(encoding="utf-8"))
    doc["shapes"] = [s for s in doc["shapes"] if s["label"] != "盂唇中心点"]      # drop P4
    (bad / "2_1.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    paths = find_labelme_files(bad)
    with pytest.raises(DataError, match=r"1_1\.png: image does not decode"):
        HipDataset(paths)
    with pytest.raises(DataError, match=r"2_1\.json: missing point: landmark 3 \(盂唇中心点"):
        HipDataset([p for p in paths if p.stem != "1_1"])
    with caplog.at_level(logging.WARNING, logger="data_pipelines.hip_dataset"):
        ds = HipDataset(paths, skip_bad=True)
    assert len(ds) == len(paths) - 2
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == ["1_1.json", "2_1.json"]
    assert "skipped 2 bad file(s)" in caplog.text and "1_1.png" in caplog.text and "2_1.json" in caplog.text


def test_failure_inside_a_worker_is_a_data_error_naming_the_file(synth, tmp_path):
    folder = _copy(synth, tmp_path / "late")
    ds = HipDataset(find_labelme_files(folder), input_hw=(64, 96))
    victim = ds.json_paths[5]
    victim.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\n gone bad after validation")
    err = _first_error(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples))
    assert isinstance(err, DataError) and victim.stem in err.path and victim.stem in str(err)
    assert "image does not decode" in err.problem
    with pytest.raises(DataError, match=r"image does not decode"):
        ds[5]


def test_ids_patients_and_types_fall_back_to_file_names(synth, tmp_path):
    folder = _copy(synth, tmp_path / "plain")
    (folder / "dataset.json").unlink()
    ds = HipDataset(find_labelme_files(folder), spacing_mm=(0.3, 0.25))
    for i, path in enumerate(ds.json_paths):
        patient = path.stem.split("_")[0]
        assert ds.patient_id(i) == patient and ds.sample_id(i) == path.stem
        assert ds.hip_type(i) == ("II" if int(patient) > 1000 else "I")
    np.testing.assert_allclose(ds[0]["spacing_mm_2"].numpy(), [0.6, 0.5], rtol=1e-6)
