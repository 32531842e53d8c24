"""Segmentation zoo plumbing (issue 7): losses by name and weighted sums against hand-computed values, the poly LR
schedule, confusion-matrix Dice / mIoU with and without background (a collapsed model must not look good), HD95,
the model registry (every zoo model trains with SegCriterion, STN switch, local weights file) and `medpose models`.
"""
import math

import numpy as np
import pytest
import torch

from models.losses_seg import SegCriterion, parse_loss_spec, soft_iou_loss

# Two pixels, two classes: A has logits (0, ln 3) -> p = (1/4, 3/4), truth 1; B has (ln 4, 0) -> p = (4/5, 1/5),
# truth 0. Every loss below is written out by hand from these probabilities.
LOGITS = torch.tensor([[[[0.0, math.log(4.0)]], [[math.log(3.0), 0.0]]]])      # (1, 2, 1, 2)
MASK = torch.tensor([[[1, 0]]])
LA, LB = -math.log(3 / 4), -math.log(4 / 5)                                     # -log p_true of A and B
CE = (LA + LB) / 2
WCE = (3 * LA + 1 * LB) / (3 + 1)                                              # class weights (1, 3)
IOU = 1 - ((0.8 / (1.05 + 1 - 0.8)) + (0.75 / (0.95 + 1 - 0.75))) / 2           # per class: I / (sum p + sum g - I)
DICE = 1 - ((2 * 0.8 / (1.05 + 1)) + (2 * 0.75 / (0.95 + 1))) / 2
FOCAL = (0.5 * (1 / 4) ** 2 * LA + 0.5 * (1 / 5) ** 2 * LB) / 2                # alpha 0.5, gamma 2


@pytest.mark.parametrize("spec,expected", [
    ("ce", CE), ("wce", WCE), ("iou", IOU), ("dice", DICE), ("focal", FOCAL),
    ("0.8*ce + 0.2*iou", 0.8 * CE + 0.2 * IOU), ({"dice": 1.0, "focal": 2.0}, DICE + 2 * FOCAL),
])
def test_losses_match_hand_computed_values(spec, expected):
    crit = SegCriterion(num_classes=2, loss=spec, class_weights=[1.0, 3.0] if spec == "wce" else None)
    out = crit({"seg_logits_BCHW": LOGITS}, {"mask_BHW": MASK})
    assert float(out["loss"]) == pytest.approx(expected, abs=2e-5)
    for name in parse_loss_spec(spec):
        assert f"loss_{name}" in out


def test_deep_supervision_adds_the_weighted_aux_losses():
    crit = SegCriterion(num_classes=2, loss="ce", aux_weight=0.4)
    aux = [LOGITS * 2.0, torch.zeros_like(LOGITS)]          # zeros: p = 1/2 everywhere -> ce = ln 2
    out = crit({"seg_logits_BCHW": LOGITS, "aux_logits_BCHW": aux}, {"mask_BHW": MASK})
    ce2 = float(torch.nn.functional.cross_entropy(LOGITS * 2.0, MASK))
    assert float(out["loss"]) == pytest.approx(CE + 0.4 * (ce2 + math.log(2.0)), abs=1e-6)


@pytest.mark.parametrize("spec,message", [
    ("0.8*cee", "unknown term 'cee'"), ("ce + ce", "appears twice"), ("0.8 ce", "cannot read '0.8 ce'"),
    ({"ce": -1}, "must be > 0"), ("", "cannot read"),
])
def test_bad_loss_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_loss_spec(spec)


def test_wce_needs_class_weights_and_labels_are_checked():
    with pytest.raises(ValueError, match="needs class_weights"):
        SegCriterion(num_classes=2, loss="wce")
    with pytest.raises(ValueError, match="outside 0..1"):
        SegCriterion(num_classes=2)({"seg_logits_BCHW": LOGITS}, {"mask_BHW": MASK + 1})


def test_soft_iou_is_zero_for_a_confident_perfect_prediction():
    logits = torch.stack([(MASK == 0).float(), (MASK == 1).float()], 1) * 50.0
    assert float(soft_iou_loss(logits, MASK)) == pytest.approx(0.0, abs=1e-6)


def test_poly_schedule_per_iteration():
    from engine.config import load_config
    from engine.trainer import lr_factor
    cfg = load_config(None, ["optim.scheduler=poly", "train.max_steps=100", "optim.warmup_steps=0"])
    for step in (0, 1, 37, 99):
        assert lr_factor(step, cfg) == pytest.approx((1 - step / 100) ** 0.9, rel=1e-12)
    assert lr_factor(100, cfg) == 0.0
    cfg = load_config(None, ["optim.scheduler=poly", "train.max_steps=110", "optim.warmup_steps=10",
                             "optim.poly_power=2.0"])
    assert lr_factor(4, cfg) == pytest.approx(0.5) and lr_factor(60, cfg) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------- metrics
def _acc():
    from engine.tasks.segmentation import SegAccumulator
    return SegAccumulator(2, ["background", "head"])


def _truth():
    t = np.zeros((10, 10), np.int64)
    t[2:6, 3:8] = 1                                          # 20 foreground pixels of 100
    return t


def _update(acc, pred, truth, sid="a"):
    acc.update_sample({"mask_HW": pred}, {"mask_HW": truth, "spacing_mm_2": np.array([0.5, 0.5])}, {"id": sid})


def test_collapsed_model_scores_well_only_with_background():
    acc = _acc()
    _update(acc, np.zeros((10, 10), np.int64), _truth())
    f = acc.compute()
    # background: TP 80, FN 0, FP 20 -> Dice 160/180, IoU 80/100; head: TP 0 -> 0
    assert f["dice_background"] == pytest.approx(160 / 180) and f["iou_background"] == pytest.approx(0.8)
    assert f["dice"] == 0.0 and f["miou"] == 0.0
    assert f["dice_with_bg"] == pytest.approx(80 / 180) and f["miou_with_bg"] == pytest.approx(0.4)
    assert math.isnan(f["hd95_mm"])                          # an empty prediction has no surface distance


def test_dice_iou_hd95_of_a_shifted_prediction_and_rank_sums():
    truth = _truth()
    pred = np.roll(truth, 2, axis=1)                          # 2 px to the right: overlap 4 x 3 = 12 of 20
    acc = _acc()
    _update(acc, pred, truth)
    f = acc.compute()
    assert f["dice_head"] == pytest.approx(2 * 12 / 40) and f["iou_head"] == pytest.approx(12 / 28)
    assert f["hd95_px"] == pytest.approx(2.0) and f["hd95_mm"] == pytest.approx(1.0)   # 0.5 mm pixels
    # two ranks' sums equal one pass over both images (the engine all-reduces state() with SUM)
    a, b, both = _acc(), _acc(), _acc()
    _update(a, pred, truth, "a")
    _update(b, truth, truth, "b")
    _update(both, pred, truth, "a")
    _update(both, truth, truth, "b")
    a.load_state({k: v + b.state()[k] for k, v in a.state().items()})
    for key, value in both.compute().items():
        assert a.compute()[key] == pytest.approx(value, nan_ok=True), key
    assert both.compute()["dice_per_image"] == pytest.approx((0.6 + 1.0) / 2)
    # split-level Dice pools the pixels: TP 32, FP 8, FN 8
    assert both.compute()["dice_head"] == pytest.approx(64 / 80)


# --------------------------------------------------------------------------------------------------- registry
def test_every_zoo_model_is_registered_with_the_seg_criterion():
    from models.registry import CRITERIA, MODELS
    from models.seg import SEG_SPECS
    assert len(SEG_SPECS) >= 29
    for name in SEG_SPECS:
        assert name in MODELS and CRITERIA[name] is SegCriterion, name
    wanted = {"unet", "segnet", "deeplabv3plus", "deeplabv2", "danet", "eanet", "hardnet", "pspnet", "ocnet",
              "ocrnet", "dlinknet", "attention_unet", "unet_pp", "unet3p", "dense_unet", "ternausnet", "csnet",
              "scse_unet", "u2net", "u2net_small", "multiresunet", "r2unet", "r2_attention_unet", "lightnet",
              "onenet", "cenet", "lrf_eanet", "simple_unet", "setr", "hrnet"}
    assert wanted <= set(SEG_SPECS), sorted(wanted - set(SEG_SPECS))


def test_stn_switch_and_local_weights_file(tmp_path):
    from models.seg import build_seg_model
    torch.manual_seed(0)
    model = build_seg_model("simple_unet", in_channels=1, num_classes=3, stn=True, base=8).eval()
    x = torch.randn(1, 1, 32, 48)
    out = model(x)
    assert out["seg_logits_BCHW"].shape == (1, 3, 32, 48)
    assert torch.allclose(out["stn_theta_B23"], torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))   # identity start
    path = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(1)
    again = build_seg_model("simple_unet", in_channels=1, num_classes=3, stn=True, base=8, weights=str(path)).eval()
    assert torch.equal(again(x)["seg_logits_BCHW"], out["seg_logits_BCHW"])
    with pytest.raises(ValueError, match="w.pt: does not fit the model"):
        build_seg_model("simple_unet", in_channels=1, num_classes=2, base=8, weights=str(path))
    with pytest.raises(FileNotFoundError, match="nothere.pt: model.args.weights file not found"):
        build_seg_model("simple_unet", weights=str(tmp_path / "nothere.pt"))
    with pytest.raises(KeyError, match="no segmentation model named 'unet4'"):
        build_seg_model("unet4")


def test_flop_count_of_a_convolution_is_exact():
    from launch.models_cmd import flop_count
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    _, flops = flop_count(conv, torch.randn(1, 3, 16, 16))
    assert flops == 2 * 8 * 16 * 16 * 3 * 3 * 3


def test_medpose_models_lists_and_inspects(capsys):
    from launch.cli import main
    from models.seg import build_seg_model
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    n = sum(p.numel() for p in build_seg_model("u2net_small").parameters())
    line = next(ln for ln in listing.splitlines() if ln.startswith("u2net_small "))
    assert f"{n / 1e6:.2f} M" in line and "own" in line
    for name in ("unet_pp", "deeplabv3plus", "multihipposenet", "hourglass"):
        assert any(ln.startswith(name + " ") for ln in listing.splitlines()), name
    assert main(["models", "simple_unet", "base=8", "--hw", "64", "96", "--in-channels", "1", "--classes", "3"]) == 0
    one = capsys.readouterr().out
    m = build_seg_model("simple_unet", in_channels=1, num_classes=3, base=8)
    assert f"{sum(p.numel() for p in m.parameters()):,} parameters" in one
    assert "output seg_logits_BCHW: (1, 3, 64, 96)" in one and "GFLOPs per image at 64x96" in one
    with pytest.raises(SystemExit, match="divisible by 8"):
        main(["models", "simple_unet", "--hw", "60", "96"])
