"""Keypoint-consistent augmentation: one 3x3 affine matrix per sample moves image, mask and landmarks together.

Convention (data_pipelines/batch.py): (x, y) pixels, pixel centres at integer coordinates. A matrix M maps source
pixels to destination pixels, [x', y', 1]^T = M [x, y, 1]^T. Warping samples the source at M^-1 (x', y') for every
destination pixel centre; torch's grid_sample with align_corners=True puts normalised -1/+1 exactly on the first/last
pixel centre, i.e. x_norm = 2 x / (W - 1) - 1, which is this convention with no half-pixel shift - so a landmark and
the pixel it marks move identically. This module is the reference the DALI path (fn.warp_affine +
fn.coord_transform) is held to.

Intensity augmentation works on float images in [0, 1]; every random draw comes from a numpy Generator passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


# ----------------------------------------------------------------------------------------------------------------
# Matrices
# ----------------------------------------------------------------------------------------------------------------

def translation_matrix(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def letterbox_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Resize keeping the aspect ratio, centred, padded: x' = (x + 0.5) s - 0.5 + pad_x, y' likewise with pad_y.

    s = min(H'/H, W'/W); pad_x = (W' - W s) / 2, pad_y = (H' - H s) / 2. Each offset goes to its own axis (the
    published code also added the vertical offset to x - not reproduced).
    """
    (h, w), (dh, dw) = src_hw, dst_hw
    s = min(dh / h, dw / w)
    pad_x, pad_y = (dw - w * s) / 2.0, (dh - h * s) / 2.0
    return np.array([[s, 0.0, 0.5 * s - 0.5 + pad_x],
                     [0.0, s, 0.5 * s - 0.5 + pad_y],
                     [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class AffineDraw:
    """One sample's augmentation parameters: the matrix is a pure function of these (affine_from_draw), so the
    torch path and the DALI path (data_pipelines/dali/affine.py, fn.transforms.*) build the same matrix."""
    flipped: bool
    angle_deg: float
    scale: float
    shear_deg: float
    tx: float
    ty: float


def draw_affine(rng: np.random.Generator, hw: tuple[int, int], rotation_deg: float = 10.0,
                scale_range: tuple[float, float] = (0.9, 1.1), translate_frac: float = 0.05,
                shear_deg: float = 0.0, flip_p: float = 0.0) -> AffineDraw:
    """The random draws of random_affine_matrix, in its fixed order (flip, angle, scale, shear, tx, ty)."""
    h, w = hw
    flipped = bool(rng.random() < flip_p)
    angle = rng.uniform(-rotation_deg, rotation_deg)
    scale = rng.uniform(scale_range[0], scale_range[1])
    shear = rng.uniform(-shear_deg, shear_deg)
    tx, ty = rng.uniform(-1.0, 1.0, size=2) * translate_frac * np.array([w, h])
    return AffineDraw(flipped, float(angle), float(scale), float(shear), float(tx), float(ty))


def affine_from_draw(hw: tuple[int, int], d: AffineDraw) -> np.ndarray:
    """M = T(c + t) R(theta) Sh(phi) S(s) Flip T(-c) about the frame centre c = ((W-1)/2, (H-1)/2)."""
    h, w = hw
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    theta, shear = math.radians(d.angle_deg), math.radians(d.shear_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    shr = np.array([[1.0, math.tan(shear), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    scl = np.diag([d.scale, d.scale, 1.0])
    flp = np.diag([-1.0 if d.flipped else 1.0, 1.0, 1.0])
    return translation_matrix(cx + d.tx, cy + d.ty) @ rot @ shr @ scl @ flp @ translation_matrix(-cx, -cy)


def random_affine_matrix(rng: np.random.Generator, hw: tuple[int, int], rotation_deg: float = 10.0,
                         scale_range: tuple[float, float] = (0.9, 1.1), translate_frac: float = 0.05,
                         shear_deg: float = 0.0, flip_p: float = 0.0) -> tuple[np.ndarray, bool]:
    """A random similarity (+ optional shear, horizontal flip) about the centre of an (H, W) frame.

    M = T(c + t) R(theta) Sh(phi) S(s) Flip T(-c), c = ((W-1)/2, (H-1)/2), theta ~ U(-rot, rot), s ~ U(scale_range),
    phi ~ U(-shear, shear) (x-shear), t = (U(-1,1) translate_frac W, U(-1,1) translate_frac H), flip with prob
    flip_p. The draws are made in a fixed order (flip, angle, scale, shear, tx, ty) so one seed gives one matrix.
    Returns (M, flipped).
    """
    d = draw_affine(rng, hw, rotation_deg, scale_range, translate_frac, shear_deg, flip_p)
    return affine_from_draw(hw, d), d.flipped


def _normaliser(hw: tuple[int, int]) -> np.ndarray:
    """Pixel -> normalised coordinates of affine_grid/grid_sample with align_corners=True: centre 0 -> -1, centre
    W-1 -> +1. A 1-pixel axis has its single centre at 0 in both functions, so it maps 0 -> 0 (kept invertible)."""
    h, w = hw
    sx, ox = (2.0 / (w - 1), -1.0) if w > 1 else (1.0, 0.0)
    sy, oy = (2.0 / (h - 1), -1.0) if h > 1 else (1.0, 0.0)
    return np.array([[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]])


def sampling_grid(m: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """(1, H', W', 2) float32 grid for grid_sample(align_corners=True): for each destination pixel centre (x', y'),
    the normalised source position N_src M^-1 (x', y', 1). Compute once per sample, reuse for image and mask."""
    a = _normaliser(src_hw) @ np.linalg.inv(np.asarray(m, dtype=np.float64))      # float64: no error added here
    ys = torch.arange(out_hw[0], dtype=torch.float64)[:, None]
    xs = torch.arange(out_hw[1], dtype=torch.float64)[None, :]
    gx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    gy = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    return torch.stack([gx, gy], dim=-1)[None].to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Warps
# ----------------------------------------------------------------------------------------------------------------

def warp_image(img_CHW: np.ndarray | torch.Tensor, m: np.ndarray, out_hw: tuple[int, int],
               pad_value: float = 0.5, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear warp of a float (C, H, W) image by M (source -> destination pixels); outside the source = pad_value.

    Sampling (img - pad) with zero padding and adding pad back is exactly a constant-pad bilinear warp, so pixels
    near the border blend towards the pad value as they should.
    """
    src = torch.as_tensor(img_CHW, dtype=torch.float32)
    if grid is None:
        grid = sampling_grid(m, tuple(src.shape[-2:]), out_hw)
    out = F.grid_sample((src - pad_value)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0] + pad_value


def warp_mask(mask_HW: np.ndarray | torch.Tensor, m: np.ndarray, out_hw: tuple[int, int],
              grid: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-neighbour warp of an integer class mask; outside the source = 0 (background). Returns int64 (H', W')."""
    src = torch.as_tensor(np.asarray(mask_HW), dtype=torch.float32)
    if grid is None:
        grid = sampling_grid(m, tuple(src.shape[-2:]), out_hw)
    out = F.grid_sample(src[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0].to(torch.int64)      # nearest returns the source's exact (integer-valued) class ids


def warp_points(pts_K2: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply M to (K, 2) points (homogeneous); float64 out."""
    pts = np.asarray(pts_K2, dtype=np.float64).reshape(-1, 2)
    homog = np.concatenate([pts, np.ones((pts.shape[0], 1))], axis=1)
    out = homog @ np.asarray(m, dtype=np.float64).T
    return out[:, :2] / out[:, 2:3]


def points_in_frame(pts_K2: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bool (K,): inside the image extent [-0.5, W-0.5] x [-0.5, H-0.5]."""
    h, w = hw
    x, y = pts_K2[:, 0], pts_K2[:, 1]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def apply_flip_pairs(pts_K2: np.ndarray, visible_K: np.ndarray,
                     flip_pairs: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """After a mirror, a left landmark sits where the right one was: swap each (a, b) pair's rows."""
    pts, vis = np.array(pts_K2, copy=True), np.array(visible_K, copy=True)
    for a, b in flip_pairs:
        pts[[a, b]] = pts[[b, a]]
        vis[[a, b]] = vis[[b, a]]
    return pts, vis


# ----------------------------------------------------------------------------------------------------------------
# Intensity augmentation (float images in [0, 1]; the caller draws the parameters)
# ----------------------------------------------------------------------------------------------------------------

def adjust_brightness_contrast(img: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """out = clip(contrast (img - 0.5) + 0.5 + brightness, 0, 1)."""
    return np.clip(contrast * (img - 0.5) + 0.5 + brightness, 0.0, 1.0)


def adjust_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """out = img ** gamma (gamma > 1 darkens mid-tones; 0 and 1 stay fixed)."""
    return np.power(np.clip(img, 0.0, 1.0), gamma)


def add_speckle_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Multiplicative speckle, the noise model of ultrasound: out = clip(img (1 + sigma n), 0, 1), n ~ N(0, 1)."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img * (1.0 + np.float32(sigma) * noise), 0.0, 1.0).astype(img.dtype, copy=False)


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (kernel radius ceil(3 sigma), edges replicated)."""
    if sigma_px <= 0:
        return img
    sigmas = (0.0,) * (img.ndim - 2) + (sigma_px, sigma_px)
    return gaussian_filter(img, sigmas, mode="nearest", truncate=3.0)


@dataclass
class AugmentParams:
    """Augmentation settings; defaults are modest, for ultrasound (the probe's orientation is standardised)."""
    enabled: bool = True
    rotation_deg: float = 10.0                       # U(-r, r)
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_frac: float = 0.05                     # of the input width / height
    shear_deg: float = 0.0
    flip_p: float = 0.0                              # off: a mirrored hip is another anatomy view
    flip_pairs: tuple[tuple[int, int], ...] = ()     # landmark index swaps on a flip (none for the hip task)
    brightness: float = 0.08                         # additive, U(-b, b)
    contrast_range: tuple[float, float] = (0.85, 1.15)
    gamma_range: tuple[float, float] = (0.85, 1.2)   # log-uniform
    speckle_sigma_max: float = 0.08                  # multiplicative noise sigma ~ U(0, max)
    blur_p: float = 0.25
    blur_sigma_range: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self):
        for name in ("scale_range", "contrast_range", "gamma_range", "blur_sigma_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentParams.{name}: need 0 < low <= high, got {(lo, hi)}")
        for name in ("flip_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentParams.{name}: must lie in [0, 1]")
        if self.rotation_deg < 0 or self.translate_frac < 0 or self.shear_deg < 0 or self.brightness < 0:
            raise ValueError("AugmentParams: rotation_deg, translate_frac, shear_deg, brightness must be >= 0")
        self.flip_pairs = tuple((int(a), int(b)) for a, b in self.flip_pairs)


@dataclass(frozen=True)
class IntensityDraw:
    """One sample's intensity augmentation: the values augment_intensity draws, in its order. The DALI path applies
    the same draw on the device (data_pipelines/dali/pipeline.py); only the speckle noise field itself differs (DALI's
    generator draws it)."""
    brightness: float
    contrast: float
    gamma: float
    speckle: float
    blur_sigma: float          # 0: no blur

    def vector(self) -> np.ndarray:
        return np.array([self.brightness, self.contrast, self.gamma, self.speckle, self.blur_sigma], np.float32)


IDENTITY_INTENSITY = IntensityDraw(0.0, 1.0, 1.0, 0.0, 0.0)


def draw_intensity(rng: np.random.Generator, p: AugmentParams) -> IntensityDraw:
    """Brightness, contrast, gamma (log-uniform), speckle sigma, then blur with probability blur_p; fixed order."""
    brightness = rng.uniform(-p.brightness, p.brightness)
    contrast = rng.uniform(*p.contrast_range)
    gamma = math.exp(rng.uniform(math.log(p.gamma_range[0]), math.log(p.gamma_range[1])))
    speckle = rng.uniform(0.0, p.speckle_sigma_max)
    blur = rng.uniform(*p.blur_sigma_range) if rng.random() < p.blur_p else 0.0
    return IntensityDraw(brightness, contrast, gamma, speckle, blur)   # numpy scalars kept: same dtypes as before


def apply_intensity(img: np.ndarray, rng: np.random.Generator, d: IntensityDraw) -> np.ndarray:
    """Brightness/contrast, gamma, speckle (its noise field drawn from rng), then blur."""
    out = adjust_gamma(adjust_brightness_contrast(img, d.brightness, d.contrast), d.gamma)
    if d.speckle > 0:
        out = add_speckle_noise(out, rng, d.speckle)
    return gaussian_blur(out, d.blur_sigma) if d.blur_sigma > 0 else out


def augment_intensity(img: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
    """Brightness/contrast, gamma, speckle, then blur with probability blur_p; fixed draw order."""
    return apply_intensity(img, rng, draw_intensity(rng, p))
