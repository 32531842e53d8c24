"""Run under torchrun (2 ranks, gloo, CPU): the same small Adam run under DeepSpeed ZeRO with and without CPU offload
(`dist.deepspeed.offload_optimizer`, `offload_params`), the strategy built from the run config the way engine/run.py
builds it (make_strategy) and driven the way engine/trainer.py drives it. Rank 0 writes, per run: the per-step loss
and grad norm, the output on a fixed probe input, the whole weights after the last step (gathered under ZeRO-3), and
whether DeepSpeed really offloaded.

argv: OUT_PATH CKPT_ROOT SCENARIO...; a scenario is NAME:STAGE:OFFLOAD_OPTIMIZER:OFFLOAD_PARAMS:STEPS[:save=N]
[:resume=N] (`save=N` saves at step N and at the end into CKPT_ROOT/NAME; `resume=N` starts from ckpt_stepN of
CKPT_ROOT/<NAME without its '_resume' suffix>)."""
import sys
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import checkpoint_path
from engine.config import load_config
from engine.dist import read_dist_info
from engine.run import make_strategy
from engine.strategies import build_strategy

PROBE_X = torch.randn(3, 3, 12, 10, generator=torch.Generator().manual_seed(7))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def rank_batch(rank: int):
    """The same batch at every step (so the loss must fall), a different half of it on each rank."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(4, 3, 12, 10, generator=g), torch.randn(4, 2, 12, 10, generator=g)
    return x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]


def whole_weights(strategy) -> dict[str, torch.Tensor]:
    module = strategy.engine.module
    if strategy.zero_stage == 3:                       # partitioned: gather them (collective)
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def run(info, spec: str, ckpt_root: Path) -> dict:
    name, stage, offload_optimizer, offload_params, steps, *flags = spec.split(":")
    steps = int(steps)
    cfg = load_config(None, ["dist.strategy=deepspeed", f"dist.deepspeed.zero_stage={stage}",
                             f"dist.deepspeed.offload_optimizer={offload_optimizer}",
                             f"dist.deepspeed.offload_params={offload_params}", "train.batch_size=2",
                             "train.precision=fp32", "optim.grad_clip=1.0"])
    strategy = make_strategy(cfg, info)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model, opt, _ = strategy.setup(model, opt, None)
    engine = strategy.engine
    offloaded = {"optimizer": bool(engine.zero_cpu_offload()),
                 "params": engine.zero_offload_param() is not None and str(engine.zero_offload_param().device)
                 .endswith("cpu")}
    save_at = next((int(f[5:]) for f in flags if f.startswith("save=")), None)
    resume_at = next((int(f[7:]) for f in flags if f.startswith("resume=")), None)
    step, losses, norms = 0, [], []
    if resume_at is not None:
        client = strategy.load(checkpoint_path(ckpt_root / name.removesuffix("_resume"), resume_at))
        step = int(client["step"])
        assert step == resume_at and client["data_pos"]["consumed"] == step, client
    x, y = rank_batch(info.rank)
    while step < steps:
        model.train()
        with strategy.accumulate(is_boundary=True):
            loss = ((model(x) - y) ** 2).mean()
            strategy.backward(loss)
        norms.append(strategy.step())
        losses.append(float(strategy.all_reduce_mean(loss.detach().double())))
        step += 1
        if save_at is not None and step in (save_at, steps):
            strategy.save(checkpoint_path(ckpt_root / name, step),     # the client state a trainer writes
                          {"step": step, "data_pos": {"epoch": 0, "consumed": step}, "world_size": info.world_size})
    model.eval()
    with torch.no_grad():
        probe = model(PROBE_X).detach().clone()        # every rank: ZeRO-3's forward gathers collectively
    state = whole_weights(strategy)
    strategy.close()
    return {"losses": losses, "norms": norms, "probe": probe, "state": state, "offloaded": offloaded,
            "ds_zero": strategy.ds_config["zero_optimization"]}


def main(out_path: str, ckpt_root: str, specs: list[str]) -> None:
    info = read_dist_info()
    owner = build_strategy("ddp", info)  # creates (and later destroys) the gloo process group
    results = {spec.split(":")[0]: run(info, spec, Path(ckpt_root)) for spec in specs}
    if info.is_main:
        torch.save(results, out_path)
    owner.barrier()
    owner.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
