"""Run under torchrun (2 ranks): each rank takes its half of a fixed global batch, does forward/backward through
DDPStrategy, and rank 0 saves the synchronised gradients. Also usable with world size 1 (the reference).
argv: OUT_PATH GRAD_ACCUM [toy|hip]; the loss is a per-element MSE mean, so the mean over equal halves is the
full-batch loss and the gradients must agree."""
import sys

import torch
from torch import nn

from engine.dist import read_dist_info
from engine.strategies import build_strategy


def make_model(kind: str):
    torch.manual_seed(0)
    if kind == "hip":  # the real network: GN experts, ME-GCT, two decoders, MT-GALM graph layer (two passes)
        from models import MODELS
        net = MODELS["multihipposenet"](expert_depth=18, width=8, num_experts=2, gn_groups=4, decoder_norm="gn")
        return _Concat(net)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))


class _Concat(nn.Module):
    """forward -> one tensor (seg logits and heatmaps stacked on channels) so one MSE covers both heads."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return torch.cat([out["seg_logits_BCHW"], out["heatmap_BKHW"]], dim=1)


def global_batch(kind: str):
    g = torch.Generator().manual_seed(123)
    if kind == "hip":
        return torch.rand(8, 3, 64, 96, generator=g), torch.randn(8, 14, 64, 96, generator=g)
    return torch.randn(8, 3, 12, 10, generator=g), torch.randn(8, 2, 12, 10, generator=g)


def main(out_path: str, grad_accum: int, kind: str) -> None:
    info = read_dist_info()
    strategy = build_strategy("auto", info, grad_accum=grad_accum)
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, _ = strategy.setup(model, opt, None)
    x, y = global_batch(kind)
    shard = slice(info.rank * 8 // info.world_size, (info.rank + 1) * 8 // info.world_size)
    xs, ys = x[shard], y[shard]
    micro = len(xs) // grad_accum
    for i in range(grad_accum):
        with strategy.accumulate(is_boundary=(i == grad_accum - 1)):
            out = model(xs[i * micro:(i + 1) * micro])
            strategy.backward(((out - ys[i * micro:(i + 1) * micro]) ** 2).mean())
    grads = {n: p.grad.detach().clone() for n, p in strategy.unwrap().named_parameters()}
    summed = strategy.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    if info.is_main:
        torch.save({"grads": grads, "rank_sum": float(summed)}, out_path)
    strategy.barrier()
    strategy.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "toy")
