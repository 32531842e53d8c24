"""Run under torchrun (2 ranks): each rank takes its half of a fixed global batch, does forward/backward through
DDPStrategy, and rank 0 saves the synchronised gradients. Also usable with world size 1 (the reference)."""
import sys

import torch
from torch import nn

from engine.dist import read_dist_info
from engine.strategies import build_strategy


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def global_batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(8, 3, 12, 10, generator=g), torch.randn(8, 2, 12, 10, generator=g)


def main(out_path: str, grad_accum: int) -> None:
    info = read_dist_info()
    strategy = build_strategy("auto", info, grad_accum=grad_accum)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, _ = strategy.setup(model, opt, None)
    x, y = global_batch()
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
    main(sys.argv[1], int(sys.argv[2]))
