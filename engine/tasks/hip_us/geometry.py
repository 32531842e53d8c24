"""Graf hip-ultrasound geometry: the acute angle between two lines, the alpha/beta angles, the screening type.

Landmark order (docs/systems/hip_us_multihipposenet.md): P1 baseline point, P2 bony rim point, P3 lower limb of the os
ilium, P4 labrum centre, P5 peak of the acetabular prominence, P6 echo-loss point. Points are (x, y) pixels
(data_pipelines/batch.py).

    alpha = acute angle between the bony roof line P3-P5 and the baseline P1-P2
    beta  = acute angle between the cartilage roof line P4-P6 and the baseline P1-P2
    Graf type II (screening positive) when alpha < 60 deg, else type I.

Inputs may be numpy arrays (or anything `np.asarray` takes) or torch tensors: when any argument is a torch tensor
the computation runs in torch on that tensor's device and returns a tensor, otherwise it runs in numpy (float64)
and returns an ndarray (0-d for a single line pair). Angles are not meant to be differentiated through (the
gradient of |cross| is undefined at 0 deg).

Degenerate lines: a line whose two points coincide exactly (zero length) has no direction, so its angle is NaN
(never a silent 0). Non-finite coordinates propagate as NaN as well.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

GRAF_ALPHA_THRESHOLD_DEG = 60.0
"""Graf screening rule: alpha below this is type II (docs/systems/hip_us_multihipposenet.md)."""

P1, P2, P3, P4, P5, P6 = range(6)
"""Indices of the six hip landmarks in a (..., 6, 2) array."""
NUM_HIP_LANDMARKS = 6


def _is_torch(*xs: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def _torch_float(xs: tuple[Any, ...]) -> list[torch.Tensor]:
    """Common floating dtype and device for the torch path (integers promote to float64)."""
    ref = next(x for x in xs if isinstance(x, torch.Tensor))
    ts = [x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device=ref.device) for x in xs]
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    return [t.to(device=ref.device, dtype=dtype) for t in ts]


def acute_line_angle_deg(a1: Any, a2: Any, b1: Any, b2: Any):
    """Acute angle in [0, 90] degrees between line a1-a2 and line b1-b2.

    Each argument is (..., 2) (x, y); leading dims broadcast. Lines, not rays: direction does not matter, so
    an obtuse angle of 120 deg between the direction vectors reads as 60 deg.
    Formula: with u = a2 - a1, v = b2 - b1, angle = atan2(|u x v|, |u . v|); atan2 is accurate near 0 and 90 deg
    where arccos of a normalised dot product loses precision. Zero-length line -> NaN.
    """
    if _is_torch(a1, a2, b1, b2):
        a1, a2, b1, b2 = _torch_float((a1, a2, b1, b2))
        lib = torch
    else:
        a1, a2, b1, b2 = (np.asarray(p, dtype=np.float64) for p in (a1, a2, b1, b2))
        lib = np
    for name, p in (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2)):
        if p.ndim == 0 or p.shape[-1] != 2:
            raise ValueError(f"engine/tasks/hip_us/geometry.py: acute_line_angle_deg: {name} must have shape (..., 2) (x, y), "
                             f"got {tuple(p.shape)}")
    u = a2 - a1
    v = b2 - b1
    cross = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
    dot = u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]
    if lib is torch:
        angle_deg = torch.rad2deg(torch.atan2(cross.abs(), dot.abs()))
    else:
        angle_deg = np.degrees(np.arctan2(np.abs(cross), np.abs(dot)))
    # A zero-length line gives cross = dot = 0 and atan2(0, 0) = 0: make it NaN, it has no direction.
    degenerate = ((u[..., 0] == 0) & (u[..., 1] == 0)) | ((v[..., 0] == 0) & (v[..., 1] == 0))
    nan = float("nan")
    if lib is torch:
        return torch.where(degenerate, torch.full_like(angle_deg, nan), angle_deg)
    return np.where(degenerate, nan, angle_deg)


def graf_angles_deg(kpts_K2: Any):
    """(alpha_deg, beta_deg) from hip landmarks of shape (6, 2) or (..., 6, 2), ordered P1..P6.

    Returns two arrays (or tensors, for torch input) of the leading shape; 0-d for a single (6, 2) input.
    NaN where a line is degenerate (see acute_line_angle_deg).
    """
    kpts = kpts_K2 if isinstance(kpts_K2, torch.Tensor) else np.asarray(kpts_K2, dtype=np.float64)
    if kpts.ndim < 2 or tuple(kpts.shape[-2:]) != (NUM_HIP_LANDMARKS, 2):
        raise ValueError(f"engine/tasks/hip_us/geometry.py: graf_angles_deg: expected landmarks of shape (..., 6, 2) in order "
                         f"P1..P6, got {tuple(kpts.shape)}")
    p = [kpts[..., k, :] for k in range(NUM_HIP_LANDMARKS)]
    alpha_deg = acute_line_angle_deg(p[P3], p[P5], p[P1], p[P2])
    beta_deg = acute_line_angle_deg(p[P4], p[P6], p[P1], p[P2])
    return alpha_deg, beta_deg


def is_type_ii(alpha_deg: Any):
    """Vectorised screening rule: True where alpha < 60 deg (Graf type II). NaN -> False; callers that need to
    know about undefined angles must test for NaN themselves (metrics skip them)."""
    if isinstance(alpha_deg, torch.Tensor):
        return alpha_deg < GRAF_ALPHA_THRESHOLD_DEG
    return np.asarray(alpha_deg, dtype=np.float64) < GRAF_ALPHA_THRESHOLD_DEG


def graf_type(alpha_deg: float) -> str:
    """Graf type of one hip from its alpha angle: "II" if alpha < 60 deg, else "I".

    A non-finite alpha (degenerate landmarks) has no type and raises ValueError rather than defaulting to "I".
    """
    value = float(alpha_deg)
    if not math.isfinite(value):
        raise ValueError(f"engine/tasks/hip_us/geometry.py: graf_type: alpha must be finite, got {value}")
    return "II" if value < GRAF_ALPHA_THRESHOLD_DEG else "I"
