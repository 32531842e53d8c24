"""The DALI loader on the hip dataset (data_pipelines/dali/hip.py + dali_pipeline.py, CPU-only pipeline) against
the torch path: the same Batch (landmarks within 0.05 px, masks >= 0.99 agreement, images within interpolation
rounding, the same visibility, spacing and metadata) with geometric and brightness/contrast/gamma augmentation on,
with DALI decoding the PNGs or the host decoding them; blur and speckle against their definitions; rank sharding
that covers every sample exactly once in evaluation; a file that stops decoding after validation."""
import numpy as np
import pytest
import torch

from data_pipelines.batch import collate_samples
from data_pipelines.dali.source import RecordDaliSource
from data_pipelines.readers.labelme_reader import HipDataset
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

pytestmark = pytest.mark.dali

AUGMENT = AugmentParams(enabled=True, rotation_deg=15.0, scale_range=(0.85, 1.15), translate_frac=0.08,
                        shear_deg=5.0, flip_p=0.5, speckle_sigma_max=0.0, blur_p=0.0)   # noise / blur: below


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return generate_hip_dataset(tmp_path_factory.mktemp("hip"), 7, seed=3, image_hw=(120, 160))


def _dataset(files, augment, cache=True, **kw):
    return HipDataset(files, input_hw=(64, 96), augment=augment, seed=5, heatmap_impl="none",
                      cache_decoded=cache, **kw)


def _torch_batches(ds, sampler, batch_size):
    idx = list(sampler)
    return [collate_samples([ds[(i, sampler.epoch)] for i in idx[s:s + batch_size]])
            for s in range(0, len(idx), batch_size)
            if not (sampler.drop_last and len(idx[s:s + batch_size]) < batch_size)]


@pytest.mark.parametrize("decode", ["dali", "host"])
@pytest.mark.parametrize("augment", [AUGMENT, None], ids=["augmented", "plain"])
def test_dali_batches_equal_the_torch_path(files, augment, decode):
    from data_pipelines.dali.source import dali_batches
    ds = _dataset(files, augment, cache=decode == "host")
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=True, batch_size=3)  # noqa: E731
    dali = dali_batches(ds, 3, make())
    assert dali.source.decode == decode
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
    from data_pipelines.dali.source import dali_batches
    ds = _dataset(files, None)
    seen = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), rank, 2, shuffle=False, drop_last=False, batch_size=2)
        batches = list(dali_batches(ds, 2, sampler))
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


def _one_batch(ds, decode="auto", n=4):
    from data_pipelines.dali.source import dali_batches
    sampler = ShardedSampler(len(ds), 0, 1, shuffle=False, drop_last=False, batch_size=n)
    return next(iter(dali_batches(ds, n, sampler, decode=decode)))


def test_blur_matches_scipy_away_from_the_border(files):
    """blur_p=1: DALI's Gaussian (same sigma draw, scipy's radius) equals scipy's inside the image; only the border
    rule differs (DALI reflects, scipy repeats the edge)."""
    blur = AugmentParams(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, brightness=0.0,
                         contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), speckle_sigma_max=0.0, blur_p=1.0,
                         blur_sigma_range=(0.8, 1.0))
    ds = _dataset(files, blur, cache=False)
    got = _one_batch(ds)
    want = collate_samples([ds[i] for i in range(4)])
    inner = (slice(None), slice(None), slice(4, -4), slice(12, -12))   # the letterbox pads ~5 px left and right
    diff = (got.image_BCHW - want.image_BCHW).abs()
    assert diff[inner].max() < 2e-3
    plain = collate_samples([_dataset(files, None)[i] for i in range(4)]).image_BCHW
    assert (plain - want.image_BCHW)[inner].abs().max() > 0.02          # the blur did change the image


def test_speckle_noise_has_the_torch_paths_strength(files):
    """Speckle multiplies by (1 + s n) with the same drawn s; only the noise field comes from DALI's generator. After
    the same warp (which averages neighbouring noise), the ratio to the noiseless image has the torch path's spread."""
    noisy = AugmentParams(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, brightness=0.0,
                          contrast_range=(1.0, 1.0), gamma_range=(1.0, 1.0), speckle_sigma_max=0.3, blur_p=0.0)
    ds = _dataset(files, noisy, cache=False)
    got = _one_batch(ds, n=4).image_BCHW
    want = collate_samples([ds[i] for i in range(4)]).image_BCHW
    clean = collate_samples([_dataset(files, None)[i] for i in range(4)]).image_BCHW
    for k in range(4):
        sel = (clean[k] > 0.2) & (clean[k] < 0.6)
        spread = [float((x[k][sel] / clean[k][sel] - 1.0).std()) for x in (got, want)]
        assert spread[1] > 0.005                                          # the draw is not negligible
        assert abs(spread[0] - spread[1]) < 0.15 * spread[1], (k, spread)
        assert abs(float((got[k][sel] / clean[k][sel] - 1.0).mean())) < 0.02
    assert not torch.equal(got, want)                                     # different generators, same strength


def test_a_file_that_stops_decoding_is_named_or_skipped(tmp_path):
    """The image is corrupted after validation (e.g. replaced on a network share): DALI's decode fails, the loader
    finds the file on the host and names it; with skip_bad it is counted and the other samples still come."""
    from data_pipelines.dali.source import dali_batches
    from data_pipelines.errors import DataError
    files = generate_hip_dataset(tmp_path, 5, seed=4, image_hw=(60, 80))
    for skip in (False, True):
        ds = _dataset(files, None, cache=False, skip_bad=skip)
        image = ds.records[2].image.name
        sampler = ShardedSampler(len(ds), 0, 1, shuffle=False, drop_last=False, batch_size=2)
        loader = dali_batches(ds, 2, sampler)
        assert loader.source.decode == "dali"
        original = open(image, "rb").read()
        with open(image, "wb") as f:
            f.write(original[:40])                                    # header kept, data cut
        try:
            if not skip:
                with pytest.raises(DataError) as err:
                    list(loader)
                assert image in str(err.value)
            else:
                seen = [m["index"] for b in loader for m in b.meta]
                assert seen == [0, 1, 3, 4]
                assert [p for p, _ in ds.skipped] == [image] and str(ds.json_paths[2]) in ds.skipped[0][1]
        finally:
            with open(image, "wb") as f:
                f.write(original)


def test_background_producer_equals_foreground_and_survives_an_abandoned_epoch(files):
    """The producer thread yields the foreground loop's batches; leaving an epoch after one batch (max_steps) stops
    it, and the next epoch (rebuilt pipeline) is complete and equal again."""
    from data_pipelines.dali.pipeline import DaliBatches
    ds = _dataset(files, AUGMENT, cache=False)
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=False, batch_size=2)  # noqa: E731
    fg = DaliBatches(RecordDaliSource(ds), 2, make(), background=False)
    bg = DaliBatches(RecordDaliSource(ds), 2, make(), background=True)
    for epoch in (0, 1):
        fg.set_epoch(epoch)
        bg.set_epoch(epoch)
        if epoch == 0:
            first = next(iter(bg))                     # abandoned after one batch
            assert len(first.meta) == 2
            bg.set_epoch(epoch)
        got, want = list(bg), list(fg)
        assert [len(b.meta) for b in got] == [2, 2, 2, 1]
        for g, w in zip(got, want):
            assert [m["index"] for m in g.meta] == [m["index"] for m in w.meta]
            assert torch.equal(g.image_BCHW, w.image_BCHW) and torch.equal(g.mask_BHW, w.mask_BHW)
            assert torch.equal(g.kpts_px_BK2, w.kpts_px_BK2)


def test_make_batches_keeps_one_dali_loader_per_dataset(files):
    from data_pipelines.loaders import make_batches
    ds = _dataset(files, None)
    s1 = ShardedSampler(len(ds), 0, 1, shuffle=False, drop_last=False, batch_size=4)
    s2 = ShardedSampler(len(ds), 0, 1, shuffle=True, seed=9, drop_last=False, batch_size=4)
    a, b = make_batches(ds, 4, s1, "dali"), make_batches(ds, 4, s2, "dali")
    assert a is b and b.sampler is s2                  # the pipeline is reused; the sampler is the latest call's
    assert [m["index"] for batch in b for m in batch.meta] == list(s2)
