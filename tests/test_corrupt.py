"""Robustness evaluation under image corruption (engine/corrupt.py, eval.corrupt, `medpose eval --corrupt`).

The corruptions against their definitions (salt-and-pepper density within 1 % of the level asked for, Gaussian and
speckle noise statistics, blur against scipy's Gaussian filter), determinism per (kind, level, image), the dataset view
that applies them in the original frame, and end to end: the final test report of `train` and `medpose eval` write the
robustness table and plot, level 0 equals the plain evaluation exactly, and 2 ranks give the single-process figures.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _dist_utils import torchrun
from engine.config import ConfigError, load_config
from engine.corrupt import Corruption, blur, corrupted_view, gaussian_kernel, level_key, parse_corruptions, stream

TINY = [
    "data.synth_n=40", "data.synth_image_hw=[96, 128]", "data.input_hw=[64, 96]", "data.sigma_px=1.5",
    "data.num_workers=0", "data.num_folds=4",
    "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
    "model.criterion_args={balance: fixed}", "train.batch_size=4", "log.progress=false", "log.tensorboard=false",
    "log.overlays=0",
]


def _grey(h=512, w=512, seed=0) -> np.ndarray:
    """A uint8 (1, H, W) image with no pixel at 0 or 255, so every salt or pepper pixel changes it."""
    return np.random.default_rng(seed).integers(1, 255, (1, h, w)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- the syntax
def test_parse_merges_sorts_and_accepts_lists():
    plan = parse_corruptions(["salt_pepper:0.02,0.01", "gaussian:0.05;salt_pepper:0.01, 0.005", " blur:1.5 "])
    assert plan == {"salt_pepper": (0.005, 0.01, 0.02), "gaussian": (0.05,), "blur": (1.5,)}
    assert list(plan) == ["salt_pepper", "gaussian", "blur"]
    assert parse_corruptions("") == {}
    assert level_key(0.0) == "0" and level_key(0.0001) == "0.0001" and level_key(2.0) == "2"


@pytest.mark.parametrize("spec, named", [
    ("salt_pepper", "'salt_pepper' must look like KIND:LEVEL"),
    ("noise:0.1", "unknown corruption 'noise'"),
    ("salt_pepper:0.01,abc", "level 'abc' of 'salt_pepper:0.01,abc' is not a number"),
    ("salt_pepper:1.5", "level '1.5' of 'salt_pepper:1.5' must be [0, 1]"),
    ("blur:-1", "level '-1' of 'blur:-1' must be >= 0"),
    ("gaussian:nan", "level 'nan' of 'gaussian:nan'"),
    ("speckle:", "'speckle:' gives no level"),
])
def test_parse_errors_name_the_bad_token(spec, named):
    with pytest.raises(ConfigError, match="eval.corrupt") as err:
        parse_corruptions(spec)
    assert named in str(err.value)


def test_config_key_is_validated():
    assert load_config(None, ["eval.corrupt=salt_pepper:0.01;blur:1"]).eval.corrupt == "salt_pepper:0.01;blur:1"
    assert load_config(None).eval.corrupt == ""
    with pytest.raises(ConfigError, match=r"eval.corrupt: unknown corruption 'pepper'"):
        load_config(None, ["eval.corrupt=pepper:0.01"])


# --------------------------------------------------------------------------------------------- the corruptions
@pytest.mark.parametrize("density", [0.02, 0.01, 0.005, 0.001, 0.0001])
def test_salt_pepper_density_is_the_level_asked_for(density):
    img = _grey()
    out = Corruption("salt_pepper", density)(img, "scan_7")
    changed = out != img
    assert abs(changed.mean() - density) <= 0.01 * density, changed.mean()
    assert set(np.unique(out[changed])) <= {0, 255}              # salt = the dtype's max, pepper = its min
    if density >= 0.005:                                         # about half of each (binomial, k >= 1300)
        assert 0.45 < (out[changed] == 255).mean() < 0.55
    assert np.array_equal(out[~changed], img[~changed])


def test_salt_pepper_hits_every_channel_of_a_pixel_and_float_range():
    rgb = np.random.default_rng(1).integers(1, 255, (3, 256, 256)).astype(np.uint8)
    out = Corruption("salt_pepper", 0.01)(rgb, "x")
    changed = (out != rgb)
    assert np.array_equal(changed[0], changed[1]) and np.array_equal(changed[0], changed[2])
    assert abs(changed[0].mean() - 0.01) <= 0.0001
    slab = np.random.default_rng(2).standard_normal((1, 256, 256)).astype(np.float32)   # a z-scored MRI slab
    out = Corruption("salt_pepper", 0.01)(slab, "x")
    hit = out != slab
    assert out.dtype == np.float32 and abs(hit.mean() - 0.01) <= 0.0001
    assert set(np.unique(out[hit])) <= {slab.min(), slab.max()}  # float images: their own range


def test_level_zero_is_the_identity_and_input_is_never_modified():
    img = _grey(64, 80)
    keep = img.copy()
    for kind in ("salt_pepper", "gaussian", "speckle", "blur"):
        assert Corruption(kind, 0.0)(img, "a") is img
        out = Corruption(kind, 0.3 if kind != "blur" else 1.0)(img, "a")
        assert out.dtype == img.dtype and out.shape == img.shape and not np.array_equal(out, img)
    assert np.array_equal(img, keep)


def test_noise_is_deterministic_per_image_kind_and_level():
    img = _grey(128, 128)
    a = Corruption("gaussian", 0.05)
    first = a(img, "case_001")
    _ = [Corruption("gaussian", 0.05)(img, f"other_{i}") for i in range(3)]     # other draws in between
    assert np.array_equal(a(img, "case_001"), first)
    assert not np.array_equal(a(img, "case_002"), first)
    assert not np.array_equal(Corruption("gaussian", 0.06)(img, "case_001"), first)
    assert not np.array_equal(Corruption("speckle", 0.05)(img, "case_001"), first)
    r1, r2 = stream("salt_pepper", 0.01, "k").random(4), stream("salt_pepper", 0.01, "k").random(4)
    assert np.array_equal(r1, r2)


def test_gaussian_noise_statistics():
    flat = np.full((1, 512, 512), 128, np.uint8)
    out = Corruption("gaussian", 0.02)(flat, "g").astype(np.float64) - 128.0
    assert abs(out.std() - 0.02 * 255) < 0.03 * 0.02 * 255, out.std()   # sigma is a fraction of the 0..255 range
    assert abs(out.mean()) < 0.05
    slab = np.zeros((1, 512, 512), np.float32)                          # float: the image's own range (here 6)
    slab[0, 0, 0], slab[0, 0, 1] = -3.0, 3.0
    noise = Corruption("gaussian", 0.01)(slab, "g")[0].ravel()[2:]
    assert abs(noise.std() - 0.06) < 0.03 * 0.06 and abs(noise.mean()) < 0.002
    clipped = Corruption("gaussian", 0.5)(flat, "g")
    assert clipped.min() == 0 and clipped.max() == 255                  # clipped to the range, not wrapped


def test_speckle_noise_is_multiplicative():
    img = np.full((1, 512, 512), 100, np.uint8)
    img[0, :, :64] = 0                                                  # black stays black
    out = Corruption("speckle", 0.1)(img, "s").astype(np.float64)
    assert np.all(out[0, :, :64] == 0)
    rel = out[0, :, 64:] / 100.0 - 1.0
    assert abs(rel.std() - 0.1) < 0.003 and abs(rel.mean()) < 0.002


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_blur_equals_scipy_gaussian_filter(sigma):
    ndimage = pytest.importorskip("scipy.ndimage")
    slab = np.random.default_rng(3).standard_normal((2, 40, 57))
    ref = ndimage.gaussian_filter(slab, (0, sigma, sigma), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(blur(slab, sigma), ref, rtol=0, atol=1e-12)
    img = _grey(40, 57, seed=4)
    ref_u8 = np.rint(ndimage.gaussian_filter(img.astype(np.float64), (0, sigma, sigma), mode="reflect",
                                             truncate=4.0)).astype(np.uint8)
    assert np.abs(blur(img, sigma).astype(int) - ref_u8.astype(int)).max() <= 1   # rounding ties only
    assert (blur(img, sigma) != ref_u8).mean() < 1e-3


def test_blur_kernel_wider_than_the_image():
    ndimage = pytest.importorskip("scipy.ndimage")
    tiny = np.random.default_rng(5).standard_normal((1, 5, 4))
    ref = ndimage.gaussian_filter(tiny, (0, 3.0, 3.0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(blur(tiny, 3.0), ref, rtol=0, atol=1e-12)
    assert len(gaussian_kernel(3.0)) == 25


# ------------------------------------------------------------------------------------------------ dataset view
@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


def test_view_corrupts_the_decoded_original_whatever_the_order(phantom_root):
    from data_pipelines.readers.labelme_reader import HipDataset
    paths = sorted(p for p in Path(phantom_root).glob("*.json") if p.name != "dataset.json")[:6]
    ds = HipDataset(paths, input_hw=(64, 96), cache_decoded=True)
    clean = [ds[i]["image_CHW"].clone() for i in range(len(ds))]
    c = Corruption("salt_pepper", 0.05)
    view = corrupted_view(ds, c)
    forward = [view[i]["image_CHW"] for i in range(len(ds))]
    again = corrupted_view(ds, c)
    backward = {i: again[i]["image_CHW"] for i in reversed(range(len(ds)))}
    for i, rec in enumerate(ds.records):
        assert np.array_equal(forward[i].numpy(), backward[i].numpy())          # order-independent
        assert not np.array_equal(forward[i].numpy(), clean[i].numpy())
        decoded, _ = ds.decode(rec)                                              # the original frame, before resizing
        expect = c(decoded, rec.id)
        assert np.array_equal(view.working(i)[0], expect)
        # round(0.05 H W) positions hit; those already black or white under pepper / salt stay as they were
        assert 0.025 < (expect != decoded).any(0).mean() <= 0.05
        assert np.array_equal(view.original(i)["image_HW3"], ds.original(i)["image_HW3"])  # truth stays clean
    assert all(np.array_equal(ds[i]["image_CHW"].numpy(), clean[i].numpy()) for i in range(len(ds)))  # cache intact
    from torch.utils.data import DataLoader

    from data_pipelines.batch import collate_samples
    loaded = DataLoader(corrupted_view(ds, c), batch_size=4, num_workers=2, collate_fn=collate_samples)
    images = [im for b in loaded for im in b.image_BCHW]                        # two worker processes
    assert all(np.array_equal(images[i].numpy(), forward[i].numpy()) for i in range(len(ds)))
    identity = corrupted_view(ds, Corruption("blur", 0.0))
    assert all(np.array_equal(identity[i]["image_CHW"].numpy(), clean[i].numpy()) for i in range(len(ds)))


# -------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_root):
    """A 1-step run whose final test report asks for robustness through the config key."""
    from launch.cli import main
    run = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, f"data.root={phantom_root}", f"log.run_dir={run}", "train.max_steps=1",
                 "train.eval_every=0", "eval.corrupt=salt_pepper:0.05;blur:0,2"]) == 0
    return run


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def test_final_test_report_has_the_robustness_table_and_plot(trained):
    rep = _report(trained)
    heads = ["seg_miou", "seg_dice", "landmark_mre_px", "landmark_mre_mm", "alpha_mae_deg", "beta_mae_deg",
             "screening_accuracy"]
    rob = rep["robustness"]
    assert list(rob) == ["salt_pepper", "blur"]
    assert list(rob["salt_pepper"]) == ["0", "0.05"] and list(rob["blur"]) == ["0", "2"]
    clean = {k: rep[k] for k in heads}
    assert rob["salt_pepper"]["0"] == clean           # level 0 not asked for: the plain evaluation leads the table
    assert rob["blur"]["0"] == clean                  # asked for: evaluated through the corrupted view, equal exactly
    for kind, level in (("salt_pepper", "0.05"), ("blur", "2")):
        assert list(rob[kind][level]) == heads
        assert rob[kind][level] != clean, (kind, level)
    with open(trained / "robustness.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["kind"], r["level"]) for r in rows] == [("salt_pepper", "0"), ("salt_pepper", "0.05"),
                                                       ("blur", "0"), ("blur", "2")]
    for r in rows:
        for k in heads:
            want = rob[r["kind"]][r["level"]][k]
            assert (r[k] == "" and want is None) or float(r[k]) == want
    md = (trained / "robustness.md").read_text()
    assert "## blur" in md and "| 2 |" in md and "Robustness" in (trained / "summary.txt").read_text()
    png = trained / "figures" / "robustness.png"
    assert png.stat().st_size > 10_000 and str(png) in rep["figure_files"]


def test_plot_curves_are_relative_to_the_clean_value():
    from engine.plots import robustness_curves
    table = {"salt_pepper": {"0": {"a": 2.0, "b": 0.0, "c": None}, "0.01": {"a": 3.0, "b": 4.0, "c": None},
                             "0.1": {"a": 5.0, "b": 8.0, "c": None}}}
    curves = robustness_curves(table)["salt_pepper"]
    x, y, label = curves["a"]
    assert x.tolist() == [0.0, 0.01, 0.1] and y.tolist() == [1.0, 1.5, 2.5] and "clean 2" in label
    assert curves["b"][1].tolist() == [0.0, 0.5, 1.0] and "max 8" in curves["b"][2]   # clean 0: divided by the max
    assert "c" not in curves


@pytest.mark.slow
def test_cli_eval_corrupt_on_two_ranks_matches_the_single_process_report(trained, tmp_path):
    """`medpose eval --corrupt` under torchrun (2 CPU ranks, gloo): each rank corrupts and scores its own shard and
    the task's sums are all-reduced, so the figures are those of the 1-process final report of the same checkpoint;
    level 0, asked for here, equals the plain evaluation of this launch exactly."""
    ckpt = trained / "checkpoints" / "best.pt"
    out = tmp_path / "ev"
    torchrun(["-m", "launch.cli", "eval", "--checkpoint", str(ckpt), "--out", str(out), "--corrupt",
              "salt_pepper:0,0.05", "--corrupt", "gaussian:0.1"], nproc=2, timeout=240)
    ev, final = _report(out), _report(trained)
    assert ev["run"]["world_size"] == 2
    rob = ev["robustness"]
    assert list(rob) == ["salt_pepper", "gaussian"] and list(rob["gaussian"]) == ["0", "0.1"]
    clean = {k: ev[k] for k in rob["salt_pepper"]["0"]}
    assert rob["salt_pepper"]["0"] == clean
    assert clean == pytest.approx({k: final[k] for k in clean}, rel=1e-9)
    assert rob["salt_pepper"]["0.05"] == pytest.approx(final["robustness"]["salt_pepper"]["0.05"], rel=1e-9)
    assert rob["gaussian"]["0.1"] != clean
