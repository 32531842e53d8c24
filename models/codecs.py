"""Heatmap codec: Gaussian targets (encode) and keypoint decoders (argmax, DARK, soft-argmax).

Coordinates follow data_pipelines/batch.py: (x, y) = (column, row) in pixels of the heatmap, pixel centres at
integers. Heatmaps here are at the network input resolution, so decoded points are input-frame pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.heatmap_render import render_heatmaps
from kernels.soft_argmax import soft_argmax

DECODE_METHODS = ("dark", "softargmax", "argmax")


def render_heatmaps_torch(kpts_px_BK2: torch.Tensor, visible_BK: torch.Tensor, hw: tuple[int, int], sigma: float,
                          peak: float = 255.0, truncate: float = 3.0) -> torch.Tensor:
    """Unnormalised, truncated Gaussian heatmaps (B, K, H, W) float32 on the keypoints' device — the definition of
    data_pipelines/heatmaps.py (window centred on the keypoint rounded half away from zero, r = ceil(truncate *
    sigma); invisible or non-finite keypoints give all-zero maps), so device-rendered targets equal the loader's.
    kernels/heatmap_render.py does the work: the Triton kernel for CUDA tensors, its torch reference otherwise."""
    if kpts_px_BK2.dim() != 3 or kpts_px_BK2.shape[-1] != 2:
        raise ValueError(f"models/codecs.py: kpts_px_BK2 must be (B, K, 2), got {tuple(kpts_px_BK2.shape)}")
    if tuple(visible_BK.shape) != tuple(kpts_px_BK2.shape[:2]):
        raise ValueError(f"models/codecs.py: visible_BK {tuple(visible_BK.shape)} does not match kpts "
                         f"{tuple(kpts_px_BK2.shape[:2])}")
    if not sigma > 0:
        raise ValueError(f"models/codecs.py: sigma must be > 0, got {sigma}")
    return render_heatmaps(kpts_px_BK2, visible_BK.to(kpts_px_BK2.device), (int(hw[0]), int(hw[1])), float(sigma),
                           float(peak), float(truncate))


def target_heatmaps(targets: dict, heat_BKHW: torch.Tensor, sigma_px: float | None, peak: float,
                    where: str) -> torch.Tensor:
    """The loss target for predicted heatmaps heat_BKHW: targets["heatmap_BKHW"] when the loader rendered it, else
    rendered here from targets["kpts_px_BK2"] / ["kpts_visible_BK"] on heat's device (data.targets=device: the Triton
    kernel on CUDA, its reference elsewhere; same values as the loader's numba targets). `where` names the caller in
    errors."""
    if targets.get("heatmap_BKHW") is not None:
        target = targets["heatmap_BKHW"].to(heat_BKHW.device)
    elif sigma_px is not None:
        for key in ("kpts_px_BK2", "kpts_visible_BK"):
            if targets.get(key) is None:
                raise KeyError(f"{where}: targets carry no 'heatmap_BKHW' and no '{key}' to render it from "
                               f"(got {sorted(targets)})")
        target = render_heatmaps_torch(targets["kpts_px_BK2"].to(heat_BKHW.device),
                                       targets["kpts_visible_BK"].to(heat_BKHW.device),
                                       tuple(heat_BKHW.shape[-2:]), sigma_px, peak)
    else:
        raise KeyError(f"{where}: targets carry no 'heatmap_BKHW' and the loss has no sigma_px to render it")
    if tuple(target.shape) != tuple(heat_BKHW.shape[-4:]):
        raise ValueError(f"{where}: target heatmap {tuple(target.shape)} does not match the prediction "
                         f"{tuple(heat_BKHW.shape[-4:])}")
    return target


def argmax_decode(heatmap_BKHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer peak per map: ((B, K, 2) float32 pixels, (B, K) float32 peak values). Ties -> first in raster order."""
    _check_heatmap(heatmap_BKHW)
    b, k, h, w = heatmap_BKHW.shape
    score_BK, idx_BK = heatmap_BKHW.float().reshape(b, k, h * w).max(dim=-1)
    xy_BK2 = torch.stack([idx_BK % w, torch.div(idx_BK, w, rounding_mode="floor")], dim=-1).to(torch.float32)
    return xy_BK2, score_BK


def dark_kernel_size(sigma: float) -> int:
    """Default DARK blur kernel: 11 at the published sigma 7, scaled with sigma (odd, >= 3)."""
    return max(3, 2 * int(round(5.0 * sigma / 7.0)) + 1)


def gaussian_blur(heatmap_BKHW: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, kernel sigma from the size as OpenCV does (0.3 ((k - 1) / 2 - 1) + 0.8), the rule of
    the DARK reference; replicate padding so a peak at the border is not pulled down by zeros."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"models/codecs.py: blur kernel size must be odd and >= 1, got {kernel_size}")
    b, k, h, w = heatmap_BKHW.shape
    s = 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8
    t = torch.arange(kernel_size, dtype=heatmap_BKHW.dtype, device=heatmap_BKHW.device) - (kernel_size - 1) / 2
    g = torch.exp(-t * t / (2 * s * s))
    g = g / g.sum()
    r = kernel_size // 2
    x = F.pad(heatmap_BKHW.reshape(b * k, 1, h, w), (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return x.view(b, k, h, w)


def dark_decode(heatmap_BKHW: torch.Tensor, sigma: float = 7.0, kernel_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + DARK sub-pixel refinement (Zhang et al., "Distribution-Aware Coordinate Representation for Human
    Pose Estimation", CVPR 2020): blur the map (the network's output is not a clean Gaussian), take the log (a
    Gaussian becomes a quadratic, for which one Newton step is exact), and step mu = m - H^-1 grad from the integer
    argmax m with central finite differences. The step is skipped where the local Hessian is not negative definite
    (no maximum there), handled per axis on the image border (see _newton_step), and clamped to +-1 px. DARK's
    rescale of the blurred map to the old maximum only adds a constant after the log, so it is left out.
    Returns ((B, K, 2) float32 pixels, (B, K) raw peak values)."""
    xy_BK2, score_BK = argmax_decode(heatmap_BKHW)
    b, k, h, w = heatmap_BKHW.shape
    ks = dark_kernel_size(sigma) if kernel_size is None else int(kernel_size)
    logh = torch.log(gaussian_blur(heatmap_BKHW.float(), ks).clamp_min(1e-10))
    padded = F.pad(logh.reshape(b * k, 1, h, w), (1, 1, 1, 1), mode="replicate").reshape(b, k, (h + 2) * (w + 2))
    ix, iy = xy_BK2[..., 0].long(), xy_BK2[..., 1].long()
    offs = torch.tensor([-1, 0, 1], device=heatmap_BKHW.device)
    # 3x3 neighbourhood around the argmax in the padded map: index (iy + 1 + dy) * (w + 2) + (ix + 1 + dx)
    rows = (iy[..., None, None] + 1 + offs[:, None]) * (w + 2)
    idx = (rows + ix[..., None, None] + 1 + offs[None, :]).reshape(b, k, 9)
    v = torch.gather(padded, 2, idx).reshape(b, k, 3, 3)                    # v[..., 1 + dy, 1 + dx]
    gx = 0.5 * (v[..., 1, 2] - v[..., 1, 0])
    gy = 0.5 * (v[..., 2, 1] - v[..., 0, 1])
    hxx = v[..., 1, 2] - 2 * v[..., 1, 1] + v[..., 1, 0]
    hyy = v[..., 2, 1] - 2 * v[..., 1, 1] + v[..., 0, 1]
    hxy = 0.25 * (v[..., 2, 2] - v[..., 0, 2] - v[..., 2, 0] + v[..., 0, 0])
    step_BK2 = _newton_step(gx, gy, hxx, hyy, hxy, interior_x=(ix > 0) & (ix < w - 1),
                            interior_y=(iy > 0) & (iy < h - 1))
    return xy_BK2 + step_BK2.clamp(-1.0, 1.0), score_BK


def _newton_step(gx, gy, hxx, hyy, hxy, interior_x, interior_y) -> torch.Tensor:
    """-H^-1 grad (2x2 inverse) where the argmax is interior and the Hessian negative definite. On an image border
    the central difference across it would read replicated padding, so that axis is not refined and the other one
    takes a 1-D Newton step -g / h''; at a corner nothing is refined."""
    det = hxx * hyy - hxy * hxy
    ok2 = interior_x & interior_y & (det > 1e-12) & (hxx < 0)
    safe_det = torch.where(ok2, det, torch.ones_like(det))
    step2_x = -(hyy * gx - hxy * gy) / safe_det
    step2_y = -(hxx * gy - hxy * gx) / safe_det
    ok_x = interior_x & ~interior_y & (hxx < -1e-12)
    ok_y = interior_y & ~interior_x & (hyy < -1e-12)
    step1_x = -gx / torch.where(ok_x, hxx, -torch.ones_like(hxx))
    step1_y = -gy / torch.where(ok_y, hyy, -torch.ones_like(hyy))
    zero = torch.zeros_like(gx)
    step_x = torch.where(ok2, step2_x, torch.where(ok_x, step1_x, zero))
    step_y = torch.where(ok2, step2_y, torch.where(ok_y, step1_y, zero))
    return torch.stack([step_x, step_y], dim=-1)


def softargmax_decode(heatmap_BKHW: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Soft-argmax (integral regression, Sun et al. ECCV 2018): E[(x, y)] under softmax(beta * heatmap) over the
    pixels. (B, K, 2) float32 pixels. For a Gaussian of peak P the weights are ~Gaussian with sigma / sqrt(beta P)
    around the true centre, so beta * P of ~20 gives an unbiased, still sharp estimate. Differentiable;
    kernels/soft_argmax.py does the work (one pass per map in Triton on CUDA, its torch reference otherwise)."""
    _check_heatmap(heatmap_BKHW)
    return soft_argmax(heatmap_BKHW, float(beta))


def decode_heatmaps(heatmap_BKHW: torch.Tensor, method: str = "dark", sigma: float = 7.0,
                    kernel_size: int | None = None, beta: float | None = None, peak: float = 255.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, K, 2) float32 pixels, (B, K) float32 score = peak value / `peak`, ~1 for a confident full peak)."""
    if method not in DECODE_METHODS:
        raise ValueError(f"models/codecs.py: decode method '{method}' is not one of {DECODE_METHODS}")
    with torch.no_grad():
        if method == "argmax":
            xy, score = argmax_decode(heatmap_BKHW)
        elif method == "dark":
            xy, score = dark_decode(heatmap_BKHW, sigma=sigma, kernel_size=kernel_size)
        else:
            xy = softargmax_decode(heatmap_BKHW, beta=20.0 / peak if beta is None else beta)
            score = heatmap_BKHW.float().flatten(2).max(dim=-1).values
    return xy.float(), (score / peak).float()


def decode_outputs(outputs: dict[str, torch.Tensor], method: str = "dark", sigma: float = 7.0,
                   kernel_size: int | None = None, beta: float | None = None, peak: float = 255.0
                   ) -> dict[str, torch.Tensor]:
    """Network outputs -> {"kpts_px_BK2": float32 input-frame pixels, "kpt_score_BK": float32, "mask_BHW": int64
    argmax of the logits when the model segments}. Landmarks come from "kpts_px_BK2" when the model regresses them
    (score 1), else from "heatmap_BKHW" decoded by `method`. `sigma` is the target heatmap sigma (sets DARK's default
    blur kernel); `peak` the target peak (scores are peak-relative; soft-argmax's default beta is 20 / peak)."""
    out: dict[str, torch.Tensor] = {}
    if outputs.get("kpts_px_BK2") is not None:
        kpts = outputs["kpts_px_BK2"].detach().float()
        out["kpts_px_BK2"], out["kpt_score_BK"] = kpts, torch.ones(kpts.shape[:2], device=kpts.device)
    elif outputs.get("heatmap_BKHW") is not None:
        out["kpts_px_BK2"], out["kpt_score_BK"] = decode_heatmaps(outputs["heatmap_BKHW"].detach(), method, sigma,
                                                                  kernel_size, beta, peak)
    else:
        raise KeyError(f"models/codecs.py: decode_outputs needs 'heatmap_BKHW' or 'kpts_px_BK2' in the outputs "
                       f"(got {sorted(outputs)})")
    if outputs.get("seg_logits_BCHW") is not None:
        out["mask_BHW"] = outputs["seg_logits_BCHW"].argmax(dim=1).to(torch.int64)
    return out


def _check_heatmap(heatmap_BKHW: torch.Tensor) -> None:
    if heatmap_BKHW.dim() != 4 or heatmap_BKHW.shape[-1] < 1 or heatmap_BKHW.shape[-2] < 1:
        raise ValueError(f"models/codecs.py: heatmap must be (B, K, H, W), got {tuple(heatmap_BKHW.shape)}")
