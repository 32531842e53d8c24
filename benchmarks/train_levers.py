"""Training-step throughput levers, each alone and all together, against the plain PyTorch loop (benchmarks/plain_loop.py).

The published MultiHipPoseNet (3 ResNet-50 experts with GroupNorm, ME-GCT, MT-GALM; 128.2 M parameters) at 3 x 192 x 256,
batch 4, Adam lr 1e-4, its own losses (focal + soft Dice + weighted heatmap MSE, CoV task balancing), one training step
on in-memory batches. Every configuration runs in its own process (the allocator setting is process-wide), in rounds:
round r runs every configuration once, so slow drift of a shared machine spreads over all of them; the table gives the
median of the rounds and their spread. Ratios are against the plain loop of the same rounds.

    python benchmarks/train_levers.py --out benchmarks/results/train_levers_cpu_DATE      # ~40 min on 2 CPU cores
    python benchmarks/train_levers.py --quick --out /tmp/levers                             # tiny model, ~2 min
    python benchmarks/train_levers.py --configs plain,engine,bf16 --runs 1                  # a subset

Configurations (engine = engine/trainer.py's step with every perf lever off; each lever is a config key):
  plain             the plain loop: torch defaults, glibc's malloc defaults
  plain_keep        the plain loop with perf.cpu_malloc=keep's allocator setting (how much of the gain is the allocator)
  engine            Trainer.train_step, perf.* off (cpu_malloc=system, host_sync=step, optimizer torch's default)
  keep              + perf.cpu_malloc=keep
  channels_last     + perf.channels_last=true
  bf16              + train.precision=bf16 (autocast; the losses stay fp32)
  fused             + perf.optimizer_impl=fused
  host_sync_log     + perf.host_sync=log (implies the fused optimizer)
  compile_model     + perf.compile=model
  compile_loss      + perf.compile=loss
  all               keep + channels_last + bf16 + host_sync=log (fused)
  all_compile       all + perf.compile=model (not in the default set: inductor's bf16 CPU code was ~10x slower)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

OFF = ["perf.cpu_malloc=system", "perf.host_sync=step", "perf.optimizer_impl=auto", "perf.channels_last=false",
       "perf.compile=none", "train.precision=fp32"]
ALL = ["perf.cpu_malloc=keep", "perf.channels_last=true", "train.precision=bf16", "perf.host_sync=log",
       "perf.optimizer_impl=fused"]
CONFIGS: dict[str, list[str] | None] = {
    "plain": None,
    "plain_keep": None,
    "engine": [],
    "keep": ["perf.cpu_malloc=keep"],
    "channels_last": ["perf.channels_last=true"],
    "bf16": ["train.precision=bf16"],
    "fused": ["perf.optimizer_impl=fused"],
    "host_sync_log": ["perf.host_sync=log"],
    "compile_model": ["perf.compile=model"],
    "compile_loss": ["perf.compile=loss"],
    "all": ALL,
    "all_compile": [*ALL, "perf.compile=model"],
}
DEFAULT_CONFIGS = [n for n in CONFIGS if n != "all_compile"]  # bf16 + compile: ~10x slower on a CPU (run it with --configs)

PUBLISHED = dict(size=None, hw=(192, 256), batch=4)
QUICK = dict(size=dict(expert_depth=18, width=16, num_experts=2, gn_groups=8, decoder_norm="gn"), hw=(64, 96), batch=2)


# ---------------------------------------------------------------------------------------------- one configuration

def plain_step_times(model_args: dict | None, hw: tuple[int, int], batch: int, steps: int, warmup: int,
                     device: str = "cpu", loader=None) -> dict:
    """The plain loop (benchmarks/plain_loop.py) on in-memory batches (or `loader`): {"times": timed s/step,
    "first_s": the warm-up steps' seconds}."""
    import torch

    from models import MODELS, build_criterion
    from plain_loop import plain_training, synthetic_tensors
    if loader is None:
        image, mask, heat, vis = synthetic_tensors(batch * 2, hw)
        loader = [(image[i:i + batch], mask[i:i + batch], heat[i:i + batch], vis[i:i + batch])
                  for i in range(0, 2 * batch, batch)]
    torch.manual_seed(967)
    model = MODELS["multihipposenet"](**(model_args or {}))
    criterion = build_criterion("multihipposenet")
    times = plain_training(model, criterion, loader, warmup + steps, device=device)
    return {"times": times[warmup:], "first_s": sum(times[:warmup])}


def engine_step_times(overrides: list[str], model_args: dict | None, hw: tuple[int, int], batch: int, steps: int,
                      warmup: int, device: str = "cpu") -> dict:
    """engine/trainer.py's training step (Trainer.train_step, plus the flush a log line makes under
    perf.host_sync=log) of MultiHipPoseNet on in-memory batches, with every perf lever off except `overrides`:
    {"times", "first_s", "malloc", "skipped"}. On CUDA each timed step ends with a synchronize."""
    import torch

    from data_pipelines.batch import Batch
    from engine.config import load_config
    from engine.dist import read_dist_info
    from engine.perf import check_perf
    from engine.run import make_criterion, make_strategy
    from engine.trainer import Trainer
    from models import MODELS
    from plain_loop import synthetic_tensors

    image, mask, heat, vis = synthetic_tensors(batch * 2, hw)
    torch.manual_seed(967)
    overrides = [*OFF, *overrides, "model.name=multihipposenet", "optim.name=adam", "optim.lr=1e-4",
                 "optim.scheduler=constant", f"train.batch_size={batch}", "train.log_every=10",
                 "log.progress=false", "log.tensorboard=false"]
    if model_args:
        overrides.append("model.args={" + ", ".join(f"{k}: {v}" for k, v in model_args.items()) + "}")
    cfg = load_config(None, overrides)
    check_perf(cfg, "single", cfg.train.precision)
    strategy = make_strategy(cfg, read_dist_info(use_cuda=device == "cuda"))
    model = MODELS["multihipposenet"](**(model_args or {}))
    criterion = make_criterion(cfg)
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"medpose_levers_{os.getpid()}"
    trainer = Trainer(cfg, strategy, model, criterion, list(range(64)), None, run_dir)
    batches = [Batch(image[i:i + batch], torch.zeros(batch, 6, 2), vis[i:i + batch], torch.ones(batch, 2),
                     mask[i:i + batch], heat[i:i + batch]) for i in range(0, 2 * batch, batch)]

    def feed():
        while True:
            yield from batches
    it, times = feed(), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step(it)
        trainer.step += 1
        if trainer.deferred and (trainer.step % cfg.train.log_every == 0 or i == warmup + steps - 1):
            trainer.flush()   # the read a log line makes; also at the end, so the last step is complete
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times[warmup:], "first_s": sum(times[:warmup]), "malloc": trainer.malloc,
            "skipped": trainer.skipped_total}


def _worker(name: str, steps: int, warmup: int, quick: bool) -> dict:
    spec = QUICK if quick else PUBLISHED
    if CONFIGS[name] is None:                                    # the plain loop
        if name == "plain_keep":
            import torch

            from engine.perf import apply_cpu_malloc
            apply_cpu_malloc("keep", torch.device("cpu"))
        return plain_step_times(spec["size"], spec["hw"], spec["batch"], steps, warmup)
    return engine_step_times(CONFIGS[name], spec["size"], spec["hw"], spec["batch"], steps, warmup)


# ---------------------------------------------------------------------------------------------- the campaign

def _run_one(name: str, steps: int, warmup: int, quick: bool, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--warmup", str(warmup)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"configuration {name}: the worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine() -> str:
    import torch

    from history import _cpu_model
    return f"{_cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def table(results: dict[str, list[float]], first: dict[str, list[float]], batch: int) -> tuple[str, list[dict]]:
    """Markdown table (median s/step over the rounds, spread, speed-up over plain and engine) + history rows
    (samples/s, so that a ratio to the plain loop reads as a speed-up)."""
    plain = statistics.median(results["plain"]) if "plain" in results else None
    lines = ["| configuration | s/step (median of rounds) | spread (min–max) | × plain loop | × engine | "
             "first steps (s) |", "|---|---|---|---|---|---|"]
    engine = statistics.median(results["engine"]) if "engine" in results else None
    rows = []
    for name, per_round in results.items():
        med = statistics.median(per_round)
        ratio_plain = f"{plain / med:.2f}×" if plain else ""
        ratio_engine = f"{engine / med:.2f}×" if engine else ""
        lines.append(f"| {name} | {med:.3f} | {min(per_round):.3f}–{max(per_round):.3f} | {ratio_plain} | "
                     f"{ratio_engine} | {statistics.median(first[name]):.1f} |")
        rows.append({"group": "train step vs plain loop", "name": name, "value": batch / med, "unit": "samples/s",
                     "better": "higher", "spread": [batch / max(per_round), batch / min(per_round)],
                     **({"ratio_to": "plain"} if name != "plain" and plain else {})})
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated subset (see above)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (each configuration once per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation, allocations)")
    ap.add_argument("--quick", action="store_true", help="a tiny MultiHipPoseNet at 64 x 96, batch 2 (smoke test)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration and round")
    ap.add_argument("--record", action="store_true", help="also store the results in benchmarks/history/")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.warmup, args.quick)), flush=True)
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {', '.join(unknown)} (choose from {', '.join(CONFIGS)})")
    results: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.time()
    for r in range(args.runs):
        for name in names:
            out = _run_one(name, args.steps, args.warmup, args.quick, args.timeout)
            per_step = statistics.median(out["times"])
            results[name].append(per_step)
            first[name].append(out["first_s"])
            print(f"round {r + 1}/{args.runs} {name:14s} {per_step:7.3f} s/step  (steps {[round(t, 3) for t in out['times']]}, "
                  f"first {out['first_s']:.1f} s)", flush=True)
    spec = QUICK if args.quick else PUBLISHED
    md, rows = table(results, first, spec["batch"])
    head = (f"MultiHipPoseNet {'(tiny, --quick)' if args.quick else '(published, 128.2 M parameters)'} at 3 x "
            f"{spec['hw'][0]} x {spec['hw'][1]}, batch {spec['batch']}; {args.runs} rounds x {args.steps} timed steps "
            f"after {args.warmup} warm-up; {machine()}; {time.time() - t0:.0f} s in all.")
    print(head + "\n\n" + md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(head + "\n\n" + md + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"header": head, "seconds_per_step": results, "first_steps_s": first, "rows": rows}, indent=1))
    if args.record:
        import history
        print("recorded:", history.record_rows("train_levers" + ("_quick" if args.quick else ""), rows, notes=head))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
