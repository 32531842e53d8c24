"""Image corruptions for robustness evaluation (`medpose eval --corrupt`, config key eval.corrupt).

A corruption is applied to each image in its ORIGINAL frame, on the decoded pixel values in their native range, before
any resizing, equalisation or normalisation: the network sees what a noisy scan of the same anatomy would give it,
passed through the unchanged preprocessing. The native range is the dtype's for integer images (uint8: 0..255) and the
image's own min..max for float images (the NIfTI reader's z-scored slabs).

Kinds and what their level means:
    salt_pepper  density d in [0, 1]: exactly round(d * H * W) pixel positions are replaced (every channel), each
                 with the range maximum (salt) or minimum (pepper) with probability 1/2 - the usual definition of the
                 noise density (a fraction of the image's pixels).
    gaussian     sigma as a fraction of the intensity range: x + N(0, (sigma * range)^2), clipped to the range.
    speckle      sigma of multiplicative noise on the unit-range image: u * (1 + N(0, sigma^2)), clipped to [0, 1].
    blur         Gaussian blur, sigma in original-image pixels (kernel truncated at 4 sigma, mirrored edges).
Integer images are rounded back to their dtype. Level 0 of every kind returns the image unchanged (bit for bit).

Determinism: each (kind, level, sample id) has its own random stream (a SHA-256 of the three), so the noise an image
gets does not depend on batch order, rank, world size, DataLoader workers or what else was evaluated.

Syntax: "KIND:LEVEL,LEVEL,...", several kinds joined with ";" (or given as several --corrupt options), e.g.
"salt_pepper:0.001,0.01;blur:1,2". A kind given twice has its levels merged; levels are sorted ascending.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .config import ConfigError

KINDS: dict[str, str] = {
    "salt_pepper": "noise density (fraction of pixels)",
    "gaussian": "noise sigma (fraction of the intensity range)",
    "speckle": "multiplicative noise sigma",
    "blur": "Gaussian blur sigma (original pixels)",
}
_MAX_LEVEL = {"salt_pepper": 1.0}


def parse_corruptions(spec: str | Iterable[str], source: str = "eval.corrupt") -> dict[str, tuple[float, ...]]:
    """'salt_pepper:0.01,0.02;gaussian:0.05' (or a list of such strings) -> {kind: sorted unique levels}, in the
    order the kinds were first given. A ConfigError names `source` and the bad token."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    plan: dict[str, set[float]] = {}
    for part in parts:
        for token in str(part).split(";"):
            token = token.strip()
            if not token:
                continue
            kind, sep, levels = token.partition(":")
            kind = kind.strip()
            if not sep:
                raise ConfigError(f"{source}: '{token}' must look like KIND:LEVEL[,LEVEL...] (kinds: "
                                  f"{', '.join(KINDS)})")
            if kind not in KINDS:
                raise ConfigError(f"{source}: unknown corruption '{kind}' in '{token}' (choose from "
                                  f"{', '.join(KINDS)})")
            found = plan.setdefault(kind, set())
            if not levels.strip():
                raise ConfigError(f"{source}: '{token}' gives no level")
            for raw in levels.split(","):
                raw = raw.strip()
                try:
                    level = float(raw)
                except ValueError:
                    raise ConfigError(f"{source}: level '{raw}' of '{token}' is not a number") from None
                top = _MAX_LEVEL.get(kind, math.inf)
                if not (math.isfinite(level) and 0.0 <= level <= top):
                    bound = f"[0, {top:g}]" if math.isfinite(top) else ">= 0 and finite"
                    raise ConfigError(f"{source}: level '{raw}' of '{token}' must be {bound} ({KINDS[kind]})")
                found.add(level)
    return {kind: tuple(sorted(levels)) for kind, levels in plan.items()}


def level_key(level: float) -> str:
    """The level as report.json / CSV write it: '0', '0.01', '1e-05'."""
    return f"{float(level):g}"


def stream(kind: str, level: float, key: str) -> np.random.Generator:
    """The random stream of one (kind, level, sample id): independent of order, rank and workers."""
    digest = hashlib.sha256(f"{kind}|{level_key(level)}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def value_range(image: np.ndarray) -> tuple[float, float]:
    """(min, max) of the image's native range: the dtype's for integers, the image's own for floats."""
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return float(info.min), float(info.max)
    if image.size == 0:
        return 0.0, 1.0
    return float(np.min(image)), float(np.max(image))


def _back_to_dtype(values: np.ndarray, like: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = np.clip(values, lo, hi)
    if np.issubdtype(like.dtype, np.integer):
        out = np.rint(out)
    return out.astype(like.dtype)


def salt_pepper(image_CHW: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """round(density * H * W) distinct pixel positions set to the range max or min (every channel), half each on
    average."""
    lo, hi = value_range(image_CHW)
    c, h, w = image_CHW.shape
    n = h * w
    k = int(round(density * n))
    out = np.array(image_CHW, copy=True)
    if k == 0:
        return out
    where = rng.choice(n, size=k, replace=False)
    salt = rng.random(k) < 0.5
    flat = out.reshape(c, n)
    flat[:, where[salt]] = np.asarray(hi).astype(out.dtype)
    flat[:, where[~salt]] = np.asarray(lo).astype(out.dtype)
    return out


def gaussian_noise(image_CHW: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, (sigma * range)^2) per pixel and channel, clipped to the range."""
    lo, hi = value_range(image_CHW)
    noise = rng.standard_normal(image_CHW.shape) * (sigma * (hi - lo))
    return _back_to_dtype(image_CHW.astype(np.float64) + noise, image_CHW, lo, hi)


def speckle_noise(image_CHW: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise on the unit-range image: u (1 + N(0, sigma^2)), clipped to [0, 1], back to the range."""
    lo, hi = value_range(image_CHW)
    span = hi - lo if hi > lo else 1.0
    unit = (image_CHW.astype(np.float64) - lo) / span
    noisy = unit * (1.0 + sigma * rng.standard_normal(image_CHW.shape))
    return _back_to_dtype(np.clip(noisy, 0.0, 1.0) * span + lo, image_CHW, lo, hi)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius int(4 sigma + 0.5)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _convolve_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along one axis with mirrored edges (d c b a | a b c d); the taps are symmetric."""
    r = len(taps) // 2
    if r == 0:
        return x
    n = x.shape[axis]
    # np.pad's "symmetric" mirrors only once: a radius beyond the image size needs the pattern repeated
    xp = x
    while r > 0:
        step = min(r, xp.shape[axis])
        width = [(0, 0)] * x.ndim
        width[axis] = (step, step)
        xp = np.pad(xp, width, mode="symmetric")
        r -= step
    out = np.zeros_like(x, dtype=np.float64)
    for j, t in enumerate(taps):
        out += t * np.take(xp, np.arange(j, j + n), axis=axis)
    return out


def blur(image_CHW: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of every channel, sigma in pixels."""
    lo, hi = value_range(image_CHW)
    taps = gaussian_kernel(sigma)
    x = image_CHW.astype(np.float64)
    x = _convolve_axis(_convolve_axis(x, taps, 1), taps, 2)
    return _back_to_dtype(x, image_CHW, lo, hi)


@dataclass(frozen=True)
class Corruption:
    """One kind at one level; call it on a (C, H, W) image with the sample's id. Never modifies its input."""
    kind: str
    level: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"corruption: unknown kind '{self.kind}' (choose from {', '.join(KINDS)})")

    def __call__(self, image_CHW: np.ndarray, key: str) -> np.ndarray:
        image = np.asarray(image_CHW)
        if self.level == 0:
            return image
        if image.ndim != 3:
            raise ValueError(f"Corruption: expected a (C, H, W) image, got shape {image.shape}")
        if self.kind == "blur":
            return blur(image, self.level)
        rng = stream(self.kind, self.level, key)
        if self.kind == "salt_pepper":
            return salt_pepper(image, self.level, rng)
        if self.kind == "gaussian":
            return gaussian_noise(image, self.level, rng)
        return speckle_noise(image, self.level, rng)


class _CorruptedDecode:
    """The dataset's decode followed by the corruption of the image (keyed by the record's id); the mask is left
    as it is. A plain object, so DataLoader workers can pickle it."""

    def __init__(self, decode, corruption: Corruption):
        self.decode, self.corruption = decode, corruption

    def __call__(self, rec) -> tuple[np.ndarray, Any]:
        image, mask = self.decode(rec)
        return self.corruption(image, rec.id), mask


def corrupted_view(dataset, corruption: Corruption):
    """A shallow copy of an engine dataset (data_pipelines.dataset.LandmarkDataset) whose images are corrupted
    right after decoding, in their original frame: everything after the decode (pre-resize, values, warp, targets)
    is the dataset's own code. The decoded-image cache is not used (it may hold pre-resized working copies);
    original() stays the clean dataset's (the truth does not change; its image is only drawn in figures). Level 0
    goes through the same view (an identity corruption), so its figures test the view against the plain pass."""
    from data_pipelines.dataset import LandmarkDataset
    if not isinstance(dataset, LandmarkDataset):
        raise ConfigError(f"eval.corrupt: the {type(dataset).__name__} dataset does not decode images through the "
                          f"engine's LandmarkDataset, so its images cannot be corrupted")
    view = copy.copy(dataset)
    view.__dict__.pop("_dali_loaders", None)
    view._cache = None
    view.decode = _CorruptedDecode(dataset.decode, corruption)
    view.original = dataset.original
    return view


def describe_plan(plan: dict[str, Sequence[float]]) -> str:
    """'salt_pepper:0.001,0.01;blur:1' (the canonical spelling of a parsed plan)."""
    return ";".join(f"{kind}:{','.join(level_key(v) for v in levels)}" for kind, levels in plan.items())
