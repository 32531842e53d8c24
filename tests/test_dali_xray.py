"""The DALI loader on the hip X-ray reader (data_pipelines/dali/xray.py + dali_pipeline.py, CPU-only pipeline) against
the torch path: the same Batch (landmarks within 0.05 px, images within 1e-3 in [0, 1] units - measured about 1.5e-4
with brightness/contrast/gamma on, 1e-5 without -, the same visibility, spacing and metadata) with geometric and
intensity augmentation on (speckle and blur off: their noise field / border rule differ by design), with the host
decoding and equalising (the published setting, stretch resize, ImageNet normalisation) or DALI decoding (no
equalisation, letterbox); rank sharding that covers every sample once in evaluation; a file that stops decoding."""
import numpy as np
import pytest
import torch

from _dali_cases import assert_eval_shards_see_every_sample_once
from data_pipelines.batch import collate_samples
from data_pipelines.dali.source import RecordDaliSource
from data_pipelines.errors import DataError
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synthetic.xray import generate_xray_dataset
from data_pipelines.transforms import AugmentParams
from data_pipelines.readers.xray_csv import XRAY_FLIP_PAIRS
from data_pipelines.readers.xray_csv import XrayDataset

pytestmark = pytest.mark.dali

AUGMENT = AugmentParams(enabled=True, rotation_deg=15.0, scale_range=(0.85, 1.15), translate_frac=0.08,
                        shear_deg=5.0, flip_p=0.5, flip_pairs=XRAY_FLIP_PAIRS, speckle_sigma_max=0.0, blur_p=0.0)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# decode -> the reader settings it runs with: the host decodes when equalising (DALI cannot equalise like OpenCV)
SETTINGS = {"host": dict(equalize=True, resize="stretch", normalize="imagenet"),
            "dali": dict(equalize=False, resize="letterbox", normalize="none")}


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    return generate_xray_dataset(tmp_path_factory.mktemp("xray"), 7, seed=3, image_hw=(120, 150))


def _dataset(items, augment, **kw):
    kw = {**SETTINGS["dali"], **kw}
    return XrayDataset(items, input_hw=(64, 80), augment=augment, seed=5, heatmap_impl="none", **kw)


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
def test_dali_batches_equal_the_torch_path(csvs, augment, decode):
    ds = _dataset(csvs, augment, **SETTINGS[decode])
    make = lambda: ShardedSampler(len(ds), 0, 1, shuffle=True, seed=2, drop_last=True, batch_size=3)  # noqa: E731
    dali = _dali(ds, 3, make())
    assert dali.source.decode == decode                                # auto: host exactly when equalising
    dali.set_epoch(1)
    reference = make()
    reference.set_epoch(1)
    got, want = list(dali), _torch_batches(ds, reference, 3)
    assert len(got) == len(want) == len(dali) == 2                    # 7 samples, batches of 3, tail dropped
    std = IMAGENET_STD if ds.pre.normalize == "imagenet" else torch.ones(1)
    flips = 0
    for g, w in zip(got, want):
        assert [m["index"] for m in g.meta] == [m["index"] for m in w.meta]
        assert g.image_BCHW.shape == w.image_BCHW.shape == (3, 3, 64, 80)
        assert ((g.image_BCHW - w.image_BCHW) * std).abs().max() < 1e-3     # in [0, 1] units
        assert w.image_BCHW.std() > 0.1                                   # a real image, not the padding
        assert np.abs((g.kpts_px_BK2 - w.kpts_px_BK2).numpy()).max() < 0.05
        assert torch.equal(g.kpts_visible_BK, w.kpts_visible_BK)
        torch.testing.assert_close(g.spacing_mm_B2, w.spacing_mm_B2)
        assert g.mask_BHW is None and w.mask_BHW is None and g.heatmap_BKHW is None
        assert g.meta == w.meta                                           # to_input_3x3, flipped, ids, paths
        flips += sum(m["flipped"] for m in g.meta)
    if augment is not None:
        assert flips >= 1, "the draws should include a flip (flip_p 0.5, 6 samples)"


def test_the_decode_choice_follows_equalisation_and_the_cache(csvs):
    assert RecordDaliSource(_dataset(csvs, None, equalize=False)).decode == "dali"
    assert RecordDaliSource(_dataset(csvs, None, equalize=True)).decode == "host"
    assert RecordDaliSource(_dataset(csvs, None, equalize=False, cache_decoded=True)).decode == "host"
    with pytest.raises(ValueError, match="cannot apply the histogram equalisation"):
        RecordDaliSource(_dataset(csvs, None, equalize=True), "dali")
    with pytest.raises(ValueError, match="decode must be auto, dali or host"):
        RecordDaliSource(_dataset(csvs, None), "gpu")


def test_cached_equalised_host_pixels_give_the_uncached_batch(csvs):
    """cache_decoded keeps the raw grey image; the source equalises it per sample exactly as the torch path does."""
    sampler = lambda: ShardedSampler(7, shuffle=False, drop_last=False, batch_size=4)  # noqa: E731
    cached = next(iter(_dali(_dataset(csvs, None, equalize=True, cache_decoded=True), 4, sampler())))
    want = collate_samples([_dataset(csvs, None, equalize=True)[i] for i in range(4)])
    assert (cached.image_BCHW - want.image_BCHW).abs().max() < 1e-3
    assert torch.equal(cached.image_BCHW[:, 0], cached.image_BCHW[:, 2])     # grey replicated to 3 channels


def test_dali_evaluation_shards_see_every_sample_once(csvs):
    from data_pipelines.dali.source import RecordDaliSource
    assert_eval_shards_see_every_sample_once(_dataset(csvs, None), RecordDaliSource)


def test_a_file_that_stops_decoding_is_named_or_skipped(tmp_path):
    """The image is corrupted after validation: DALI's decode fails and the loader names the file (with skip_bad it is
    counted and the other samples still come); when the host decodes (equalisation on), its decode names it."""
    csvs = generate_xray_dataset(tmp_path, 5, seed=4, image_hw=(120, 150))
    for decode, skip in (("dali", False), ("dali", True), ("host", False)):
        ds = _dataset(csvs, None, skip_bad=skip, **SETTINGS[decode])
        image = str(ds.records[2].image.path)
        loader = _dali(ds, 2, ShardedSampler(len(ds), shuffle=False, drop_last=False, batch_size=2))
        assert loader.source.decode == decode
        original = open(image, "rb").read()
        with open(image, "wb") as f:
            f.write(original[:40])                                    # header kept, data cut
        try:
            if not skip:
                with pytest.raises(DataError) as err:
                    list(loader)
                assert err.value.path == image and "does not decode" in err.value.problem
            else:
                seen = [m["index"] for b in loader for m in b.meta]
                assert seen == [0, 1, 3, 4]
                assert [p for p, _ in ds.skipped] == [image]
        finally:
            with open(image, "wb") as f:
                f.write(original)


def test_an_image_resized_after_validation_is_named(tmp_path):
    """DALI decodes the file as it is now; the host checks its header against the validated size first."""
    from PIL import Image
    csvs = generate_xray_dataset(tmp_path, 3, seed=4, image_hw=(120, 150))
    ds = _dataset(csvs, None)
    image = ds.records[1].image.path
    Image.open(image).resize((160, 120)).save(image)
    with pytest.raises(DataError) as err:
        list(_dali(ds, 3, ShardedSampler(len(ds), shuffle=False, drop_last=False, batch_size=3)))
    assert err.value.path == str(image) and "is 160x120 now, 150x120 when validated" in err.value.problem
