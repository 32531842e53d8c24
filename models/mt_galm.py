"""MT-GALM: multi-task graph adaptive learning over decoder channels (MultiHipPoseNet,
docs/systems/hip_us_multihipposenet.md).

Graph. The nodes are the C channels of one decoder level. The adjacency is learned from node embeddings
N1 (M x d) and N2 (d x M), randn init, as in Graph WaveNet (Wu et al., IJCAI 2019):
    A = softmax_rows(blocksum_s(ReLU(N1 @ N2))),  s = M / C,
where blocksum_s sums each s x s block, pooling M embedding nodes into the C channel nodes; every row of A sums to 1.
One embedding pair serves all four levels (published: M = 1024, d = 10, levels C = 512/256/128/64, s = 2/4/8/16).
With a width multiplier C need not divide 1024 (width 24: C = 192/96/48/24), so M is the smallest multiple of the
largest level's channel count that is >= 1024: levels are dec_width x (8, 4, 2, 1), so every level divides M
(width 24: M = 1152, s = 6/12/24/48); at the published width M = 1024 exactly.

Information gain. Pass 1 runs every task's decoder and keeps its level features F_t (B, C, H, W). Pass 2 re-runs task
t's decoder and adds, at every level, a gain feature computed from the other tasks' F_o through the channel graph:
  * galm="weightfree" (published): g_t = mean_{o != t} einsum('bchw,cd->bdhw', F_o, A); for two tasks the mean is
    the single other task, exactly the published form. Because the map is linear, the mean is taken first and one
    einsum (one GEMM) is run.
  * galm="gcn" (engine default): a torch-geometric DenseGCNConv per (task, level). Each pixel (b, h, w) is one graph
    over the C channel nodes; node c's feature vector is (F_o[b, c, h, w] for the S = T-1 other tasks), so
    X is (B*H*W, C, S) and the layer computes out = A_hat @ X @ Theta + bias with Theta (S x 1). A is passed as the
    dense adjacency without added self-loops: it is row-stochastic, so DenseGCNConv's D^-1/2 A D^-1/2 leaves it
    unchanged (every degree is 1) and node d receives the A[d, c]-weighted mean of its neighbours (random-walk GCN).
    Theta starts at 1/S and the bias at 0, so the layer starts as the mean over the other tasks and learns how much
    each of them gives. Efficiency: the B*H*W graphs share one adjacency, and DenseGCNConv's matmul broadcasts the
    (1, C, C) adjacency over the pixel batch without copying it, i.e. one batched GEMM of C x C by C x S per pixel;
    nothing of size B*H*W*C*C nor an edge list is ever built. Note the published einsum propagates along columns of A
    (A^T), the GCN along rows; both are learned graphs and the weight-free form stays faithful.
  * galm="none": no pass 2 (ablation).
Cost: ReLU(N1 @ N2) is formed once per forward and block-summed per level; A's negligible entries are zeroed before
the propagation (see _drop_negligible_edges). With the published randn init the block sums are in the hundreds, so A is
nearly one-hot per row at init (a soft channel permutation). Measured on 2 CPU cores (ResNet-18 experts, width 16,
128x160, batch 4): pass 2 adds ~40 % to a training step (mostly the re-run up blocks); "gcn" costs 2-5 % more than
"weightfree".
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.nn import DenseGCNConv

GALM_MODES = ("gcn", "weightfree", "none")


def embedding_nodes(level_channels: list[int], base: int = 1024) -> int:
    """M: the smallest multiple of every level's channel count that is >= base (see module docstring)."""
    lcm = 1
    for c in level_channels:
        lcm = lcm * c // math.gcd(lcm, c)
    return lcm * max(1, math.ceil(base / lcm))


def channel_adjacency(n1_Md: torch.Tensor, n2_dM: torch.Tensor, channels: int) -> torch.Tensor:
    """A (C x C) = softmax_rows(blocksum_{M/C}(ReLU(N1 @ N2)))."""
    return block_adjacency(torch.relu(n1_Md @ n2_dM), channels)


def block_adjacency(full_MM: torch.Tensor, channels: int) -> torch.Tensor:
    """softmax_rows(blocksum_{M/C}(full)); the block sum is two contiguous reductions (columns, then rows), which
    is several times faster on CPU than one reduction over two strided axes."""
    m = full_MM.shape[0]
    if m % channels:
        raise ValueError(f"models/mt_galm.py: {channels} channels do not divide the {m} embedding nodes")
    s = m // channels
    blocks_CC = full_MM.reshape(m, channels, s).sum(dim=2).view(channels, s, channels).sum(dim=1)
    return torch.softmax(blocks_CC, dim=1)


class MTGALM(nn.Module):
    """Learned channel graphs for the decoder levels and the per-task information-gain features."""

    def __init__(self, level_channels: list[int], num_tasks: int = 2, mode: str = "gcn", embed_dim: int = 10):
        super().__init__()
        if mode not in ("gcn", "weightfree"):
            raise ValueError(f"models/mt_galm.py: mode '{mode}' is not one of ('gcn', 'weightfree')")
        if num_tasks < 2:
            raise ValueError(f"models/mt_galm.py: MT-GALM needs at least 2 tasks, got {num_tasks}")
        if embed_dim < 1:
            raise ValueError(f"models/mt_galm.py: galm_embed_dim={embed_dim} must be >= 1")
        self.level_channels = list(level_channels)
        self.num_tasks = num_tasks
        self.mode = mode
        m = embedding_nodes(self.level_channels)
        self.n1 = nn.Parameter(torch.randn(m, embed_dim))
        self.n2 = nn.Parameter(torch.randn(embed_dim, m))
        if mode == "gcn":
            others = num_tasks - 1
            self.graph_convs = nn.ModuleList(
                nn.ModuleList(_mean_init_gcn(others) for _ in self.level_channels) for _ in range(num_tasks))

    def adjacencies(self) -> list[torch.Tensor]:
        """One (C x C) adjacency per decoder level, computed once per forward and shared by all tasks and pixels."""
        full_MM = torch.relu(self.n1 @ self.n2)             # shared by the levels: one M x d x M product
        return [block_adjacency(full_MM, c) for c in self.level_channels]

    def gain(self, task: int, level: int, feats_by_task: list[torch.Tensor], adj_CC: torch.Tensor) -> torch.Tensor:
        """Information-gain feature for `task` at `level` from the other tasks' (B, C, H, W) features."""
        if len(feats_by_task) != self.num_tasks:
            raise ValueError(f"models/mt_galm.py: expected {self.num_tasks} task features, got {len(feats_by_task)}")
        others = [f for o, f in enumerate(feats_by_task) if o != task]
        adj_CC = _drop_negligible_edges(adj_CC.to(others[0].dtype))
        if self.mode == "weightfree":
            mean_BCHW = others[0] if len(others) == 1 else torch.stack(others).mean(dim=0)
            return torch.einsum("bchw,cd->bdhw", mean_BCHW, adj_CC)
        b, c, h, w = others[0].shape
        x_PCS = torch.stack(others, dim=-1).permute(0, 2, 3, 1, 4).reshape(b * h * w, c, len(others))
        out_PC1 = self.graph_convs[task][level](x_PCS, adj_CC, add_loop=False)
        return out_PC1.view(b, h, w, c).permute(0, 3, 1, 2)


def _drop_negligible_edges(adj_CC: torch.Tensor) -> torch.Tensor:
    """Zero the entries of A below max(tiny, 1e-6 eps) of its dtype (float32: 1.2e-13). The block sums are large
    (hundreds at init), so the row softmax is nearly one-hot and most entries of the fine levels underflow to tiny
    or subnormal values; products of those with features and gradients are subnormal, which x86 CPUs process
    10-20x slower (the whole backward of the decoder slowed down). Dropping them changes each propagated value by
    < C * 1.2e-13 relative, far below float32 resolution."""
    info = torch.finfo(adj_CC.dtype)
    return adj_CC.masked_fill(adj_CC < max(info.tiny, info.eps * 1e-6), 0.0)


def _mean_init_gcn(num_inputs: int) -> DenseGCNConv:
    conv = DenseGCNConv(num_inputs, 1, bias=True)
    with torch.no_grad():
        conv.lin.weight.fill_(1.0 / num_inputs)
        conv.bias.zero_()
    return conv
