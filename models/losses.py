"""MultiHipPoseNet losses (docs/systems/hip_us_multihipposenet.md): focal + soft Dice for segmentation, weighted heatmap
MSE for landmarks, and task balancing by the coefficient of variation of the loss ratios (CoV-weighting).

All losses are computed in float32 whatever the autocast dtype of the outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .codecs import target_heatmaps

WHERE = "models/losses.py"


def focal_loss(logits_BCHW: torch.Tensor, mask_BHW: torch.Tensor, class_weights_C: torch.Tensor | None = None,
               alpha: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017), plain mean over pixels:
        mean_i  alpha * w[y_i] * (1 - p_i)^gamma * (-log p_i),   p_i = softmax(logits_i)[y_i].
    The modulating factor uses the true class probability (not a weight-scaled one), so with gamma = 0 this is
    alpha * F.cross_entropy(logits, y, weight=w, reduction="none").mean()."""
    logp_BCHW = F.log_softmax(logits_BCHW.float(), dim=1)
    logpt_BHW = logp_BCHW.gather(1, mask_BHW.unsqueeze(1)).squeeze(1)
    pt_BHW = logpt_BHW.exp()
    loss_BHW = -alpha * (1.0 - pt_BHW).clamp_min(0.0).pow(gamma) * logpt_BHW
    if class_weights_C is not None:
        loss_BHW = loss_BHW * class_weights_C.to(loss_BHW)[mask_BHW]
    return loss_BHW.mean()


def soft_dice_loss(logits_BCHW: torch.Tensor, mask_BHW: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean_c (2 sum(p_c g_c) + smooth) / (sum p_c + sum g_c + smooth); p = softmax, g = one-hot, sums over the
    batch and pixels per class (Milletari et al., 3DV 2016, without the squares)."""
    prob_BCHW = torch.softmax(logits_BCHW.float(), dim=1)
    onehot_BCHW = F.one_hot(mask_BHW, prob_BCHW.shape[1]).permute(0, 3, 1, 2).to(prob_BCHW.dtype)
    inter_C = (prob_BCHW * onehot_BCHW).sum(dim=(0, 2, 3))
    card_C = prob_BCHW.sum(dim=(0, 2, 3)) + onehot_BCHW.sum(dim=(0, 2, 3))
    dice_C = (2.0 * inter_C + smooth) / (card_C + smooth)
    return 1.0 - dice_C.mean()


def weighted_heatmap_mse(pred_BKHW: torch.Tensor, target_BKHW: torch.Tensor, visible_BK: torch.Tensor,
                         joint_weight: float = 0.25, scale: float = 0.7, base: float = 1.004) -> torch.Tensor:
    """Published landmark loss, plain mean over all elements:
        scale * (p w - g w)^2 * base^(g w),  w = joint_weight for visible joints, 0 for invisible ones.
    base^(g w) (1.004^63.75 = 1.29 at the peak 255) up-weights pixels near the landmark. With top-k hard joint mining
    at k = K (published) the per-joint mean over all joints is this plain mean."""
    w_BK11 = (joint_weight * visible_BK.to(torch.float32))[..., None, None]
    p, g = pred_BKHW.float() * w_BK11, target_BKHW.float() * w_BK11
    # base^(g w) as exp(g w ln base) with ln base taken in float64: float32(1.004) alone is off by 5e-8, which the
    # exponent 63.75 would amplify to a 3e-6 relative error
    return (scale * (p - g).pow(2) * torch.exp(g * math.log(base))).mean()


class CoVWeighting(nn.Module):
    """Task weights from the coefficient of variation of each loss ratio (Groenendijk et al., "Multi-Loss Weighting
    with Coefficient of Variations", WACV 2021).

    At iteration t with unweighted losses L_i(t): the ratio l_i(t) = L_i(t) / mean_{s<t} L_i(s) (l_i(0) = 1); the
    weights are a_i = cv_i / sum_j cv_j with cv_i = std(l_i) / mean(l_i) over the ratios of iterations 0..t-1
    (population std, Welford's running update); the first `warmup` iterations use 1 / T. Weights are detached.
    The state (iteration count, running mean of L, running mean and M2 of l, last weights) lives in buffers, so
    state_dict() checkpoints it exactly; it is updated only in training mode (evaluation reads it unchanged).
    """

    def __init__(self, num_losses: int = 2, warmup: int = 3, eps: float = 1e-8):
        super().__init__()
        if num_losses < 1 or warmup < 1:
            raise ValueError(f"{WHERE}: num_losses={num_losses} and warmup={warmup} must be >= 1")
        self.num_losses, self.warmup, self.eps = num_losses, warmup, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean_L", torch.zeros(num_losses, dtype=torch.float64))
        self.register_buffer("mean_l", torch.zeros(num_losses, dtype=torch.float64))
        self.register_buffer("m2_l", torch.zeros(num_losses, dtype=torch.float64))
        self.register_buffer("weights", torch.full((num_losses,), 1.0 / num_losses, dtype=torch.float64))

    def current_weights(self) -> torch.Tensor:
        """Written without reading the device (torch.where, no int()/bool() of a buffer): on a GPU the host never
        waits for the loss balancing."""
        n = self.count.to(self.m2_l.dtype).clamp_min(1.0)
        uniform = torch.full_like(self.mean_l, 1.0 / self.num_losses)
        cv = torch.sqrt(self.m2_l / n + self.eps) / self.mean_l.clamp_min(self.eps)
        total = cv.sum()
        use_cv = (self.count >= self.warmup) & (total > self.eps)
        return torch.where(use_cv, cv / total, uniform)

    @torch.no_grad()
    def forward(self, losses_T: torch.Tensor) -> torch.Tensor:
        """Weights (float32, detached) for this iteration's losses; in training mode also records them."""
        if losses_T.shape != (self.num_losses,):
            raise ValueError(f"{WHERE}: CoVWeighting expects {self.num_losses} losses, got shape "
                             f"{tuple(losses_T.shape)}")
        weights = self.current_weights()
        if self.training:
            self._update(losses_T.detach().to(self.mean_L))
            self.weights.copy_(weights)
        return weights.to(torch.float32)

    def _update(self, loss_T: torch.Tensor) -> None:
        n = (self.count + 1).to(self.mean_L.dtype)
        ref = torch.where(self.count == 0, loss_T, self.mean_L)
        ratio = loss_T / ref.clamp_min(self.eps)
        delta = ratio - self.mean_l
        self.mean_l += delta / n
        self.m2_l += delta * (ratio - self.mean_l)          # Welford: M2 += (x - old mean)(x - new mean)
        self.mean_L += (loss_T - self.mean_L) / n
        self.count += 1


class MultiHipPoseCriterion(nn.Module):
    """forward(outputs, targets) -> {"loss", "loss_seg", "loss_kpt", "loss_focal", "loss_dice", "w_seg", "w_kpt"}.

    outputs: seg_logits_BCHW, heatmap_BKHW. targets: mask_BHW (int64), kpts_visible_BK (bool), heatmap_BKHW (float,
    peak `heatmap_peak`) — or, when heatmap_BKHW is absent and sigma_px is set, kpts_px_BK2 rendered here.
    balance="cov" (published) or "fixed" (fixed_weights).
    seg_loss: None (published: focal + soft Dice, class-weighted focal) or a weighted sum of segmentation terms
    written as for the segmentation zoo (models/losses_seg.py), e.g. "ce + dice"; class_weights apply to its wce and
    focal terms. A weighted head class biases the mask boundary outwards (tests/test_hc_bias.py).
    """

    requires_masks = True           # the engine checks the data gives masks before training (engine/fitting.py)

    def __init__(self, num_classes: int = 8, class_weights: Sequence[float] | None = None, focal_alpha: float = 0.5,
                 focal_gamma: float = 2.0, dice_smooth: float = 1e-5, kpt_joint_weight: float = 0.25,
                 kpt_scale: float = 0.7, kpt_base: float = 1.004, balance: str = "cov", warmup_iters: int = 3,
                 fixed_weights: Sequence[float] = (0.5, 0.5), sigma_px: float | None = None,
                 heatmap_peak: float = 255.0, seg_loss: str | dict | None = None):
        super().__init__()
        if class_weights is None:
            class_weights = [1.0] + [5.0] * (num_classes - 1)
        if len(class_weights) != num_classes:
            raise ValueError(f"{WHERE}: class_weights has {len(class_weights)} entries for {num_classes} classes")
        if balance not in ("cov", "fixed"):
            raise ValueError(f"{WHERE}: balance='{balance}' is not one of ('cov', 'fixed')")
        if len(fixed_weights) != 2:
            raise ValueError(f"{WHERE}: fixed_weights needs 2 values (seg, kpt), got {list(fixed_weights)}")
        self.num_classes = num_classes
        self.register_buffer("class_weights", torch.tensor(list(class_weights), dtype=torch.float32),
                             persistent=False)
        self.focal_alpha, self.focal_gamma, self.dice_smooth = focal_alpha, focal_gamma, dice_smooth
        self.kpt_joint_weight, self.kpt_scale, self.kpt_base = kpt_joint_weight, kpt_scale, kpt_base
        self.sigma_px, self.heatmap_peak = sigma_px, heatmap_peak
        self.balance = balance
        self.fixed_weights = tuple(float(w) for w in fixed_weights)
        self.balancer = CoVWeighting(2, warmup_iters)
        self.seg_terms = None
        if seg_loss is not None:
            from .losses_seg import SegCriterion      # losses_seg imports this module
            self.seg_terms = SegCriterion(num_classes, seg_loss, class_weights, focal_gamma, focal_alpha)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, heat = _get(outputs, "seg_logits_BCHW", "outputs"), _get(outputs, "heatmap_BKHW", "outputs")
        mask = self._mask(_get(targets, "mask_BHW", "targets"), logits)
        visible = _get(targets, "kpts_visible_BK", "targets").to(heat.device)
        target_heat = self._target_heatmap(targets, heat, visible)
        if self.seg_terms is not None:
            seg_parts: dict[str, torch.Tensor] = {}
            loss_seg = self.seg_terms._sum(logits, mask, seg_parts)
            loss_focal = seg_parts.get("loss_focal", loss_seg.new_zeros(()))
            loss_dice = seg_parts.get("loss_dice", loss_seg.new_zeros(()))
        else:
            loss_focal = focal_loss(logits, mask, self.class_weights, self.focal_alpha, self.focal_gamma)
            loss_dice = soft_dice_loss(logits, mask, self.dice_smooth)
            loss_seg = loss_focal + loss_dice
        loss_kpt = weighted_heatmap_mse(heat, target_heat, visible, self.kpt_joint_weight, self.kpt_scale,
                                        self.kpt_base)
        if self.balance == "cov":
            w = self.balancer(torch.stack([loss_seg.detach(), loss_kpt.detach()]))
        else:
            w = torch.tensor(self.fixed_weights, dtype=torch.float32)
        w = w.to(loss_seg.device)
        loss = w[0] * loss_seg + w[1] * loss_kpt
        return {"loss": loss, "loss_seg": loss_seg.detach(), "loss_kpt": loss_kpt.detach(),
                "loss_focal": loss_focal.detach(), "loss_dice": loss_dice.detach(), "w_seg": w[0], "w_kpt": w[1]}

    def _mask(self, mask_BHW: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        b, c, h, w = logits.shape
        if c != self.num_classes:
            raise ValueError(f"{WHERE}: criterion built for {self.num_classes} classes, logits have {c}")
        if tuple(mask_BHW.shape) != (b, h, w):
            raise ValueError(f"{WHERE}: mask_BHW {tuple(mask_BHW.shape)} does not match logits (B, H, W) = "
                             f"{(b, h, w)}")
        mask_BHW = mask_BHW.to(device=logits.device, dtype=torch.int64)
        if mask_BHW.numel() and (int(mask_BHW.min()) < 0 or int(mask_BHW.max()) >= c):
            raise ValueError(f"{WHERE}: mask_BHW values must lie in [0, {c}), got [{int(mask_BHW.min())}, "
                             f"{int(mask_BHW.max())}]")
        return mask_BHW

    def _target_heatmap(self, targets: dict, heat: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        target = target_heatmaps(targets, heat, self.sigma_px, self.heatmap_peak, WHERE)
        if tuple(visible.shape) != tuple(heat.shape[:2]):
            raise ValueError(f"{WHERE}: kpts_visible_BK {tuple(visible.shape)} does not match (B, K) = "
                             f"{tuple(heat.shape[:2])}")
        return target


def _get(d: dict, key: str, what: str) -> torch.Tensor:
    if key not in d or d[key] is None:
        raise KeyError(f"{WHERE}: '{key}' missing from the {what} (got {sorted(d)})")
    return d[key]
