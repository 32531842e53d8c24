"""Segmentation losses by name and their weighted sums from the config (docs/systems/segmentation_zoo.md).

Terms (p = softmax(logits), g = one-hot truth, sums over the batch and pixels per class, then a mean over classes):
  ce     F.cross_entropy, plain mean over pixels;
  wce    class-weighted cross entropy (torch's weighted mean: sum_i w[y_i] l_i / sum_i w[y_i]); needs class_weights;
  iou    soft IoU (Jaccard) loss 1 - mean_c (sum p g + s) / (sum p + sum g - sum p g + s), s = 1e-5;
  dice   soft Dice loss 1 - mean_c (2 sum p g + s) / (sum p + sum g + s) (models/losses.py soft_dice_loss);
  focal  focal loss, gamma 2, alpha 0.5 by default (models/losses.py focal_loss; class_weights apply if given).
A loss is written as a weighted sum, e.g. "0.8*ce + 0.2*iou", "ce", "dice + focal", or given as a mapping
{ce: 0.8, iou: 0.2}. Deep-supervision outputs ("aux_logits_BCHW") add `aux_weight` times the same sum each.
All terms are computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import focal_loss, soft_dice_loss

WHERE = "models/losses_seg.py"
SMOOTH = 1e-5


def soft_iou_loss(logits_BCHW: torch.Tensor, mask_BHW: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    prob_BCHW = torch.softmax(logits_BCHW.float(), dim=1)
    onehot_BCHW = F.one_hot(mask_BHW, prob_BCHW.shape[1]).permute(0, 3, 1, 2).to(prob_BCHW.dtype)
    inter_C = (prob_BCHW * onehot_BCHW).sum(dim=(0, 2, 3))
    union_C = prob_BCHW.sum(dim=(0, 2, 3)) + onehot_BCHW.sum(dim=(0, 2, 3)) - inter_C
    return 1.0 - ((inter_C + smooth) / (union_C + smooth)).mean()


TERMS = ("ce", "wce", "iou", "dice", "focal")
_TERM_RE = re.compile(r"^\s*(?:(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)\s*\*\s*)?([a-z]+)\s*$")


def parse_loss_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    """"0.8*ce + 0.2*iou" (or {ce: 0.8, iou: 0.2}) -> {"ce": 0.8, "iou": 0.2}; errors name the bad part."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in spec.split("+"):
            m = _TERM_RE.match(part)
            if not m:
                raise ValueError(f"{WHERE}: loss '{spec}': cannot read '{part.strip()}' "
                                 f"(write terms like '0.8*ce + 0.2*iou'; terms: {', '.join(TERMS)})")
            items.append((m.group(2), float(m.group(1)) if m.group(1) else 1.0))
    else:
        raise ValueError(f"{WHERE}: loss must be a string like '0.8*ce + 0.2*iou' or a mapping, got {spec!r}")
    out: dict[str, float] = {}
    for name, weight in items:
        if name not in TERMS:
            raise ValueError(f"{WHERE}: loss '{spec}': unknown term '{name}' (choose from {', '.join(TERMS)})")
        if name in out:
            raise ValueError(f"{WHERE}: loss '{spec}': term '{name}' appears twice")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{WHERE}: loss '{spec}': weight of '{name}' is not a number: {weight!r}") from None
        if not weight > 0:
            raise ValueError(f"{WHERE}: loss '{spec}': weight of '{name}' must be > 0, got {weight}")
        out[name] = weight
    if not out:
        raise ValueError(f"{WHERE}: loss '{spec}' has no terms")
    return out


class SegCriterion(nn.Module):
    """Weighted sum of segmentation loss terms; returns {"loss", "loss_<term>"...} (parts detached, main output)."""

    requires_masks = True           # the engine checks the data gives masks before training (engine/fitting.py)

    def __init__(self, num_classes: int = 2, loss: str | Mapping[str, float] = "ce",
                 class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0, focal_alpha: float = 0.5,
                 aux_weight: float = 0.4):
        super().__init__()
        self.num_classes = int(num_classes)
        self.terms = parse_loss_spec(loss)
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ValueError(f"{WHERE}: class_weights has {len(class_weights)} entries for {num_classes} classes")
        if "wce" in self.terms and class_weights is None:
            raise ValueError(f"{WHERE}: loss term 'wce' (class-weighted cross entropy) needs class_weights")
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights is not None else torch.ones(0), persistent=False)
        self.focal_gamma, self.focal_alpha, self.aux_weight = float(focal_gamma), float(focal_alpha), aux_weight

    def _weights(self) -> torch.Tensor | None:
        return self.class_weights if self.class_weights.numel() else None

    def _term(self, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if name == "ce":
            return lambda z, y: F.cross_entropy(z.float(), y)
        if name == "wce":
            return lambda z, y: F.cross_entropy(z.float(), y, weight=self._weights().to(z.device))
        if name == "iou":
            return soft_iou_loss
        if name == "dice":
            return soft_dice_loss
        return lambda z, y: focal_loss(z, y, self._weights(), alpha=self.focal_alpha, gamma=self.focal_gamma)

    def _sum(self, logits: torch.Tensor, mask: torch.Tensor, parts: dict | None) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for name, w in self.terms.items():
            value = self._term(name)(logits, mask)
            if parts is not None:
                parts[f"loss_{name}"] = value.detach()
            total = total + w * value
        return total

    def forward(self, outputs: dict[str, Any], targets: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = outputs.get("seg_logits_BCHW")
        mask = targets.get("mask_BHW")
        if logits is None or mask is None:
            raise KeyError(f"{WHERE}: SegCriterion needs outputs['seg_logits_BCHW'] and targets['mask_BHW']")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"{WHERE}: the model outputs {logits.shape[1]} classes, the criterion has "
                             f"num_classes={self.num_classes}")
        mask = mask.to(device=logits.device, dtype=torch.int64)
        if int(mask.max()) >= self.num_classes or int(mask.min()) < 0:
            raise ValueError(f"{WHERE}: mask labels span {int(mask.min())}..{int(mask.max())}, outside "
                             f"0..{self.num_classes - 1}")
        parts: dict[str, torch.Tensor] = {}
        total = self._sum(logits, mask, parts)
        aux = outputs.get("aux_logits_BCHW") or []
        if aux and self.aux_weight:
            aux_total = sum(self._sum(a, mask, None) for a in aux)
            parts["loss_aux"] = aux_total.detach()
            total = total + self.aux_weight * aux_total
        return {"loss": total, **parts}
