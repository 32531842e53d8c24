import math

import pytest
import torch
from torch import nn

from models import MODELS, build_multihipposenet, count_parameters
from models.me_gct import gct_gate
from models.mt_galm import MTGALM, _drop_negligible_edges, channel_adjacency, embedding_nodes
from models.resnet_gn import ResNetGN, num_groups_for

TINY = dict(expert_depth=18, width=8, num_experts=2, gn_groups=4)


@pytest.fixture(scope="module")
def published():
    # 3 x ResNet-50-GN experts, width 64, shared fusion (the released code), weight-free MT-GALM
    return MODELS["multihipposenet"](fusion="shared", galm="weightfree").eval()


def test_published_configuration_parameter_count_and_output_shapes(published):
    # We get 128.165 M (experts 70.52 M + fusion 16.77 M + 2 decoders 40.85 M + graph embeddings 0.02 M);
    # published: 128.24 M. Shapes on a small input here (they scale); the 384x512 check is the slow test below.
    n = count_parameters(published)
    assert abs(n - 128.24e6) / 128.24e6 < 0.01, n
    assert sum(count_parameters(e) for e in published.experts) == pytest.approx(3 * 23.508e6, rel=1e-3)
    with torch.no_grad():
        out = published(torch.randn(1, 3, 64, 96))
    assert out["seg_logits_BCHW"].shape == (1, 8, 64, 96) and out["heatmap_BKHW"].shape == (1, 6, 64, 96)
    assert torch.isfinite(out["seg_logits_BCHW"]).all() and torch.isfinite(out["heatmap_BKHW"]).all()


@pytest.mark.slow
def test_published_configuration_full_resolution_forward(published):
    # ~6 s on one CPU core
    with torch.no_grad():
        out = published(torch.randn(1, 3, 384, 512))
    assert out["seg_logits_BCHW"].shape == (1, 8, 384, 512) and out["heatmap_BKHW"].shape == (1, 6, 384, 512)
    assert torch.isfinite(out["heatmap_BKHW"]).all()


def test_expert_pyramid_channels_and_strides():
    x = torch.randn(1, 3, 64, 96)
    feats = ResNetGN(50, width=8, gn_groups=4)(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 48), (32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
    assert ResNetGN(34, width=8).out_channels == [8, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="expert_depth=101"):
        ResNetGN(101)


def test_group_count_is_largest_divisor_not_above_limit():
    assert [num_groups_for(c, 32) for c in (64, 24, 48, 96, 7, 2048)] == [32, 24, 24, 32, 7, 32]
    assert num_groups_for(6, 4) == 3 and num_groups_for(5, 4) == 1


def test_gct_gate_hand_computed_and_identity_at_init():
    x = torch.tensor([[[[1.0, 2.0]], [[2.0, 2.0]]]])                 # (1, 2, 1, 2)
    alpha = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    gamma = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
    beta = torch.tensor([0.1, -0.2]).view(1, 2, 1, 1)
    eps = 1e-5
    emb = [1.0 * math.sqrt(5 + eps), 2.0 * math.sqrt(8 + eps)]
    norm_den = math.sqrt((emb[0] ** 2 + emb[1] ** 2) / 2 + eps)
    gate = [1 + math.tanh(emb[0] * 0.5 / norm_den + 0.1), 1 + math.tanh(emb[1] * 1.0 / norm_den - 0.2)]
    expected = torch.tensor([[[[gate[0], 2 * gate[0]]], [[2 * gate[1], 2 * gate[1]]]]])
    assert torch.allclose(gct_gate(x, alpha, gamma, beta, eps), expected, rtol=1e-6)
    y = torch.randn(2, 5, 3, 4)
    ones, zeros = torch.ones(1, 5, 1, 1), torch.zeros(1, 5, 1, 1)
    assert torch.equal(gct_gate(y, ones, zeros, zeros), y)


def test_gct_gate_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)] + [
        torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64) for _ in range(3)]
    args = [a.requires_grad_() for a in args]
    assert gct_gate(*args).dtype == torch.float64
    assert torch.autograd.gradcheck(gct_gate, args)


def test_channel_adjacency_blocksum_softmax_by_hand():
    n1 = torch.tensor([[1.0], [0.0], [-1.0], [2.0]])                 # M = 4, d = 1
    n2 = torch.tensor([[1.0, 1.0, 0.5, -1.0]])
    # ReLU(N1 N2) = [[1,1,.5,0],[0,0,0,0],[0,0,0,1],[2,2,1,0]]; 2x2 block sums [[2, .5], [4, 2]]
    a = channel_adjacency(n1, n2, 2)
    expected = torch.softmax(torch.tensor([[2.0, 0.5], [4.0, 2.0]]), dim=1)
    assert torch.allclose(a, expected)
    assert torch.allclose(channel_adjacency(torch.randn(1024, 10), torch.randn(10, 1024), 64).sum(1), torch.ones(64))
    assert embedding_nodes([512, 256, 128, 64]) == 1024 and embedding_nodes([192, 96, 48, 24]) == 1152
    assert embedding_nodes([2048, 1024, 512, 256]) == 2048
    with pytest.raises(ValueError, match="do not divide"):
        channel_adjacency(n1, n2, 3)


def test_galm_weightfree_is_published_einsum_and_gcn_starts_as_row_propagation():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 3, 5) for _ in range(3)]
    wf = MTGALM([16, 8], num_tasks=2, mode="weightfree", embed_dim=4)
    a = wf.adjacencies()[1]
    assert a.shape == (8, 8)
    got = wf.gain(0, 1, feats[:2], a)
    assert torch.allclose(got, torch.einsum("bchw,cd->bdhw", feats[1], a), atol=1e-6)
    gcn = MTGALM([16, 8], num_tasks=3, mode="gcn", embed_dim=4)
    a3 = gcn.adjacencies()[1]
    mean_others = (feats[0] + feats[2]) / 2                              # task 1's others: 0 and 2
    assert torch.allclose(gcn.gain(1, 1, feats, a3), torch.einsum("dc,bchw->bdhw", a3, mean_others), atol=1e-5)
    with torch.no_grad():                                                # Theta picks task 2 only, bias 0.5
        gcn.graph_convs[1][1].lin.weight.copy_(torch.tensor([[0.0, 1.0]]))
        gcn.graph_convs[1][1].bias.fill_(0.5)
    assert torch.allclose(gcn.gain(1, 1, feats, a3), torch.einsum("dc,bchw->bdhw", a3, feats[2]) + 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        MTGALM([8], num_tasks=1)


def test_negligible_adjacency_entries_are_dropped_and_others_kept():
    a = torch.tensor([[0.5, 1e-39, 0.5 - 1e-39], [1e-13, 1e-45, 1.0 - 2e-13], [3e-13, 1e-3, 1.0 - 1e-3]])
    dropped = _drop_negligible_edges(a)                  # float32 threshold: 1e-6 * eps = 1.19e-13
    assert dropped[0, 1].item() == 0.0 and dropped[1, 0].item() == 0.0 and dropped[1, 1].item() == 0.0
    assert dropped[2, 0].item() == pytest.approx(3e-13) and torch.equal(dropped[:, 2], a[:, 2])
    assert torch.equal(dropped[2], a[2]) and torch.equal(dropped[0, 0], a[0, 0])


@pytest.mark.parametrize("galm,fusion", [("gcn", "per_task"), ("weightfree", "shared"), ("none", "per_task")])
def test_small_model_shapes_and_every_parameter_gets_a_gradient(galm, fusion):
    torch.manual_seed(0)
    model = build_multihipposenet(num_classes=5, num_keypoints=3, galm=galm, fusion=fusion, **TINY)
    out = model(torch.randn(2, 3, 64, 96))
    assert out["seg_logits_BCHW"].shape == (2, 5, 64, 96) and out["heatmap_BKHW"].shape == (2, 3, 64, 96)
    (out["seg_logits_BCHW"].square().mean() + out["heatmap_BKHW"].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert len(model.fusions) == (2 if fusion == "per_task" else 1)


def test_zero_gain_second_pass_equals_single_pass_and_gain_changes_both_tasks():
    torch.manual_seed(0)
    with_galm = build_multihipposenet(galm="gcn", **TINY).eval()
    without = build_multihipposenet(galm="none", **TINY).eval()
    missing, unexpected = without.load_state_dict(with_galm.state_dict(), strict=False)
    assert not missing and all(k.startswith("galm.") for k in unexpected)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        base = without(x)
        full = with_galm(x)
        for task_convs in with_galm.galm.graph_convs:
            for conv in task_convs:
                conv.lin.weight.zero_()
                conv.bias.zero_()
        zero_gain = with_galm(x)
    for key in base:
        assert torch.allclose(zero_gain[key], base[key], atol=1e-6)
        assert not torch.allclose(full[key], base[key], atol=1e-4)


def test_per_task_fusion_adds_one_fusion_set_and_width_scaling_works():
    per_task = build_multihipposenet(fusion="per_task", **TINY)
    shared = build_multihipposenet(fusion="shared", **TINY)
    assert count_parameters(per_task) - count_parameters(shared) == count_parameters(shared.fusions[0])
    odd = build_multihipposenet(expert_depth=18, width=24, num_experts=1, galm="gcn").eval()
    assert odd.galm.n1.shape == (1152, 10)
    with torch.no_grad():
        out = odd(torch.randn(1, 3, 32, 32))
    assert out["heatmap_BKHW"].shape == (1, 6, 32, 32)


def test_bad_inputs_and_arguments_give_clear_errors():
    model = build_multihipposenet(**TINY)
    with pytest.raises(ValueError, match=r"models/multihipposenet.py: input H, W = \(48, 60\)"):
        model(torch.randn(1, 3, 48, 60))
    with pytest.raises(ValueError, match="expected image_BCHW"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="fusion='both'"):
        build_multihipposenet(fusion="both", **TINY)
    with pytest.raises(ValueError, match="galm='dense'"):
        build_multihipposenet(galm="dense", **TINY)


def test_count_parameters_counts_shared_tensors_once():
    lin = nn.Linear(3, 4)
    assert count_parameters(lin) == 16 and count_parameters(nn.Sequential(lin, lin)) == 16


def test_decoder_groupnorm_option_adds_exactly_the_norm_parameters_and_keeps_features_alive():
    kw = dict(expert_depth=18, width=8, num_experts=2, gn_groups=4, galm="none")
    plain = build_multihipposenet(**kw)
    normed = build_multihipposenet(decoder_norm="gn", **kw)
    w = 8  # decoder width tied to width: blocks 8w, 4w, 2w, w (two GN each) + final pair (two GN of w), per task
    assert count_parameters(normed) - count_parameters(plain) == 2 * (2 * 2 * (8 + 4 + 2 + 1) * w + 2 * 2 * w)
    captured = {}
    normed.decoders[1].head.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    torch.manual_seed(0)
    normed(torch.rand(1, 3, 64, 96))
    # after GroupNorm + ReLU roughly half of the activations are positive in every group, not a dead map
    alive = (captured["x"] > 0).float().mean().item()
    assert 0.3 < alive < 0.7
    with pytest.raises(ValueError, match="decoder_norm"):
        build_multihipposenet(decoder_norm="bn", **kw)
