"""Run under torchrun (2 ranks, gloo, CPU): the same small training run under DDP and DeepSpeed ZeRO 0-3, driven
through the strategy interface the way engine/trainer.py drives it (accumulate → backward per micro-batch, step at
the boundary, collective save/load with the engine's client state). Rank 0 writes every run's per-step loss, grad
norm and the model's output on a fixed probe input to OUT_PATH.

argv: OUT_PATH CKPT_ROOT SCENARIO...; a scenario is NAME:STRATEGY:STAGE:ACCUM:STEPS[:save=N][:resume=N]
[:noconsolidate][:nan=S.I] (STRATEGY ddp|deepspeed; `save=N` saves at step N and at the end into CKPT_ROOT/NAME,
`latest` re-pointed after each; `resume=N` starts from ckpt_stepN in CKPT_ROOT/<NAME without its '_resume' suffix>;
`noconsolidate`: dist.deepspeed.consolidate_on_save=false; `nan=S.I`: micro-batch I of step S (0-based) has a
non-finite loss, handled as engine/trainer.py does).
`train JOB...` instead runs engine.run.train jobs (see train_jobs)."""
import sys
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint import checkpoint_path, update_latest
from engine.dist import read_dist_info
from engine.strategies import build_strategy

MICRO = 4  # global micro-batch: 2 samples per rank
PROBE = torch.Generator().manual_seed(7)
PROBE_X = torch.randn(3, 3, 12, 10, generator=PROBE)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def micro_batch(step: int, micro: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(MICRO, 3, 12, 10, generator=g), torch.randn(MICRO, 2, 12, 10, generator=g)
    per = MICRO // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def run(info, spec: str, ckpt_root: Path) -> dict:
    name, kind, stage, accum, steps, *flags = spec.split(":")
    stage, accum, steps = int(stage), int(accum), int(steps)
    save_at = next((int(f[5:]) for f in flags if f.startswith("save=")), None)
    kwargs = {"grad_accum": accum, "grad_clip": 0.0, "precision": "fp32"}
    if kind == "deepspeed":
        kwargs.update(batch_size=MICRO // info.world_size,
                      deepspeed={"zero_stage": stage, "consolidate_on_save": "noconsolidate" not in flags})
    strategy = build_strategy(kind, info, **kwargs)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)  # scheduler state matters on resume
    model, opt, sched = strategy.setup(model, opt, sched)
    ckpt_dir = ckpt_root / name
    step, losses, norms, lrs = 0, [], [], []
    resume_at = next((int(f[7:]) for f in flags if f.startswith("resume=")), None)
    if resume_at is not None:
        client = strategy.load(checkpoint_path(ckpt_root / name.removesuffix("_resume"), resume_at))
        step = int(client["step"])
        assert step == resume_at and client["data_pos"]["consumed"] == step * accum, client
    nan_at = next((tuple(int(v) for v in f[4:].split(".")) for f in flags if f.startswith("nan=")), None)
    while step < steps:
        total = 0.0
        for i in range(accum):
            if (step, i) == nan_at:  # the trainer's non-finite-loss path: no backward, zero_grad, no step
                strategy.zero_grad()
                break
            x, y = micro_batch(step, i, info.rank, info.world_size)
            with strategy.accumulate(is_boundary=(i == accum - 1)):
                loss = ((model(x) - y) ** 2).mean()
                strategy.backward(loss)
            total += float(loss.detach()) / accum
        lrs.append(opt.param_groups[0]["lr"])
        norms.append(float("nan") if (step, i) == nan_at else strategy.step())
        losses.append(float(strategy.all_reduce_mean(torch.tensor(total, dtype=torch.float64))))
        step += 1
        if save_at is not None and step in (save_at, steps):
            path = checkpoint_path(ckpt_dir, step)
            strategy.save(path, {"step": step, "data_pos": {"epoch": 0, "consumed": step * accum},
                                 "world_size": info.world_size})
            if info.is_main:
                update_latest(ckpt_dir, path)
            strategy.barrier()
    model.eval()
    with torch.no_grad():
        probe = model(PROBE_X).detach().clone()
    if kind == "deepspeed":
        strategy.close()  # the process group belongs to the first strategy (closed at the end)
    return {"losses": losses, "norms": norms, "lrs": lrs, "probe": probe}


def main(out_path: str, ckpt_root: str, specs: list[str]) -> None:
    info = read_dist_info()
    owner = build_strategy("ddp", info)  # creates (and later destroys) the gloo process group
    results = {spec.split(":")[0]: run(info, spec, Path(ckpt_root)) for spec in specs}
    if info.is_main:
        torch.save(results, out_path)
    owner.barrier()
    owner.close()


def train_jobs(jobs: list[str]) -> None:
    """argv: train JOB...; a job is RESUME;OVERRIDE;... (RESUME: '-', 'auto' or a checkpoint file; the override
    `final_test` adds the held-out report, `weights_only` takes only RESUME's weights: --resume-weights-only), run
    through engine.run.train."""
    import engine.run as run
    from engine.config import load_config
    for job in jobs:
        resume, *overrides = job.split(";")
        final_test = "final_test" in overrides  # then also the held-out report (best weights, figures on rank 0)
        weights_only = "weights_only" in overrides
        overrides = [o for o in overrides if o not in ("final_test", "weights_only")]
        run.train(load_config(None, overrides), resume=None if resume == "-" else resume, final_test=final_test,
                  resume_weights_only=weights_only)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_jobs(sys.argv[2:])
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
