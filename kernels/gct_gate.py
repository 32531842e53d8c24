"""GCT gate of ME-GCT (MultiHipPoseNet), and the gate fused with the 1x1 fusion conv that follows it.

Maths (per sample b and channel c; x is (B, C, H, W); alpha, gamma, beta are (1, C, 1, 1) or (C,)):
    S[b,c]  = sum_hw x[b,c,hw]^2                      statistics in at least float32 (float64 stays float64)
    n[b,c]  = sqrt(S[b,c] + eps)
    e[b,c]  = alpha[c] * n[b,c]                        global context embedding
    r[b]    = 1 / sqrt(mean_c e[b,c]^2 + eps)          channel normalisation
    t[b,c]  = tanh(gamma[c] * e[b,c] * r[b] + beta[c])
    g[b,c]  = 1 + t[b,c]                               the gate, a per-sample per-channel gain in (0, 2)
    y       = x * g[b,c]
Fused conv: out[b] = conv1x1(y, weight)[b] = (weight_OC * g[b][None, :]) @ x[b].reshape(C, HW), one batched GEMM with
the per-sample weight; the gated tensor y
is never written, except on maps with H*W < Cout, where y is smaller than the scaled weight (B, Cout, C).

Bytes (N = B*C*H*W elements of the input dtype; the (B, C) statistics and the parameters are negligible):
    gct_gate ideal:          fwd reads x, writes y (2N);  fwd+bwd adds read x, dy, write dx (5N)
    gct_gate this schedule:  fwd reads x twice (stats, gating) + writes y (3N);  bwd reads dy, x twice
                             (kernel C: sum dy*x, kernel D: dx) + writes dx (5N) -> 8N in all
Schedule: kernel A (`_gct_gate_rowdot_kernel`, SQUARE) -> S; kernel G (`_gct_gate_gate_fwd_kernel`, one program per
sample) -> t, root; kernel B (`_gct_gate_fwd_kernel`) y = x * (1 + t). Backward: kernel C (`_gct_gate_rowdot_kernel`)
G = sum_hw dy*x; kernel H (`_gct_gate_gate_bwd_kernel`, derivation beside it) -> dS and per-sample parameter grads;
kernel D (`_gct_gate_bwd_kernel`) dx = dy*g + 2*x*dS. The (B, C) maths lives in kernels G and H, not in torch: a
dozen tiny torch launches per call cost more than the memory-bound passes at the small ME-GCT levels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import HAVE_TRITON, choose_impl, next_pow2

if HAVE_TRITON:
    import triton
    import triton.language as tl

_TILE = 4096          # elements per program and loop step: 8 warps x 32 lanes x 16 elements
_MAX_BLOCK_HW = 4096
_MAX_BLOCK_C = 1024       # kernels G and H loop over C in blocks of this many channels
_NUM_WARPS = 8


def _as_vec(p: torch.Tensor, C: int, name: str) -> torch.Tensor:
    """(1, C, 1, 1) or (C,) -> (C,) view; anything else is an error (a silent broadcast would hide a bug)."""
    if p.numel() != C or p.dim() not in (1, 4):
        raise ValueError(f"kernels/gct_gate: {name} must have shape (1, C, 1, 1) or (C,) with C={C}, "
                         f"got {tuple(p.shape)}")
    return p.reshape(C)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"kernels/gct_gate: expects x of shape (B, C, H, W), got {tuple(x.shape)}")


def gct_gate_ref(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 eps: float = 1e-5) -> torch.Tensor:
    """Pure-torch GCT gate: the specification (same maths, line for line, as models/me_gct.py's gct_gate)."""
    _check_x(x)
    alpha, gamma, beta = (p.reshape(1, -1, 1, 1) if p.dim() == 1 else p for p in (alpha, gamma, beta))
    xc = x.to(torch.promote_types(x.dtype, torch.float32))        # fp16/bf16 -> fp32; fp32/fp64 unchanged
    emb = alpha * (xc.pow(2).sum(dim=(2, 3), keepdim=True) + eps).sqrt()
    norm = gamma / (emb.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    gate = 1.0 + torch.tanh(emb * norm + beta)
    return (xc * gate).to(x.dtype)


def gct_gate_conv1x1_ref(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Pure-torch gate + 1x1 conv (weight (Cout, C, 1, 1), no bias): the specification of `gct_gate_conv1x1`."""
    return F.conv2d(gct_gate_ref(x, alpha, gamma, beta, eps), weight)


def _pick_blocks(rows: int, HW: int, block_hw: int | None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_HW): a power-of-two HW block that wastes little of a short row (768 = 24x32 -> 256, not 1024
    with a quarter masked), then enough rows per program to fill a tile of `_TILE` elements."""
    if block_hw is None:
        block_hw = min(next_pow2(HW), _MAX_BLOCK_HW)
        while block_hw > 128 and (math.ceil(HW / block_hw) * block_hw - HW) > HW // 8:
            block_hw //= 2
    block_r = max(1, min(_TILE // block_hw, next_pow2(rows)))
    return block_r, block_hw


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


if HAVE_TRITON:
    @triton.jit
    def _gct_gate_rowdot_kernel(a_ptr, b_ptr, out_ptr, n_rows, HW, SQUARE: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
        # Kernels A and C: out[row] = sum_hw a[row, hw] * b[row, hw] (SQUARE: b = a, loaded once), rows = B*C.
        # A (BLOCK_R, BLOCK_HW) accumulator summed once at the end: many partial sums, so long rows (192x256) keep
        # fp32 accuracy. int64 offsets: B*C*HW can pass 2^31.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        base = rows.to(tl.int64) * HW
        acc = tl.zeros((BLOCK_R, BLOCK_HW), dtype=ACC)
        for start in range(0, HW, BLOCK_HW):
            cols = start + tl.arange(0, BLOCK_HW)
            mask = row_ok[:, None] & (cols[None, :] < HW)
            offs = base[:, None] + cols[None, :]
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC)
            if SQUARE:
                acc += a * a
            else:
                acc += a * tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _gct_gate_fwd_kernel(x_ptr, t_ptr, y_ptr, n_rows, HW, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
        # Kernel B: y[row, hw] = x[row, hw] * g[row], g = 1 + t[row], computed in ACC, stored in y's dtype.
        # Grid (row blocks, HW blocks): a long row is spread over many programs.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols[None, :] < HW)
        offs = (rows.to(tl.int64) * HW)[:, None] + cols[None, :]
        g = 1.0 + tl.load(t_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + offs, (x * g[:, None]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gct_gate_bwd_kernel(dy_ptr, x_ptr, t_ptr, dS_ptr, dx_ptr, n_rows, HW, HAS_DY: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
        # Kernel D: dx = dy * g[row] + 2 * x * dS[row], g = 1 + t (y = x*g directly; S = sum x^2 through the gate).
        # HAS_DY=False gives the sum-of-squares backward alone, dx = 2 * x * dS (the fused-conv path).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols[None, :] < HW)
        offs = (rows.to(tl.int64) * HW)[:, None] + cols[None, :]
        ds2 = 2.0 * tl.load(dS_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        dx = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) * ds2[:, None]
        if HAS_DY:
            g = 1.0 + tl.load(t_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            dx += tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC) * g[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _tanh(z):
        # tanh from exp(-2|z|) <= 1: no overflow for large |z|, exact +-1 in the limit.
        q = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - q) / (1.0 + q)
        return tl.where(z < 0, -t, t)

    @triton.jit
    def _gct_gate_gate_fwd_kernel(S_ptr, alpha_ptr, gamma_ptr, beta_ptr, t_ptr, root_ptr, C, eps,
                                  ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        # Kernel G, one program per sample b (two passes over C):
        #   n = sqrt(S + eps), e = alpha * n, root = sqrt(mean_c e^2 + eps), t = tanh(e * (gamma / root) + beta)
        b = tl.program_id(0)
        acc = tl.zeros((BLOCK_C,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C                                             # masked lanes: alpha = 0 -> e = 0
            e = tl.load(alpha_ptr + c, mask=m, other=0.0).to(ACC) * tl.sqrt(
                tl.load(S_ptr + b * C + c, mask=m, other=0.0).to(ACC) + eps)
            acc += e * e
        root = tl.sqrt(tl.sum(acc, axis=0) / C + eps)
        tl.store(root_ptr + b, root)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C
            e = tl.load(alpha_ptr + c, mask=m, other=0.0).to(ACC) * tl.sqrt(
                tl.load(S_ptr + b * C + c, mask=m, other=0.0).to(ACC) + eps)
            z = e * (tl.load(gamma_ptr + c, mask=m, other=0.0).to(ACC) / root) \
                + tl.load(beta_ptr + c, mask=m, other=0.0).to(ACC)
            tl.store(t_ptr + b * C + c, _tanh(z), mask=m)

    @triton.jit
    def _gct_gate_gate_bwd_kernel(G_ptr, S_ptr, t_ptr, root_ptr, alpha_ptr, gamma_ptr, dS_ptr, dp_ptr, B, C, eps,
                                  ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        # Kernel H, one program per sample b, given G = dL/dg (g = 1 + t; for gct_gate G = sum_hw dy*x).
        # Forward: n = sqrt(S+eps), e = a*n, m = mean_c e^2, r = (m+eps)^-1/2 = 1/root, z = gamma*e*r + beta, t = tanh z
        #   dz     = G * (1 - t^2)                               tanh' = 1 - tanh^2
        #   dbeta  = sum_b dz,   dgamma = sum_b dz * e * r
        #   dr[b]  = sum_c dz * gamma * e                         r is shared by the channels of sample b (pass 1)
        #   dm[b]  = dr * dr/dm = dr * (-1/2)(m+eps)^-3/2 = -dr * r^3 / 2
        #   de     = dz * gamma * r + dm * 2e / C                 direct path + through the mean of e^2
        #   dalpha = sum_b de * n,   dS = de * a * dn/dS = de * a / (2n)
        # Writes dS (B, C) and the per-sample terms of dalpha, dgamma, dbeta into dp (3, B, C); torch sums over b.
        b = tl.program_id(0)
        r = 1.0 / tl.load(root_ptr + b).to(ACC)
        acc = tl.zeros((BLOCK_C,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C
            t = tl.load(t_ptr + b * C + c, mask=m, other=0.0).to(ACC)
            dz = tl.load(G_ptr + b * C + c, mask=m, other=0.0).to(ACC) * (1.0 - t * t)
            e = tl.load(alpha_ptr + c, mask=m, other=0.0).to(ACC) * tl.sqrt(
                tl.load(S_ptr + b * C + c, mask=m, other=0.0).to(ACC) + eps)
            acc += dz * tl.load(gamma_ptr + c, mask=m, other=0.0).to(ACC) * e
        dm = -0.5 * tl.sum(acc, axis=0) * r * r * r
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C
            t = tl.load(t_ptr + b * C + c, mask=m, other=0.0).to(ACC)
            dz = tl.load(G_ptr + b * C + c, mask=m, other=0.0).to(ACC) * (1.0 - t * t)
            a = tl.load(alpha_ptr + c, mask=m, other=0.0).to(ACC)
            n = tl.sqrt(tl.load(S_ptr + b * C + c, mask=m, other=0.0).to(ACC) + eps)
            e = a * n
            de = dz * tl.load(gamma_ptr + c, mask=m, other=0.0).to(ACC) * r + dm * 2.0 * e / C
            tl.store(dS_ptr + b * C + c, de * a / (2.0 * n), mask=m)
            tl.store(dp_ptr + b * C + c, de * n, mask=m)
            tl.store(dp_ptr + (B + b) * C + c, dz * e * r, mask=m)
            tl.store(dp_ptr + (2 * B + b) * C + c, dz, mask=m)



def _rowdot(a: torch.Tensor, b: torch.Tensor | None, acc_dtype: torch.dtype, block_hw: int | None) -> torch.Tensor:
    """Kernels A / C: (B, C) sums over H*W of a*a (b None) or a*b, in acc_dtype. a, b contiguous (B, C, H, W)."""
    B, C, H, W = a.shape
    rows, HW = B * C, H * W
    out_BC = torch.empty(B, C, device=a.device, dtype=acc_dtype)
    block_r, block = _pick_blocks(rows, HW, block_hw)
    _gct_gate_rowdot_kernel[(triton.cdiv(rows, block_r),)](
        a, a if b is None else b, out_BC, rows, HW, SQUARE=b is None, ACC=_acc_dtype(acc_dtype),
        BLOCK_R=block_r, BLOCK_HW=block, num_warps=_NUM_WARPS)
    return out_BC


def _gate_fwd(S_BC, a_C, g_C, b_C, eps: float):
    """Kernel G: t (B, C) with the gate g = 1 + t, and root (B,) = sqrt(mean_c e^2 + eps)."""
    B, C = S_BC.shape
    t_BC = torch.empty_like(S_BC)
    root_B = torch.empty(B, device=S_BC.device, dtype=S_BC.dtype)
    _gct_gate_gate_fwd_kernel[(B,)](S_BC, a_C, g_C, b_C, t_BC, root_B, C, eps, ACC=_acc_dtype(S_BC.dtype),
                                    BLOCK_C=min(next_pow2(C), _MAX_BLOCK_C), num_warps=4)
    return t_BC, root_B


def _gate_bwd(G_BC, S_BC, t_BC, root_B, a_C, g_C, eps: float):
    """Kernel H: dS (B, C) and (dalpha, dgamma, dbeta) stacked as (3, C), given G = dL/dg."""
    B, C = S_BC.shape
    dS_BC = torch.empty_like(S_BC)
    dp_3BC = torch.empty(3, B, C, device=S_BC.device, dtype=S_BC.dtype)
    _gct_gate_gate_bwd_kernel[(B,)](G_BC.to(S_BC.dtype).contiguous(), S_BC, t_BC, root_B, a_C, g_C, dS_BC, dp_3BC,
                                    B, C, eps, ACC=_acc_dtype(S_BC.dtype),
                                    BLOCK_C=min(next_pow2(C), _MAX_BLOCK_C), num_warps=4)
    return dS_BC, dp_3BC.sum(1)


def _scale_rows(x: torch.Tensor, t_BC: torch.Tensor, block_hw: int | None) -> torch.Tensor:
    """Kernel B: y = x * (1 + t[b, c])."""
    B, C, H, W = x.shape
    rows, HW = B * C, H * W
    y = torch.empty_like(x)
    block_r, block = _pick_blocks(rows, HW, block_hw)
    _gct_gate_fwd_kernel[(triton.cdiv(rows, block_r), triton.cdiv(HW, block))](
        x, t_BC, y, rows, HW, ACC=_acc_dtype(t_BC.dtype), BLOCK_R=block_r, BLOCK_HW=block, num_warps=_NUM_WARPS)
    return y


def _grad_x(dy: torch.Tensor | None, x: torch.Tensor, t_BC: torch.Tensor | None, dS_BC: torch.Tensor,
            block_hw: int | None) -> torch.Tensor:
    """Kernel D: dx = dy * (1 + t) + 2 * x * dS, or 2 * x * dS alone when dy is None."""
    B, C, H, W = x.shape
    rows, HW = B * C, H * W
    dx = torch.empty_like(x)
    block_r, block = _pick_blocks(rows, HW, block_hw)
    has_dy = dy is not None
    _gct_gate_bwd_kernel[(triton.cdiv(rows, block_r), triton.cdiv(HW, block))](
        dy if has_dy else x, x, t_BC if has_dy else dS_BC, dS_BC, dx, rows, HW, HAS_DY=has_dy,
        ACC=_acc_dtype(dS_BC.dtype), BLOCK_R=block_r, BLOCK_HW=block, num_warps=_NUM_WARPS)
    return dx


def _stat_dtype(x: torch.Tensor, *params: torch.Tensor) -> torch.dtype:
    """The reference's statistics dtype: x promoted to at least float32, then with the parameters."""
    dt = torch.promote_types(x.dtype, torch.float32)
    for p in params:
        dt = torch.promote_types(dt, p.dtype)
    return dt


def _gate_stats(ctx, x, alpha, gamma, beta, eps, block_hw, *extra_saved):
    """Shared forward of both Functions: contiguous x, S (kernel A), t and root (kernel G); saves them for backward
    (x, S, t, root, alpha, gamma as vectors, then `extra_saved`)."""
    C = x.shape[1]
    x = x.contiguous()
    dt = _stat_dtype(x, alpha, gamma, beta)
    a_C, g_C, b_C = (_as_vec(p, C, n).to(dt).contiguous()
                     for p, n in ((alpha, "alpha"), (gamma, "gamma"), (beta, "beta")))
    S_BC = _rowdot(x, None, dt, block_hw)
    t_BC, root_B = _gate_fwd(S_BC, a_C, g_C, b_C, eps)
    ctx.save_for_backward(x, S_BC, t_BC, root_B, a_C, g_C, *extra_saved)
    ctx.eps, ctx.block_hw = eps, block_hw
    ctx.param_meta = [(p.shape, p.dtype) for p in (alpha, gamma, beta)]
    return x, t_BC


def _gate_grads(ctx, G_BC, dy):
    """Shared backward: kernel H then kernel D (dy None: the sum-of-squares term alone)."""
    x, S_BC, t_BC, root_B, a_C, g_C = ctx.saved_tensors
    dS_BC, dp_3C = _gate_bwd(G_BC, S_BC, t_BC, root_B, a_C, g_C, ctx.eps)
    dx = _grad_x(dy, x, t_BC, dS_BC, ctx.block_hw) if ctx.needs_input_grad[0] else None
    dparams = [d.reshape(shape).to(dtype) for d, (shape, dtype) in zip(dp_3C, ctx.param_meta)]
    return (dx, *dparams, None, None)


class _GCTGateFn(torch.autograd.Function):
    """y = x * g(x): forward kernels A, G, B; backward kernels C, H, D."""

    @staticmethod
    def forward(ctx, x, alpha, gamma, beta, eps, block_hw):
        x, t_BC = _gate_stats(ctx, x, alpha, gamma, beta, eps, block_hw)
        return _scale_rows(x, t_BC, block_hw)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        G_BC = _rowdot(dy, ctx.saved_tensors[0], ctx.saved_tensors[1].dtype, ctx.block_hw)
        return _gate_grads(ctx, G_BC, dy)


def gct_gate(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
             impl: str = "auto", block_hw: int | None = None) -> torch.Tensor:
    """GCT gate y = x * (1 + tanh(...)) (module docstring). impl: "auto" | "triton" | "ref" (kernels/_dispatch.py).
    block_hw forces the kernels' H*W block (a power of two; tests use it to get multi-block rows on tiny grids)."""
    _check_x(x)
    if choose_impl("gct_gate", impl, x, alpha, gamma, beta) == "ref" or x.numel() == 0:
        return gct_gate_ref(x, alpha, gamma, beta, eps)
    return _GCTGateFn.apply(x, alpha, gamma, beta, float(eps), block_hw)


def _conv_gates_x(HW: int, cout: int) -> bool:
    """Route of gct_gate_conv1x1: gate x (writes B*C*HW) rather than scale the weight (writes B*Cout*C)?"""
    return HW < cout


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the 1x1 conv would run in here: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _scaled_weight(w_OC: torch.Tensor, t_BC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weight W * g[b], (B, Cout, C) in `dtype`: the gate folded into the GEMM."""
    return (w_OC.to(t_BC.dtype)[None] * (1.0 + t_BC)[:, None, :]).to(dtype)


class _GCTGateConv1x1Fn(torch.autograd.Function):
    """out[b] = (W * g[b]) @ x[b] as one batched GEMM (cuBLAS bmm) with the per-sample scaled weight: the gated
    tensor is never written.
        forward:  kernel A (S), kernel G (t, root), out = bmm(W * g, x)
        backward: dx_gemm = bmm((W * g)^T, dout); dWg = bmm(dout, x^T) (B, Cout, C); dW = sum_b dWg[b] * g[b];
                  dL/dg[b, c] = sum_o dWg[b, o, c] W[o, c]; kernel H (dS, parameter grads); kernel D with t = 0:
                  dx = dx_gemm + 2 x dS in one pass (no separate accumulation of the two paths into x).
    The GEMMs run in `_conv_dtype(x)` (autocast's dtype when autocast is on), like the plain conv would.
    """

    @staticmethod
    def forward(ctx, x, alpha, gamma, beta, weight, eps, block_hw):
        B, C, H, W = x.shape
        x, t_BC = _gate_stats(ctx, x, alpha, gamma, beta, eps, block_hw, weight)
        ctx.cdt = _conv_dtype(x)
        w_OC = weight.reshape(weight.shape[0], C)
        out = torch.bmm(_scaled_weight(w_OC, t_BC, ctx.cdt), x.to(ctx.cdt).reshape(B, C, H * W))
        return out.reshape(B, weight.shape[0], H, W)

    @staticmethod
    def backward(ctx, dout):
        x, S_BC, t_BC, root_B, a_C, g_C, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        cout = weight.shape[0]
        w_OC = weight.reshape(cout, C)
        dout_BOP = dout.to(ctx.cdt).reshape(B, cout, H * W)
        x_BCP = x.to(ctx.cdt).reshape(B, C, H * W)
        dwg_BOC = torch.bmm(dout_BOP, x_BCP.transpose(1, 2)).to(S_BC.dtype)
        dweight = (dwg_BOC * (1.0 + t_BC)[:, None, :]).sum(0).reshape(weight.shape).to(weight.dtype)
        dgate_BC = (dwg_BOC * w_OC.to(S_BC.dtype)[None]).sum(1)
        dS_BC, dp_3C = _gate_bwd(dgate_BC, S_BC, t_BC, root_B, a_C, g_C, ctx.eps)
        dx = None
        if ctx.needs_input_grad[0]:
            dx_gemm = torch.bmm(_scaled_weight(w_OC, t_BC, ctx.cdt).transpose(1, 2), dout_BOP)
            # kernel D computes dy * (1 + t) + 2 x dS: with dy = dx_gemm and t = 0 it adds the two x paths in one pass
            dx = _grad_x(dx_gemm.reshape(B, C, H, W), x, torch.zeros_like(t_BC), dS_BC, ctx.block_hw)
        dparams = [d.reshape(shape).to(dtype) for d, (shape, dtype) in zip(dp_3C, ctx.param_meta)]
        return (dx, *dparams, dweight, None, None)


ROUTES = ("gated", "fused")


def _route(HW: int, cout: int, route: str) -> str:
    """The route gct_gate_conv1x1 takes. "gated" (default): the gct_gate kernels write the gated tensor, then the
    plain cuDNN conv — measured fastest on an H200 in fp32 and bf16 (benchmarks/results/kernels_h200_20261126.md).
    "fused": one bmm with the per-sample scaled weight, the gated tensor never written; it still gates where
    H*W < Cout (`_conv_gates_x`), since the scaled weight would then be larger than the gated tensor."""
    if route not in ROUTES:
        raise ValueError(f"kernels/gct_gate: route must be one of {ROUTES}, got {route!r}")
    return "gated" if route == "gated" or _conv_gates_x(HW, cout) else "fused"


def gct_gate_conv1x1(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     weight: torch.Tensor, eps: float = 1e-5, impl: str = "auto",
                     block_hw: int | None = None, route: str = "gated") -> torch.Tensor:
    """conv1x1(gct_gate(x), weight), values of gct_gate_conv1x1_ref.

    Triton path, route "fused": g (B, C) from kernels A and G, then one cuBLAS bmm with the per-sample scaled weight
    (B, Cout, C) — the gated tensor is never written — and a custom backward that folds both gradient paths into x
    with one pass of kernel D (_GCTGateConv1x1Fn). Route "gated" (default, faster on an H200): the gct_gate kernels,
    then the plain conv (`_route`).
    """
    _check_x(x)
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"kernels/gct_gate: weight must be (Cout, C={x.shape[1]}, 1, 1), got {tuple(weight.shape)}")
    if choose_impl("gct_gate_conv1x1", impl, x, alpha, gamma, beta, weight) == "ref" or x.numel() == 0:
        return gct_gate_conv1x1_ref(x, alpha, gamma, beta, weight, eps)
    B, C, H, W = x.shape
    if _route(H * W, weight.shape[0], route) == "gated":
        y = _GCTGateFn.apply(x, alpha, gamma, beta, float(eps), block_hw)
        return F.conv2d(y, weight.to(y.dtype))          # like the fused route: the weight follows x's dtype
    return _GCTGateConv1x1Fn.apply(x, alpha, gamma, beta, weight, float(eps), block_hw)


def gct_gate_bytes(B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float32,
                   param_dtype: torch.dtype = torch.float32) -> dict:
    """Bytes moved by gct_gate: "forward"/"forward_backward" = ideal (x read once, y written once; backward reads
    x and dy, writes dx); "*_schedule" = this implementation (x read twice forward, x and dy twice backward)."""
    n = B * C * H * W * torch.empty((), dtype=dtype).element_size()
    p = 3 * C * torch.empty((), dtype=param_dtype).element_size()
    return {"forward": 2 * n + p, "forward_backward": 5 * n + 2 * p,
            "forward_schedule": 3 * n + p, "forward_backward_schedule": 8 * n + 2 * p}


def gct_gate_conv1x1_bytes(B: int, C: int, H: int, W: int, Cout: int, dtype: torch.dtype = torch.float32,
                           param_dtype: torch.dtype = torch.float32) -> dict:
    """Bytes moved by gct_gate_conv1x1. Ideal forward: read x and weight once, write out (B, Cout, H, W); backward:
    read x, dout, weight, write dx and dweight. This schedule, scaled-weight route (H*W >= Cout): forward reads x
    twice (kernel A, conv) and writes + reads the scaled weight (B, Cout, C); backward: the conv's data gradient
    reads dout and the scaled weight and writes dx_conv, its weight gradient reads dout and x and writes (B, Cout,
    C), kernel D reads dx_conv and x and writes dx. Gated route (H*W < Cout): gct_gate's schedule plus the conv's
    (y written and read forward; dy written and read backward)."""
    es = torch.empty((), dtype=dtype).element_size()
    ps = torch.empty((), dtype=param_dtype).element_size()
    n_x, n_out, n_w, n_bw = B * C * H * W * es, B * Cout * H * W * es, Cout * C * es, B * Cout * C * es
    p = 3 * C * ps
    fwd = n_x + n_w + n_out + p
    bwd = n_x + n_out + n_w + n_x + n_w + 2 * p
    if _conv_gates_x(H * W, Cout):
        fwd_s = 3 * n_x + (n_x + n_w + n_out) + p
        bwd_s = (2 * n_out + n_x + 2 * n_w + n_x) + 5 * n_x + 2 * p
    else:
        fwd_s = 2 * n_x + 2 * n_bw + n_out + p
        bwd_s = (2 * n_out + 2 * n_bw + n_x) + (n_x + n_bw) + 3 * n_x + n_w + 2 * p
    return {"forward": fwd, "forward_backward": fwd + bwd,
            "forward_schedule": fwd_s, "forward_backward_schedule": fwd_s + bwd_s}
