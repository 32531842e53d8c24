"""Losses of the hip X-ray keypoint models (docs/systems/hip_xray_efficientnet.md): coordinate regression and heatmap (+
soft-argmax).

Both follow the criterion contract: forward(outputs, targets) -> {"loss": scalar, parts...}; targets are
Batch.targets() ({"kpts_px_BK2", "kpts_visible_BK", "heatmap_BKHW"?}). Only visible landmarks count; a batch with
no visible landmark gives a zero loss that still depends on the outputs (so backward works). Computed in float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .codecs import softargmax_decode, target_heatmaps

WHERE = "models/losses_kpt.py"
COORD_KINDS = ("mse", "l1", "smooth_l1")


def _get(d: dict, key: str, what: str) -> torch.Tensor:
    if key not in d or d[key] is None:
        raise KeyError(f"{WHERE}: '{key}' missing from the {what} (got {sorted(d)})")
    return d[key]


def masked_coord_loss(pred_BK2: torch.Tensor, true_BK2: torch.Tensor, visible_BK: torch.Tensor, kind: str = "mse",
                      beta: float = 1.0) -> torch.Tensor:
    """Mean of the elementwise loss over the x and y of visible landmarks:
        sum_{b,k visible, c in (x, y)} l(pred - true) / (2 * #visible),
    l = d^2 (mse), |d| (l1) or smooth-L1 with threshold beta. With every landmark visible this is nn.MSELoss() over
    the 2K coordinates, the published loss. Invisible targets may hold NaN: they are replaced before the loss."""
    if pred_BK2.shape != true_BK2.shape or pred_BK2.shape[:2] != visible_BK.shape or pred_BK2.shape[-1] != 2:
        raise ValueError(f"{WHERE}: pred {tuple(pred_BK2.shape)}, target {tuple(true_BK2.shape)} and visible "
                         f"{tuple(visible_BK.shape)} must be (B, K, 2), (B, K, 2), (B, K)")
    vis = visible_BK.to(device=pred_BK2.device, dtype=torch.bool)[..., None].expand_as(pred_BK2)
    pred = pred_BK2.float()
    true = torch.where(vis, true_BK2.to(pred.device).float(), pred.detach())  # no NaN reaches the gradient
    if kind == "mse":
        elem = (pred - true).pow(2)
    elif kind == "l1":
        elem = (pred - true).abs()
    elif kind == "smooth_l1":
        elem = F.smooth_l1_loss(pred, true, reduction="none", beta=beta)
    else:
        raise ValueError(f"{WHERE}: loss kind '{kind}' is not one of {COORD_KINDS}")
    return (elem * vis).sum() / vis.sum().clamp_min(1)


class CoordinateLoss(nn.Module):
    """Regression loss on outputs["kpts_px_BK2"] (network-input pixels).

    kind: "mse" (published), "l1" or "smooth_l1" (threshold `beta`, in the units the loss sees).
    normalize_hw: (H, W) of the network input; when given, x is divided by W and y by H before the loss, making it
    scale-free (a 1-px error at 224 px costs (1/224)^2 under MSE). Set it to data.input_hw.
    Returns {"loss", "loss_coord", "mre_px"} (mre_px: mean radial error of the visible points, detached).
    """

    def __init__(self, kind: str = "mse", normalize_hw: Sequence[int] | None = None, beta: float = 1.0):
        super().__init__()
        if kind not in COORD_KINDS:
            raise ValueError(f"{WHERE}: kind '{kind}' is not one of {COORD_KINDS}")
        if normalize_hw is not None and (len(normalize_hw) != 2 or min(normalize_hw) <= 0):
            raise ValueError(f"{WHERE}: normalize_hw must be a positive (H, W), got {normalize_hw}")
        self.kind, self.beta = kind, float(beta)
        self.normalize_hw = None if normalize_hw is None else (float(normalize_hw[0]), float(normalize_hw[1]))

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = _get(outputs, "kpts_px_BK2", "outputs").float()
        true = _get(targets, "kpts_px_BK2", "targets").to(pred.device).float()
        vis = _get(targets, "kpts_visible_BK", "targets").to(pred.device)
        scale = 1.0 if self.normalize_hw is None else pred.new_tensor([1.0 / self.normalize_hw[1],
                                                                       1.0 / self.normalize_hw[0]])
        loss = masked_coord_loss(pred * scale, true * scale, vis, self.kind, self.beta)
        return {"loss": loss, "loss_coord": loss.detach(), "mre_px": _mre_px(pred, true, vis)}


def _mre_px(pred_BK2: torch.Tensor, true_BK2: torch.Tensor, visible_BK: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        vis = visible_BK.to(torch.bool)
        dist = torch.linalg.vector_norm(torch.nan_to_num(pred_BK2 - true_BK2), dim=-1)
        return (dist * vis).sum() / vis.sum().clamp_min(1)


def visible_heatmap_mse(pred_BKHW: torch.Tensor, target_BKHW: torch.Tensor, visible_BK: torch.Tensor
                        ) -> torch.Tensor:
    """sum_{b,k} v_bk * mean_{h,w} (p - g)^2 / max(sum v, 1): the per-map MSE averaged over the visible maps."""
    per_map_BK = (pred_BKHW.float() - target_BKHW.float()).pow(2).mean(dim=(2, 3))
    vis = visible_BK.to(device=per_map_BK.device, dtype=per_map_BK.dtype)
    return (per_map_BK * vis).sum() / vis.sum().clamp_min(1)


class HeatmapCoordLoss(nn.Module):
    """Heatmap loss for `efficientnet_heatmap`:
        loss = heatmap_weight * visible_heatmap_mse(pred, target)
             + coord_weight * masked_coord_loss(softargmax(pred), kpts_px, coord_kind)   (skipped at weight 0)
    The target heatmap is targets["heatmap_BKHW"] (peak = data.heatmap_peak) or, without it, rendered here from
    kpts_px_BK2 with sigma_px / heatmap_peak. The soft-argmax uses beta = softargmax_beta (default 20 / peak, see
    models/codecs.py); its coordinate term is in input pixels, divided by (W, H) when normalize_coords is true.
    Returns {"loss", "loss_heatmap", "loss_coord", "mre_px"} (mre_px of the soft-argmax points, detached)."""

    def __init__(self, heatmap_weight: float = 1.0, coord_weight: float = 0.0, coord_kind: str = "l1",
                 sigma_px: float | None = None, heatmap_peak: float = 1.0, softargmax_beta: float | None = None,
                 normalize_coords: bool = False):
        super().__init__()
        if coord_kind not in COORD_KINDS:
            raise ValueError(f"{WHERE}: coord_kind '{coord_kind}' is not one of {COORD_KINDS}")
        if heatmap_weight < 0 or coord_weight < 0 or heatmap_weight + coord_weight == 0:
            raise ValueError(f"{WHERE}: weights must be >= 0 and not both 0 (heatmap_weight={heatmap_weight}, "
                             f"coord_weight={coord_weight})")
        self.heatmap_weight, self.coord_weight, self.coord_kind = float(heatmap_weight), float(coord_weight), coord_kind
        self.sigma_px, self.heatmap_peak = sigma_px, float(heatmap_peak)
        self.beta = 20.0 / self.heatmap_peak if softargmax_beta is None else float(softargmax_beta)
        self.normalize_coords = bool(normalize_coords)

    def _target(self, targets: dict, heat: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        return target_heatmaps(targets, heat, self.sigma_px, self.heatmap_peak, WHERE)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heat = _get(outputs, "heatmap_BKHW", "outputs")
        vis = _get(targets, "kpts_visible_BK", "targets").to(heat.device)
        if tuple(vis.shape) != tuple(heat.shape[:2]):
            raise ValueError(f"{WHERE}: kpts_visible_BK {tuple(vis.shape)} does not match (B, K) = "
                             f"{tuple(heat.shape[:2])}")
        loss_hm = visible_heatmap_mse(heat, self._target(targets, heat, vis), vis)
        xy = softargmax_decode(heat, beta=self.beta) if self.coord_weight > 0 else \
            softargmax_decode(heat.detach(), beta=self.beta)
        true = _get(targets, "kpts_px_BK2", "targets").to(heat.device).float()
        loss_c = torch.zeros((), device=heat.device)
        if self.coord_weight > 0:
            h, w = heat.shape[-2:]
            scale = xy.new_tensor([1.0 / w, 1.0 / h]) if self.normalize_coords else 1.0
            loss_c = masked_coord_loss(xy * scale, true * scale, vis, self.coord_kind)
        loss = self.heatmap_weight * loss_hm + self.coord_weight * loss_c
        return {"loss": loss, "loss_heatmap": loss_hm.detach(), "loss_coord": loss_c.detach(),
                "mre_px": _mre_px(xy.detach(), true, vis)}


CRITERIA_KPT: dict[str, Callable[..., nn.Module]] = {
    "efficientnet": CoordinateLoss,
    "efficientnet_cbam": CoordinateLoss,
    "efficientnet_ms_cbam_3scales": CoordinateLoss,
    "efficientnet_heatmap": HeatmapCoordLoss,
}
