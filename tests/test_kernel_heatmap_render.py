"""kernels/heatmap_render.py: Triton heatmap targets vs the torch reference vs data_pipelines/heatmaps.py.

The Triton tests run under TRITON_INTERPRET=1 on CPU tensors (tiny grids), or compiled on CUDA when the interpreter
is off and a GPU is present; the `gpu` section runs the realistic sweep (B=8, 64x64 and 384x512, sigma 2 and 7).
"""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels.heatmap_render as hr

try:
    from data_pipelines.heatmaps import render_heatmaps_numba, render_heatmaps_numpy
except ImportError:  # data_pipelines/__init__ imports readers with optional deps (nibabel...) that this op never uses
    _spec = importlib.util.spec_from_file_location(
        "_medpose_heatmaps", Path(__file__).resolve().parents[1] / "data_pipelines" / "heatmaps.py")
    _heatmaps = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_heatmaps)
    render_heatmaps_numba, render_heatmaps_numpy = _heatmaps.render_heatmaps_numba, _heatmaps.render_heatmaps_numpy
from kernels._dispatch import ENV_VAR, HAVE_TRITON, interpreting
from kernels.heatmap_render import render_heatmaps, render_heatmaps_bytes, render_heatmaps_ref


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _triton_device() -> str:
    """Where the Triton path can run in this process: CPU under the interpreter, else CUDA, else skip."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton path needs TRITON_INTERPRET=1 or a CUDA device")


def _points(b, k, hw, seed, margin=4.0, dtype=torch.float32):
    """Keypoints spread over the image and `margin` px beyond it, ~80 % visible."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    lo = torch.tensor([-margin, -margin], dtype=torch.float64)
    span = torch.tensor([w - 1 + 2 * margin, h - 1 + 2 * margin], dtype=torch.float64)
    kpts_BK2 = (torch.rand(b, k, 2, generator=g, dtype=torch.float64) * span + lo).to(dtype)
    vis_BK = torch.rand(b, k, generator=g) < 0.8
    return kpts_BK2, vis_BK


def _numpy_maps(kpts_BK2, vis_BK, hw, sigma, peak=255.0, truncate=3.0) -> torch.Tensor:
    """data_pipelines reference, sample by sample (keypoint by keypoint for a per-keypoint sigma tensor)."""
    k_np, v_np = kpts_BK2.detach().cpu().double().numpy(), vis_BK.cpu().numpy()
    if not isinstance(sigma, torch.Tensor):
        maps = [render_heatmaps_numpy(k_np[b], v_np[b], hw, sigma, peak, truncate) for b in range(len(k_np))]
        return torch.from_numpy(np.stack(maps))
    s_np = sigma.cpu().double().numpy()
    maps = [[render_heatmaps_numpy(k_np[b, j:j + 1], v_np[b, j:j + 1], hw, float(s_np[b, j]), peak, truncate)[0]
             for j in range(k_np.shape[1])] for b in range(k_np.shape[0])]
    return torch.from_numpy(np.array(maps, dtype=np.float32).reshape(k_np.shape[0], k_np.shape[1], *hw))


def _assert_maps(got, want, peak=255.0):
    """Values within rtol 1e-5 / atol 1e-4 * peak, and exactly the same support (the truncation window)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * abs(peak))
    assert torch.equal(got != 0, want != 0), "window (support) differs"


def _check_triton(kpts_BK2, vis_BK, hw, sigma, peak=255.0, truncate=3.0):
    """Triton path vs the numpy reference and vs the torch reference; returns the Triton maps (CPU)."""
    dev = _triton_device()
    s_dev = sigma.to(dev) if isinstance(sigma, torch.Tensor) else sigma
    got = render_heatmaps(kpts_BK2.to(dev), vis_BK.to(dev), hw, s_dev, peak, truncate, impl="triton").cpu()
    _assert_maps(got, _numpy_maps(kpts_BK2, vis_BK, hw, sigma, peak, truncate), peak)
    _assert_maps(got, render_heatmaps_ref(kpts_BK2, vis_BK, hw, sigma, peak, truncate), peak)
    return got


# ---------------------------------------------------------------- reference vs data_pipelines (numpy / numba)

@pytest.mark.parametrize("b, k, hw, sigma, truncate", [(3, 17, (63, 65), 1.3, 3.0), (2, 4, (16, 16), 2.0, 3.0),
                                                       (4, 9, (128, 96), 7.0, 3.0), (2, 5, (1, 37), 0.7, 4.5)])
def test_ref_matches_numpy_and_numba(b, k, hw, sigma, truncate):
    kpts_BK2, vis_BK = _points(b, k, hw, seed=b * 100 + k, margin=3 * sigma + 3)
    kpts_BK2[0, 0] = torch.tensor([2.5, -0.5])                          # exact halves
    kpts_BK2[-1, -1] = torch.tensor([float("nan"), 1.0])
    vis_BK[0, 0] = vis_BK[-1, -1] = True
    ref = render_heatmaps_ref(kpts_BK2, vis_BK, hw, sigma, truncate=truncate)
    _assert_maps(ref, _numpy_maps(kpts_BK2, vis_BK, hw, sigma, truncate=truncate))
    k_np, v_np = kpts_BK2.double().numpy(), vis_BK.numpy()
    numba_maps = np.stack([render_heatmaps_numba(k_np[i], v_np[i], hw, sigma, 255.0, truncate) for i in range(b)])
    _assert_maps(ref, torch.from_numpy(numba_maps))
    assert ref.sum() > 0 and not ref[-1, -1].any()


def test_ref_rounds_half_away_from_zero_at_hand_checked_pixels():
    # sigma 0.5, truncate 2 -> r = 1: the lit columns are exactly round(kx) - 1 .. round(kx) + 1 (clipped)
    kpts_BK2 = torch.tensor([[[2.5, 3.0], [-0.5, 3.0], [0.5, 3.0], [3.5, 3.0], [-1.5, 3.0]]])
    ref = render_heatmaps_ref(kpts_BK2, torch.ones(1, 5, dtype=torch.bool), (7, 8), 0.5, peak=1.0, truncate=2.0)
    lit = [set(torch.nonzero(ref[0, j, 3]).flatten().tolist()) for j in range(5)]
    # half to even would give {1, 2, 3}, {0, 1}, {0, 1}, {3, 4, 5}, {0} (-1.5 -> -2 either way)
    assert lit == [{2, 3, 4}, {0}, {0, 1, 2}, {3, 4, 5}, set()]
    assert ref[0, 0, 3, 2].item() == pytest.approx(ref[0, 0, 3, 3].item())   # centred on 2.5 itself
    assert ref[0, 0, 3, 3].item() == pytest.approx(math.exp(-0.25 / 0.5), rel=1e-6)


# ---------------------------------------------------------------- Triton path (interpreter on CPU: tiny grids)

@pytest.mark.parametrize("b, k, hw, sigma", [(3, 17, (63, 65), 1.3), (2, 4, (16, 16), 2.0)])
def test_triton_matches_numpy_and_ref_on_odd_and_pow2_shapes(b, k, hw, sigma):
    kpts_BK2, vis_BK = _points(b, k, hw, seed=7 * k, margin=5.0)
    got = _check_triton(kpts_BK2, vis_BK, hw, sigma)
    assert got.amax() > 100                                            # real peaks, not an all-zero pass


def test_triton_rounds_exact_halves_away_from_zero():
    kpts_BK2 = torch.tensor([[[2.5, 1.5], [-0.5, 4.5], [0.5, -0.5], [6.5, 2.5]],
                             [[-1.5, 3.5], [3.5, 0.5], [9.5, 5.5], [4.5, 4.5]]])
    got = _check_triton(kpts_BK2, torch.ones(2, 4, dtype=torch.bool), (7, 10), 0.5, peak=1.0, truncate=2.0)
    assert set(torch.nonzero(got[0, 0, 2]).flatten().tolist()) == {2, 3, 4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_triton_reads_float64_and_half_keypoints(dtype):
    kpts_BK2, vis_BK = _points(2, 3, (11, 13), seed=4, dtype=dtype)
    if dtype == torch.float64:   # |k| + 0.5 rounds to 1.0 in float64: numpy's floor gives 1, so must the kernel
        kpts_BK2[0, 0] = torch.tensor([0.49999999999999994, 2.5000000000000004], dtype=dtype)
        vis_BK[0, 0] = True
    _check_triton(kpts_BK2, vis_BK, (11, 13), 1.4)


def test_triton_negative_and_outside_keypoints_light_their_window_inside():
    kpts_BK2 = torch.tensor([[[-3.0, 5.0], [-5.2, -4.9], [12.4, 3.3], [4.0, 14.6], [-30.0, 2.0], [1e30, -1e30]]])
    got = _check_triton(kpts_BK2, torch.ones(1, 6, dtype=torch.bool), (11, 9), 2.0, peak=1.0)
    assert got[0, 0, 5, 0].item() == pytest.approx(math.exp(-9.0 / 8.0), abs=1e-6)
    assert got[0, 0, 5, 4].item() == 0.0                                 # |4 - (-3)| = 7 > r = 6
    assert got[0, :4].flatten(1).amax(1).min() > 0 and not got[0, 4:].any()


def test_triton_invisible_and_nonfinite_keypoints_give_zero_maps():
    nan, inf = float("nan"), float("inf")
    kpts_BK2 = torch.tensor([[[4.0, 3.0], [nan, 3.0], [4.0, inf], [-inf, nan], [5.0, 5.0]]])
    vis_BK = torch.tensor([[False, True, True, True, True]])
    got = _check_triton(kpts_BK2, vis_BK, (9, 12), 1.5)
    assert not got[0, :4].any() and got[0, 4].amax() == pytest.approx(255.0)
    assert torch.isfinite(got).all()


def test_triton_per_keypoint_sigma_tensor():
    kpts_BK2, vis_BK = _points(2, 5, (17, 23), seed=3)
    sigma_BK = torch.tensor([[0.5, 1.0, 2.0, 1.5, 0.8], [3.0, 0.7, 1.2, 2.5, 1.0]])
    got = _check_triton(kpts_BK2, vis_BK, (17, 23), sigma_BK)
    one = render_heatmaps_ref(kpts_BK2[:, :1], vis_BK[:, :1], (17, 23), 0.5)
    torch.testing.assert_close(got[:1, :1], one[:1], rtol=1e-5, atol=1e-4 * 255)


@pytest.mark.parametrize("peak, truncate", [(1.0, 0.0), (1.0, 2.0), (100.0, 4.5), (255.0, 1.0)])
def test_triton_peak_and_truncate_are_configurable(peak, truncate):
    kpts_BK2, vis_BK = _points(2, 3, (12, 14), seed=int(truncate * 10), margin=2.0)
    got = _check_triton(kpts_BK2, vis_BK, (12, 14), 1.2, peak=peak, truncate=truncate)
    assert got.amax() <= peak
    if truncate == 0.0:                                                  # r = 0: the rounded pixel only
        assert int((got != 0).flatten(2).sum(-1).max()) <= 1


def test_triton_with_small_blocks_covers_rows_longer_than_one_block():
    dev = _triton_device()
    kpts_BK2, vis_BK = _points(2, 3, (13, 21), seed=11, margin=2.0)
    got = hr._launch_fwd(kpts_BK2.to(dev), vis_BK.to(dev), (13, 21), 1.7, 255.0, 3.0, torch.float32,
                         block_h=4, block_w=8).cpu()                     # grid 6 x 4 x 3
    _assert_maps(got, _numpy_maps(kpts_BK2, vis_BK, (13, 21), 1.7))
    with pytest.raises(ValueError, match="block_w"):
        hr._launch_fwd(kpts_BK2.to(dev), vis_BK.to(dev), (13, 21), 1.7, 255.0, 3.0, torch.float32, block_w=6)


def test_triton_single_keypoint_noncontiguous_and_empty_inputs():
    dev = _triton_device()
    _check_triton(torch.tensor([[[3.3, 2.8]]]), torch.ones(1, 1, dtype=torch.bool), (6, 5), 1.0)   # B = K = 1
    kpts_B2K = _points(2, 6, (10, 9), seed=5)[0].transpose(1, 2).contiguous()
    kpts_BK2, vis_BK = kpts_B2K.transpose(1, 2), torch.rand(6, 2, generator=torch.Generator().manual_seed(0)).T > 0.2
    assert not kpts_BK2.is_contiguous() and not vis_BK.is_contiguous()
    _check_triton(kpts_BK2, vis_BK, (10, 9), 1.1)
    empty = render_heatmaps(torch.zeros(2, 0, 2, device=dev), torch.zeros(2, 0, dtype=torch.bool, device=dev),
                            (5, 5), 1.0, impl="triton")
    assert empty.shape == (2, 0, 5, 5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_out_dtype_follows_the_bf16_rule(out_dtype):
    dev = _triton_device()
    kpts_BK2, vis_BK = _points(2, 4, (16, 16), seed=2)
    ref = render_heatmaps_ref(kpts_BK2, vis_BK, (16, 16), 2.0)
    got = render_heatmaps(kpts_BK2.to(dev), vis_BK.to(dev), (16, 16), 2.0, impl="triton", out_dtype=out_dtype)
    assert got.dtype == out_dtype
    fp32 = render_heatmaps(kpts_BK2.to(dev), vis_BK.to(dev), (16, 16), 2.0, impl="triton")
    assert torch.equal(got, fp32.to(out_dtype))                        # the fp32 values, rounded once (RNE)
    err_kernel = (got.cpu().float() - ref).abs().max()
    err_torch = (ref.to(out_dtype).float() - ref).abs().max()
    assert err_kernel <= 2 * err_torch + 1e-3, (err_kernel, err_torch)


def test_output_has_no_grad():
    kpts_BK2 = torch.tensor([[[3.2, 4.1]]], requires_grad=True)
    vis_BK = torch.ones(1, 1, dtype=torch.bool)
    assert not render_heatmaps_ref(kpts_BK2, vis_BK, (8, 8), 1.0).requires_grad
    assert not render_heatmaps(kpts_BK2, vis_BK, (8, 8), 1.0).requires_grad
    dev = _triton_device()
    assert not render_heatmaps(kpts_BK2.detach().to(dev).requires_grad_(), vis_BK.to(dev), (8, 8), 1.0,
                               impl="triton").requires_grad


# ---------------------------------------------------------------- dispatch, validation, byte count

def test_auto_on_cpu_tensors_uses_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(hr, "_launch_fwd", lambda *a, **kw: pytest.fail("auto picked Triton for CPU tensors"))
    monkeypatch.setattr(hr, "render_heatmaps_ref", lambda *a, **kw: calls.append(a) or render_heatmaps_ref(*a, **kw))
    kpts_BK2, vis_BK = _points(1, 2, (6, 7), seed=0)
    out = render_heatmaps(kpts_BK2, vis_BK, (6, 7), 1.0, out_dtype=torch.bfloat16)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, render_heatmaps_ref(kpts_BK2, vis_BK, (6, 7), 1.0).to(torch.bfloat16))


def test_env_var_forces_either_path_and_bogus_impl_raises(monkeypatch):
    dev = _triton_device()
    launches = []
    real = hr._launch_fwd
    monkeypatch.setattr(hr, "_launch_fwd", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    kpts_BK2, vis_BK = _points(1, 2, (6, 7), seed=1)
    kpts_BK2, vis_BK = kpts_BK2.to(dev), vis_BK.to(dev)
    monkeypatch.setenv(ENV_VAR, "triton")
    _assert_maps(render_heatmaps(kpts_BK2, vis_BK, (6, 7), 1.0), render_heatmaps_ref(kpts_BK2, vis_BK, (6, 7), 1.0))
    assert launches == [1]
    monkeypatch.setenv(ENV_VAR, "ref")
    render_heatmaps(kpts_BK2, vis_BK, (6, 7), 1.0)
    assert launches == [1]
    with pytest.raises(ValueError, match="impl"):
        render_heatmaps(kpts_BK2, vis_BK, (6, 7), 1.0, impl="bogus")


@pytest.mark.parametrize("bad, match", [
    (dict(kpts_px_BK2=torch.zeros(2, 3)), "kpts_px_BK2"),
    (dict(kpts_px_BK2=torch.zeros(2, 3, 2, dtype=torch.int64)), "kpts_px_BK2"),
    (dict(visible_BK=torch.ones(2, 4, dtype=torch.bool)), "visible_BK"),
    (dict(hw=(8,)), "hw"), (dict(hw=(0, 8)), "hw"), (dict(hw=(8.0, 8)), "hw"),
    (dict(sigma=0.0), "sigma"), (dict(sigma=float("nan")), "sigma"), (dict(sigma=float("inf")), "sigma"),
    (dict(sigma=torch.ones(3, 2)), "sigma"), (dict(sigma=torch.tensor([[1.0, 0.0, 1.0]] * 2)), "sigma"),
    (dict(peak=float("nan")), "peak"), (dict(truncate=-1.0), "truncate"),
    (dict(out_dtype=torch.float64), "out_dtype"),
])
def test_bad_arguments_raise_value_errors_naming_them(bad, match):
    args = dict(kpts_px_BK2=torch.zeros(2, 3, 2), visible_BK=torch.ones(2, 3, dtype=torch.bool), hw=(8, 8),
                sigma=1.0, peak=255.0, truncate=3.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        render_heatmaps(**args, impl="ref")
    if "out_dtype" not in bad:
        with pytest.raises(ValueError, match=match):
            render_heatmaps_ref(**args)


def test_bytes_count_the_written_maps_and_the_inputs_once():
    f32 = render_heatmaps_bytes(8, 17, 384, 512, torch.float32)
    bf16 = render_heatmaps_bytes(8, 17, 384, 512, torch.bfloat16)
    assert f32["fwd"] == 8 * 17 * 384 * 512 * 4 + 8 * 17 * 9 == f32["fwd_bwd"]
    assert bf16["fwd"] == 8 * 17 * 384 * 512 * 2 + 8 * 17 * 9


# ---------------------------------------------------------------- GPU: realistic sizes, compiled kernel

def _gpu_points(k, hw, sigma, seed):
    kpts_BK2, vis_BK = _points(8, k, hw, seed=seed, margin=3 * sigma + 2)
    kpts_BK2[0, 0], kpts_BK2[1, 0] = torch.tensor([10.5, -2.5]), torch.tensor([float("nan"), 3.0])
    kpts_BK2[2, 0] = torch.tensor([hw[1] - 0.5, hw[0] + 1.5])
    vis_BK[:3, 0] = True
    return kpts_BK2.cuda(), vis_BK.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("sigma", [2.0, 7.0])
@pytest.mark.parametrize("hw", [(64, 64), (384, 512)], ids=["64x64", "384x512"])
@pytest.mark.parametrize("k", [6, 17])
def test_gpu_sweep_fp32_matches_ref_and_bf16_follows_the_rule(monkeypatch, k, hw, sigma):
    launches = []
    real = hr._launch_fwd
    monkeypatch.setattr(hr, "_launch_fwd", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    kpts_BK2, vis_BK = _gpu_points(k, hw, sigma, seed=k + hw[0])
    ref = render_heatmaps_ref(kpts_BK2, vis_BK, hw, sigma)
    got = render_heatmaps(kpts_BK2, vis_BK, hw, sigma)                  # auto on CUDA -> Triton
    assert launches == [1] and got.is_cuda and got.is_contiguous()
    _assert_maps(got, ref)
    _assert_maps(got[:2].cpu(), _numpy_maps(kpts_BK2[:2], vis_BK[:2], hw, sigma))
    got_bf16 = render_heatmaps(kpts_BK2, vis_BK, hw, sigma, out_dtype=torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    err_kernel = (got_bf16.float() - ref).abs().max().item()
    err_torch = (ref.to(torch.bfloat16).float() - ref).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-3, (err_kernel, err_torch)


@pytest.mark.gpu
def test_gpu_per_keypoint_sigma_fp16_and_env_ref(monkeypatch):
    kpts_BK2, vis_BK = _gpu_points(17, (384, 512), 7.0, seed=5)
    sigma_BK = (torch.rand(8, 17, generator=torch.Generator().manual_seed(0)) * 6 + 1.5).cuda()
    ref = render_heatmaps_ref(kpts_BK2, vis_BK, (384, 512), sigma_BK)
    _assert_maps(render_heatmaps(kpts_BK2, vis_BK, (384, 512), sigma_BK), ref)
    got16 = render_heatmaps(kpts_BK2, vis_BK, (384, 512), sigma_BK, out_dtype=torch.float16)
    err_kernel = (got16.float() - ref).abs().max().item()
    assert err_kernel <= 2 * (ref.half().float() - ref).abs().max().item() + 1e-3
    monkeypatch.setattr(hr, "_launch_fwd", lambda *a, **kw: pytest.fail("MEDPOSE_KERNELS=ref launched Triton"))
    monkeypatch.setenv(ENV_VAR, "ref")
    _assert_maps(render_heatmaps(kpts_BK2, vis_BK, (384, 512), sigma_BK), ref)
