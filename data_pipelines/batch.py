"""The one batch type every loader (torch path, later DALI) yields and every model/metric reads.

Coordinate convention (written once, used everywhere):
    Points are (x, y) in pixels of the image they belong to, x to the right (column), y down (row).
    Pixel centres sit at integer coordinates: the centre of pixel (row r, column c) is (x=c, y=r);
    the image covers [-0.5, W-0.5] x [-0.5, H-0.5]. A resize by factor s therefore maps
    x' = (x + 0.5) * s - 0.5.
    `kpts_px_BK2` is in the frame of `image_BCHW` (the network input, after letterbox/augmentation).
    `meta[i]["to_input_3x3"]` maps original-image pixels to that frame (homogeneous, same convention),
    so predictions map back with its inverse.
    `spacing_mm_B2` is millimetres per pixel (x, y) in the *input* frame (original spacing / scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    image_BCHW: torch.Tensor                 # float32, normalised network input
    kpts_px_BK2: torch.Tensor                # float32, input-frame pixels (see module docstring)
    kpts_visible_BK: torch.Tensor            # bool, False for missing / out-of-frame landmarks
    spacing_mm_B2: torch.Tensor              # float32, mm per input pixel (x, y)
    mask_BHW: torch.Tensor | None = None     # int64 class ids, 0 = background
    heatmap_BKHW: torch.Tensor | None = None  # float32 Gaussian targets in the input frame
    meta: list[dict[str, Any]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.image_BCHW.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(mv(self.image_BCHW), mv(self.kpts_px_BK2), mv(self.kpts_visible_BK),
                     mv(self.spacing_mm_B2), mv(self.mask_BHW), mv(self.heatmap_BKHW), self.meta)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the CPU tensors (DataLoader(pin_memory=True) calls this), so that
        .to("cuda", non_blocking=True) is an asynchronous copy."""
        def pin(t):
            return t if t is None or t.device.type != "cpu" else t.pin_memory()
        return Batch(pin(self.image_BCHW), pin(self.kpts_px_BK2), pin(self.kpts_visible_BK), pin(self.spacing_mm_B2),
                     pin(self.mask_BHW), pin(self.heatmap_BKHW), self.meta)

    def targets(self) -> dict[str, torch.Tensor]:
        """What losses read: everything but the image and meta."""
        out = {"kpts_px_BK2": self.kpts_px_BK2, "kpts_visible_BK": self.kpts_visible_BK}
        if self.mask_BHW is not None:
            out["mask_BHW"] = self.mask_BHW
        if self.heatmap_BKHW is not None:
            out["heatmap_BKHW"] = self.heatmap_BKHW
        return out


def _stack(values, dtype):
    return torch.stack([torch.as_tensor(np.asarray(v), dtype=dtype) for v in values])


def collate_samples(samples: list[dict[str, Any]]) -> Batch:
    """Collate per-sample dicts with keys image_CHW, kpts_px_K2, kpts_visible_K, spacing_mm_2,
    optional mask_HW, heatmap_KHW, and meta (a dict)."""
    if not samples:
        raise ValueError("collate_samples: empty sample list")
    first = samples[0]
    return Batch(
        image_BCHW=_stack([s["image_CHW"] for s in samples], torch.float32),
        kpts_px_BK2=_stack([s["kpts_px_K2"] for s in samples], torch.float32),
        kpts_visible_BK=_stack([s["kpts_visible_K"] for s in samples], torch.bool),
        spacing_mm_B2=_stack([s["spacing_mm_2"] for s in samples], torch.float32),
        mask_BHW=_stack([s["mask_HW"] for s in samples], torch.int64) if first.get("mask_HW") is not None else None,
        heatmap_BKHW=(_stack([s["heatmap_KHW"] for s in samples], torch.float32)
                      if first.get("heatmap_KHW") is not None else None),
        meta=[dict(s.get("meta", {})) for s in samples],
    )
