"""Kernel benchmark: torch eager vs torch.compile vs the Triton kernel, side by side in one run, against the
device's measured copy bandwidth (the physical limit of a memory-bound op).

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels   # GPU: full sweep, writes .md + .json
    python benchmarks/kernel_bench.py --quick                             # a few small cases (any device)

For every op and shape: the bytes the op must move (each input read once, each output written once; `bytes` column),
the time that takes at the measured device-to-device copy bandwidth (`limit`), and per provider the median time
(triton.testing.do_bench when a GPU is present: L2 flushed between reps), GB/s = bytes / time, the fraction of the
copy bandwidth reached, and the peak memory one call allocates beyond its inputs. "fwd+bwd" times the forward and
torch.autograd.grad of every input from a fixed upstream gradient (no accumulation into .grad). Results are written
after every case, so a run stopped early keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.gct_gate import gct_gate, gct_gate_conv1x1, gct_gate_conv1x1_ref, gct_gate_ref  # noqa: E402
from kernels.heatmap_render import render_heatmaps, render_heatmaps_ref  # noqa: E402
from kernels.soft_argmax import soft_argmax, soft_argmax_ref  # noqa: E402

B = 8
# MultiHipPoseNet at the published 384x512 input: 3 ResNet-50 experts -> E*C channels per level
# (docs/systems/hip_us_multihipposenet.md)
GCT_SHAPES = [(B, 192, 192, 256), (B, 768, 96, 128), (B, 1536, 48, 64), (B, 3072, 24, 32), (B, 6144, 12, 16)]
# heatmaps: MultiHipPoseNet (K=6 at 384x512), hourglass discs (K=11..17 at 64x64 / 256x128), a chip-filling batch
HEAT_SHAPES = [(B, 6, 384, 512), (B, 17, 64, 64), (B, 11, 256, 128), (B, 17, 384, 512), (64, 17, 384, 512)]
QUICK_GCT = [(2, 12, 16, 20)]
QUICK_HEAT = [(2, 3, 32, 40)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Median wall time of fn in ms, the device synchronised inside the timing."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, counting bytes read + written (the yardstick of a memory-bound kernel)."""
    n = nbytes // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _grad_fn(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], out_like: torch.Tensor | None = None):
    """Callable running forward + backward of fn(*inputs) w.r.t. every input (upstream gradient fixed)."""
    out = fn(*inputs)
    g = torch.randn_like(out)

    def run():
        y = fn(*inputs)
        return torch.autograd.grad(y, inputs, g)
    return run


# ----------------------------------------------------------------------------------------------------------------
# the cases: (name, shape, bytes_fwd, bytes_fwdbwd, providers {name: (fwd callable, fwd+bwd callable or None)})

def gct_case(shape, dtype, device, compiled: bool):
    b, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    params = [(torch.rand(1, c, 1, 1, generator=g) * 2).to(device).requires_grad_() for _ in range(3)]
    s = x.element_size()
    n = x.numel()
    provs = {
        "eager": lambda *a: gct_gate_ref(*a),
        "triton": lambda *a: gct_gate(*a, impl="triton"),
    }
    if compiled:
        provs["compile"] = torch.compile(gct_gate_ref, dynamic=False)
    ins = [x, *params]
    out = {k: ((lambda f=f: f(*ins)), _grad_fn(f, ins)) for k, f in provs.items()}
    return dict(op="gct_gate", shape=shape, bytes_fwd=2 * n * s, bytes_fwdbwd=5 * n * s, providers=out)


def gct_conv_case(shape, dtype, device, compiled: bool):
    b, c, h, w = shape
    cout = c // 3
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    params = [(torch.rand(1, c, 1, 1, generator=g) * 2).to(device).requires_grad_() for _ in range(3)]
    weight = (torch.randn(cout, c, 1, 1, generator=g) / c ** 0.5).to(device, dtype).requires_grad_()
    s = x.element_size()
    n, n_out = x.numel(), b * cout * h * w
    provs = {
        "eager": lambda *a: gct_gate_conv1x1_ref(*a),
        "triton gate + conv": lambda x_, a_, g_, b_, w_: F.conv2d(gct_gate(x_, a_, g_, b_, impl="triton"), w_),
        "triton fused": lambda *a: gct_gate_conv1x1(*a, impl="triton", route="fused"),
    }
    if compiled:
        provs["compile"] = torch.compile(gct_gate_conv1x1_ref, dynamic=False)
    ins = [x, *params, weight]
    out = {k: ((lambda f=f: f(*ins)), _grad_fn(f, ins)) for k, f in provs.items()}
    flops = 2 * b * cout * c * h * w
    return dict(op="gct_gate+conv1x1", shape=shape, bytes_fwd=(n + n_out) * s, bytes_fwdbwd=(3 * n + 2 * n_out) * s,
                flops_fwd=flops, providers=out)


def soft_argmax_case(shape, dtype, device, compiled: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_()
    n, s = h.numel(), h.element_size()
    provs = {"eager": lambda t: soft_argmax_ref(t, 1.0), "triton": lambda t: soft_argmax(t, 1.0, impl="triton")}
    if compiled:
        provs["compile"] = torch.compile(lambda t: soft_argmax_ref(t, 1.0), dynamic=False)
    out = {k: ((lambda f=f: f(h)), _grad_fn(f, [h])) for k, f in provs.items()}
    return dict(op="soft_argmax", shape=shape, bytes_fwd=n * s, bytes_fwdbwd=3 * n * s, providers=out)


def render_case(shape, dtype, device, compiled: bool):
    b, k, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    kpts = (torch.rand(b, k, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])).to(device)
    vis = torch.ones(b, k, dtype=torch.bool, device=device)
    sigma = 7.0 if h >= 256 else 2.0
    provs = {"eager": lambda: render_heatmaps_ref(kpts, vis, (h, w), sigma),
             "triton": lambda: render_heatmaps(kpts, vis, (h, w), sigma, impl="triton")}
    if compiled:
        cref = torch.compile(render_heatmaps_ref, dynamic=False)
        provs["compile"] = lambda: cref(kpts, vis, (h, w), sigma)
    n = b * k * h * w
    return dict(op="render_heatmaps", shape=shape, bytes_fwd=n * 4, bytes_fwdbwd=None,
                providers={k_: (f, None) for k_, f in provs.items()})


def measure(case: dict, device: torch.device, bw_gbs: float) -> list[dict]:
    rows = []
    for mode, nbytes in (("fwd", case["bytes_fwd"]), ("fwd+bwd", case["bytes_fwdbwd"])):
        if nbytes is None:
            continue
        for prov, fns in case["providers"].items():
            fn = fns[0] if mode == "fwd" else fns[1]
            row = dict(op=case["op"], shape="x".join(map(str, case["shape"])), mode=mode, provider=prov,
                       bytes=nbytes, limit_ms=nbytes / (bw_gbs * 1e9) * 1e3)
            try:
                fn()                                    # compile / autotune outside the timing
                ms = time_ms(fn, device)
                row.update(ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9, frac_bw=nbytes / (ms * 1e-3) / 1e9 / bw_gbs,
                           peak_extra_bytes=peak_extra_bytes(fn, device))
                if mode == "fwd" and case.get("flops_fwd"):
                    row["tflops"] = case["flops_fwd"] / (ms * 1e-3) / 1e12
            except Exception as e:  # one provider failing (e.g. compile on an old torch) must not lose the table
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['op']:18s} {r['shape']:18s} {r['mode']:8s} {r['provider']:20s} ERROR {r['error']}"
    return (f"{r['op']:18s} {r['shape']:18s} {r['mode']:8s} {r['provider']:20s} {r['ms']:9.4f} ms "
            f"{r['gbs']:8.1f} GB/s {100 * r['frac_bw']:5.1f}% of copy bw")


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"# Kernel benchmark — {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, dtype {meta['dtype']}. Measured device-to-device copy "
             f"bandwidth (read + write): **{meta['copy_gbs']:.0f} GB/s**; `limit` = bytes / that bandwidth.", "",
             "| op | shape | mode | provider | bytes | limit (ms) | time (ms) | GB/s | % of copy bw | vs eager | "
             "peak extra MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["op"], r["shape"], r["mode"]): r.get("ms") for r in rows if r["provider"] == "eager"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['bytes'] / 1e6:.1f} MB | "
                         f"{r['limit_ms']:.4f} | error: {r['error'][:80]} | | | | |")
            continue
        e = eager.get((r["op"], r["shape"], r["mode"]))
        speed = f"{e / r['ms']:.2f}x" if e else ""
        peak = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['bytes'] / 1e6:.1f} MB | "
                     f"{r['limit_ms']:.4f} | {r['ms']:.4f} | {r['gbs']:.0f} | {100 * r['frac_bw']:.0f} % | {speed} | "
                     f"{peak} |")
    path.write_text("\n".join(lines) + "\n")


def sweep_soft_argmax(device: torch.device, bw_gbs: float) -> list[dict]:
    """Launch-parameter sweep of the soft-argmax kernels (block, forward split, backward split) at two shapes: the
    evidence behind the defaults in kernels/soft_argmax.py."""
    rows = []
    for shape in ((64, 17, 384, 512), (8, 6, 384, 512)):
        h = torch.randn(shape, device=device).mul_(3).requires_grad_()
        n_maps = shape[0] * shape[1]
        g = torch.randn(shape[0], shape[1], 2, device=device)
        for block in (512, 1024, 2048, 4096):
            for split in (None, max(1, 256 // n_maps), max(1, 1024 // n_maps), max(1, 4096 // n_maps)):
                for split_bwd in (None, max(1, 2048 // n_maps)):
                    kw = dict(block=block, split=split, split_bwd=split_bwd)
                    fwd = lambda: soft_argmax(h, 1.0, impl="triton", **kw)  # noqa: E731
                    both = lambda: torch.autograd.grad(soft_argmax(h, 1.0, impl="triton", **kw), h, g)  # noqa: E731
                    row = dict(shape="x".join(map(str, shape)), **{k: str(v) for k, v in kw.items()})
                    try:
                        fwd(), both()
                        row["fwd_frac_bw"] = h.numel() * 4 / (time_ms(fwd, device) * 1e-3) / 1e9 / bw_gbs
                        row["fwdbwd_frac_bw"] = 3 * h.numel() * 4 / (time_ms(both, device) * 1e-3) / 1e9 / bw_gbs
                    except Exception as e:  # a launch the chip refuses must not end the sweep
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
                    print("sweep", row, flush=True)
    return rows


def profile_gct(device: torch.device, shape=(8, 3072, 24, 32)) -> str:
    """torch.profiler table of one gct_gate fwd+bwd per provider (where the time goes at a small-map level)."""
    from torch.profiler import ProfilerActivity, profile
    case = gct_case(shape, torch.float32, device, compiled=False)
    text = []
    for prov, (_, both) in case["providers"].items():
        both(), both()
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                both()
            _sync(device)
        text.append(f"== {prov} {shape} fwd+bwd x5\n" + prof.key_averages().table(sort_by="cuda_time_total",
                                                                                  row_limit=18))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for kernel_bench.md / kernel_bench.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes only (a smoke run, any device)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="input dtype of the timed ops")
    ap.add_argument("--ops", default="gct_gate,gct_gate_conv1x1,soft_argmax,render_heatmaps",
                    help="comma-separated subset of the ops")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--sweep", action="store_true", help="also sweep the soft-argmax launch parameters")
    ap.add_argument("--profile", action="store_true", help="also profile gct_gate fwd+bwd at a small-map level")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    compiled = not args.no_compile
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    import triton
    meta = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.machine()}",
                date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton.__version__,
                dtype=args.dtype, interpret=os.environ.get("TRITON_INTERPRET", "0"))
    meta["copy_gbs"] = copy_bandwidth_gbs(device)
    print(f"device {meta['device']}: copy bandwidth {meta['copy_gbs']:.0f} GB/s", flush=True)
    if args.profile and device.type == "cuda":
        prof = profile_gct(device)
        print(prof, flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "profile_gct.txt").write_text(prof)
    if args.sweep and device.type == "cuda":
        sweep = sweep_soft_argmax(device, meta["copy_gbs"])
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "sweep_soft_argmax.json").write_text(json.dumps(sweep, indent=1))
    gshapes, hshapes = (QUICK_GCT, QUICK_HEAT) if args.quick else (GCT_SHAPES, HEAT_SHAPES)
    builders = {"gct_gate": (gct_case, gshapes), "gct_gate_conv1x1": (gct_conv_case, gshapes),
                "soft_argmax": (soft_argmax_case, hshapes), "render_heatmaps": (render_case, hshapes)}
    rows: list[dict] = []
    for op in [o for o in args.ops.split(",") if o]:
        build, shapes = builders[op]
        for shape in shapes:
            case = build(shape, dtype, device, compiled)
            rows += measure(case, device, meta["copy_gbs"])
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"kernel_bench_{args.dtype}.json").write_text(json.dumps(dict(meta=meta, rows=rows),
                                                                                      indent=1))
                write_markdown(args.out / f"kernel_bench_{args.dtype}.md", meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
