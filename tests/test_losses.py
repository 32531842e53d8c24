import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from models import build_criterion, render_heatmaps_torch
from models.losses import CoVWeighting, focal_loss, soft_dice_loss, weighted_heatmap_mse

LN3 = math.log(3.0)


def _tiny_seg():
    """1x2x2x2 logits. Pixels (raster order): [0, 0] label 0 (p_t = 1/2); [ln3, 0] label 1 (p_t = 1/4);
    [0, ln3] label 1 (p_t = 3/4); [0, ln3] label 0 (p_t = 1/4)."""
    logits = torch.tensor([[[[0.0, LN3], [0.0, 0.0]], [[0.0, 0.0], [LN3, LN3]]]])
    mask = torch.tensor([[[0, 1], [1, 0]]])
    return logits, mask


def test_focal_loss_hand_computed():
    logits, mask = _tiny_seg()
    w = torch.tensor([1.0, 5.0])
    # 0.5 * w * (1 - p_t)^2 * (-ln p_t) per pixel:
    #   0.5*1*(1/4)*ln2 + 0.5*5*(9/16)*ln4 + 0.5*5*(1/16)*ln(4/3) + 0.5*1*(9/16)*ln4 = 3.5 ln2 + 0.15625 ln(4/3)
    expected = (3.5 * math.log(2.0) + 0.15625 * math.log(4.0 / 3.0)) / 4
    assert focal_loss(logits, mask, w, alpha=0.5, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    mask = torch.randint(0, 4, (2, 5, 6), generator=g)
    w = torch.tensor([1.0, 5.0, 2.0, 0.5])
    ce = F.cross_entropy(logits, mask, weight=w, reduction="none").mean()
    assert focal_loss(logits, mask, w, alpha=0.5, gamma=0.0).item() == pytest.approx(0.5 * ce.item(), rel=1e-6)


def test_soft_dice_hand_computed_and_perfect_prediction():
    logits, mask = _tiny_seg()
    s = 1e-5
    # class 0: probs 1/2, 3/4, 1/4, 1/4, truth 1, 0, 0, 1 -> inter 0.75, sum p 1.75, sum g 2
    # class 1: probs 1/2, 1/4, 3/4, 3/4, truth 0, 1, 1, 0 -> inter 1.0,  sum p 2.25, sum g 2
    dice0 = (1.5 + s) / (3.75 + s)
    dice1 = (2.0 + s) / (4.25 + s)
    assert soft_dice_loss(logits, mask, s).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-6)
    target = torch.randint(0, 3, (2, 6, 7), generator=torch.Generator().manual_seed(1))
    perfect = 60.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_weighted_heatmap_mse_hand_computed_invisible_joint_ignored():
    pred = torch.tensor([[[[10.0, 0.0]], [[5.0, 5.0]]]])        # (1, 2, 1, 2)
    gt = torch.tensor([[[[8.0, 255.0]], [[0.0, 0.0]]]])
    visible = torch.tensor([[True, False]])
    # joint 0, w = 0.25: 0.7*(2.5-2)^2*1.004^2 and 0.7*(0-63.75)^2*1.004^63.75; joint 1 weighted 0
    expected = (0.7 * 0.25 * 1.004 ** 2 + 0.7 * 63.75 ** 2 * 1.004 ** 63.75) / 4
    assert weighted_heatmap_mse(pred, gt, visible).item() == pytest.approx(expected, rel=1e-6)


def _oracle_cov_weights(history):
    """Direct (non-Welford) CoV weights for the next iteration given the loss history (list of per-task lists)."""
    n = len(history)
    if n < 3:
        return [0.5, 0.5]
    cvs = []
    for task in range(2):
        series = [h[task] for h in history]
        ratios = [1.0] + [series[t] / statistics.fmean(series[:t]) for t in range(1, n)]
        cvs.append(statistics.pstdev(ratios) / statistics.fmean(ratios))
    return [c / sum(cvs) for c in cvs]


def test_cov_weighting_hand_computed_sequence():
    seq = [(1.0, 2.0), (0.5, 2.0), (0.5, 1.0), (0.4, 1.5), (0.3, 0.9), (0.35, 0.7)]
    cov = CoVWeighting(2, warmup=3).train()
    got = [cov(torch.tensor(losses)).tolist() for losses in seq]
    assert got[0] == got[1] == got[2] == [0.5, 0.5]
    # iteration 3, by hand: seg ratios 1, 0.5, 0.5/0.75 -> mean 0.72222, pstd 0.207870, cv 0.287821;
    # kpt ratios 1, 1, 0.5 -> mean 0.83333, pstd 0.235702, cv 0.282843; a = cv / sum(cv)
    assert got[3] == pytest.approx([0.504362, 0.495638], abs=1e-5)
    for t in range(3, len(seq)):
        assert got[t] == pytest.approx(_oracle_cov_weights(seq[:t]), abs=1e-6)
    assert int(cov.count) == len(seq)


def test_cov_state_dict_round_trip_and_eval_does_not_update():
    seq = [(1.0, 2.0), (0.7, 1.9), (0.6, 1.2), (0.5, 1.4), (0.45, 1.0)]
    a = CoVWeighting(2).train()
    for losses in seq:
        a(torch.tensor(losses))
    b = CoVWeighting(2).train()
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([0.4, 0.8])
    assert torch.equal(a(nxt), b(nxt)) and torch.equal(a(nxt), b(nxt))
    assert set(a.state_dict()) == {"count", "mean_L", "mean_l", "m2_l", "weights"}
    state = {k: v.clone() for k, v in a.state_dict().items()}
    a.eval()
    w_eval = a(torch.tensor([5.0, 0.1]))
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    assert torch.equal(w_eval, a(torch.tensor([0.1, 5.0])))


def _outputs_targets(b=2, c=8, k=6, hw=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    kpts = torch.rand(b, k, 2, generator=g) * torch.tensor([hw[1] - 1, hw[0] - 1])
    visible = torch.rand(b, k, generator=g) > 0.2
    targets = {"mask_BHW": torch.randint(0, c, (b, *hw), generator=g), "kpts_px_BK2": kpts,
               "kpts_visible_BK": visible, "heatmap_BKHW": render_heatmaps_torch(kpts, visible, hw, 2.0)}
    outputs = {"seg_logits_BCHW": torch.randn(b, c, *hw, generator=g, requires_grad=True),
               "heatmap_BKHW": (50 * torch.rand(b, k, *hw, generator=g)).requires_grad_()}
    return outputs, targets


def test_criterion_combines_parts_with_cov_weights_and_backprops():
    crit = build_criterion("multihipposenet").train()
    outputs, targets = _outputs_targets()
    res = crit(outputs, targets)
    w = torch.tensor([1.0] + [5.0] * 7)
    seg = (focal_loss(outputs["seg_logits_BCHW"], targets["mask_BHW"], w) +
           soft_dice_loss(outputs["seg_logits_BCHW"], targets["mask_BHW"]))
    kpt = weighted_heatmap_mse(outputs["heatmap_BKHW"], targets["heatmap_BKHW"], targets["kpts_visible_BK"])
    assert res["loss_seg"].item() == pytest.approx(seg.item(), rel=1e-6)
    assert res["loss_kpt"].item() == pytest.approx(kpt.item(), rel=1e-6)
    assert res["w_seg"].item() == res["w_kpt"].item() == 0.5
    assert res["loss"].item() == pytest.approx(0.5 * seg.item() + 0.5 * kpt.item(), rel=1e-6)
    assert all(not res[key].requires_grad for key in ("loss_seg", "loss_kpt", "w_seg", "w_kpt"))
    res["loss"].backward()
    assert outputs["seg_logits_BCHW"].grad.abs().sum() > 0 and outputs["heatmap_BKHW"].grad.abs().sum() > 0
    for _ in range(3):
        res = crit(*_outputs_targets(seed=_ + 1))
    assert res["w_seg"].item() != 0.5 and res["w_seg"].item() + res["w_kpt"].item() == pytest.approx(1.0)
    assert int(crit.state_dict()["balancer.count"]) == 4


def test_criterion_renders_missing_heatmap_and_rejects_bad_targets():
    outputs, targets = _outputs_targets()
    with_heat = build_criterion(balance="fixed")(outputs, targets)
    no_heat = {k: v for k, v in targets.items() if k != "heatmap_BKHW"}
    rendered = build_criterion(balance="fixed", sigma_px=2.0)(outputs, no_heat)
    assert rendered["loss_kpt"].item() == pytest.approx(with_heat["loss_kpt"].item(), rel=1e-6)
    with pytest.raises(KeyError, match="heatmap_BKHW"):
        build_criterion()(outputs, no_heat)
    bad = dict(targets, mask_BHW=targets["mask_BHW"] + 8)
    with pytest.raises(ValueError, match=r"models/losses.py: mask_BHW values"):
        build_criterion()(outputs, bad)
    with pytest.raises(KeyError, match="no criterion"):
        build_criterion("unet4")
