"""Disc post-processing for the stacked hourglass (docs/systems/spine_disc_hourglass.md): heatmap candidates, a
mean-skeleton prior, and a decoder that picks one candidate (or none) per disc channel to match the prior.

Coordinates are (x, y) pixels of the heatmap (x = column, y = row, pixel centres at integers); the hourglass
heatmaps are at network-input resolution, so decoded points are network-input pixels.

The published post-processing thresholds each channel at half its maximum, takes connected components as candidates
and searches the combination of candidates closest to a mean training skeleton, reading the number of discs from the
ground truth (a leak). Here the number of discs is decided per sample from the heatmaps alone: a channel is "absent"
when no candidate fits the skeleton well enough to beat the penalty for dropping it, and the search is polynomial
(hypotheses from candidate pairs, see `select_candidates`) instead of exhaustive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

WHERE = "models/skeleton.py"


@dataclass
class SkeletonPrior:
    """Mean skeleton: offsets_K2[k] = mean of (p_k - p_0) / |p_4 - p_0| over training samples (the published
    normalisation by the disc0-disc4 distance; no rotation removed), spread_K[k] = RMS distance of the samples to
    that mean in the same units, count_K[k] = samples that contributed. Discs never seen have NaN offsets."""
    offsets_K2: np.ndarray
    spread_K: np.ndarray
    count_K: np.ndarray
    ref: tuple[int, int] = (0, 4)

    @property
    def known_K(self) -> np.ndarray:
        return np.isfinite(self.offsets_K2).all(axis=1)

    def to_dict(self) -> dict:
        """Plain lists (NaN kept as float('nan')), for checkpoints and JSON-like storage."""
        return {"offsets_K2": self.offsets_K2.tolist(), "spread_K": self.spread_K.tolist(),
                "count_K": self.count_K.tolist(), "ref": list(self.ref)}

    @classmethod
    def from_dict(cls, d: dict) -> "SkeletonPrior":
        return cls(offsets_K2=np.asarray(d["offsets_K2"], dtype=np.float64).reshape(-1, 2),
                   spread_K=np.asarray(d["spread_K"], dtype=np.float64),
                   count_K=np.asarray(d["count_K"], dtype=np.int64), ref=(int(d["ref"][0]), int(d["ref"][1])))


def _similarity(src: np.ndarray, dst: np.ndarray, reflect: bool = False) -> tuple[complex, complex]:
    """Least-squares 2-D similarity dst ~ a * z + b, z = src (or conj(src) for a reflection), points as complex
    numbers: a = sum conj(z_c) dst_c / sum |z_c|^2 on centred points (Umeyama 1991 in complex form)."""
    z = np.conj(src) if reflect else src
    zc, dc = z - z.mean(), dst - dst.mean()
    denom = float(np.sum(np.abs(zc) ** 2))
    a = complex(np.sum(np.conj(zc) * dc) / denom) if denom > 0 else 1.0 + 0j
    return a, complex(dst.mean() - a * z.mean())


def _nan_mean(v_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 of the finite entries (NaN where there are none) and their count, without nanmean's
    empty-slice warning."""
    ok = np.isfinite(v_NK)
    count = ok.sum(axis=0)
    total = np.where(ok, v_NK, 0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def fit_skeleton(kpts_NK2: np.ndarray, visible_NK: np.ndarray, ref: tuple[int, int] = (0, 4)) -> SkeletonPrior:
    """Mean skeleton of N training samples. Samples with both reference discs are normalised directly; the others
    (>= 2 discs in common with that first mean) are mapped into its frame by a least-squares similarity and then
    count too, so a disc is averaged over every sample where it is present."""
    kpts = np.asarray(kpts_NK2, dtype=np.float64)
    vis = np.asarray(visible_NK, dtype=bool)
    if kpts.ndim != 3 or kpts.shape[-1] != 2 or vis.shape != kpts.shape[:2]:
        raise ValueError(f"{WHERE}: fit_skeleton needs kpts (N, K, 2) and visible (N, K), got {kpts.shape} "
                         f"and {vis.shape}")
    k = kpts.shape[1]
    r0, r1 = ref[0], min(ref[1], k - 1)
    if r0 == r1:
        raise ValueError(f"{WHERE}: a skeleton needs at least 2 discs, got K={k}")
    vis = vis & np.isfinite(kpts).all(axis=-1)
    z = kpts[..., 0] + 1j * kpts[..., 1]                                    # (N, K) complex
    length = np.abs(z[:, r1] - z[:, r0])
    direct = vis[:, r0] & vis[:, r1] & (length > 0)
    if not direct.any():
        raise ValueError(f"{WHERE}: no training sample has both disc {r0} and disc {r1}; cannot normalise")
    u = np.full(z.shape, np.nan + 0j)
    u[direct] = (z[direct] - z[direct, r0:r0 + 1]) / length[direct, None]
    u[~vis] = np.nan
    mean, _ = _nan_mean(u[direct])
    for n in np.flatnonzero(~direct):
        common = vis[n] & np.isfinite(mean)
        if common.sum() < 2:
            continue
        # map the sample into the prior frame: u = a z + b fitted on its discs that the first mean knows
        a, b = _similarity(z[n, common], mean[common])
        u[n, vis[n]] = a * z[n, vis[n]] + b
    mean, count = _nan_mean(u)
    spread = np.sqrt(_nan_mean(np.abs(u - mean) ** 2)[0].real)
    offsets_K2 = np.where((count > 0)[:, None], np.stack([mean.real, mean.imag], axis=1), np.nan)
    return SkeletonPrior(offsets_K2=offsets_K2, spread_K=spread,
                         count_K=count.astype(np.int64), ref=(r0, r1))


def _subpixel_peak(h_HW: np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    """Vertex of the parabola through the peak and its two neighbours, per axis: offset = (l - r) / (2 (l - 2c + r)),
    on log values when all three are positive (exact for a Gaussian, whose log is a parabola). No step on a border
    or where the curvature is not negative; the step is within +-0.5 px for a true local maximum."""
    def step(l: float, c: float, r: float) -> float:
        if l > 0 and c > 0 and r > 0:
            l, c, r = np.log(l), np.log(c), np.log(r)
        denom = l - 2.0 * c + r
        return float(np.clip(0.5 * (l - r) / denom, -0.5, 0.5)) if denom < 0 else 0.0
    h, w = h_HW.shape
    dx = step(h_HW[iy, ix - 1], h_HW[iy, ix], h_HW[iy, ix + 1]) if 0 < ix < w - 1 else 0.0
    dy = step(h_HW[iy - 1, ix], h_HW[iy, ix], h_HW[iy + 1, ix]) if 0 < iy < h - 1 else 0.0
    return ix + dx, iy + dy


def heatmap_candidates(heatmap_KHW: np.ndarray, rel_threshold: float = 0.5, abs_threshold: float = 0.1,
                       max_per_channel: int = 3, peak: float = 1.0) -> list[list[tuple[float, float, float]]]:
    """Per channel, up to `max_per_channel` candidates (x, y, score), highest score first: the 8-connected
    components of {h >= rel_threshold * max h}, each placed at its sub-pixel peak with score = its peak value.
    A channel whose maximum is below abs_threshold * peak (target peak value) has no candidates."""
    hm = np.asarray(heatmap_KHW, dtype=np.float64)
    if hm.ndim != 3:
        raise ValueError(f"{WHERE}: heatmap must be (K, H, W), got {hm.shape}")
    out: list[list[tuple[float, float, float]]] = []
    for h_HW in hm:
        m = float(np.max(h_HW)) if np.isfinite(h_HW).all() else float("nan")
        if not np.isfinite(m) or m <= 0 or m < abs_threshold * peak:
            out.append([])
            continue
        labels, n = ndimage.label(h_HW >= rel_threshold * m, structure=np.ones((3, 3), dtype=bool))
        idx = np.arange(1, n + 1)
        values = ndimage.maximum(h_HW, labels, idx)
        positions = ndimage.maximum_position(h_HW, labels, idx)
        cands = []
        for j in np.argsort(-np.asarray(values), kind="stable")[:max_per_channel]:
            x, y = _subpixel_peak(h_HW, int(positions[j][0]), int(positions[j][1]))
            cands.append((x, y, float(values[j])))
        out.append(cands)
    return out


def _hypotheses(z: np.ndarray, chan: np.ndarray, m_K: np.ndarray):
    """Similarity transforms a z' + b (z' = m or conj(m)) mapping the prior points of two channels onto one
    candidate each, for every pair of candidates of different channels, proper and reflected. Returns (a_H, b_H,
    reflect_H)."""
    i, j = np.triu_indices(len(z), k=1)
    keep = chan[i] != chan[j]
    i, j = i[keep], j[keep]
    a_all, b_all, refl_all = [], [], []
    for reflect in (False, True):
        mi, mj = m_K[chan[i]], m_K[chan[j]]
        if reflect:
            mi, mj = np.conj(mi), np.conj(mj)
        ok = (np.abs(mj - mi) > 1e-9) & (np.abs(z[j] - z[i]) > 1e-6)
        a = (z[j][ok] - z[i][ok]) / (mj[ok] - mi[ok])
        a_all.append(a)
        b_all.append(z[i][ok] - a * mi[ok])
        refl_all.append(np.full(a.shape, reflect))
    return np.concatenate(a_all), np.concatenate(b_all), np.concatenate(refl_all)


def _assign(a_H, b_H, refl_H, z, chan, m_K, sigma_K, absent_K, k: int):
    """Costs of every hypothesis: per channel min(min_c (d_c / sigma_k)^2, absent_k), d_c = distance of candidate c
    to the transformed prior point measured in prior units (pixels / |a|). Returns (total_H, choice_HK) with -1 for
    'absent'."""
    m = np.where(refl_H[:, None], np.conj(m_K)[None, :], m_K[None, :])        # (H, K)
    pred = a_H[:, None] * m + b_H[:, None]
    d = np.abs(z[None, :] - pred[:, chan]) / np.abs(a_H)[:, None]             # (H, n)
    cost = (d / sigma_K[chan][None, :]) ** 2
    total = np.zeros(len(a_H))
    choice = np.full((len(a_H), k), -1)
    for ch in np.unique(chan):
        cols = np.flatnonzero(chan == ch)
        best = cols[np.argmin(cost[:, cols], axis=1)]
        best_cost = cost[np.arange(len(a_H)), best]
        take = best_cost < absent_K[ch]
        choice[take, ch] = best[take]
        total += np.where(take, best_cost, absent_K[ch])
    return total, choice


def select_candidates(cands: list[list[tuple[float, float, float]]], prior: SkeletonPrior | None,
                      peak: float = 1.0, drop_penalty: float = 4.0, min_sigma: float = 0.05,
                      refits: int = 2) -> list[int]:
    """Index of the chosen candidate per channel, -1 for absent.

    Cost of a choice = sum over channels of (d / sigma_k)^2 for a kept candidate, d its distance to the
    similarity-aligned mean skeleton in units of the disc0-disc4 distance and sigma_k = max(spread_k, min_sigma),
    or drop_penalty * min(score / peak, 1) for dropping the channel's best candidate (dropping a confident
    candidate costs more). For a fixed similarity the cost separates by channel, so the best choice is exact per
    channel; the similarity is searched over the O((K C)^2) transforms that put two candidates of different channels
    exactly on their prior discs (RANSAC-style, both handednesses), then refitted by least squares on the chosen
    candidates. Channels the prior does not know keep their best candidate; without a prior (or with fewer than
    two known channels holding candidates) every channel keeps its best candidate."""
    k = len(cands)
    fallback = [0 if c else -1 for c in cands]
    if prior is None:
        return fallback
    if prior.offsets_K2.shape[0] != k:
        raise ValueError(f"{WHERE}: the prior has {prior.offsets_K2.shape[0]} discs, the heatmap {k} channels")
    known = prior.known_K
    flat = [(ch, x, y, s) for ch in range(k) if known[ch] for (x, y, s) in cands[ch]]
    if len({f[0] for f in flat}) < 2:
        return fallback
    chan = np.array([f[0] for f in flat])
    z = np.array([f[1] + 1j * f[2] for f in flat])
    m_K = np.where(known, prior.offsets_K2[:, 0] + 1j * prior.offsets_K2[:, 1], 0)
    sigma_K = np.maximum(np.nan_to_num(prior.spread_K, nan=min_sigma), min_sigma)
    absent_K = np.zeros(k)
    for ch in range(k):
        if cands[ch]:
            absent_K[ch] = drop_penalty * min(max(cands[ch][0][2], 0.0) / peak, 1.0)
    a_H, b_H, refl_H = _hypotheses(z, chan, m_K)
    if len(a_H) == 0:
        return fallback
    total, choice = _assign(a_H, b_H, refl_H, z, chan, m_K, sigma_K, absent_K, k)
    h = int(np.argmin(total))
    best_total, best_choice, reflect = total[h], choice[h], bool(refl_H[h])
    for _ in range(refits):
        kept = best_choice[best_choice >= 0]
        if len(kept) < 2:
            break
        a, b = _similarity(m_K[chan[kept]], z[kept], reflect=reflect)
        t2, c2 = _assign(np.array([a]), np.array([b]), np.array([reflect]), z, chan, m_K, sigma_K, absent_K, k)
        if not t2[0] < best_total:
            break
        best_total, best_choice = t2[0], c2[0]
    result = list(fallback)
    for ch in range(k):
        if known[ch]:
            # index within the channel's own list: position of the chosen flat entry among that channel's entries
            result[ch] = -1 if best_choice[ch] < 0 else int(best_choice[ch] - np.flatnonzero(chan == ch)[0])
    return result


def _window_centroid(h_HW: np.ndarray, x: float, y: float, radius: int, iters: int = 10) -> tuple[float, float]:
    """Soft-argmax restricted to a window around the candidate, as a mean shift: c <- centroid of max(h, 0) times
    exp(-|p - c|^2 / (2 radius^2)) over the pixels within 2 radius of round(c). A plain centroid over a fixed square
    is pulled towards the square's centre (0.1-0.3 px for sigma 2-3 px); with the kernel centred on the estimate,
    any blob symmetric about mu has mu as fixed point (for a Gaussian of sigma s the error shrinks by s^2 / (s^2 +
    radius^2) per step). Blind to the other discs' blobs, unlike a global soft-argmax."""
    hh, ww = h_HW.shape
    r = 2 * radius
    for _ in range(iters):
        cx, cy = int(round(x)), int(round(y))
        x0, x1, y0, y1 = max(cx - r, 0), min(cx + r, ww - 1), max(cy - r, 0), min(cy + r, hh - 1)
        xs, ys = np.arange(x0, x1 + 1, dtype=np.float64), np.arange(y0, y1 + 1, dtype=np.float64)
        kernel = np.exp(-((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2) / (2.0 * radius * radius))
        w = np.clip(h_HW[y0:y1 + 1, x0:x1 + 1], 0, None) * kernel
        total = float(w.sum())
        if total <= 0:
            break
        x, y = float((w.sum(axis=0) * xs).sum() / total), float((w.sum(axis=1) * ys).sum() / total)
    return x, y


def decode_discs(heatmap_BKHW: torch.Tensor, prior: SkeletonPrior | None, method: str = "argmax",
                 rel_threshold: float = 0.5, abs_threshold: float = 0.1, peak: float = 1.0,
                 max_per_channel: int = 3, drop_penalty: float = 4.0, window: int = 3
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disc positions from hourglass heatmaps: ((B, K, 2) float32 pixels, NaN where absent; (B, K) bool present).
    Per sample: candidates per channel (`heatmap_candidates`), one or none chosen per channel against the prior
    (`select_candidates`), then the position refined by `method`: "argmax" = integer peak + per-axis parabola on
    the log values (the candidate position), "softargmax" = a window-restricted soft-argmax (mean shift with a
    Gaussian kernel of `window` px started at the candidate, `_window_centroid`)."""
    if method not in ("argmax", "softargmax"):
        raise ValueError(f"{WHERE}: method must be 'argmax' or 'softargmax', got {method!r}")
    if heatmap_BKHW.dim() != 4:
        raise ValueError(f"{WHERE}: heatmap must be (B, K, H, W), got {tuple(heatmap_BKHW.shape)}")
    hm = heatmap_BKHW.detach().float().cpu().numpy()
    b, k = hm.shape[:2]
    kpts = np.full((b, k, 2), np.nan, dtype=np.float32)
    present = np.zeros((b, k), dtype=bool)
    for i in range(b):
        cands = heatmap_candidates(hm[i], rel_threshold, abs_threshold, max_per_channel, peak)
        for ch, c in enumerate(select_candidates(cands, prior, peak, drop_penalty)):
            if c < 0:
                continue
            x, y, _ = cands[ch][c]
            if method == "softargmax":
                x, y = _window_centroid(hm[i, ch], x, y, window)
            kpts[i, ch], present[i, ch] = (x, y), True
    return torch.from_numpy(kpts), torch.from_numpy(present)
