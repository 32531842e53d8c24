"""Stacked-hourglass variants under DDP and DeepSpeed ZeRO-1/2/3: per-rank model-state memory (measured on 2 CPU
ranks with gloo, computed for 8 and 64 ranks), activation memory with and without checkpointing, and step time,
side by side in one run (issue 6).

    python benchmarks/zero_memory.py --out benchmarks/results/zero_memory_cpu_DATE [--quick]

Per-rank memory is measured as the bytes malloc has handed out and not taken back (glibc mallinfo2: main-arena
`uordblks` + mmapped `hblkhd`), in fresh worker processes started with MALLOC_ARENA_MAX=1 (every thread allocates
from the main arena, which mallinfo2 reports) and a fixed mmap threshold. Unlike counting the tensors Python can
see, this includes what lives only in C++ (DDP's gradient buckets, DeepSpeed's flat buffers). Points, each minus
the figure before the model was built: after setup (model wrapped, optimizer created), after the first backward
(gradients; activations already freed), inside the first optimizer step (right after the torch optimizer's update,
gradients and the new optimizer state both alive: the peak), after it, and after the timed steps. Model-state
memory = the largest of these.

Computed columns (ZeRO paper, Rajbhandari et al. 2020, Psi = parameter count, N = ranks; bytes per parameter):
  mixed precision, Adam (K = 12: fp32 master weights, momentum, variance):
    DDP 16 (fp32 weights 4 + fp32 grads 4 + Adam 8; torch autocast keeps fp32 weights) [+ 4 DDP gradient buckets],
    ZeRO-1 2 + 2 + 12/N, ZeRO-2 2 + (2 + 12)/N, ZeRO-3 (2 + 2 + 12)/N;
  fp32, Adam (DeepSpeed keeps an fp32 copy of the partition it updates even in fp32, so K = 12 again):
    DDP 16 [+ 4 buckets], ZeRO-1 4 + 4 + 12/N, ZeRO-2 4 + (4 + 12)/N, ZeRO-3 (4 + 4 + 12)/N.
DeepSpeed's communication buckets (reduce/allgather, a few hundred MB by default, capped by the model size) come on
top, which is why the measured 2-rank figures sit above the formula for small models.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {"2x256": (2, 256), "4x256": (4, 256), "8x256": (8, 256), "8x512": (8, 512)}
# larger ones for --largest (the GPU search); "mhp" = the published MultiHipPoseNet (--throughput)
LARGE = {"8x768": (8, 768), "8x1024": (8, 1024), "16x1024": (16, 1024), "16x1536": (16, 1536)}
ALL_MODELS = {**VARIANTS, **LARGE, "mhp": None}
STRATEGIES = {"ddp": None, "zero1": 1, "zero2": 2, "zero3": 3, "zero2_offload": 2, "zero3_offload": 3}
MIB = 2 ** 20
ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1",
       "NUMBA_THREADING_LAYER": "workqueue"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_in_use() -> int:
    """Bytes malloc has handed out (main arena + mmapped chunks); 0 where glibc's mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return 0
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def model_state_formula(psi: int, strategy: str, n: int, precision: str, ddp_buckets: bool = True) -> float:
    """Bytes per rank for parameters + gradients + Adam state (see the module docstring)."""
    w = 2 if precision == "bf16" else 4          # DeepSpeed's working copy of weights and grads
    if strategy == "ddp":
        return psi * (16 + (4 if ddp_buckets else 0))
    stage = STRATEGIES[strategy]
    if stage == 1:
        return psi * (w + w + 12 / n)
    if stage == 2:
        return psi * (w + (w + 12) / n)
    return psi * (w + w + 12) / n


# ---------------------------------------------------------------------- worker (one rank)

def _worker(rank: int, world: int, port: int, variant: str, strategy: str, precision: str, hw: tuple, batch: int,
            steps: int, checkpointing: bool, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import torch
    from engine.dist import read_dist_info
    from engine.strategies import build_strategy
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    info = read_dist_info(os.environ, use_cuda=cuda)
    kwargs = {"grad_accum": 1, "grad_clip": 0.0, "precision": precision}
    if strategy != "ddp":
        import deepspeed  # noqa: F401  (imported before the baseline, as in a real run)
        ds = {"zero_stage": STRATEGIES[strategy], "consolidate_on_save": False}
        if strategy.endswith("_offload"):
            ds["offload_optimizer"] = "cpu"
            if STRATEGIES[strategy] == 3:
                ds["offload_params"] = "cpu"
        kwargs.update(batch_size=batch, deepspeed=ds)
    strat = build_strategy("ddp" if strategy == "ddp" else "deepspeed", info, **kwargs)
    dev = info.device
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, *hw, generator=g).to(dev)

    def in_use() -> int:
        return torch.cuda.memory_allocated(dev) if cuda else malloc_in_use()
    if variant == "mhp":
        from models.losses import MultiHipPoseCriterion
        from models.multihipposenet import build_multihipposenet
        build = lambda: build_multihipposenet()           # noqa: E731  (the published size, 145 M parameters)
        crit = MultiHipPoseCriterion(balance="fixed").to(dev)
        targets = {"mask_BHW": torch.randint(0, 8, (batch, *hw), generator=g).to(dev),
                   "heatmap_BKHW": (255 * torch.rand(batch, 6, *hw, generator=g)).to(dev),
                   "kpts_visible_BK": torch.ones(batch, 6, dtype=torch.bool, device=dev)}
    else:
        from models.hourglass import StackedHeatmapLoss, build_hourglass
        stacks, feats = ALL_MODELS[variant]
        build = lambda: build_hourglass(num_stacks=stacks, num_features=feats,  # noqa: E731
                                        checkpointing=checkpointing)
        crit = StackedHeatmapLoss()
        targets = {"heatmap_BKHW": torch.rand(batch, 11, *hw, generator=g).to(dev),
                   "kpts_visible_BK": torch.ones(batch, 11, dtype=torch.bool, device=dev)}
    strat.barrier()
    base = in_use()
    torch.manual_seed(0)
    model = build()
    psi = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, opt, _ = strat.setup(model, opt, None)
    mem = {"setup": in_use() - base}
    # the peak comes inside the strategy's step: after the torch optimizer's update (its state exists) and before
    # the strategy releases the gradients; DeepSpeed steps the same torch optimizer, so one hook serves all
    hook = opt.register_step_post_hook(lambda *_: mem.__setitem__("in_step", in_use() - base))

    def one_step(first: bool) -> float:
        with strat.accumulate(is_boundary=True), strat.autocast():
            out = model(x)
            loss = crit(out, targets)["loss"]
        strat.backward(loss)
        if first:
            mem["backward"] = in_use() - base
        strat.step()
        if first:
            mem["step"] = in_use() - base        # after the strategy's step (gradients released)
            hook.remove()
        strat.zero_grad()
        return float(loss.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    one_step(True)               # warm-up: allocates the optimizer state
    strat.barrier()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step(False)
        if cuda:
            torch.cuda.synchronize(dev)
        strat.barrier()
        times.append(time.perf_counter() - t0)
    mem["end"] = in_use() - base
    if cuda:   # everything a step needs on the device, activations included
        mem["device_peak_with_activations"] = torch.cuda.max_memory_allocated(dev) - base
    rows = strat.all_gather_object({"rank": rank, "mem": mem, "step_s": times})
    if rank == 0:
        tmp_file = Path(f"{out_file}.tmp")    # renamed when complete: a rank aborted at teardown cannot cut it
        tmp_file.write_text(json.dumps({"variant": variant, "strategy": strategy, "precision": precision,
                                        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                                        "checkpointing": checkpointing, "params": psi, "hw": hw,
                                        "batch": batch, "ranks": rows}))
        os.replace(tmp_file, out_file)
    strat.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(variant: str, strategy: str, precision: str, hw: tuple, batch: int, steps: int, checkpointing: bool,
             tmp: Path, world: int = 2) -> dict:
    """One (variant, strategy) case in fresh processes (spawn; the malloc settings must be in their environment)."""
    import torch.multiprocessing as mp
    os.environ.update(ENV)
    out_file = tmp / f"{variant}_{strategy}_{precision}_{int(checkpointing)}.json"
    out_file.unlink(missing_ok=True)
    try:
        mp.start_processes(_worker, nprocs=world, start_method="spawn",
                           args=(world, _free_port(), variant, strategy, precision, hw, batch, steps, checkpointing,
                                 str(out_file)))
    except mp.ProcessExitedException as e:
        # gloo's C++ threads now and then abort a rank at teardown ("terminate called without an active
        # exception", SIGABRT), after every rank's figures were gathered and written: keep those, fail otherwise
        if not (out_file.is_file() and e.signal_name == "SIGABRT"):
            raise
    return json.loads(out_file.read_text())


# ---------------------------------------------------------------------- activation memory (one process)

def activation_rows(variants: list[str], sizes: list[int]) -> list[dict]:
    """Per variant and input: activation bytes held after one forward at batch 1 (training mode) without and with
    per-stack checkpointing, and the checkpointed backward's peak (held + one stack's activations)."""
    import torch
    from bench_hourglass import saved_activation_bytes
    from models.hourglass import build_hourglass
    rows = []
    for v in variants:
        stacks, feats = VARIANTS[v]
        for hw in sizes:
            torch.manual_seed(0)
            model = build_hourglass(num_stacks=stacks, num_features=feats).train()
            x = torch.randn(1, 3, hw, hw)
            plain = saved_activation_bytes(model, x)
            model.checkpointing = True
            held = saved_activation_bytes(model, x, model.bodies)
            stack = saved_activation_bytes(model.bodies[0], torch.randn(1, feats, hw // 4, hw // 4))
            rows.append({"variant": v, "hw": hw, "no_ckpt": plain, "ckpt_held": held, "ckpt_peak": held + stack})
            del model
    return rows


# ---------------------------------------------------------------------- report

def render(cases: list[dict], acts: list[dict], meta: dict) -> str:
    lines = [f"# Stacked hourglass under DDP and ZeRO-1/2/3 — {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, deepspeed {meta['deepspeed']}, {meta['precision']}, Adam, 2 ranks (gloo), "
             f"1 thread per rank, batch {meta['batch']} per rank at {meta['hw']}×{meta['hw']}, "
             f"{meta['steps']} timed steps after one warm-up step. Command: `{meta['command']}`", "",
             "## Model-state memory per rank (MiB)", "",
             "Measured = the largest malloc-in-use figure of rank 0 after setup / after the first backward / inside "
             "the first optimizer step / after it / after the timed steps, minus before the model was built "
             "(module docstring). Computed = the ZeRO formula "
             f"({meta['precision']}; DDP with its fp32 gradient buckets) for N ranks.", "",
             "| variant | parameters | strategy | measured, N=2 (setup / backward / in step) | computed N=2 | "
             "computed N=8 | computed N=64 | step s (mean, rank 0) |", "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c["checkpointing"]:
            continue
        r0 = c["ranks"][0]
        m = r0["mem"]
        peak = max(m.values())
        comp = [model_state_formula(c["params"], c["strategy"], n, c["precision"]) / MIB for n in (2, 8, 64)]
        step = sum(r0["step_s"]) / len(r0["step_s"])
        lines.append(f"| {c['variant']} | {c['params'] / 1e6:.2f} M | {c['strategy']} | **{peak / MIB:.0f}** "
                     f"({m['setup'] / MIB:.0f} / {m['backward'] / MIB:.0f} / {m['in_step'] / MIB:.0f}) | "
                     f"{comp[0]:.0f} | {comp[1]:.0f} | {comp[2]:.0f} | {step:.2f} |")
    ck = [c for c in cases if c["checkpointing"]]
    if ck:
        lines += ["", "## Step time with activation checkpointing (same run, same ranks and input)", "",
                  "| variant | strategy | step s without | step s with | ratio |", "|---|---|---|---|---|"]
        for c in ck:
            ref = next(d for d in cases if not d["checkpointing"] and d["variant"] == c["variant"]
                       and d["strategy"] == c["strategy"])
            a = sum(ref["ranks"][0]["step_s"]) / len(ref["ranks"][0]["step_s"])
            b = sum(c["ranks"][0]["step_s"]) / len(c["ranks"][0]["step_s"])
            lines.append(f"| {c['variant']} | {c['strategy']} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    if acts:
        lines += ["", "## Activation memory, batch 1, training mode (MiB; scales linearly with batch)", "",
                  "Bytes autograd keeps after one forward (benchmarks/bench_hourglass.py's count); with "
                  "checkpointing the backward peak is what is held plus one stack's activations.", "",
                  "| variant | input | no checkpointing | checkpointing: held | checkpointing: backward peak |",
                  "|---|---|---|---|---|"]
        for a in acts:
            lines.append(f"| {a['variant']} | {a['hw']}² | {a['no_ckpt'] / MIB:.1f} | {a['ckpt_held'] / MIB:.1f} |"
                         f" {a['ckpt_peak'] / MIB:.1f} ({100 * (a['ckpt_peak'] / a['no_ckpt'] - 1):+.0f} %) |")
    return "\n".join(lines) + "\n"


def _try_case(*a, **kw) -> tuple[dict | None, str]:
    """run_case, or (None, the error's last line) when a rank failed (e.g. out of device memory)."""
    import torch.multiprocessing as mp
    try:
        return run_case(*a, **kw), ""
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        return None, str(e).strip().splitlines()[-1][:160]


def largest_search(args, out: Path) -> int:
    order = list(dict.fromkeys(args.variants.split(",") + list(LARGE)))
    rows = []
    for s in args.strategies.split(","):
        best, failed, why = None, None, ""
        for v in order:
            case, why = _try_case(v, s, args.precision, (args.hw, args.hw), args.batch, 2, False, out / "cases",
                                  world=args.world)
            if case is None:
                failed = v
                break
            best = case
        rows.append({"strategy": s, "largest": best["variant"] if best else None, "first_failing": failed,
                     "error": why, "params": best["params"] if best else None,
                     "device_peak": best["ranks"][0]["mem"].get("device_peak_with_activations") if best else None})
        print(rows[-1], flush=True)
    (out / "largest.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| strategy | largest that trains (batch {args.batch}/device, {args.hw}², {args.precision}) | "
             f"parameters | device peak | first that fails |", "|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['device_peak'] / 2**30:.1f} GiB" if r["device_peak"] else "n/a"
        params = f"{r['params'] / 1e6:.0f} M" if r["params"] else "n/a"
        lines.append(f"| {r['strategy']} | {r['largest']} | {params} | {peak} | {r['first_failing'] or 'none'} "
                     f"{('(' + r['error'] + ')') if r['error'] else ''} |")
    (out / "largest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def throughput(args, out: Path) -> int:
    rows = []
    for model, hw in (("2x256", (args.hw, args.hw)), ("mhp", tuple(args.mhp_hw))):
        for s in args.strategies.split(","):
            case, why = _try_case(model, s, args.precision, hw, args.batch, args.steps, False, out / "cases",
                                  world=args.world)
            if case is None:
                rows.append({"model": model, "strategy": s, "error": why})
                continue
            t = case["ranks"][0]["step_s"]
            rows.append({"model": model, "strategy": s, "params": case["params"], "hw": list(hw),
                         "samples_per_s": args.batch * args.world * len(t) / sum(t),
                         "device_peak": case["ranks"][0]["mem"].get("device_peak_with_activations")})
            print(rows[-1], flush=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| model | strategy | input | samples/s ({args.world} rank(s), batch {args.batch}/rank, "
             f"{args.precision}) | device peak |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | | failed: {r['error']} | |")
            continue
        peak = f"{r['device_peak'] / 2**30:.2f} GiB" if r["device_peak"] else "n/a"
        lines.append(f"| {r['model']} | {r['strategy']} | {r['hw'][0]}×{r['hw'][1]} | {r['samples_per_s']:.1f} | "
                     f"{peak} |")
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json and table.md")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    ap.add_argument("--strategies", default="ddp,zero1,zero2,zero3", help="comma list of " + ",".join(STRATEGIES))
    ap.add_argument("--world", type=int, default=2, help="ranks per case (on a GPU machine: at most its GPUs)")
    ap.add_argument("--largest", action="store_true",
                    help="per strategy, the largest hourglass (--variants, then " + ", ".join(LARGE) + ") that "
                         "trains 3 steps at --batch per rank and --hw; the first failure (out of memory) ends the "
                         "search for that strategy")
    ap.add_argument("--throughput", action="store_true",
                    help="samples/s of --strategies on the published hourglass (2x256, --hw) and MultiHipPoseNet "
                         "(mhp, --mhp-hw), --batch per rank, --steps timed steps")
    ap.add_argument("--mhp-hw", type=int, nargs=2, default=(384, 512), help="MultiHipPoseNet input (published)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--hw", type=int, default=128, help="square input of the timed steps (>= 128 at batch 1)")
    ap.add_argument("--batch", type=int, default=2, help="samples per rank per step")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    ap.add_argument("--ckpt-variants", default="2x256,8x512",
                    help="variants whose DDP step is also timed with activation checkpointing ('' for none)")
    ap.add_argument("--act-hw", default="256", help="comma list of inputs for the activation-memory table")
    ap.add_argument("--act-variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="2x256 only, ddp and zero2, 1 timed step (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.variants, args.strategies, args.steps, args.ckpt_variants = "2x256", "ddp,zero2", 1, ""
        args.act_variants, args.act_hw = "2x256", "128"
    for name in args.variants.split(",") + args.act_variants.split(","):
        if name not in VARIANTS and not (args.largest and name in LARGE):
            ap.error(f"--variants: unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
    for name in args.strategies.split(","):
        if name not in STRATEGIES:
            ap.error(f"--strategies: unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    import torch
    from tqdm import tqdm
    if args.largest:
        return largest_search(args, out)
    if args.throughput:
        return throughput(args, out)
    todo = [(v, s, False) for v in args.variants.split(",") for s in args.strategies.split(",")]
    todo += [(v, "ddp", True) for v in filter(None, args.ckpt_variants.split(",")) if v in args.variants.split(",")]
    cases = []
    for v, s, ck in tqdm(todo, desc="cases", unit="case"):
        cases.append(run_case(v, s, args.precision, (args.hw, args.hw), args.batch, args.steps, ck, out / "cases",
                              world=args.world))
    acts = activation_rows(args.act_variants.split(","), [int(h) for h in args.act_hw.split(",")])
    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = "not installed"
    meta = {"device": f"CPU ({os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "deepspeed": ds_version, "precision": args.precision, "hw": args.hw, "batch": args.batch,
            "steps": args.steps, "command": "python benchmarks/zero_memory.py " + " ".join(sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "cases": cases, "activations": acts}, indent=1))
    (out / "table.md").write_text(render(cases, acts, meta))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
