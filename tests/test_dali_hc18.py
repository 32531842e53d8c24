"""The DALI loader on the HC18 fetal-head reader (data_pipelines/dali/hc18.py + dali_pipeline.py, CPU-only pipeline)
against the torch path: the same Batch (landmarks within 0.05 px after the flip swap and the README axis order, masks
>= 0.99 agreement - measured 1.0 -, images within 1e-3 - measured about 1.3e-4 with brightness/contrast/gamma on -,
heatmaps within 0.05 of 255, the same visibility, spacing and metadata) with geometric and intensity augmentation on
(speckle and blur off: their noise field / border rule differ by design), with DALI decoding the PNGs or the host
decoding them; rank sharding that covers every sample once in evaluation; an image or a mask that goes bad after
validation."""
from pathlib import Path

import numpy as np
import pytest
import torch

from _dali_cases import assert_eval_shards_see_every_sample_once
from data_pipelines.batch import collate_samples
from data_pipelines.dali.source import RecordDaliSource
from data_pipelines.errors import DataError
from data_pipelines.readers.hc18 import HC18_FLIP_PAIRS, HC18Dataset
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synthetic.hc18 import generate_hc18_dataset
from data_pipelines.transforms import AugmentParams

pytestmark = pytest.mark.dali

AUGMENT = AugmentParams(enabled=True, rotation_deg=20.0, scale_range=(0.85, 1.15), translate_frac=0.08,
                        shear_deg=0.0, flip_p=0.5, flip_pairs=HC18_FLIP_PAIRS, speckle_sigma_max=0.0, blur_p=0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_hc18_dataset(tmp_path_factory.mktemp("hc18"), 7, seed=3, image_hw=(90, 130))


def _dataset(root, augment, **kw):
    return HC18Dataset.from_root(root, input_hw=(64, 96), augment=augment, seed=5, heatmap_impl="numpy", **kw)


def _torch_batches(ds, sampler, batch_size):
    idx = list(sampler)
    return [collate_samples([ds[(i, sampler.epoch)] for i in idx[s:s + batch_size]])
            for s in range(0, len(idx), batch_size)
            if not (sampler.drop_last and len(idx[s:s + batch_size]) < batch_size)]


def _dali(ds, batch_size, sampler, decode="auto"):
    from data_pipelines.dali.pipeline import DaliBatches
    return DaliBatches(RecordDaliSource(ds, decode), batch_size, sampler)


@pytest.mark.parametrize("decode", ["dali", "host"])
@pytest.mark.parametrize("augment", [AUGMENT, None], ids=["augmented", "plain"])
def test_dali_batches_equal_the_torch_path(root, augment, decode):
    ds = _dataset(root, augment, cache_decoded=decode == "host")
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=True, batch_size=3)  # noqa: E731
    dali = _dali(ds, 3, make())
    assert dali.source.decode == decode                                # auto: the host decodes a cached dataset
    dali.set_epoch(1)
    reference = make()
    reference.set_epoch(1)
    got, want = list(dali), _torch_batches(ds, reference, 3)
    assert len(got) == len(want) == len(dali) == 2                    # 7 samples, batches of 3, tail dropped
    flips = 0
    for g, w in zip(got, want):
        assert [m["index"] for m in g.meta] == [m["index"] for m in w.meta]
        assert g.image_BCHW.shape == w.image_BCHW.shape == (3, 3, 64, 96)
        assert (g.image_BCHW - w.image_BCHW).abs().max() < 1e-3
        assert torch.equal(g.image_BCHW[:, 0], g.image_BCHW[:, 2])     # grey replicated, as the torch path does
        assert g.mask_BHW.dtype == torch.int64 and g.mask_BHW.shape == (3, 64, 96)
        assert (g.mask_BHW == w.mask_BHW).float().mean() >= 0.99
        assert int(w.mask_BHW.sum()) > 300                              # the head is in view
        assert np.abs((g.kpts_px_BK2 - w.kpts_px_BK2).numpy()).max() < 0.05
        assert torch.equal(g.kpts_visible_BK, w.kpts_visible_BK)
        assert (g.heatmap_BKHW - w.heatmap_BKHW).abs().max() < 0.05    # peak 255, rendered at the same points
        torch.testing.assert_close(g.spacing_mm_B2, w.spacing_mm_B2)
        assert g.meta == w.meta                                         # to_input_3x3, flipped, ids, orig_hw
        flips += sum(m["flipped"] for m in g.meta)
    if augment is not None:
        assert flips >= 1, "the draws should include a flip (flip_p 0.5, 6 samples)"


def test_the_decode_choice_and_the_packed_masks(root):
    ds = _dataset(root, None)
    src = RecordDaliSource(ds)
    assert src.decode == "dali"
    assert RecordDaliSource(_dataset(root, None, cache_decoded=True)).decode == "host"
    with pytest.raises(ValueError, match="decode must be auto, dali or host"):
        RecordDaliSource(ds, "gpu")
    item = src.item(3, 0)
    image, mask = ds.decode(ds.records[3])
    np.testing.assert_array_equal(item.mask_HW, mask)                  # unpacked bits = the mask PNG
    assert src._masks[ds.records[3].id][0].nbytes == -(-mask.size // 8)
    np.testing.assert_array_equal(RecordDaliSource(ds, "host").item(3, 0).data[..., 0], image[0])


def test_dali_evaluation_shards_see_every_sample_once(root):
    from data_pipelines.dali.source import RecordDaliSource
    assert_eval_shards_see_every_sample_once(_dataset(root, None), RecordDaliSource)


def test_a_file_that_stops_decoding_is_named_or_skipped(tmp_path):
    """The image is corrupted after validation: DALI's decode fails, the loader finds the file on the host and names
    it; with skip_bad it is counted and the other samples still come. A bad mask is named by the host's read."""
    root = generate_hc18_dataset(tmp_path, 5, seed=4, image_hw=(60, 80))
    for skip in (False, True):
        ds = _dataset(root, None, skip_bad=skip)
        image = str(ds.records[2].image.path)
        loader = _dali(ds, 2, ShardedSampler(len(ds), shuffle=False, drop_last=False, batch_size=2))
        assert loader.source.decode == "dali"
        original = open(image, "rb").read()
        with open(image, "wb") as f:
            f.write(original[:40])                                    # header kept, data cut
        try:
            if not skip:
                with pytest.raises(DataError) as err:
                    list(loader)
                assert err.value.path == image and "image does not decode" in err.value.problem
            else:
                seen = [m["index"] for b in loader for m in b.meta]
                assert seen == [0, 1, 3, 4]
                assert [p for p, _ in ds.skipped] == [image]
        finally:
            with open(image, "wb") as f:
                f.write(original)
    ds = _dataset(root, None)
    mask = Path(ds.records[1].mask.path)
    mask.write_bytes(mask.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        list(_dali(ds, 2, ShardedSampler(len(ds), shuffle=False, drop_last=False, batch_size=2)))
    assert err.value.path == str(mask) and "mask does not decode" in err.value.problem
