"""The Triton ops inside the models and losses: a MultiHipPoseNet training step gives the same loss and gradients
with the kernels as with their torch references (MEDPOSE_KERNELS forces either path), the heatmap losses render their
targets on the device when the loader did not, and the codecs decode with the soft-argmax op.

On CPU the Triton path runs in the interpreter (TRITON_INTERPRET=1, tests/conftest.py) on a tiny model; the `gpu`
tests repeat the step on CUDA at a realistic width.
"""
import numpy as np
import pytest
import torch

from data_pipelines.heatmaps import render_heatmaps_numba
from models import build_criterion
from models.codecs import decode_heatmaps, render_heatmaps_torch, softargmax_decode, target_heatmaps
from models.hourglass import StackedHeatmapLoss
from models.multihipposenet import build_multihipposenet

TINY = dict(expert_depth=18, width=4, num_experts=2, gn_groups=2, decoder_norm="gn")


def _batch(b, hw, k=6, classes=8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, *hw, generator=g)
    mask = torch.randint(0, classes, (b, *hw), generator=g)
    kpts = torch.rand(b, k, 2, generator=g) * torch.tensor([hw[1] - 1.0, hw[0] - 1.0])
    vis = torch.rand(b, k, generator=g) > 0.2
    targets = {"mask_BHW": mask, "kpts_px_BK2": kpts, "kpts_visible_BK": vis}
    return image.to(device), {key: v.to(device) for key, v in targets.items()}


def _step(impl, monkeypatch, model_args, hw, device, b=2):
    """One forward + backward of MultiHipPoseNet with every kernel forced to `impl`; targets rendered by the loss."""
    monkeypatch.setenv("MEDPOSE_KERNELS", impl)
    torch.manual_seed(0)
    model = build_multihipposenet(galm="gcn", **model_args).to(device)
    criterion = build_criterion("multihipposenet", balance="fixed", sigma_px=2.0, heatmap_peak=255.0)
    image, targets = _batch(b, hw, device=device)
    out = criterion(model(image), targets)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _compare_steps(monkeypatch, model_args, hw, device, rtol, atol):
    # full fp32 convolutions and GEMMs on both paths: TF32 (cuDNN's default for convs) would differ between the
    # reference's conv and the fused path's GEMM by ~1e-3 and hide what this test compares
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ref_out, ref_grads = _step("ref", monkeypatch, model_args, hw, device)
            tri_out, tri_grads = _step("triton", monkeypatch, model_args, hw, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul
    for key in ("loss", "loss_seg", "loss_kpt"):
        torch.testing.assert_close(tri_out[key], ref_out[key], rtol=rtol, atol=atol, msg=key)
    assert ref_grads.keys() == tri_grads.keys()
    gate_grads = [n for n in ref_grads if n.endswith((".alpha", ".gamma", ".beta"))]
    assert gate_grads, "the model has no GCT gate parameters"
    for name in ref_grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        err = (tri_grads[name] - ref_grads[name]).abs().max() / scale
        assert err < rtol * 50, f"{name}: relative gradient error {float(err):.2e}"


def test_multihipposenet_training_step_same_loss_with_triton_as_with_references(monkeypatch):
    _compare_steps(monkeypatch, TINY, (32, 32), "cpu", rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_multihipposenet_training_step_same_loss_with_triton_as_with_references_on_gpu(monkeypatch):
    _compare_steps(monkeypatch, dict(expert_depth=18, width=16, num_experts=3, decoder_norm="gn"), (128, 160),
                   "cuda", rtol=1e-3, atol=1e-4)


def test_me_gct_gate_is_the_kernel_and_the_fused_path_equals_gate_then_conv(monkeypatch):
    monkeypatch.setenv("MEDPOSE_KERNELS", "ref")
    from models.me_gct import MEGCT
    torch.manual_seed(0)
    fused, plain = MEGCT(2, 8, gn_groups=2, fused=True), MEGCT(2, 8, gn_groups=2, fused=False)
    with torch.no_grad():
        fused.gate.gamma.uniform_(0.5, 1.5)
        fused.gate.beta.uniform_(-0.5, 0.5)
    plain.load_state_dict(fused.state_dict())
    feats = [torch.randn(2, 8, 6, 7) for _ in range(2)]
    torch.testing.assert_close(fused(feats), plain(feats), rtol=1e-5, atol=1e-5)
    # the gate changes the output once gamma != 0: compare with the ungated conv
    with torch.no_grad():
        ungated = plain.fuse(torch.cat(feats, 1))
    assert (ungated - plain(feats)).abs().max() > 1e-3


def test_losses_render_targets_on_the_device_when_the_loader_did_not():
    """data.targets=device: the batch has no heatmap_BKHW; the losses render the same values the loader would."""
    _, targets = _batch(2, (24, 30), k=4)
    loader_hm = np.stack([render_heatmaps_numba(targets["kpts_px_BK2"][i].numpy(),
                                                targets["kpts_visible_BK"][i].numpy(), (24, 30), 2.0, 255.0)
                          for i in range(2)])
    heat = torch.zeros(2, 4, 24, 30)
    rendered = target_heatmaps(targets, heat, 2.0, 255.0, "test")
    torch.testing.assert_close(rendered, torch.from_numpy(loader_hm), rtol=1e-5, atol=1e-3)
    crit = StackedHeatmapLoss(sigma_px=2.0, heatmap_peak=255.0)
    with_loader = crit({"heatmap_BKHW": heat}, {**targets, "heatmap_BKHW": torch.from_numpy(loader_hm)})
    on_device = crit({"heatmap_BKHW": heat}, targets)
    torch.testing.assert_close(on_device["loss"], with_loader["loss"], rtol=1e-5, atol=1e-3)
    assert on_device["loss"] > 1.0                                     # a zero prediction is far from the targets
    with pytest.raises(KeyError, match="no sigma_px"):
        StackedHeatmapLoss()({"heatmap_BKHW": heat}, targets)


def test_half_pixel_keypoints_round_away_from_zero_like_the_loader():
    kpts = torch.tensor([[[2.5, 3.5], [-0.5, 1.5]]])
    vis = torch.ones(1, 2, dtype=torch.bool)
    torch_hm = render_heatmaps_torch(kpts, vis, (9, 9), 1.0, 255.0, truncate=1.0)
    loader_hm = render_heatmaps_numba(kpts[0].numpy(), vis[0].numpy(), (9, 9), 1.0, 255.0, truncate=1.0)
    torch.testing.assert_close(torch_hm[0], torch.from_numpy(loader_hm), rtol=1e-6, atol=1e-4)
    # x = 2.5 rounds to 3: the window is x in [2, 4], so column 4 is lit and column 1 is not
    assert torch_hm[0, 0, 4, 4] > 0 and torch_hm[0, 0, 4, 1] == 0


def test_codecs_soft_argmax_decode_finds_rendered_peaks():
    kpts = torch.tensor([[[10.3, 7.6], [3.0, 12.2]]])
    hm = render_heatmaps_torch(kpts, torch.ones(1, 2, dtype=torch.bool), (16, 20), 1.5, 255.0)
    xy = softargmax_decode(hm, beta=20.0 / 255.0)
    # the zero background keeps a little weight (exp(0) against exp(20) at the peak): a pull of < 0.2 px to the centre
    torch.testing.assert_close(xy, kpts, atol=0.2, rtol=0)
    p_BKN = torch.softmax(hm.double().flatten(2) * 20.0 / 255.0, dim=-1)
    xs, ys = torch.arange(20.0).repeat(16).double(), torch.arange(16.0).repeat_interleave(20).double()
    expected = torch.stack([(p_BKN * xs).sum(-1), (p_BKN * ys).sum(-1)], dim=-1).float()
    torch.testing.assert_close(xy, expected, atol=1e-4, rtol=0)
    xy2, score = decode_heatmaps(hm, "softargmax", peak=255.0)
    torch.testing.assert_close(xy2, xy)
    assert score.min() > 0.9


def test_fused_gate_conv_follows_autocast_like_the_plain_conv():
    """Under bf16 autocast the fused path convolves in bf16 exactly where the reference's conv would, and its
    gradients stay within bf16 rounding of the reference's."""
    from kernels.gct_gate import gct_gate_conv1x1
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    params = [(torch.rand(1, 8, 1, 1) + 0.5).requires_grad_() for _ in range(3)]
    weight = torch.randn(3, 8, 1, 1, requires_grad=True)
    results = {}
    for impl in ("ref", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gct_gate_conv1x1(x, *params, weight, impl=impl, route="fused")
        grads = torch.autograd.grad(out.float().pow(2).sum(), [x, *params, weight])
        results[impl] = (out, grads)
    (out_r, grads_r), (out_t, grads_t) = results["ref"], results["triton"]
    assert out_r.dtype == out_t.dtype == torch.bfloat16
    # bf16 rounds x * g (reference) or W * g (fused) before the conv: ~2^-8 relative per term
    assert (out_t.float() - out_r.float()).abs().max() <= 2e-2 * out_r.float().abs().max()
    for g_t, g_r in zip(grads_t, grads_r):
        assert g_t.dtype == g_r.dtype
        assert (g_t - g_r).abs().max() <= 3e-2 * g_r.abs().max()


def test_loader_skips_targets_when_the_device_renders_them():
    from engine.config import DataConfig
    from data_pipelines.heatmaps import heatmap_item, render_heatmaps
    from data_pipelines.build import loader_heatmap_impl
    assert loader_heatmap_impl(DataConfig(targets="device")) == "none"
    assert loader_heatmap_impl(DataConfig(targets="loader")) == "numba"
    assert loader_heatmap_impl(DataConfig(targets="auto")) == "numba"      # unresolved: the loader renders
    kpts, vis = np.array([[3.0, 4.0]]), np.array([True])
    assert render_heatmaps(kpts, vis, (8, 8), 1.0, impl="none") is None and heatmap_item(None) == {}
    item = heatmap_item(render_heatmaps(kpts, vis, (8, 8), 1.0, impl="numba"))
    assert item["heatmap_KHW"].shape == (1, 8, 8) and float(item["heatmap_KHW"][0, 4, 3]) == 255.0
