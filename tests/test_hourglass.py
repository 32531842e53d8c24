import copy
import pytest
import torch
from torch import nn

from models.hourglass import (CRITERIA_HG, MODELS_HG, Hourglass, PreActBottleneck, StackedHeatmapLoss,
                              build_hourglass)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_published_parameter_counts():
    # published: 6.73 M without attention, 6.80 M with, 9.97 M with 3 stacks (2 stacks / 1 block / 11 discs)
    assert round(n_params(build_hourglass(attention=False)) / 1e6, 2) == 6.73
    assert round(n_params(build_hourglass()) / 1e6, 2) == 6.80
    assert round(n_params(build_hourglass(num_stacks=3)) / 1e6, 2) == 9.97
    # the exact figures our reading of the architecture gives (module docstring)
    assert n_params(build_hourglass(attention=False)) == 6_727_062
    # a 1-channel stem is 2 * 49 * 64 weights lighter, which would round to 6.72 M: the published input is 3-channel
    assert n_params(build_hourglass(attention=False, in_channels=1)) == 6_727_062 - 2 * 49 * 64


def test_bottleneck_hand_counted_and_identity_when_branch_is_zero():
    b = PreActBottleneck(256, 256)
    # BN(256) + 1x1 256->128 + BN(128) + 3x3 128->128 + BN(128) + 1x1 128->256, all convs biased, no projection
    assert n_params(b) == 512 + (256 * 128 + 128) + 256 + (128 * 128 * 9 + 128) + 256 + (128 * 256 + 256)
    nn.init.zeros_(b.conv3.weight), nn.init.zeros_(b.conv3.bias)
    x = torch.randn(2, 256, 4, 4)
    torch.testing.assert_close(b.eval()(x), x)   # pre-activation: the identity path is untouched
    p = PreActBottleneck(64, 128)
    assert isinstance(p.proj, nn.Conv2d) and p.proj.in_channels == 64 and p.proj.out_channels == 128


def test_hourglass_resolutions_and_odd_sizes():
    hg = Hourglass(8, depth=4, num_blocks=1).eval()
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
             for m in (hg.inner.inner.inner.inner,)]
    with torch.no_grad():
        out = hg(torch.randn(1, 8, 16, 16))
    assert sizes == [(1, 1)] and out.shape == (1, 8, 16, 16)     # 16 -> 8 -> 4 -> 2 -> 1 at depth 4
    for h in hooks:
        h.remove()
    with torch.no_grad():   # 18 -> 9 -> 4 -> 2 -> 1: the odd size is restored by size-based upsampling
        assert hg(torch.randn(1, 8, 18, 18)).shape == (1, 8, 18, 18)


def test_forward_outputs_and_attention_gates_the_last_stack():
    torch.manual_seed(0)
    model = build_hourglass(num_features=32, num_keypoints=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out["heatmaps_SBKHW"].shape == (2, 2, 5, 64, 64) and out["attention_B1hw"].shape == (2, 1, 16, 16)
    torch.testing.assert_close(out["heatmap_BKHW"], out["heatmaps_SBKHW"][-1])
    assert ((out["attention_B1hw"] > 0) & (out["attention_B1hw"] < 1)).all()
    # closing the gate (sigmoid(-100) ~ 0) leaves the last score conv's bias everywhere; stack 0 is unaffected
    nn.init.constant_(model.attention.net[-1].bias, -100.0)
    with torch.no_grad():
        closed = model(x)
    bias_K = model.scores[-1].bias
    torch.testing.assert_close(closed["heatmap_BKHW"], bias_K.view(1, 5, 1, 1).expand(2, 5, 64, 64))
    torch.testing.assert_close(closed["heatmaps_SBKHW"][0], out["heatmaps_SBKHW"][0])


def test_without_attention_has_no_map_and_odd_input_is_upsampled_to_input_size():
    model = build_hourglass(num_stacks=1, num_features=16, num_keypoints=3, in_channels=1, attention=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 72, 76))
    assert "attention_B1hw" not in out and out["heatmaps_SBKHW"].shape == (1, 1, 3, 72, 76)


def test_stacked_loss_hand_computed():
    pred = torch.zeros(2, 1, 2, 2, 2)
    pred[0], pred[1] = 1.0, 0.5
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0, 0] = 1.0
    target[0, 1] = 7.0                                   # invisible channel: ignored whatever its values
    vis = torch.tensor([[True, False]])
    out = StackedHeatmapLoss()({"heatmaps_SBKHW": pred, "heatmap_BKHW": pred[-1]},
                               {"heatmap_BKHW": target, "kpts_visible_BK": vis})
    # stack 0: 3 pixels of (1 - 0)^2 over 8 elements; stack 1: 4 pixels of 0.5^2 over 8
    assert out["loss_stack0"].item() == pytest.approx(0.5 * 3 / 8)
    assert out["loss_stack1"].item() == pytest.approx(0.5 * 1 / 8)
    assert out["loss"].item() == pytest.approx(0.25)


def test_loss_reaches_every_stack_and_registries():
    assert MODELS_HG["hourglass"] is build_hourglass and CRITERIA_HG["hourglass"] is StackedHeatmapLoss
    model = build_hourglass(num_stacks=3, num_features=16, num_keypoints=2)
    x = torch.randn(2, 3, 64, 64)
    targets = {"heatmap_BKHW": torch.rand(2, 2, 64, 64), "kpts_visible_BK": torch.ones(2, 2, dtype=torch.bool)}
    out = StackedHeatmapLoss()(model(x), targets)
    assert set(out) == {"loss", "loss_stack0", "loss_stack1", "loss_stack2"}
    torch.testing.assert_close(out["loss"].detach(), out["loss_stack0"] + out["loss_stack1"] + out["loss_stack2"])
    out["loss"].backward()
    for i in range(3):   # each stack's score conv receives gradient from its own supervision
        assert model.scores[i].weight.grad.abs().sum() > 0


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)          # kept alive so that no storage is freed and its address reused while counting
    del out
    return sum(seen.values())


def test_checkpointing_same_outputs_gradients_and_bn_statistics():
    torch.manual_seed(1)
    ref = build_hourglass(num_stacks=2, num_features=32, num_keypoints=4).train()
    ckpt = copy.deepcopy(ref)
    ckpt.checkpointing = True
    x = torch.randn(2, 3, 64, 64)
    targets = {"heatmap_BKHW": torch.rand(2, 4, 64, 64), "kpts_visible_BK": torch.ones(2, 4, dtype=torch.bool)}
    losses = []
    for m in (ref, ckpt):
        out = m(x)
        losses.append(StackedHeatmapLoss()(out, targets)["loss"])
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # BN running statistics moved once, not twice, although the backward re-ran every stack's forward
    for (name, b), c in zip(ref.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)
    assert ckpt.bodies[0].fc[1].num_batches_tracked.item() == 1
    assert all(m.momentum == 0.1 for m in ckpt.modules() if isinstance(m, nn.BatchNorm2d))


def test_checkpointing_stops_activation_memory_growing_with_stacks():
    # Bytes autograd saves in the forward (de-duplicated by storage): each extra stack adds its whole body's
    # activations without checkpointing, only its fc output and score with it (the stem is common to both).
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for s in (2, 4):
        for ck in (False, True):
            torch.manual_seed(0)
            saved[s, ck] = _saved_bytes(build_hourglass(num_stacks=s, num_features=64, checkpointing=ck), x)
    per_stack_ref = (saved[4, False] - saved[2, False]) / 2
    per_stack_ckpt = (saved[4, True] - saved[2, True]) / 2
    assert per_stack_ckpt < 0.2 * per_stack_ref, (per_stack_ckpt, per_stack_ref)
    assert saved[4, True] < 0.6 * saved[4, False]


def test_large_variant_builds_and_trains_a_step():
    # 8 stacks x 512 features (~100 M parameters), checkpointed, at 64x64: ~9 s on one core, so not marked slow
    torch.manual_seed(0)
    model = build_hourglass(num_stacks=8, num_features=512, num_keypoints=11, checkpointing=True).train()
    assert n_params(model) > 90e6
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64)       # batch 2: training BN needs > 1 value per channel at the 1x1 bottom
    targets = {"heatmap_BKHW": torch.rand(2, 11, 64, 64), "kpts_visible_BK": torch.ones(2, 11, dtype=torch.bool)}
    loss = StackedHeatmapLoss()(model(x), targets)["loss"]
    before = model.scores[0].weight.detach().clone()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.scores[0].weight)
