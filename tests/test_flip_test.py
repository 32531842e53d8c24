"""Flip-test averaging (models/flip_test.py) and its wiring in engine/evaluate.py (predict_batch, evaluate_dataset)."""
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.evaluate import evaluate_dataset, predict_batch
from models.codecs import decode_outputs
from models.flip_test import flip_average, flip_permutation

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"

PAIRS = ((0, 2),)
SWAP = [2, 1, 0]          # landmark k of the plain frame is landmark SWAP[k] of the mirrored pass


class KnownFunction(nn.Module):
    """Outputs that are known functions of the image, not mirror-symmetric: maps = image + column index (a ramp that
    the flip turns into W - 1 - x), points = the (x, y) of each channel's maximum, and fixed points."""

    def __init__(self, fixed_BK2: torch.Tensor | None = None):
        super().__init__()
        self.fixed_BK2 = fixed_BK2

    def forward(self, image_BCHW):
        b, c, h, w = image_BCHW.shape
        ramp = torch.arange(w, dtype=image_BCHW.dtype).expand(h, w)
        idx = image_BCHW.flatten(2).argmax(-1)
        argmax_BK2 = torch.stack([idx % w, idx // w], dim=-1).float()
        out = {"heatmap_BKHW": image_BCHW + ramp, "seg_logits_BCHW": 2 * image_BCHW + ramp,
               "kpts_px_BK2": argmax_BK2 if self.fixed_BK2 is None else self.fixed_BK2.expand(b, -1, -1),
               "attention_B1hw": image_BCHW[:, :1] * 3}
        return out


def _integer_image(b=2, k=3, h=6, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(b * k * h * w, generator=g).reshape(b, k, h, w).float()   # distinct: no argmax ties


def test_known_function_gives_exactly_the_expected_average():
    image = _integer_image()
    w = image.shape[-1]
    model = KnownFunction()
    avg = flip_average(model(image), model(image.flip(-1)), PAIRS, w)
    # heatmap k: 0.5 ((I_k + x) + (I_swap(k) + (W - 1 - x))) = 0.5 (I_k + I_swap(k)) + (W - 1) / 2, exactly
    expected_heat = 0.5 * (image + image[:, SWAP]) + (w - 1) / 2
    assert torch.equal(avg["heatmap_BKHW"], expected_heat)
    # seg logits: flipped back, no swap: 0.5 ((2 I + x) + (2 I + W - 1 - x)) = 2 I + (W - 1) / 2
    assert torch.equal(avg["seg_logits_BCHW"], 2 * image + (w - 1) / 2)
    # argmax points: the mirrored pass finds channel j's maximum at W - 1 - x; mirrored back and swapped, landmark k
    # averages its own argmax with landmark SWAP[k]'s
    plain = model(image)["kpts_px_BK2"]
    assert torch.equal(avg["kpts_px_BK2"], 0.5 * (plain + plain[:, SWAP]))
    # unknown keys pass through from the plain pass
    assert torch.equal(avg["attention_B1hw"], image[:, :1] * 3)


def test_regressed_points_are_mirrored_about_the_pixel_centres_and_swapped():
    fixed = torch.tensor([[[1.0, 2.0], [3.5, 4.0], [6.0, 1.0]]])
    model = KnownFunction(fixed)
    image = _integer_image(b=1)
    w = image.shape[-1]                                     # 8: x -> 7 - x
    avg = flip_average(model(image), model(image.flip(-1)), PAIRS, w)["kpts_px_BK2"]
    mirrored = torch.tensor([[[7 - 6.0, 1.0], [7 - 3.5, 4.0], [7 - 1.0, 2.0]]])   # x' = W - 1 - x, then 0 <-> 2
    assert torch.equal(avg, 0.5 * (fixed + mirrored))
    # the pixel-centre convention: a point on the central axis x = (W - 1) / 2 is its own mirror image
    centre = torch.tensor([[[3.5, 5.0], [3.5, 0.0], [3.5, 2.0]]])
    out = flip_average({"kpts_px_BK2": centre}, {"kpts_px_BK2": centre.clone()}, (), w)["kpts_px_BK2"]
    assert torch.equal(out, centre)


def test_pair_swapping_k3():
    """A heatmap pass whose landmark 0 fires left, 2 right: the mirrored pass (a network that learned mirrored
    labels) puts landmark 0 where 2 was; flipped back and swapped, its maps coincide with the plain ones."""
    h, w = 5, 9
    plain = torch.zeros(1, 3, h, w)
    plain[0, 0, 2, 1] = plain[0, 1, 2, 4] = plain[0, 2, 2, 7] = 1.0
    mirrored = torch.zeros(1, 3, h, w)        # what the mirrored image shows: landmark 0 at 8 - 7, 2 at 8 - 1
    mirrored[0, 0, 2, 8 - 7] = mirrored[0, 1, 2, 8 - 4] = mirrored[0, 2, 2, 8 - 1] = 1.0
    assert torch.equal(flip_average({"heatmap_BKHW": plain}, {"heatmap_BKHW": mirrored}, PAIRS, w)["heatmap_BKHW"],
                       plain)
    # without the swap the two passes disagree for the paired landmarks and agree for the midline one
    no_swap = flip_average({"heatmap_BKHW": plain}, {"heatmap_BKHW": mirrored}, (), w)["heatmap_BKHW"]
    assert torch.equal(no_swap[0, 1], plain[0, 1]) and not torch.equal(no_swap[0, 0], plain[0, 0])
    assert flip_permutation(3, PAIRS) == SWAP and flip_permutation(4, ((0, 1), (2, 3))) == [1, 0, 3, 2]
    for bad in (((0, 3),), ((0, 0),), ((0, 1), (1, 2)), ((0, 1, 2),)):
        with pytest.raises(ValueError, match="flip_pairs"):
            flip_permutation(3, bad)


def test_stacked_heatmaps_follow_the_heatmap_rule():
    image = _integer_image()
    stacks = lambda x: {"heatmaps_SBKHW": torch.stack([x, 2 * x]), "heatmap_BKHW": 2 * x}
    avg = flip_average(stacks(image), stacks(image.flip(-1)), PAIRS, image.shape[-1])
    expected = 0.5 * (image + image[:, SWAP])
    assert torch.equal(avg["heatmaps_SBKHW"], torch.stack([expected, 2 * expected]))
    assert torch.equal(avg["heatmap_BKHW"], 2 * expected)


class MirrorPairConv(nn.Module):
    """Translation-equivariant toy model: channel 0 = image * A, channel 1 = image * mirror(A) (cross-correlation),
    channel 2 = image * S with a mirror-symmetric S. Mirroring the image mirrors channel 2 and trades 0 and 1, so a
    flip test with pairs ((0, 1),) must give back the plain outputs for ANY image."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        a = torch.rand(1, 1, 3, 5, generator=g, dtype=torch.float64)
        s = torch.rand(1, 1, 3, 5, generator=g, dtype=torch.float64)
        self.register_buffer("kernels", torch.cat([a, a.flip(-1), 0.5 * (s + s.flip(-1))]))

    def forward(self, image_BCHW):
        return {"heatmap_BKHW": F.conv2d(image_BCHW, self.kernels, padding=(1, 2))}


def test_equivariant_model_flip_test_equals_plain_prediction():
    model = MirrorPairConv()
    decode = lambda out: decode_outputs(out, method="dark", sigma=1.0, peak=1.0)
    # any image: the paired channels swap exactly under the mirror
    image = torch.rand(2, 1, 16, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain, plain_pred = predict_batch(model, image, decode, contextlib.nullcontext)
    flip, flip_pred = predict_batch(model, image, decode, contextlib.nullcontext, flip_pairs=((0, 1),))
    torch.testing.assert_close(flip["heatmap_BKHW"].double(), plain["heatmap_BKHW"].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flip_pred["kpts_px_BK2"], plain_pred["kpts_px_BK2"], rtol=0, atol=1e-4)
    # a left/right symmetric image through the symmetric channel: identical with no pairs (flip test still on)
    sym = torch.zeros(1, 1, 16, 20, dtype=torch.float64)
    sym[..., 8, 6], sym[..., 8, 13], sym[..., 3, 9:11] = 1.0, 1.0, 2.0   # mirror pairs about x = 9.5
    assert torch.equal(sym, sym.flip(-1))
    single = lambda x: {"heatmap_BKHW": model(x)["heatmap_BKHW"][:, 2:]}
    p_out, p_pred = predict_batch(single, sym, decode, contextlib.nullcontext)
    f_out, f_pred = predict_batch(single, sym, decode, contextlib.nullcontext, flip_pairs=())
    torch.testing.assert_close(f_out["heatmap_BKHW"], p_out["heatmap_BKHW"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_pred["kpts_px_BK2"], p_pred["kpts_px_BK2"], rtol=0, atol=1e-4)


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, image_BCHW):
        self.seen.append(image_BCHW.clone())
        return KnownFunction()(image_BCHW)


def test_predict_batch_runs_the_flipped_pass_only_when_asked():
    image = _integer_image()
    model = CountingModel()
    decode = lambda out: decode_outputs(out, method="argmax", peak=1.0)
    out, _ = predict_batch(model, image, decode, contextlib.nullcontext)
    assert len(model.seen) == 1 and torch.equal(out["heatmap_BKHW"], image + torch.arange(8.0))
    out, preds = predict_batch(model, image, decode, contextlib.nullcontext, flip_pairs=PAIRS)
    assert len(model.seen) == 3 and torch.equal(model.seen[-1], image.flip(-1))
    assert torch.equal(out["heatmap_BKHW"], 0.5 * (image + image[:, SWAP]) + 3.5)
    assert torch.equal(preds["kpts_px_BK2"], out["kpts_px_BK2"])     # regressed points win over heatmaps


class _Batch:
    def __init__(self, image):
        self.image_BCHW, self.meta, self.size = image, [], image.shape[0]

    def to(self, device):
        return self


def test_evaluate_dataset_passes_the_dataset_flip_pairs(monkeypatch):
    import engine.evaluate as ev
    image = _integer_image()
    monkeypatch.setattr(ev, "make_batches", lambda *a, **k: [_Batch(image)])
    calls = []
    real = ev.predict_batch
    monkeypatch.setattr(ev, "predict_batch", lambda *a: calls.append(a[4:]) or real(*a))
    acc = SimpleNamespace(state=lambda: {}, load_state=lambda s: None, compute=lambda: {}, records=[])
    strategy = SimpleNamespace(info=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")),
                               autocast=contextlib.nullcontext, all_reduce_sum=lambda v: v)
    dataset = type("D", (), {"flip_pairs": PAIRS, "__len__": lambda self: 2})()
    decode = lambda out: decode_outputs(out, method="argmax", peak=1.0)
    evaluate_dataset(CountingModel(), dataset, strategy, decode, acc)
    evaluate_dataset(CountingModel(), dataset, strategy, decode, acc, flip_test=True)
    plain_only = type("D", (), {"__len__": lambda self: 2})()
    evaluate_dataset(CountingModel(), plain_only, strategy, decode, acc, flip_test=True)
    assert calls == [(None,), (PAIRS,), ((),)]


def test_flip_test_needs_a_model_trained_on_mirrored_images():
    """A model never shown a mirrored image (data.flip_p=0) gets no flip test: on the synthetic hip-ultrasound set
    (fixed left/right orientation, no flip pairs) averaging the mirrored pass took mIoU 0.868 -> 0.520. Checked where
    the flip test would run (engine.run.prepare: train and eval; predict), not when a saved config is read."""
    from engine.config import ConfigError, check_flip_test, load_config
    cfg = load_config(CONFIGS / "hip_demo.yaml", ["eval.flip_test=true"])              # loadable: old checkpoints
    with pytest.raises(ConfigError, match=r"^config: eval\.flip_test: .*data\.flip_p=0"):
        check_flip_test(cfg)
    with pytest.raises(ConfigError, match=r"eval\.flip_test"):
        check_flip_test(load_config(CONFIGS / "seg_zoo.yaml", ["eval.flip_test=true", "data.flip_p=0.0"]))
    check_flip_test(load_config(CONFIGS / "seg_zoo.yaml", ["eval.flip_test=true"]))   # trained with flips: fine
    check_flip_test(load_config(CONFIGS / "hip_demo.yaml"))                           # no flip test: fine
    from engine.run import prepare
    with pytest.raises(ConfigError, match=r"eval\.flip_test"):                     # before any data is generated
        prepare(cfg)
