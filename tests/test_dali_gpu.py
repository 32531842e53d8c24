"""The DALI loader on a GPU (device_id=0): image and mask come out on the device and equal the torch path's (PNG:
DALI's mixed decoder and GPU warps; JPEG: nvJPEG against PIL's libjpeg within a few grey levels), evaluation shards
see every sample once, and data.loader=auto trains with DALI on CUDA. Skipped without CUDA or DALI."""
import json

import numpy as np
import pytest
import torch

from data_pipelines.batch import collate_samples
from data_pipelines.readers.labelme_reader import HipDataset
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

pytestmark = [pytest.mark.gpu, pytest.mark.dali]

AUGMENT = AugmentParams(enabled=True, rotation_deg=15.0, scale_range=(0.85, 1.15), translate_frac=0.08,
                        shear_deg=5.0, flip_p=0.5, speckle_sigma_max=0.0, blur_p=0.0)


def _compare(ds, batch_size=3, epoch=1):
    from data_pipelines.dali.source import dali_batches
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=True, batch_size=batch_size)  # noqa
    loader = dali_batches(ds, batch_size, make(), device_id=0)
    loader.set_epoch(epoch)
    ref = make()
    ref.set_epoch(epoch)
    idx = list(ref)
    got = list(loader)
    want = [collate_samples([ds[(i, epoch)] for i in idx[s:s + batch_size]])
            for s in range(0, len(idx) - batch_size + 1, batch_size)]
    assert len(got) == len(want) >= 1
    return loader, got, want


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_gpu_batches_equal_the_torch_path(tmp_path, fmt):
    files = generate_hip_dataset(tmp_path, 7, seed=3, image_hw=(240, 320), image_format=fmt)
    ds = HipDataset(files, input_hw=(128, 160), augment=AUGMENT, seed=5, heatmap_impl="none")
    loader, got, want = _compare(ds)
    assert loader.source.decode == "dali"
    worst = 0.0
    for g, w in zip(got, want):
        assert g.image_BCHW.device.type == "cuda" and g.mask_BHW.device.type == "cuda"
        assert [m["index"] for m in g.meta] == [m["index"] for m in w.meta]
        assert np.abs((g.kpts_px_BK2 - w.kpts_px_BK2).numpy()).max() < 0.05
        assert torch.equal(g.kpts_visible_BK, w.kpts_visible_BK)
        assert (g.mask_BHW.cpu() == w.mask_BHW).float().mean() >= 0.99
        diff = (g.image_BCHW.cpu() - w.image_BCHW).abs()
        worst = max(worst, float(diff.max()))
        if fmt == "png":
            assert float(diff.max()) < 2e-3
        else:   # nvJPEG vs libjpeg IDCT: a few grey levels at most, about none on average
            assert float(diff.max()) < 8 / 255 and float(diff.mean()) < 0.5 / 255
    print(f"{fmt}: max |DALI GPU - torch path| = {worst:.2e}")


def test_gpu_evaluation_shards_see_every_sample_once(tmp_path):
    from data_pipelines.dali.source import dali_batches
    files = generate_hip_dataset(tmp_path, 7, seed=1, image_hw=(120, 160))
    ds = HipDataset(files, input_hw=(64, 96), augment=None, heatmap_impl="none")
    seen = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), rank, 2, shuffle=False, drop_last=False, batch_size=2)
        seen += [m["index"] for b in dali_batches(ds, 2, sampler, device_id=0) for m in b.meta]
    assert sorted(seen) == list(range(len(ds)))


def test_loader_auto_trains_with_dali_on_cuda(tmp_path):
    from engine.config import load_config
    from engine.run import train
    root = tmp_path / "data"
    generate_hip_dataset(root, 24, seed=0, image_hw=(240, 320))
    cfg = load_config(None, [f"data.root={root}", f"log.run_dir={tmp_path / 'run'}", "data.cache_decoded=false",
                             "data.synth_n=24", "data.num_folds=4", "train.max_steps=30", "train.log_every=5",
                             "train.eval_every=0", "train.batch_size=8", "log.progress=false", "log.tensorboard=false",
                             "log.overlays=2"])
    train(cfg, final_test=True)
    run = tmp_path / "run"
    saved = load_config(run / "config.yaml")
    assert saved.data.loader == "dali" and saved.data.targets == "device"
    report = json.loads((run / "report.json").read_text())
    assert report["landmark_mre_px"] is not None
