"""DALI-warped batches of the hip dataset (data_pipelines/dali_hip.py, CPU-only pipeline) against the torch path:
the same Batch (landmarks within 0.05 px, masks >= 0.99 agreement, images within interpolation rounding, the same
visibility, spacing and metadata) with augmentation on, and rank sharding that covers every sample exactly once in
evaluation."""
import numpy as np
import pytest
import torch

from data_pipelines.batch import collate_samples
from data_pipelines.hip_dataset import HipDataset
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synth_hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

pytestmark = pytest.mark.dali

AUGMENT = AugmentParams(enabled=True, rotation_deg=15.0, scale_range=(0.85, 1.15), translate_frac=0.08,
                        shear_deg=5.0, flip_p=0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return generate_hip_dataset(tmp_path_factory.mktemp("hip"), 7, seed=3, image_hw=(120, 160))


def _dataset(files, augment):
    return HipDataset(files, input_hw=(64, 96), augment=augment, seed=5, heatmap_impl="none",
                      cache_decoded=True)


def _torch_batches(ds, sampler, batch_size):
    idx = list(sampler)
    return [collate_samples([ds[(i, sampler.epoch)] for i in idx[s:s + batch_size]])
            for s in range(0, len(idx), batch_size)
            if not (sampler.drop_last and len(idx[s:s + batch_size]) < batch_size)]


@pytest.mark.parametrize("augment", [AUGMENT, None], ids=["augmented", "plain"])
def test_dali_batches_equal_the_torch_path(files, augment):
    from data_pipelines.dali_hip import DaliHipBatches
    ds = _dataset(files, augment)
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=True, batch_size=3)  # noqa: E731
    dali = DaliHipBatches(ds, 3, make())
    dali.set_epoch(1)
    reference = make()
    reference.set_epoch(1)
    got, want = list(dali), _torch_batches(ds, reference, 3)
    assert len(got) == len(want) == len(dali) == 2                    # 7 samples, batches of 3, tail dropped
    flips = 0
    for g, w in zip(got, want):
        assert [m["index"] for m in g.meta] == [m["index"] for m in w.meta]
        assert np.abs((g.kpts_px_BK2 - w.kpts_px_BK2).numpy()).max() < 0.05
        assert torch.equal(g.kpts_visible_BK, w.kpts_visible_BK)
        assert (g.mask_BHW == w.mask_BHW).float().mean() >= 0.99
        assert (g.image_BCHW - w.image_BCHW).abs().max() < 1e-3
        torch.testing.assert_close(g.spacing_mm_B2, w.spacing_mm_B2)
        assert g.heatmap_BKHW is None                                   # targets are rendered on the device
        flips += sum(m["flipped"] for m in g.meta)
        assert [m["to_input_3x3"] for m in g.meta] == [m["to_input_3x3"] for m in w.meta]
    if augment is not None:
        assert flips >= 1, "the draws should include a flip (flip_p 0.5, 6 samples)"


def test_dali_evaluation_shards_see_every_sample_once(files):
    from data_pipelines.dali_hip import DaliHipBatches
    ds = _dataset(files, None)
    seen = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), rank, 2, shuffle=False, drop_last=False, batch_size=2)
        batches = list(DaliHipBatches(ds, 2, sampler))
        assert len(batches) == len(sampler.shard()) // 2 + len(sampler.shard()) % 2
        seen += [m["index"] for b in batches for m in b.meta]
    assert sorted(seen) == list(range(len(ds)))                         # 7 samples: 4 + 3, the last batch of 1


def test_make_batches_names_the_reader_without_a_dali_path():
    from data_pipelines.loaders import make_batches
    plain = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    sampler = ShardedSampler(4, shuffle=False, drop_last=False, batch_size=2)
    with pytest.raises(ValueError, match="TensorDataset reader has no DALI path"):
        make_batches(plain, 2, sampler, "dali")
    with pytest.raises(ValueError, match="unknown loader 'bogus'"):
        make_batches(plain, 2, sampler, "bogus")
