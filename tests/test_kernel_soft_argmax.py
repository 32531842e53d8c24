"""kernels/soft_argmax.py: reference vs models.codecs, gradcheck, Triton forward + every gradient vs the reference
(CPU under TRITON_INTERPRET=1 on tiny grids), dispatch, and the GPU sweep (fp32 and the bf16 rule)."""
import math

import pytest
import torch

import kernels.soft_argmax as sa
from kernels.soft_argmax import soft_argmax, soft_argmax_bytes, soft_argmax_ref
from models.codecs import softargmax_decode

needs_triton = pytest.mark.skipif(not sa.HAVE_TRITON, reason="triton is not installed")


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _run(fn, h_BKHW: torch.Tensor, beta: float, return_var: bool, seed: int = 0, **kw):
    """(outputs, dh) of fn on a fresh leaf copy of h, with fixed random upstream gradients for every output."""
    leaf = h_BKHW.detach().clone().requires_grad_(True)
    outs = _outputs(fn(leaf, beta, return_var, **kw))
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    (dh,) = torch.autograd.grad(outs, leaf, grads)
    return [o.detach() for o in outs], dh


def _triton(h, beta, return_var, **kw):
    return soft_argmax(h, beta, return_var, impl="triton", **kw)


def _ref(h, beta, return_var):
    return soft_argmax_ref(h, beta, return_var)


def _assert_triton_matches_ref(h_BKHW, beta, return_var, **kw):
    outs, dh = _run(_triton, h_BKHW, beta, return_var, **kw)
    outs_ref, dh_ref = _run(_ref, h_BKHW, beta, return_var)
    for o, r in zip(outs, outs_ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
    assert dh.dtype == h_BKHW.dtype and dh.shape == h_BKHW.shape
    torch.testing.assert_close(dh, dh_ref, rtol=1e-4, atol=1e-5 * dh_ref.abs().max().item() + 1e-7)
    return outs


# ----------------------------------------------------------------------------------------------- reference
def _softargmax_decode_before_kernels(heatmap_BKHW: torch.Tensor, beta: float) -> torch.Tensor:
    """models.codecs.softargmax_decode as it was before it called kernels/soft_argmax.py (the op's origin)."""
    b, k, h, w = heatmap_BKHW.shape
    prob = torch.softmax(beta * heatmap_BKHW.float().reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)
    xs = torch.arange(w, dtype=torch.float32, device=heatmap_BKHW.device)
    ys = torch.arange(h, dtype=torch.float32, device=heatmap_BKHW.device)
    x = (prob.sum(dim=2) * xs).sum(dim=-1)
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


@pytest.mark.parametrize("shape, beta", [((2, 3, 17, 23), 1.0), ((1, 1, 64, 64), 0.3), ((3, 5, 8, 31), 7.0)])
def test_ref_matches_original_softargmax_decode(shape, beta):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4
    expect = _softargmax_decode_before_kernels(h, beta)
    torch.testing.assert_close(soft_argmax_ref(h, beta), expect, rtol=1e-6, atol=1e-6)
    xy, _ = soft_argmax_ref(h, beta, return_var=True)
    torch.testing.assert_close(xy, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(softargmax_decode(h, beta), expect, rtol=1e-6, atol=1e-6)


def test_ref_variance_equals_raw_second_moment_formula():
    h = torch.randn(2, 3, 11, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xy, var = soft_argmax_ref(h, 1.7, return_var=True)
    p = torch.softmax(1.7 * h.flatten(2), dim=-1).reshape(h.shape)
    u = torch.arange(14, dtype=torch.float64)
    v = torch.arange(11, dtype=torch.float64)[:, None]
    var_x = (p * u ** 2).sum((-2, -1)) - xy[..., 0] ** 2
    var_y = (p * v ** 2).sum((-2, -1)) - xy[..., 1] ** 2
    torch.testing.assert_close(var, torch.stack([var_x, var_y], -1), rtol=1e-10, atol=1e-10)
    assert xy.dtype == var.dtype == torch.float64


@pytest.mark.parametrize("return_var", [False, True])
def test_ref_passes_gradcheck_in_float64(return_var):
    h = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_argmax_ref(t, 1.3, return_var), (h,))


def test_ref_of_constant_map_is_centre_with_uniform_variance():
    xy, var = soft_argmax_ref(torch.full((1, 2, 5, 8), 3.0), 2.0, return_var=True)
    torch.testing.assert_close(xy, torch.tensor([3.5, 2.0]).expand(1, 2, 2))
    torch.testing.assert_close(var, torch.tensor([(8 ** 2 - 1) / 12, (5 ** 2 - 1) / 12]).expand(1, 2, 2))


def test_bad_heatmap_shape_raises():
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        soft_argmax(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        soft_argmax_ref(torch.zeros(2, 3, 0, 4))


def test_bytes_count_reads_maps_once_per_pass():
    b, k, h, w = 8, 17, 96, 128
    for dtype, elem in [(torch.float32, 4), (torch.bfloat16, 2)]:
        for return_var, n_out in [(False, 1), (True, 2)]:
            got = soft_argmax_bytes(b, k, h, w, dtype, return_var)
            maps, outs = b * k * h * w * elem, b * k * 2 * 4 * n_out
            assert got == {"fwd": maps + outs, "fwd_bwd": 3 * maps + 2 * outs}


# ------------------------------------------------------------------------------------ Triton (interpreter)
@needs_triton
@pytest.mark.parametrize("return_var", [False, True])
@pytest.mark.parametrize("shape", [(3, 17, 63, 65), (1, 1, 9, 11), (2, 4, 16, 16)])
def test_triton_forward_and_grads_match_ref(shape, return_var):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 2
    _assert_triton_matches_ref(h, 0.8, return_var)


@needs_triton
@pytest.mark.parametrize("return_var", [False, True])
@pytest.mark.parametrize("block, split, split_bwd", [(32, 4, 3), (16, 7, 40), (64, 1, 1)])
@pytest.mark.parametrize("hw", [(19, 23), (1, 70), (70, 1)])
def test_triton_map_longer_than_one_block_matches_ref_for_any_split(hw, block, split, split_bwd, return_var):
    # 19 x 23 = 437 pixels: several blocks per map, rows both longer and shorter than a block (the row carry);
    # split 7 with block 16 leaves padding blocks in the last chunk, split_bwd 40 exceeds the block count
    # (clamped); split 1 takes the single-chunk path with no merge. 1-row and 1-column maps are the extremes.
    h = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(5)) * 3
    _assert_triton_matches_ref(h, 1.5, return_var, block=block, split=split, split_bwd=split_bwd)


@needs_triton
def test_triton_sharp_peak_with_huge_beta_does_not_overflow():
    h = torch.rand(2, 2, 24, 40, generator=torch.Generator().manual_seed(6))
    peaks = [(0, 0, 7, 33), (0, 1, 23, 0), (1, 0, 0, 39), (1, 1, 12, 20)]
    for b, k, r, c in peaks:
        h[b, k, r, c] = 1.05                  # beta * h ~ 1e4: exp without the max shift would overflow
    outs = _assert_triton_matches_ref(h, 1e4, True, block=64, split=3, split_bwd=2)
    xy, var = outs
    expect = torch.zeros(2, 2, 2)
    for b, k, r, c in peaks:
        expect[b, k] = torch.tensor([float(c), float(r)])
    torch.testing.assert_close(xy, expect, rtol=0, atol=1e-3)
    torch.testing.assert_close(var, torch.zeros_like(var), rtol=0, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("hw", [(5, 8), (16, 16), (1, 1)])
def test_triton_constant_map_gives_centre_and_uniform_variance(hw):
    hh, ww = hw
    h = torch.full((2, 3, hh, ww), -4.0)
    xy, var = _assert_triton_matches_ref(h, 2.5, True, block=16, split=2)
    torch.testing.assert_close(xy, torch.tensor([(ww - 1) / 2, (hh - 1) / 2]).expand(2, 3, 2))
    torch.testing.assert_close(var, torch.tensor([(ww ** 2 - 1) / 12, (hh ** 2 - 1) / 12]).expand(2, 3, 2))


@needs_triton
def test_triton_far_corner_peak_variance_is_not_cancelled():
    # mass near (W-1, H-1) of a wide map: sum p u^2 - x^2 in fp32 would lose ~1e-2 px^2; the centred merge must not
    u = torch.arange(200.0)
    v = torch.arange(90.0)[:, None]
    h = (-((u - 197.3) ** 2 + (v - 88.6) ** 2) / (2 * 0.7 ** 2)).expand(1, 1, 90, 200).contiguous()
    (xy, var), _ = _run(_triton, h, 1.0, True, block=1024, split=3)
    (xy_r, var_r), _ = _run(_ref, h.double(), 1.0, True)
    torch.testing.assert_close(xy, xy_r.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(var, var_r.float(), rtol=0, atol=2e-4)


@needs_triton
def test_triton_grad_when_only_variance_is_used():
    h = torch.randn(2, 3, 10, 13, generator=torch.Generator().manual_seed(7))
    grads = []
    for fn in (_triton, _ref):
        leaf = h.clone().requires_grad_(True)
        _, var = fn(leaf, 1.2, True)
        (var * torch.tensor([1.0, -2.0])).sum().backward()       # xy unused: its gradient arrives as None
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@needs_triton
def test_triton_empty_batch_gives_empty_outputs_and_grad():
    h = torch.randn(0, 3, 8, 9, requires_grad=True)
    xy, var = soft_argmax(h, 1.0, True, impl="triton")
    assert xy.shape == var.shape == (0, 3, 2)
    (xy.sum() + var.sum()).backward()
    assert h.grad.shape == h.shape


@needs_triton
def test_triton_non_contiguous_input_matches_ref():
    h = torch.randn(2, 13, 11, 3, generator=torch.Generator().manual_seed(8)).permute(0, 3, 2, 1)  # (2, 3, 11, 13)
    assert not h.is_contiguous()
    _assert_triton_matches_ref(h, 1.0, True, block=32, split=2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs_match_ref_on_same_inputs(dtype):
    h = (torch.randn(2, 3, 13, 17, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    outs, dh = _run(_triton, h, 2.0, True, block=64, split=2)
    outs_ref, dh_ref = _run(_ref, h, 2.0, True)
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
    assert dh.dtype == dtype
    # both round the same fp32 gradient to the half type: at most one unit in the last place apart
    ulp = torch.finfo(dtype).eps * dh_ref.float().abs().max().item()
    torch.testing.assert_close(dh.float(), dh_ref.float(), rtol=0, atol=ulp)


# ---------------------------------------------------------------------------------------------- dispatch
def _spy(monkeypatch):
    calls = []
    real_ref, real_launch = sa.soft_argmax_ref, sa._launch_fwd
    monkeypatch.setattr(sa, "soft_argmax_ref", lambda *a, **k: calls.append("ref") or real_ref(*a, **k))
    monkeypatch.setattr(sa, "_launch_fwd", lambda *a, **k: calls.append("triton") or real_launch(*a, **k))
    return calls


def test_auto_on_cpu_tensors_uses_reference(monkeypatch):
    monkeypatch.delenv("MEDPOSE_KERNELS", raising=False)
    calls = _spy(monkeypatch)
    h = torch.randn(1, 2, 6, 7)
    torch.testing.assert_close(soft_argmax(h, 1.0), _softargmax_decode_before_kernels(h, 1.0))
    assert calls == ["ref"]


@needs_triton
@pytest.mark.parametrize("env, expect", [("triton", "triton"), ("ref", "ref"), ("auto", "ref")])
def test_environment_variable_forces_implementation(monkeypatch, env, expect):
    monkeypatch.setenv("MEDPOSE_KERNELS", env)
    calls = _spy(monkeypatch)
    xy = soft_argmax(torch.randn(1, 2, 6, 7), 1.0)
    assert calls == [expect] and xy.shape == (1, 2, 2)


def test_explicit_ref_and_bogus_impl(monkeypatch):
    monkeypatch.setenv("MEDPOSE_KERNELS", "triton")
    calls = _spy(monkeypatch)
    soft_argmax(torch.randn(1, 1, 4, 4), impl="ref")
    assert calls == ["ref"]
    with pytest.raises(ValueError, match="impl"):
        soft_argmax(torch.randn(1, 1, 4, 4), impl="bogus")


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_heatmaps(b: int, k: int, hh: int, ww: int, seed: int) -> torch.Tensor:
    """Realistic targets-like maps: a 255-peak Gaussian at a random sub-pixel spot plus noise, float32 on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    cx = torch.rand(b, k, 1, 1, generator=gen) * (ww - 1)
    cy = torch.rand(b, k, 1, 1, generator=gen) * (hh - 1)
    sigma = 2.0 + 4.0 * torch.rand(b, k, 1, 1, generator=gen)
    u, v = torch.arange(ww).float(), torch.arange(hh).float()[:, None]
    h = 255.0 * torch.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma ** 2))
    return (h + 5.0 * torch.randn(b, k, hh, ww, generator=gen)).cuda()


_GPU_CASES = [(k, hh, ww) for k in (6, 17) for hh, ww in ((64, 64), (96, 128), (384, 512))]


@pytest.mark.gpu
@pytest.mark.parametrize("return_var", [False, True])
@pytest.mark.parametrize("k, hh, ww", _GPU_CASES)
def test_gpu_fp32_forward_and_grads_match_ref(k, hh, ww, return_var):
    h = _gpu_heatmaps(8, k, hh, ww, seed=hh + k)
    beta = 20.0 / 255.0                                    # decode_heatmaps' default for 255-peak targets
    outs, dh = _run(lambda t, b_, r: soft_argmax(t, b_, r), h, beta, return_var)   # impl="auto" on CUDA
    outs_ref, dh_ref = _run(_ref, h, beta, return_var)
    torch.testing.assert_close(outs[0], outs_ref[0], rtol=1e-5, atol=2e-3)
    if return_var:
        torch.testing.assert_close(outs[1], outs_ref[1], rtol=2e-4, atol=2e-3)
    # dh against float64: over 2e5-pixel maps the fp32 reference itself is off by ~3e-4 of max|dh| where (u - x)
    # cancels (measured on an H200), so the kernel must be as close to the float64 truth as the fp32 reference is
    _, dh_gold = _run(_ref, h.double(), beta, return_var)
    err_kernel, err_ref = _max_err(dh, dh_gold), _max_err(dh_ref, dh_gold)
    # floor 1e-4 of max|dh|: on 64x64 maps (one 4096-pixel block) the kernel measured 6e-7 = 2e-5 of max|dh|
    # against the reference's 2.7e-7, fp32 rounding of a different summation order, not a fault
    assert err_kernel <= 2.0 * err_ref + 1e-4 * dh_gold.abs().max().item(), \
        f"dh: kernel fp32 err {err_kernel:.3e} > 2 x reference fp32 err {err_ref:.3e}"
    torch.testing.assert_close(dh, dh_ref, rtol=1e-2, atol=1e-3 * dh_ref.abs().max().item())


@pytest.mark.gpu
def test_gpu_auto_dispatch_uses_triton(monkeypatch):
    monkeypatch.delenv("MEDPOSE_KERNELS", raising=False)
    calls = _spy(monkeypatch)
    soft_argmax(_gpu_heatmaps(2, 3, 32, 48, seed=0), 0.1)
    assert calls == ["triton"]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("k, hh, ww", _GPU_CASES)
def test_gpu_bf16_error_within_twice_plain_torch(k, hh, ww):
    h32 = _gpu_heatmaps(8, k, hh, ww, seed=3 * hh + k)
    h16 = h32.to(torch.bfloat16)
    beta = 20.0 / 255.0
    gold, dh_gold = _run(_ref, h32, beta, True)            # fp32 reference on the unrounded maps
    kern, dh_kern = _run(lambda t, b_, r: soft_argmax(t, b_, r, impl="triton"), h16, beta, True)
    torch_, dh_torch = _run(_ref, h16, beta, True)          # plain torch on the bf16 maps
    pairs = list(zip(kern, torch_, gold)) + [(dh_kern, dh_torch, dh_gold)]
    for name, (k_out, t_out, g_out) in zip(("xy", "var", "dh"), pairs):
        assert torch.isfinite(k_out).all(), name
        floor = 1e-3 * max(g_out.abs().max().item(), 1.0 if name == "xy" else 0.0) + 1e-12
        err_k, err_t = _max_err(k_out, g_out), _max_err(t_out, g_out)
        assert err_k <= 2.0 * err_t + floor, f"{name}: kernel bf16 err {err_k:.3e} > 2 x torch {err_t:.3e}"
    assert dh_kern.dtype == torch.bfloat16 and not math.isnan(dh_kern.float().sum().item())
