"""Gaussian landmark heatmap targets: a numba kernel beside the numpy reference that defines them.

Definition (unnormalised Gaussians, peak scaled as in docs/systems/hip_us_multihipposenet.md: sigma 7 px at 384x512,
peak 255). For keypoint k at (kx, ky), visible, the value at pixel (x, y) (pixel centres at integer coordinates,
data_pipelines/batch.py) is

    peak * exp(-((x - kx)^2 + (y - ky)^2) / (2 sigma^2))   if |x - round(kx)| <= r and |y - round(ky)| <= r,
    0                                                       otherwise,

with r = ceil(truncate * sigma). The window is centred on the rounded keypoint, the Gaussian on the exact
(sub-pixel) keypoint. An invisible keypoint's map is all zeros; a keypoint outside the image still lights the part
of its window that falls inside. round() is half away from zero (floor(v + 0.5) for the non-negative case,
mirrored for negatives) in both implementations.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


def _round_half_away(v: float) -> int:
    return int(math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1))


def render_heatmaps_numpy(kpts_K2: np.ndarray, visible_K: np.ndarray, hw: tuple[int, int], sigma: float,
                          peak: float = 255.0, truncate: float = 3.0) -> np.ndarray:
    """float32 (K, H, W) per the module definition; the reference implementation."""
    h, w = hw
    pts = np.asarray(kpts_K2, dtype=np.float64).reshape(-1, 2)
    vis = np.asarray(visible_K, dtype=bool).reshape(-1)
    out = np.zeros((pts.shape[0], h, w), dtype=np.float32)
    r = int(math.ceil(truncate * sigma))
    for k in range(pts.shape[0]):
        kx, ky = pts[k]
        if not vis[k] or not (np.isfinite(kx) and np.isfinite(ky)):
            continue
        cx, cy = _round_half_away(kx), _round_half_away(ky)
        x0, x1 = max(cx - r, 0), min(cx + r, w - 1)
        y0, y1 = max(cy - r, 0), min(cy + r, h - 1)
        if x0 > x1 or y0 > y1:
            continue
        xs = np.arange(x0, x1 + 1, dtype=np.float64)
        ys = np.arange(y0, y1 + 1, dtype=np.float64)
        # separable: exp(-(dx^2 + dy^2) / 2s^2) = exp(-dx^2 / 2s^2) exp(-dy^2 / 2s^2)
        gx = np.exp(-((xs - kx) ** 2) / (2.0 * sigma * sigma))
        gy = np.exp(-((ys - ky) ** 2) / (2.0 * sigma * sigma))
        out[k, y0:y1 + 1, x0:x1 + 1] = peak * gy[:, None] * gx[None, :]
    return out


@njit(cache=True)
def _render_numba(pts, vis, h, w, sigma, peak, r, out):
    inv = 1.0 / (2.0 * sigma * sigma)
    for k in range(pts.shape[0]):
        kx, ky = pts[k, 0], pts[k, 1]
        if not vis[k] or not (np.isfinite(kx) and np.isfinite(ky)):
            continue
        cx = int(math.floor(abs(kx) + 0.5)) * (1 if kx >= 0 else -1)
        cy = int(math.floor(abs(ky) + 0.5)) * (1 if ky >= 0 else -1)
        for y in range(max(cy - r, 0), min(cy + r, h - 1) + 1):
            gy = math.exp(-((y - ky) ** 2) * inv)
            for x in range(max(cx - r, 0), min(cx + r, w - 1) + 1):
                out[k, y, x] = peak * gy * math.exp(-((x - kx) ** 2) * inv)


def render_heatmaps_numba(kpts_K2: np.ndarray, visible_K: np.ndarray, hw: tuple[int, int], sigma: float,
                          peak: float = 255.0, truncate: float = 3.0) -> np.ndarray:
    """float32 (K, H, W), same values as render_heatmaps_numpy (compiled; cached on disk after the first call)."""
    pts = np.ascontiguousarray(np.asarray(kpts_K2, dtype=np.float64).reshape(-1, 2))
    vis = np.ascontiguousarray(np.asarray(visible_K, dtype=np.bool_).reshape(-1))
    out = np.zeros((pts.shape[0], hw[0], hw[1]), dtype=np.float32)
    _render_numba(pts, vis, int(hw[0]), int(hw[1]), float(sigma), float(peak), int(math.ceil(truncate * sigma)), out)
    return out


_IMPLS = {"numba": render_heatmaps_numba, "numpy": render_heatmaps_numpy}
HEATMAP_IMPLS = (*_IMPLS, "none")


def render_heatmaps(kpts_K2: np.ndarray, visible_K: np.ndarray, hw: tuple[int, int], sigma: float,
                    peak: float = 255.0, truncate: float = 3.0, impl: str = "numba") -> np.ndarray | None:
    """Dispatch to the numba kernel or the numpy reference (`impl` = "numba" | "numpy"). impl="none" renders
    nothing and returns None: the targets are then rendered on the model's device by the loss
    (data.targets=device, kernels/heatmap_render.py), so the loader never spends CPU time on them."""
    if impl not in HEATMAP_IMPLS:
        raise ValueError(f"render_heatmaps: impl must be one of {list(HEATMAP_IMPLS)}, got {impl!r}")
    if not sigma > 0:
        raise ValueError(f"render_heatmaps: sigma must be > 0, got {sigma}")
    if impl == "none":
        return None
    return _IMPLS[impl](kpts_K2, visible_K, hw, sigma, peak, truncate)


def heatmap_item(heatmap_KHW: np.ndarray | None) -> dict:
    """The sample-dict entry for a rendered target: {"heatmap_KHW": tensor}, or {} when rendering is left to the
    device (render_heatmaps(..., impl="none"))."""
    import torch
    return {} if heatmap_KHW is None else {"heatmap_KHW": torch.from_numpy(heatmap_KHW)}
