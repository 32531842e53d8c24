"""Soft-argmax (integral regression, Sun et al. ECCV 2018) with an optional spread estimate.

Maths, per map (b, k) of H*W pixels, pixel centres at integers, u = column index, v = row index:
    p_i   = softmax(beta * h)_i = exp(beta h_i - m) / Z,   m = max_i beta h_i,   Z = sum_i exp(beta h_i - m)
    x     = sum_i p_i u_i,            y     = sum_i p_i v_i                         -> xy  (B, K, 2) float32 pixels
    var_x = sum_i p_i (u_i - x)^2 = sum_i p_i u_i^2 - x^2   (var_y likewise)     -> var (B, K, 2) float32 px^2
Gradient (beta is a python float, not differentiated): with d p_i / d h_j = beta p_i (delta_ij - p_j),
    dx/dh_j     = beta p_j (u_j - x)
    dvar_x/dh_j = beta p_j (u_j^2 - sum p u^2) - 2 x beta p_j (u_j - x) = beta p_j ((u_j - x)^2 - var_x)
so  dh_j = beta p_j [gx (u_j - x) + gy (v_j - y) + gvx ((u_j - x)^2 - var_x) + gvy ((v_j - y)^2 - var_y)].

Bytes a kernel must move (soft_argmax_bytes): forward reads h once and writes the coordinates (and variances);
backward reads h again and the output gradients and writes dh (p is recomputed from the saved m and Z).

Triton forward: one program per (map, chunk) makes ONE pass over its chunk in blocks, keeping an online softmax
state (running max m, Z = sum e, weighted means and, for the variance, centred second moments M2 = sum e (u - mean)^2
merged block by block with Chan's parallel formula, so var never comes from the cancelling sum p u^2 - x^2). A map
split into several chunks (to fill the GPU when B*K is small) writes one partial state per chunk, merged by a tiny
second kernel. The backward is embarrassingly parallel once m, Z, x, y, var are known: (map, chunk) programs again.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from kernels._dispatch import HAVE_TRITON, choose_impl, next_pow2, tl, triton

_MAX_BLOCK = 4096            # pixels per block step (8 warps): the H200 sweep (benchmarks/results) favoured 4096
_FWD_PROGRAMS_PER_SM = 24    # auto split aims at this many forward programs per SM (H200 sweep: 24 beat 4)
_BWD_PROGRAMS_PER_SM = 8     # the backward has no reductions: more, shorter programs
_MIN_BLOCKS_PER_CHUNK = 4    # a forward chunk shorter than this is not worth a partial state + merge
_N_STATE = 6                 # partial state per (map, chunk): m, Z, mean_u, mean_v, M2_u, M2_v


def _check_heatmap(heatmap_BKHW: torch.Tensor) -> None:
    if heatmap_BKHW.dim() != 4 or heatmap_BKHW.shape[-1] < 1 or heatmap_BKHW.shape[-2] < 1:
        raise ValueError(f"kernels/soft_argmax: heatmap must be (B, K, H, W), got {tuple(heatmap_BKHW.shape)}")


def soft_argmax_ref(heatmap_BKHW: torch.Tensor, beta: float = 1.0, return_var: bool = False):
    """Pure-torch specification: xy_BK2 or (xy_BK2, var_BK2). float32 outputs computed in float32 (float64 in and
    out for a float64 input, for gradcheck). The xy arithmetic mirrors models.codecs.softargmax_decode op by op."""
    _check_heatmap(heatmap_BKHW)
    dtype = torch.float64 if heatmap_BKHW.dtype == torch.float64 else torch.float32
    b, k, h, w = heatmap_BKHW.shape
    prob_BKHW = torch.softmax(beta * heatmap_BKHW.to(dtype).reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)
    xs_W = torch.arange(w, dtype=dtype, device=heatmap_BKHW.device)
    ys_H = torch.arange(h, dtype=dtype, device=heatmap_BKHW.device)
    px_BKW, py_BKH = prob_BKHW.sum(dim=2), prob_BKHW.sum(dim=3)        # marginals over rows / columns
    x_BK = (px_BKW * xs_W).sum(dim=-1)
    y_BK = (py_BKH * ys_H).sum(dim=-1)
    xy_BK2 = torch.stack([x_BK, y_BK], dim=-1)
    if not return_var:
        return xy_BK2
    # centred form: exact in real arithmetic like sum p u^2 - x^2, but no cancellation for a peak far from 0
    var_x_BK = (px_BKW * (xs_W - x_BK[..., None]) ** 2).sum(dim=-1)
    var_y_BK = (py_BKH * (ys_H - y_BK[..., None]) ** 2).sum(dim=-1)
    return xy_BK2, torch.stack([var_x_BK, var_y_BK], dim=-1)


def soft_argmax_bytes(B: int, K: int, H: int, W: int, dtype: torch.dtype = torch.float32,
                      return_var: bool = False) -> dict:
    """Minimal bytes moved: {"fwd": read h + write outputs, "fwd_bwd": fwd + read h + read grad-out + write dh}."""
    maps = B * K * H * W * torch.empty((), dtype=dtype).element_size()
    outs = B * K * 2 * 4 * (2 if return_var else 1)                   # float32 xy (and var)
    fwd = maps + outs
    return {"fwd": fwd, "fwd_bwd": fwd + maps + outs + maps}


if HAVE_TRITON:
    @triton.jit
    def _pixel_uv(first, u0, v0, W):
        # float (column, row) of pixels first + lanes, from u0 = lanes % W and v0 = lanes // W hoisted out of the
        # loop: r + u0 < 2W, so one carry suffices. Saves a per-pixel integer div and mod (~40 instructions) that
        # would otherwise outweigh the rest of the arithmetic; floats hold these integers exactly below 2^24.
        u = (first % W).to(tl.float32) + u0
        wrap = u >= W
        u = tl.where(wrap, u - W, u)
        v = (first // W).to(tl.float32) + v0 + wrap.to(tl.float32)
        return u, v

    @triton.jit
    def _soft_argmax_store_state(bk, s, SPLIT, xy_ptr, var_ptr, mz_ptr, part_ptr, m, z, mu_u, mu_v, m2_u, m2_v,
                                 HAS_VAR: tl.constexpr, FINAL: tl.constexpr):
        if FINAL:                                      # a single chunk: this state is the map's state
            tl.store(xy_ptr + bk * 2, mu_u)
            tl.store(xy_ptr + bk * 2 + 1, mu_v)
            if HAS_VAR:
                tl.store(var_ptr + bk * 2, m2_u / z)
                tl.store(var_ptr + bk * 2 + 1, m2_v / z)
            tl.store(mz_ptr + bk * 2, m)
            tl.store(mz_ptr + bk * 2 + 1, z)
        else:                                          # one partial state per chunk, merged by the next kernel
            row = part_ptr + (bk * SPLIT + s) * 6
            tl.store(row, m)
            tl.store(row + 1, z)
            tl.store(row + 2, mu_u)
            tl.store(row + 3, mu_v)
            tl.store(row + 4, m2_u)
            tl.store(row + 5, m2_v)

    @triton.jit
    def _soft_argmax_fwd_kernel(h_ptr, xy_ptr, var_ptr, mz_ptr, part_ptr, N, W, CHUNK, SPLIT, beta,
                                HAS_VAR: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
        # program (bk, s) streams pixels [s*CHUNK, (s+1)*CHUNK) of map bk once. Per block: t = beta h,
        # m' = max(m, max t), e = exp(t - m'), old state rescaled by exp(m - m'); block mean mu_b = sum(e u)/sum(e),
        # block M2_b = sum e (u - mu_b)^2, merged (Chan): Z' = Z + z_b, mu' = mu + d z_b / Z',
        # M2' = M2 + M2_b + d^2 Z z_b / Z' with d = mu_b - mu. Every t - m' <= 0, so beta h ~ 1e4 cannot overflow.
        bk = tl.program_id(0)
        s = tl.program_id(1)
        base = h_ptr + bk.to(tl.int64) * N
        lanes = tl.arange(0, BLOCK)
        u0 = (lanes % W).to(tl.float32)
        v0 = (lanes // W).to(tl.float32)
        zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)    # 0-d fp32 for the loop-carried scalars
        m = zero - float("inf")
        z = zero
        mu_u = zero
        mu_v = zero
        m2_u = zero
        m2_v = zero
        for i in range(0, CHUNK, BLOCK):
            offs = s * CHUNK + i + lanes
            mask = offs < N
            t = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * beta
            t = tl.where(mask, t, float("-inf"))
            m_new = tl.maximum(m, tl.max(t, axis=0))
            scale = tl.exp(m - m_new)                 # 0 on the first block (m = -inf), else <= 1
            e = tl.exp(t - m_new)                     # 0 on masked lanes
            u, v = _pixel_uv(s * CHUNK + i, u0, v0, W)
            z_b = tl.sum(e, axis=0)
            # z_b underflows to 0 only for a block far below the running max (or a padding block): its weight
            # frac is then 0 and the clamp merely keeps its mean finite (|sum e u| <= z_b * max u)
            inv_b = 1.0 / tl.maximum(z_b, 1e-30)
            mub_u = tl.sum(e * u, axis=0) * inv_b
            mub_v = tl.sum(e * v, axis=0) * inv_b
            z_old = z * scale
            z = z_old + z_b                            # >= 1: the block holding the running max has e = 1
            frac = z_b / z
            d_u = mub_u - mu_u
            d_v = mub_v - mu_v
            mu_u = mu_u + d_u * frac
            mu_v = mu_v + d_v * frac
            if HAS_VAR:
                cu = u - mub_u
                cv = v - mub_v
                m2_u = m2_u * scale + tl.sum(e * cu * cu, axis=0) + d_u * d_u * z_old * frac
                m2_v = m2_v * scale + tl.sum(e * cv * cv, axis=0) + d_v * d_v * z_old * frac
            m = m_new
        _soft_argmax_store_state(bk, s, SPLIT, xy_ptr, var_ptr, mz_ptr, part_ptr, m, z, mu_u, mu_v, m2_u, m2_v,
                                 HAS_VAR, FINAL)

    @triton.jit
    def _soft_argmax_merge_kernel(part_ptr, xy_ptr, var_ptr, mz_ptr, SPLIT,
                                  HAS_VAR: tl.constexpr, SPLIT_P2: tl.constexpr):
        # merge the SPLIT partial states of map bk at once: M = max m_s, w_s = Z_s exp(m_s - M), Z = sum w_s,
        # mu = sum w_s mu_s / Z, M2 = sum M2_s exp(m_s - M) + sum w_s (mu_s - mu)^2 (all terms >= 0), var = M2 / Z.
        bk = tl.program_id(0)
        s = tl.arange(0, SPLIT_P2)
        mask = s < SPLIT
        row = part_ptr + (bk * SPLIT + s) * 6
        m_s = tl.load(row, mask=mask, other=float("-inf"))
        m = tl.max(m_s, axis=0)
        r_s = tl.exp(m_s - m)                          # 0 on padding lanes
        w_s = tl.load(row + 1, mask=mask, other=0.0) * r_s
        z = tl.sum(w_s, axis=0)
        mu_us = tl.load(row + 2, mask=mask, other=0.0)
        mu_vs = tl.load(row + 3, mask=mask, other=0.0)
        mu_u = tl.sum(w_s * mu_us, axis=0) / z
        mu_v = tl.sum(w_s * mu_vs, axis=0) / z
        tl.store(xy_ptr + bk * 2, mu_u)
        tl.store(xy_ptr + bk * 2 + 1, mu_v)
        if HAS_VAR:
            du = mu_us - mu_u
            dv = mu_vs - mu_v
            m2_u = tl.sum(tl.load(row + 4, mask=mask, other=0.0) * r_s + w_s * du * du, axis=0)
            m2_v = tl.sum(tl.load(row + 5, mask=mask, other=0.0) * r_s + w_s * dv * dv, axis=0)
            tl.store(var_ptr + bk * 2, m2_u / z)
            tl.store(var_ptr + bk * 2 + 1, m2_v / z)
        tl.store(mz_ptr + bk * 2, m)
        tl.store(mz_ptr + bk * 2 + 1, z)

    @triton.jit
    def _soft_argmax_bwd_kernel(h_ptr, dh_ptr, xy_ptr, var_ptr, mz_ptr, gxy_ptr, gvar_ptr, N, W, CHUNK, beta,
                                HAS_VAR: tl.constexpr, BLOCK: tl.constexpr):
        # recompute p = exp(beta h - m) / Z (same t = h * beta as the forward), then
        # dh = beta p [gx (u - x) + gy (v - y) + gvx ((u - x)^2 - var_x) + gvy ((v - y)^2 - var_y)]  (module doc).
        bk = tl.program_id(0)
        s = tl.program_id(1)
        base = bk.to(tl.int64) * N
        x = tl.load(xy_ptr + bk * 2)
        y = tl.load(xy_ptr + bk * 2 + 1)
        gx = tl.load(gxy_ptr + bk * 2)
        gy = tl.load(gxy_ptr + bk * 2 + 1)
        m = tl.load(mz_ptr + bk * 2)
        inv_z = 1.0 / tl.load(mz_ptr + bk * 2 + 1)
        var_x = tl.load(var_ptr + bk * 2)             # without HAS_VAR these read valid dummies, unused
        var_y = tl.load(var_ptr + bk * 2 + 1)
        gvx = tl.load(gvar_ptr + bk * 2)
        gvy = tl.load(gvar_ptr + bk * 2 + 1)
        lanes = tl.arange(0, BLOCK)
        u0 = (lanes % W).to(tl.float32)
        v0 = (lanes // W).to(tl.float32)
        for i in range(0, CHUNK, BLOCK):
            offs = s * CHUNK + i + lanes
            mask = offs < N
            t = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * beta
            p = tl.exp(t - m) * inv_z
            u, v = _pixel_uv(s * CHUNK + i, u0, v0, W)
            du = u - x
            dv = v - y
            g = gx * du + gy * dv
            if HAS_VAR:
                g += gvx * (du * du - var_x) + gvy * (dv * dv - var_y)
            dh = beta * p * g
            tl.store(dh_ptr + base + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(n_maps: int, n_pix: int, device: torch.device, block: int | None, split: int | None,
          programs_per_sm: int, min_blocks: int) -> tuple[int, int, int]:
    """(BLOCK, split, CHUNK): CHUNK is a whole number of blocks and every chunk starts inside the map."""
    block = block or max(16, min(next_pow2(n_pix), _MAX_BLOCK))
    if block & (block - 1) or block < 16:
        raise ValueError(f"kernels/soft_argmax: block must be a power of two >= 16, got {block}")
    n_blocks = triton.cdiv(n_pix, block)
    if split is None:                  # fill the GPU: enough (map, chunk) programs for every SM; 1 off-GPU
        split = 1
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            split = max(1, min(triton.cdiv(programs_per_sm * _sm_count(index), max(n_maps, 1)),
                               n_blocks // min_blocks))
    if split < 1:
        raise ValueError(f"kernels/soft_argmax: split must be >= 1, got {split}")
    chunk = triton.cdiv(n_blocks, min(split, n_blocks)) * block
    return block, triton.cdiv(n_pix, chunk), chunk


def _launch_fwd(h_BKHW: torch.Tensor, beta: float, return_var: bool, block: int | None, split: int | None):
    """h contiguous -> (xy_BK2, var_BK2 or None, mz_BK2 = per-map max m and sum Z), all float32."""
    b, k, hh, ww = h_BKHW.shape
    n_maps, n_pix = b * k, hh * ww
    block, split, chunk = _plan(n_maps, n_pix, h_BKHW.device, block, split, _FWD_PROGRAMS_PER_SM,
                                _MIN_BLOCKS_PER_CHUNK)
    xy = torch.empty((b, k, 2), dtype=torch.float32, device=h_BKHW.device)
    var = torch.empty_like(xy) if return_var else None
    mz = torch.empty((b, k, 2), dtype=torch.float32, device=h_BKHW.device)
    part = (torch.empty((n_maps, split, _N_STATE), dtype=torch.float32, device=h_BKHW.device)
            if split > 1 else mz)      # mz stands in for the unused pointer
    if n_maps == 0:                    # an empty batch: nothing to launch
        return xy, var, mz
    warps = max(1, min(8, block // 256))
    _soft_argmax_fwd_kernel[(n_maps, split)](h_BKHW, xy, xy if var is None else var, mz, part, n_pix, ww,
                                             chunk, split, float(beta), HAS_VAR=return_var, FINAL=split == 1,
                                             BLOCK=block, num_warps=warps)
    if split > 1:
        _soft_argmax_merge_kernel[(n_maps,)](part, xy, xy if var is None else var, mz, split,
                                             HAS_VAR=return_var, SPLIT_P2=max(16, next_pow2(split)), num_warps=1)
    return xy, var, mz


def _launch_bwd(h_BKHW, xy, var, mz, gxy, gvar, beta: float, block: int | None, split: int | None):
    b, k, hh, ww = h_BKHW.shape
    n_maps, n_pix = b * k, hh * ww
    block, split, chunk = _plan(n_maps, n_pix, h_BKHW.device, block, split, _BWD_PROGRAMS_PER_SM, 1)
    dh = torch.empty_like(h_BKHW)
    has_var = var is not None
    if n_maps == 0:
        return dh
    _soft_argmax_bwd_kernel[(n_maps, split)](h_BKHW, dh, xy, var if has_var else xy, mz, gxy,
                                             gvar if has_var else gxy, n_pix, ww, chunk, float(beta),
                                             HAS_VAR=has_var, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return dh


class _SoftArgmaxFunction(torch.autograd.Function):
    """Triton forward (one pass, online softmax) and recompute-based backward; saves h, xy, var and (m, Z)."""

    @staticmethod
    def forward(ctx, h_BKHW, beta, return_var, block, split, split_bwd):
        h = h_BKHW.contiguous()
        xy, var, mz = _launch_fwd(h, beta, return_var, block, split)
        ctx.save_for_backward(h, xy, var, mz)
        ctx.beta, ctx.block, ctx.split_bwd = beta, block, split_bwd
        return (xy, var) if return_var else xy

    @staticmethod
    @once_differentiable                           # the recompute backward is not itself differentiable
    def backward(ctx, *grads):
        h, xy, var, mz = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        # an unused output arrives as None: its gradient is zero
        gxy = torch.zeros_like(xy) if grads[0] is None else grads[0].float().contiguous()
        gvar = None
        if var is not None:
            gvar = torch.zeros_like(var) if grads[1] is None else grads[1].float().contiguous()
        dh = _launch_bwd(h, xy, var, mz, gxy, gvar, ctx.beta, ctx.block, ctx.split_bwd)
        return dh, None, None, None, None, None


def soft_argmax(heatmap_BKHW: torch.Tensor, beta: float = 1.0, return_var: bool = False, impl: str = "auto", *,
                block: int | None = None, split: int | None = None, split_bwd: int | None = None):
    """Soft-argmax of (B, K, H, W) heatmaps -> xy_BK2 (float32 pixels, x = column, y = row) or (xy_BK2, var_BK2).

    impl: "auto" (Triton on CUDA tensors, else the reference; MEDPOSE_KERNELS overrides), "triton" or "ref".
    block / split / split_bwd tune the Triton launch (pixels per block step, chunks per map in the forward and the
    backward); None picks them from the map size and the GPU. They do not change the result beyond fp32 rounding.
    """
    _check_heatmap(heatmap_BKHW)
    if choose_impl("soft_argmax", impl, heatmap_BKHW) == "ref":
        return soft_argmax_ref(heatmap_BKHW, beta=beta, return_var=return_var)
    return _SoftArgmaxFunction.apply(heatmap_BKHW, float(beta), bool(return_var), block, split, split_bwd)
