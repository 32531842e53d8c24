"""Shape geometry of the generic landmark task: similarity (Procrustes) alignment and the mean truth shape.

Points are (x, y) pixels, y down (data_pipelines/batch.py); NaN marks a landmark that is not visible. The mean shape
behind the error heat map is built by aligning every image's truth to a reference by a similarity transform
(translation, rotation, uniform scale; no reflection), fitted by least squares on the landmarks visible in both
(Umeyama 1991's closed form), and averaging the aligned points landmark by landmark. The reference is the image with
the most visible landmarks (the first such one), so the mean lives in that image's pixel frame; an image sharing
fewer than two visible landmarks with the reference cannot be aligned and is left out.
"""
from __future__ import annotations

import numpy as np

_WHERE = "engine/tasks/landmarks/geometry.py"


def similarity_fit(src_N2: np.ndarray, dst_N2: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, R_22, t_2) minimising sum |s R src + t - dst|^2 over rotations R (det +1); needs N >= 2 points that
    are not all equal."""
    src, dst = np.asarray(src_N2, dtype=np.float64), np.asarray(dst_N2, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"{_WHERE}: similarity_fit needs two (N >= 2, 2) point sets, got {src.shape}, {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = float((xs ** 2).sum()) / len(src)
    if var_s == 0.0:
        raise ValueError(f"{_WHERE}: similarity_fit: the source points coincide")
    u, sig, vt = np.linalg.svd(xd.T @ xs / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])   # a reflection is not a pose change: forbid it
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d)) / var_s
    return scale, rot, mu_d - scale * rot @ mu_s


def align_to(points_K2: np.ndarray, reference_K2: np.ndarray) -> np.ndarray | None:
    """points_K2 mapped onto reference_K2 by the similarity fitted on the landmarks finite in both (NaN stays NaN);
    None when fewer than two distinct common landmarks exist."""
    p, ref = np.asarray(points_K2, dtype=np.float64), np.asarray(reference_K2, dtype=np.float64)
    both = np.isfinite(p).all(1) & np.isfinite(ref).all(1)
    if both.sum() < 2 or np.ptp(p[both], axis=0).max() == 0:
        return None
    scale, rot, t = similarity_fit(p[both], ref[both])
    return scale * p @ rot.T + t


def mean_shape(truths_NK2: np.ndarray) -> np.ndarray:
    """The mean truth shape (K, 2) in the reference image's frame (module docstring); NaN for a landmark no aligned
    image shows. A single landmark (K = 1) has no shape: its mean position is returned as it is."""
    t = np.asarray(truths_NK2, dtype=np.float64)
    if t.ndim != 3 or t.shape[-1] != 2 or len(t) == 0:
        raise ValueError(f"{_WHERE}: mean_shape needs truths of shape (N >= 1, K, 2), got {t.shape}")
    visible = np.isfinite(t).all(-1)
    if t.shape[1] == 1 or not visible.any():
        return _nanmean(t)
    ref = t[int(np.argmax(visible.sum(1)))]
    aligned = [a for a in (align_to(shape, ref) for shape in t) if a is not None]
    return _nanmean(np.stack(aligned)) if aligned else ref.copy()


def _nanmean(x_NK2: np.ndarray) -> np.ndarray:
    """Mean over images, NaN (not a warning) where no image has the landmark."""
    ok = np.isfinite(x_NK2).all(-1, keepdims=True)
    n = ok.sum(0)
    total = np.where(ok, x_NK2, 0.0).sum(0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)
