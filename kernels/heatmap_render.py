"""Gaussian landmark heatmap targets rendered on the GPU: a write-only Triton kernel beside its pure-torch reference.

The definition is data_pipelines/heatmaps.py's (numpy reference + numba), batched. For keypoint (b, k) at the exact
sub-pixel position (kx, ky), visible and finite, the value at pixel (x, y) (pixel centres at integer coordinates) is

    peak * exp(-((x - kx)^2 + (y - ky)^2) / (2 sigma^2))   if |x - round(kx)| <= r and |y - round(ky)| <= r,
    0                                                       otherwise,

with r = ceil(truncate * sigma) (sigma: one python float, or a (B, K) tensor giving each keypoint its own sigma and
so its own r). round() is half AWAY from zero, sign(v) * floor(|v| + 0.5), as in numpy/numba (not torch.round,
which rounds half to even). The window is centred on the rounded keypoint, the Gaussian on the exact one. Invisible
or non-finite keypoints give all-zero maps; a keypoint outside the image still lights the part of its window inside.

The Gaussian is separable, exp(-(dx^2 + dy^2) / 2s^2) = exp(-dx^2 / 2s^2) exp(-dy^2 / 2s^2), so a tile of
BLOCK_H x BLOCK_W pixels costs BLOCK_H + BLOCK_W exp()s and one outer product; the window test is applied to the two
1-D factors (zero outside), so the product is zero outside the window without a 2-D mask.

Bytes moved (render_heatmaps_bytes): the op is write-only. It writes B*K*H*W*itemsize(out_dtype) bytes and reads the
keypoints (B*K*2 float32) and visibility (B*K bool) once: every program of map (b, k) re-reads those 9 bytes (from
cache) and derives the window itself, so a scalar sigma needs a single launch and no torch pre-pass.

The targets carry no gradient: both paths run under torch.no_grad() and return tensors with requires_grad=False.
Outputs are float32 by default; out_dtype=bfloat16/float16 stores the fp32 values rounded once (fp16 overflows to
inf above 65504, so keep peak below that).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._dispatch import HAVE_TRITON, choose_impl, next_pow2, tl, triton

OP = "heatmap_render"
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Window radius cap: keeps |x - round(kx)| and the window bounds exactly representable in int32 / fp32 in the kernel.
MAX_RADIUS = 1 << 22


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_inputs(kpts_px_BK2, visible_BK, hw, sigma, peak, truncate) -> tuple[int, int]:
    """ValueErrors naming the offending argument; returns (H, W) as ints."""
    if not isinstance(kpts_px_BK2, torch.Tensor) or kpts_px_BK2.dim() != 3 or kpts_px_BK2.shape[-1] != 2:
        got = tuple(kpts_px_BK2.shape) if isinstance(kpts_px_BK2, torch.Tensor) else type(kpts_px_BK2).__name__
        raise ValueError(f"kernels/{OP}: kpts_px_BK2 must be a (B, K, 2) tensor, got {got}")
    if not kpts_px_BK2.is_floating_point():
        raise ValueError(f"kernels/{OP}: kpts_px_BK2 must be floating point, got {kpts_px_BK2.dtype}")
    bk = tuple(kpts_px_BK2.shape[:2])
    if not isinstance(visible_BK, torch.Tensor) or tuple(visible_BK.shape) != bk:
        got = tuple(visible_BK.shape) if isinstance(visible_BK, torch.Tensor) else type(visible_BK).__name__
        raise ValueError(f"kernels/{OP}: visible_BK must be a tensor of shape (B, K) = {bk}, got {got}")
    if (not isinstance(hw, (tuple, list, torch.Size)) or len(hw) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in hw)):
        raise ValueError(f"kernels/{OP}: hw must be (H, W), two positive ints, got {hw!r}")
    if not (_is_number(peak) and math.isfinite(peak)):
        raise ValueError(f"kernels/{OP}: peak must be a finite number, got {peak!r}")
    if not (_is_number(truncate) and math.isfinite(truncate) and truncate >= 0):
        raise ValueError(f"kernels/{OP}: truncate must be a finite number >= 0, got {truncate!r}")
    if isinstance(sigma, torch.Tensor):
        if tuple(sigma.shape) != bk or not sigma.is_floating_point():
            raise ValueError(f"kernels/{OP}: sigma as a tensor must be floating point of shape (B, K) = {bk}, "
                             f"got {sigma.dtype} {tuple(sigma.shape)}")
        s64 = sigma.detach().to(torch.float64)
        # one host sync for the whole check (sigma is tiny)
        if s64.numel() and not bool(((s64 > 0) & (s64 * truncate <= MAX_RADIUS)).all()):
            raise ValueError(f"kernels/{OP}: sigma must be > 0, finite and truncate * sigma <= {MAX_RADIUS} for "
                             f"every keypoint, got min {s64.min().item()} max {s64.max().item()}")
    elif not (_is_number(sigma) and sigma > 0 and float(sigma) * truncate <= MAX_RADIUS):
        raise ValueError(f"kernels/{OP}: sigma must be a number > 0 (finite, truncate * sigma <= {MAX_RADIUS}) "
                         f"or a (B, K) tensor, got {sigma!r}")
    return int(hw[0]), int(hw[1])


def _sigma_BK(sigma, shape_BK, device) -> torch.Tensor:
    """float64 (B, K) per-keypoint sigma on `device`."""
    if isinstance(sigma, torch.Tensor):
        return sigma.detach().to(device=device, dtype=torch.float64)
    return torch.full(shape_BK, float(sigma), dtype=torch.float64, device=device)


def _window_params(kpts_px_BK2, visible_BK, hw, sigma_BK, truncate):
    """Shared window logic of both paths, float64: (k_BK2, c_BK2, r_BK).

    c = sign(k) * floor(|k| + 0.5) (half away from zero, the numpy/numba rule), r = ceil(truncate * sigma). A map that
    must stay all zero (invisible, non-finite, or a window that misses the image) gets r = -1 and k = c = 0, so no NaN
    or huge coordinate reaches the maths and every kept c lies within r + max(H, W) of the image (fits int32).
    """
    h, w = hw
    dev = kpts_px_BK2.device
    k_BK2 = kpts_px_BK2.detach().to(torch.float64)
    keep_BK = visible_BK.to(device=dev, dtype=torch.bool) & torch.isfinite(k_BK2).all(dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    k_BK2 = torch.where(keep_BK[..., None], k_BK2, zero)
    c_BK2 = torch.floor(k_BK2.abs() + 0.5) * torch.where(k_BK2 >= 0, 1.0, -1.0).to(torch.float64)
    r_BK = torch.ceil(sigma_BK * float(truncate))
    cx, cy = c_BK2[..., 0], c_BK2[..., 1]
    keep_BK = keep_BK & (cx - r_BK <= w - 1) & (cx + r_BK >= 0) & (cy - r_BK <= h - 1) & (cy + r_BK >= 0)
    r_BK = torch.where(keep_BK, r_BK, torch.full((), -1.0, dtype=torch.float64, device=dev))
    k_BK2 = torch.where(keep_BK[..., None], k_BK2, zero)
    c_BK2 = torch.where(keep_BK[..., None], c_BK2, zero)
    return k_BK2, c_BK2, r_BK


@torch.no_grad()
def render_heatmaps_ref(kpts_px_BK2: torch.Tensor, visible_BK: torch.Tensor, hw: tuple[int, int], sigma,
                        peak: float = 255.0, truncate: float = 3.0) -> torch.Tensor:
    """float32 (B, K, H, W) targets per the module definition, on the keypoints' device (the specification).

    Evaluated in float64 in the order of data_pipelines/heatmaps.py (peak * gy[:, None] * gx[None, :]), batched over
    keypoints, then cast to float32. No gradient flows to the keypoints (targets).
    """
    h, w = _check_inputs(kpts_px_BK2, visible_BK, hw, sigma, peak, truncate)
    dev = kpts_px_BK2.device
    sigma_BK = _sigma_BK(sigma, tuple(kpts_px_BK2.shape[:2]), dev)
    k_BK2, c_BK2, r_BK = _window_params(kpts_px_BK2, visible_BK, (h, w), sigma_BK, truncate)
    two_s2_BK1 = (2.0 * sigma_BK * sigma_BK)[..., None]
    r_BK1 = r_BK[..., None]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    xs = torch.arange(w, dtype=torch.float64, device=dev)
    ys = torch.arange(h, dtype=torch.float64, device=dev)
    in_x_BKW = (xs - c_BK2[..., 0, None]).abs() <= r_BK1
    in_y_BKH = (ys - c_BK2[..., 1, None]).abs() <= r_BK1
    gx_BKW = torch.where(in_x_BKW, torch.exp(-((xs - k_BK2[..., 0, None]) ** 2) / two_s2_BK1), zero)
    gy_BKH = torch.where(in_y_BKH, peak * torch.exp(-((ys - k_BK2[..., 1, None]) ** 2) / two_s2_BK1), zero)
    return (gy_BKH[..., :, None] * gx_BKW[..., None, :]).to(torch.float32)


if HAVE_TRITON:
    @triton.jit
    def _heatmap_render_fwd_kernel(out_ptr, kpts_ptr, vis_ptr, r_ptr, sig_ptr, r_all, a_all, peak, H, W,
                                   PER_KPT_SIGMA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                                   ROUND_BF16: tl.constexpr):
        # Program (bk, i, j) writes the BLOCK_H x BLOCK_W tile (i, j) of map bk, zeros included (write-only).
        # Per keypoint (scalar fp64 maths, a few ops per program): c = sign(k) floor(|k| + 0.5) (half away from
        # zero, in float64 like numpy), r = ceil(truncate sigma) (precomputed), a = 1 / (sqrt(2) sigma).
        # The map is all zero (r := -1) unless visible and the window [c - r, c + r]^2 meets the image; NaN / inf
        # coordinates fail those comparisons, so they need no separate test.
        # dx = x - kx = (x - cx) - fx with fx = kx - cx in [-0.5, 0.5]: an exact integer minus a small fraction, so
        # fp32 keeps dx to ~1e-7 px even at x ~ 500 (x - kx directly in fp32 would lose ~3e-5 px there).
        # gx(x) = [|x - cx| <= r] exp(-(dx a)^2),  gy(y) = [|y - cy| <= r] peak exp(-(dy a)^2),  out = gy gx^T:
        # BLOCK_H + BLOCK_W exps per tile, and zero outside the window without a 2-D mask.
        bk = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_w = tl.program_id(2)
        # r is carried as an fp32 holding an integer (exact below 2^24): a python int arg equal to 1 would be
        # specialised into a constexpr; comparisons with the int32 offsets below promote those exactly to fp32.
        if PER_KPT_SIGMA:
            r = tl.load(r_ptr + bk).to(tl.float32)
            a = (0.7071067811865476 / tl.load(sig_ptr + bk)).to(tl.float32)
        else:
            r = r_all
            a = a_all
        kx = tl.load(kpts_ptr + bk * 2).to(tl.float64)
        ky = tl.load(kpts_ptr + bk * 2 + 1).to(tl.float64)
        cxf = tl.floor(tl.abs(kx) + 0.5)
        cyf = tl.floor(tl.abs(ky) + 0.5)
        cxf = tl.where(kx >= 0, cxf, -cxf)
        cyf = tl.where(ky >= 0, cyf, -cyf)
        keep = ((tl.load(vis_ptr + bk) != 0) & (cxf - r <= W - 1) & (cxf + r >= 0)
                & (cyf - r <= H - 1) & (cyf + r >= 0))
        cx = tl.where(keep, cxf, 0.0).to(tl.int32)
        cy = tl.where(keep, cyf, 0.0).to(tl.int32)
        # select before subtracting: inf - inf would raise a NaN warning in the interpreter
        fx = (tl.where(keep, kx, 0.0) - tl.where(keep, cxf, 0.0)).to(tl.float32)
        fy = (tl.where(keep, ky, 0.0) - tl.where(keep, cyf, 0.0)).to(tl.float32)
        r = tl.where(keep, r, -1.0)
        rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        ix = cols - cx
        iy = rows - cy
        tx = (ix.to(tl.float32) - fx) * a
        ty = (iy.to(tl.float32) - fy) * a
        gx = tl.where((ix >= -r) & (ix <= r), tl.exp(-tx * tx), 0.0)
        gy = tl.where((iy >= -r) & (iy <= r), peak * tl.exp(-ty * ty), 0.0)
        val = gy[:, None] * gx[None, :]
        if ROUND_BF16:
            # Round to nearest even on the fp32 bits, so the bf16 cast below is exact: the GPU would round anyway,
            # but the interpreter truncates fp32 -> bf16; this keeps both bitwise equal (values are never NaN).
            bits = val.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            val = bits.to(tl.float32, bitcast=True)
        # int64 map base: B*K*H*W may pass 2^31 elements
        offs = bk.to(tl.int64) * H * W + rows[:, None] * W + cols[None, :]
        mask = (rows < H)[:, None] & (cols < W)[None, :]
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def _block_sizes(h: int, w: int, block_h: int | None, block_w: int | None) -> tuple[int, int]:
    """Tiles of up to 32 x 128 (4096 elements: 16 KiB of fp32 stores per program, 1-D exps amortised)."""
    bw = block_w or min(next_pow2(w), 128)
    bh = block_h or min(next_pow2(h), max(1, 4096 // bw))
    for name, v in (("block_h", bh), ("block_w", bw)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"kernels/{OP}: {name} must be a power of two, got {v}")
    return bh, bw


def _launch_fwd(kpts_px_BK2, visible_BK, hw, sigma, peak, truncate, out_dtype,
                block_h: int | None = None, block_w: int | None = None) -> torch.Tensor:
    """One launch on a 3-D grid; the kernel reads the raw keypoints and visibility (no torch pre-pass for a scalar
    sigma; a sigma tensor costs three tiny ops for r = ceil(truncate * sigma) in float64)."""
    h, w = hw
    b, k = kpts_px_BK2.shape[:2]
    dev = kpts_px_BK2.device
    out = torch.empty((b, k, h, w), dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    kpts = kpts_px_BK2.detach()
    if kpts.dtype not in (torch.float32, torch.float64):
        kpts = kpts.float()                       # fp16/bf16 widen exactly; the kernel reads fp32 or fp64
    kpts = kpts.contiguous()
    vis = visible_BK.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
    bh, bw = _block_sizes(h, w, block_h, block_w)
    if isinstance(sigma, torch.Tensor):
        sig_BK = sigma.detach().to(device=dev, dtype=torch.float64).contiguous()
        r_BK = torch.ceil(sig_BK * float(truncate)).to(torch.int32)
        scalars = dict(r_ptr=r_BK, sig_ptr=sig_BK, r_all=0.0, a_all=1.0, PER_KPT_SIGMA=True)
    else:  # python float64 maths on the host, exactly numpy's r
        scalars = dict(r_ptr=vis, sig_ptr=vis, r_all=float(math.ceil(truncate * sigma)),
                       a_all=1.0 / (math.sqrt(2.0) * float(sigma)), PER_KPT_SIGMA=False)
    grid = (b * k, triton.cdiv(h, bh), triton.cdiv(w, bw))
    _heatmap_render_fwd_kernel[grid](out, kpts, vis, peak=float(peak), H=h, W=w, BLOCK_H=bh, BLOCK_W=bw,
                                     ROUND_BF16=out_dtype == torch.bfloat16, num_warps=4, **scalars)
    return out


@torch.no_grad()
def render_heatmaps(kpts_px_BK2: torch.Tensor, visible_BK: torch.Tensor, hw: tuple[int, int], sigma,
                    peak: float = 255.0, truncate: float = 3.0, impl: str = "auto",
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, K, H, W) Gaussian heatmap targets in `out_dtype` (float32 | bfloat16 | float16), no grad.

    impl: "auto" (Triton when it imports and kpts_px_BK2 is a CUDA tensor; visible_BK / a sigma tensor are moved to
    the keypoints' device, as the output lives there), "triton" or "ref"; MEDPOSE_KERNELS overrides "auto".
    """
    h, w = _check_inputs(kpts_px_BK2, visible_BK, hw, sigma, peak, truncate)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"kernels/{OP}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if choose_impl(OP, impl, kpts_px_BK2) == "triton":
        return _launch_fwd(kpts_px_BK2, visible_BK, (h, w), sigma, peak, truncate, out_dtype)
    return render_heatmaps_ref(kpts_px_BK2, visible_BK, (h, w), sigma, peak, truncate).to(out_dtype)


def render_heatmaps_bytes(B: int, K: int, H: int, W: int, dtype: torch.dtype = torch.float32) -> dict:
    """Minimal bytes moved: maps written once in `dtype`, keypoints (float32 x2) and visibility (bool) read once.

    There is no backward (targets), so "fwd_bwd" equals "fwd".
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    fwd = B * K * H * W * itemsize + B * K * (2 * 4 + 1)
    return {"fwd": fwd, "fwd_bwd": fwd}
