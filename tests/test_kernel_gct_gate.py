"""kernels/gct_gate.py: the GCT gate and the gate fused with the 1x1 fusion conv, Triton path vs reference.

CPU: the Triton path runs under TRITON_INTERPRET=1 (tests/conftest.py) on tiny grids. The interpreter rounds
fp32 -> bf16 toward zero (compiled Triton rounds to nearest), so its bf16 checks allow one bf16 ulp.
GPU (@pytest.mark.gpu): the realistic sweep, compiled, with the bf16 rule (the kernel's bf16 error vs
an fp32 reference at most twice plain torch's bf16 error).
"""
from __future__ import annotations

import pytest
import torch

import kernels.gct_gate as kg
from kernels.gct_gate import (gct_gate, gct_gate_bytes, gct_gate_conv1x1, gct_gate_conv1x1_bytes,
                              gct_gate_conv1x1_ref, gct_gate_ref)
from models.me_gct import gct_gate as models_gct_gate

# (shape, forced H*W block): odd, power-of-two, C=1, and rows of 65 split into 16-wide blocks (5 blocks per row).
CPU_CASES = [((3, 17, 63, 65), None), ((2, 16, 8, 8), None), ((2, 1, 5, 13), 16), ((3, 5, 5, 13), 16)]


def _params(C, dtype=torch.float32, device="cpu", vec=False, seed=0):
    """Random alpha (positive), gamma, beta: gamma = beta = 0 (the init) would make the gate exactly 1."""
    gen = torch.Generator().manual_seed(seed)
    shape = (C,) if vec else (1, C, 1, 1)
    alpha = torch.rand(shape, generator=gen) + 0.5
    gamma = torch.randn(shape, generator=gen)
    beta = 0.5 * torch.randn(shape, generator=gen)
    return [p.to(device=device, dtype=dtype) for p in (alpha, gamma, beta)]


def _run(fn, inputs, seed=1):
    """out and the gradients of every input, for a fixed upstream gradient rounded to bf16 (so that every dtype
    sees the same values)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(seed)     # on the device: the GPU sweep is large
    dy = torch.randn(out.shape, generator=gen, device=out.device).bfloat16().to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, dy)]


def _close(actual, expected, rtol):
    # atol: rtol of the tensor's scale, plus 1e-6 for gradients that cancel to ~0 (alpha's when C=1: the channel
    # normalisation divides alpha out up to eps, and both paths return float32 rounding noise of opposite terms).
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * float(e.abs().max()) + 1e-6)


def _rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _original_models_gct_gate(x, alpha, gamma, beta, eps=1e-5):
    """models/me_gct.py's gct_gate as it was before it called kernels/ (the specification, kept verbatim)."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    emb = alpha * (xc.pow(2).sum(dim=(2, 3), keepdim=True) + eps).sqrt()
    norm = gamma / (emb.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()
    gate = 1.0 + torch.tanh(emb * norm + beta)
    return (xc * gate).to(x.dtype)


def test_ref_equals_models_me_gct_gate_exactly():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 6, 7, 5).to(dtype)
        a, g, b = _params(6)
        expected = _original_models_gct_gate(x, a, g, b, 1e-5)
        assert torch.equal(models_gct_gate(x, a, g, b, 1e-5), expected)      # CPU tensors: the reference
        assert torch.equal(gct_gate(x, a, g, b, impl="ref"), expected)
        assert torch.equal(gct_gate_ref(x, a, g, b), expected)
        assert torch.equal(gct_gate_ref(x, *(p.reshape(6) for p in (a, g, b))), expected)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 3, 3), (2, 4, 2, 2)])
def test_refs_pass_gradcheck_in_float64(shape):
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _params(C, torch.float64)]
    w = torch.randn(3, C, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gct_gate_ref, (x, *params))
    assert torch.autograd.gradcheck(gct_gate_conv1x1_ref, (x, *params, w))


@pytest.mark.parametrize("shape,block_hw", CPU_CASES)
def test_triton_gate_forward_and_grads_match_ref(shape, block_hw):
    x = torch.randn(shape)
    inputs = [x, *_params(shape[1])]
    got = _run(lambda *t: gct_gate(*t, impl="triton", block_hw=block_hw), inputs)
    _close(got, _run(gct_gate_ref, inputs), rtol=1e-4)


@pytest.mark.parametrize("route", ["fused", "gated"])
@pytest.mark.parametrize("shape,block_hw", CPU_CASES + [((2, 6, 2, 3), None)])
@pytest.mark.parametrize("cout", [7, 1])
def test_triton_conv1x1_forward_and_grads_match_ref(shape, block_hw, cout, route):
    # (2, 6, 2, 3) with cout=7: H*W < Cout, where "auto" gates x instead of scaling the weight.
    inputs = [torch.randn(shape), *_params(shape[1]), torch.randn(cout, shape[1], 1, 1)]
    got = _run(lambda *t: gct_gate_conv1x1(*t, impl="triton", block_hw=block_hw, route=route), inputs)
    _close(got, _run(gct_gate_conv1x1_ref, inputs), rtol=1e-4)


def test_triton_gate_maths_loops_over_channel_blocks(monkeypatch):
    # Kernels G and H walk C in blocks of _MAX_BLOCK_C; 4 makes C=17 take five blocks, the last one masked.
    monkeypatch.setattr(kg, "_MAX_BLOCK_C", 4)
    inputs = [torch.randn(2, 17, 3, 5), *_params(17)]
    _close(_run(lambda *t: gct_gate(*t, impl="triton"), inputs), _run(gct_gate_ref, inputs), rtol=1e-4)
    inputs.append(torch.randn(3, 17, 1, 1))
    got = _run(lambda *t: gct_gate_conv1x1(*t, impl="triton"), inputs)
    _close(got, _run(gct_gate_conv1x1_ref, inputs), rtol=1e-4)


def test_triton_accepts_params_of_shape_C_and_returns_grads_of_that_shape():
    inputs = [torch.randn(2, 5, 6, 7), *_params(5, vec=True)]
    got = _run(lambda *t: gct_gate(*t, impl="triton"), inputs)
    assert [g.shape for g in got[2:]] == [torch.Size([5])] * 3
    _close(got, _run(gct_gate_ref, inputs), rtol=1e-4)
    inputs.append(torch.randn(3, 5, 1, 1))
    got = _run(lambda *t: gct_gate_conv1x1(*t, impl="triton"), inputs)
    assert [g.shape for g in got[2:5]] == [torch.Size([5])] * 3
    _close(got, _run(gct_gate_conv1x1_ref, inputs), rtol=1e-4)


def test_triton_bf16_input_matches_ref_within_one_bf16_ulp():
    inputs = [torch.randn(2, 6, 9, 11).bfloat16(), *_params(6)]
    _close(_run(lambda *t: gct_gate(*t, impl="triton"), inputs), _run(gct_gate_ref, inputs), rtol=2 ** -7)
    inputs.append(torch.randn(4, 6, 1, 1).bfloat16())
    _close(_run(lambda *t: gct_gate_conv1x1(*t, impl="triton"), inputs), _run(gct_gate_conv1x1_ref, inputs),
           rtol=2 ** -7)


def test_triton_paths_pass_gradcheck_in_float64():
    # float64 inputs switch the kernels' accumulator to float64, so finite differences are meaningful.
    x = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)   # rows of 15 in blocks of 8
    params = [p.requires_grad_() for p in _params(2, torch.float64)]
    w = torch.randn(2, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: gct_gate(*t, impl="triton", block_hw=8), (x, *params))
    for route in ("fused", "gated"):
        assert torch.autograd.gradcheck(lambda *t: gct_gate_conv1x1(*t, impl="triton", block_hw=8, route=route),
                                        (x, *params, w))


def test_triton_handles_noncontiguous_input():
    x = torch.randn(2, 9, 6, 5).permute(0, 3, 2, 1)          # (2, 5, 6, 9), not contiguous
    assert not x.is_contiguous()
    inputs = [x, *_params(5)]
    _close(_run(lambda *t: gct_gate(*t, impl="triton"), inputs), _run(gct_gate_ref, inputs), rtol=1e-4)


def test_triton_gate_when_only_params_or_only_x_need_grad():
    x, (a, g, b) = torch.randn(2, 4, 5, 6), _params(4)
    a.requires_grad_()
    ga = torch.autograd.grad(gct_gate(x, a, g, b, impl="triton").sum(), a)[0]
    ga_ref = torch.autograd.grad(gct_gate_ref(x, a, g, b).sum(), a)[0]
    torch.testing.assert_close(ga, ga_ref, rtol=1e-4, atol=1e-5)
    xr = x.clone().requires_grad_()
    gx = torch.autograd.grad(gct_gate(xr, *_params(4), impl="triton").sum(), xr)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(gct_gate_ref(xr, *_params(4)).sum(), xr)[0])


def test_empty_batch_returns_empty_output():
    x, (a, g, b) = torch.randn(0, 3, 4, 4), _params(3)
    assert gct_gate(x, a, g, b, impl="triton").shape == (0, 3, 4, 4)
    assert gct_gate_conv1x1(x, a, g, b, torch.randn(2, 3, 1, 1), impl="triton").shape == (0, 2, 4, 4)


def test_block_choice_wastes_little_of_short_rows():
    assert kg._pick_blocks(8 * 192, 24 * 32, None) == (16, 256)        # 768 = 3 x 256, not 1024 with 25% masked
    assert kg._pick_blocks(8 * 192, 96 * 128, None) == (1, 4096)
    assert kg._pick_blocks(51, 63 * 65, None) == (1, 4096)
    assert kg._pick_blocks(3, 12, None) == (4, 16)                     # rows per program capped by the row count
    assert kg._pick_blocks(15, 65, 16) == (16, 16)


def _spy(monkeypatch):
    """Count calls of the Triton launchers' common entry (_rowdot) and of the reference."""
    calls = {"triton": 0, "ref": 0}
    rowdot, ref = kg._rowdot, kg.gct_gate_ref

    def rowdot_spy(*a, **k):
        calls["triton"] += 1
        return rowdot(*a, **k)

    def ref_spy(*a, **k):
        calls["ref"] += 1
        return ref(*a, **k)
    monkeypatch.setattr(kg, "_rowdot", rowdot_spy)
    monkeypatch.setattr(kg, "gct_gate_ref", ref_spy)
    return calls


@pytest.mark.parametrize("env,expected", [(None, "ref"), ("ref", "ref"), ("triton", "triton"), ("auto", "ref")])
def test_dispatch_on_cpu_follows_auto_and_environment(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("MEDPOSE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MEDPOSE_KERNELS", env)
    x, (a, g, b), w = torch.randn(1, 3, 4, 4), _params(3), torch.randn(2, 3, 1, 1)
    for call in (lambda: gct_gate(x, a, g, b), lambda: gct_gate_conv1x1(x, a, g, b, w)):
        calls = _spy(monkeypatch)
        call()
        other = "ref" if expected == "triton" else "triton"
        assert calls[expected] >= 1 and calls[other] == 0


def test_bogus_impl_and_bad_shapes_raise():
    x, (a, g, b), w = torch.randn(1, 3, 4, 4), _params(3), torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError):
        gct_gate(x, a, g, b, impl="bogus")
    with pytest.raises(ValueError):
        gct_gate_conv1x1(x, a, g, b, w, impl="bogus")
    with pytest.raises(ValueError):
        gct_gate(x[0], a, g, b)
    with pytest.raises(ValueError):
        gct_gate(x, a[:, :2], g, b, impl="triton")
    with pytest.raises(ValueError):
        gct_gate_conv1x1(x, a, g, b, torch.randn(2, 4, 1, 1))


def test_byte_counts_follow_the_schedules():
    n = 8 * 192 * 24 * 32
    got = gct_gate_bytes(8, 192, 24, 32, torch.bfloat16)
    p = 3 * 192 * 4
    assert got == {"forward": 2 * n * 2 + p, "forward_backward": 5 * n * 2 + 2 * p,
                   "forward_schedule": 3 * n * 2 + p, "forward_backward_schedule": 8 * n * 2 + 2 * p}
    conv = gct_gate_conv1x1_bytes(8, 192, 24, 32, 48, torch.bfloat16)
    nx, nout, nw = n * 2, 8 * 48 * 24 * 32 * 2, 48 * 192 * 2
    assert conv["forward"] == nx + nw + nout + p
    assert conv["forward_backward"] == conv["forward"] + 2 * nx + nout + 2 * nw + 2 * p
    assert conv["forward_schedule"] > conv["forward"] and conv["forward_backward_schedule"] > conv["forward_backward"]
    small = gct_gate_conv1x1_bytes(8, 6144, 6, 8, 1536, torch.bfloat16)       # gated-x route: y is 8*6144*48
    assert small["forward_schedule"] == 4 * 8 * 6144 * 48 * 2 + 1536 * 6144 * 2 + 8 * 1536 * 48 * 2 + 3 * 6144 * 4


def test_conv1x1_route_avoids_the_larger_intermediate():
    assert kg._conv_gates_x(6 * 8, 1536) and not kg._conv_gates_x(24 * 32, 48)


def test_conv1x1_route_is_gated_by_default_and_fused_on_request():
    assert kg._route(64, 2, "gated") == "gated" and kg._route(64, 2, "fused") == "fused"
    assert kg._route(4, 8, "fused") == "gated"                          # H*W < Cout: the scaled weight is larger
    with pytest.raises(ValueError, match="route"):
        kg._route(64, 2, "auto")


# ---------------------------------------------------------------- GPU: compiled kernels at realistic sizes
# + long rows (192x256), and a deep level whose 6x8 maps are smaller than Cout (conv1x1's gated-x route).
GPU_SWEEP = [(8, c, h, w) for c in (192, 768, 3072) for h, w in ((24, 32), (96, 128))] + [(2, 64, 192, 256),
                                                                                          (8, 6144, 6, 8)]
OPS = {"gate": (gct_gate, gct_gate_ref), "conv1x1": (gct_gate_conv1x1, gct_gate_conv1x1_ref)}


def _gpu_inputs(shape, op, dtype):
    """x, alpha, gamma, beta (+ weight (C/4, C, 1, 1) for conv1x1), values representable in bf16 so that every
    dtype starts from the same numbers; the gate parameters stay float32 (as nn.Parameters under autocast)."""
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, device="cuda").bfloat16().to(dtype)
    inputs = [x, *_params(shape[1], device="cuda")]
    if op == "conv1x1":
        cout = max(1, shape[1] // 4)
        w = (torch.randn(cout, shape[1], 1, 1, generator=gen, device="cuda") / shape[1] ** 0.5).bfloat16().to(dtype)
        inputs.append(w)
    return inputs


def _oracle(op, inputs):
    """The reference in float64 on the GPU (no TF32, no reduced-precision accumulation)."""
    return _run(OPS[op][1], [t.double() for t in inputs])


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", GPU_SWEEP)
def test_gpu_float32_kernel_matches_float64_reference(op, shape):
    inputs = _gpu_inputs(shape, op, torch.float32)
    got = _run(lambda *t: OPS[op][0](*t, impl="triton"), inputs)
    # conv1x1 runs cuDNN convs, TF32 by default for fp32 (relative rounding ~5e-4); the gate is pure fp32.
    tol = 3e-3 if op == "conv1x1" else 1e-4
    for name, g, r in zip(("out", "x", "alpha", "gamma", "beta", "weight"), got, _oracle(op, inputs)):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert _rel_err(g, r) <= tol, (name, _rel_err(g, r))


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", GPU_SWEEP)
def test_gpu_bf16_error_at_most_twice_plain_torch(op, shape):
    """Rule: the kernel's bf16 error vs a float64 reference <= 2 x plain torch's (the reference run on the same bf16
    inputs) + 1e-5. Error = relative Frobenius norm (a max-abs ratio is too noisy); the floor covers the parameter
    gradients, which both paths compute in float32 to ~1e-7."""
    inputs = _gpu_inputs(shape, op, torch.bfloat16)
    got = _run(lambda *t: OPS[op][0](*t, impl="triton"), inputs)
    plain = _run(OPS[op][1], inputs)
    for name, g, p, r in zip(("out", "x", "alpha", "gamma", "beta", "weight"), got, plain, _oracle(op, inputs)):
        assert g.dtype == p.dtype and g.shape == p.shape
        err_k, err_t = _rel_err(g, r), _rel_err(p, r)
        assert err_k <= 2.0 * err_t + 1e-5, (name, err_k, err_t)


@pytest.mark.gpu
def test_gpu_float64_triton_paths_pass_gradcheck():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    params = [p.requires_grad_() for p in _params(3, torch.float64, device="cuda")]
    w = torch.randn(2, 3, 1, 1, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: gct_gate(*t, impl="triton", block_hw=16), (x, *params))
    assert torch.autograd.gradcheck(lambda *t: gct_gate_conv1x1(*t, impl="triton"), (x, *params, w))


@pytest.mark.gpu
def test_gpu_auto_dispatch_uses_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("MEDPOSE_KERNELS", raising=False)
    inputs = _gpu_inputs((2, 8, 5, 7), "conv1x1", torch.float32)
    for call in (lambda: gct_gate(*inputs[:4]), lambda: gct_gate_conv1x1(*inputs)):
        calls = _spy(monkeypatch)
        call()
        assert calls == {"triton": 1, "ref": 0}
