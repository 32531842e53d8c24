"""GPU throughput checks of the MedPose training engine, measured side by side in one run (issue 17).

    python benchmarks/gpu_throughput.py --out benchmarks/results/throughput_h200_DATE     # GPU, full sizes
    python benchmarks/gpu_throughput.py --quick --out /tmp/tput                            # smoke run, any machine
    python benchmarks/gpu_throughput.py --parts train,host_sync --batch 32                 # a subset, fixed batch

Every figure is measured in this run, and every ratio divides two figures of this run (never a figure from an
earlier run or another machine). Each part runs in its own child process (the GPU memory is released between
parts; a part that crashes, hangs or runs past --part-timeout loses only its own figures), and inside a part each
configuration is wrapped on its own: a configuration that fails writes an "error: ..." row and the others go on.
Figures that need CUDA (or a library that is missing) are written as rows whose status is "skipped: <reason>", so
a table from a machine without a GPU shows what is missing instead of leaving it out. The results are rewritten
after every part (PREFIX.md + PREFIX.json with --out), so a run stopped early keeps what it measured.

Timing: a configuration runs --warmup (default 2) untimed steps (compilation, cuDNN autotuning, allocator warm-up),
then --windows (default 3) windows of --steps (default 4) steps. A window is timed with the device synchronised at its
start and end only, so the host may run ahead of the device inside a window exactly as in training; the engine's
deferred reads
(perf.host_sync=log) are flushed every train.log_every = 10 steps and at the end of each window. The figure is the
median over the windows, "spread" the slowest and fastest window. "× peer" is the speed-up over the row named in
"peer" (> 1 = faster): peer time / time for ms/step, rate / peer rate for samples/s.

The engine's levers ("levers" below) are config overrides of engine/config.py (section perf, and train.precision):
train.precision=bf16 (autocast), perf.channels_last=true, perf.optimizer_impl=fused, perf.host_sync=log (the loss,
its parts and the gradient norm stay on the device and are read once per log window). Everything else is the engine
with its perf levers off (benchmarks/train_levers.py's OFF list). Optimizer: Adam, lr 1e-4, constant schedule.

Parts (--parts, comma-separated; default all):

  train         The published MultiHipPoseNet (models.MODELS["multihipposenet"]() defaults: 3 ResNet-50 experts with
                GroupNorm, ME-GCT, MT-GALM) at 3 x 384 x 512, trained on synthetic images and labels.
                1. The largest batch that fits with the levers (bf16): powers of two from 1 up to --max-batch
                   (default 256), each tried with two training steps; an out-of-memory error ends the search (the
                   cache is emptied between tries). Without CUDA: the fixed --batch (default 2), and this row is
                   "skipped". --batch N skips the search.
                2. (a) plain PyTorch loop (benchmarks/plain_loop.py: fp32, torch defaults, MEDPOSE_KERNELS=ref so no
                   Triton kernel, Adam, loss read every step) fed by a DataLoader over in-memory synthetic tensors
                   (--workers workers, pin_memory on CUDA, shuffled). It runs at the same batch as the engine when
                   that fits in fp32; otherwise the batch is halved until it fits (the row says which). samples/s
                   makes the two comparable.
                   (a') the same plain loop on in-memory batches (no DataLoader): how much of (a) is the loader.
                   (b) the engine (Trainer.train_step) with the levers, on pinned in-memory batches (copied to the
                       device every step); the dali part measures what a real data path adds to such a step.
                   (c) (b) + perf.compile=model (torch.compile of the model, mode default). If (b) or (c) runs out
                       of memory at the searched batch, the batch is halved (the row says so).
                GOAL: (b) / (a) and (c) / (a) >= 3x in samples/s.

  host_sync     The engine step (levers, bf16) with perf.host_sync=step (the loss finiteness and the gradient norm
                read back to the host every step) vs perf.host_sync=log, same model, same batch, both trainers alive
                and their windows alternating. Batch: --sync-batch, else half the train part's largest batch when
                that part ran in this invocation (or is kept by --append; half, because two trainers must fit at
                once), else 16 (GPU) / 2 (no GPU). Figure: ms/step of each and the speed-up of log over step (the
                issue asks for the comparison; it sets no threshold).

  small_levels  A small ME-GCT network whose kernel launches are host-bound on a GPU: MultiHipPoseNet with ResNet-18
                experts at width 16, 3 experts, GroupNorm decoders (launch/configs/hip_demo.yaml's model) at
                128 x 160, batch --small-batch (default 8). The engine step (levers) eager vs perf.compile=model with
                perf.compile_mode=default vs reduce-overhead (inductor + CUDA graphs). Each compiled row reports the
                graph breaks and CUDA-graph skips torch counted. On a CPU, reduce-overhead makes no CUDA graphs: its
                row measures the same compiled code as mode default.
                GOAL: reduce-overhead faster than eager (and than mode default) where launches are host-bound.

  gct_gate      The ME-GCT gate (kernels/gct_gate.py) at MultiHipPoseNet's five ME-GCT levels at 384 x 512, batch 8
                (benchmarks/kernel_bench.py's GCT_SHAPES), fp32 vs bf16, the Triton kernel vs the torch reference:
                forward, backward alone (autograd.grad of a kept graph) and forward + backward, timed with
                triton.testing.do_bench on CUDA. GOAL: the Triton bf16 backward faster than the fp32 backward
                (the H200 run of 2026-11-26 found it slower at 8 x 192 x 192 x 256: 0.843 vs 0.612 ms fwd+bwd).
                Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) on a tiny shape:
                that checks the code path only - interpreter timings say nothing about a kernel's speed.

  dali          The engine step (levers, published model at 384 x 512, batch --dali-batch) fed by DALI vs the same
                step on one in-memory batch already on the device (no data path), as in benchmarks/loader_bench.py:
                phantom hip images (data_pipelines.synthetic.hip) decoded and augmented every time, heatmap targets
                rendered on the device by the loss (data.targets=device). Providers: dali-gpu (GPU pipeline, nvJPEG for
                JPEG) per --dali-formats; without CUDA, dali-cpu (DALI's CPU pipeline, a code-path check) runs and
                dali-gpu is "skipped". GOAL: the DALI-fed step at most 3 % slower than the in-memory step.

  zero          The DeepSpeed figures (largest stacked hourglass at batch 4 per device under DDP, ZeRO-2, ZeRO-3 and
                CPU offload; DDP vs ZeRO-2 samples/s) come from benchmarks/gpu_checks_zero.sh (it installs DeepSpeed
                from .whl/ when missing, ~8 minutes). This part prints the command; with --run-zero on a CUDA machine
                it runs it and reads its largest.json / throughput.json into the table. Without --run-zero the rows
                say "skipped: run separately"; without CUDA "skipped: no CUDA device".

--quick: tiny sizes everywhere (MultiHipPoseNet with 2 ResNet-18 experts at width 16 at 64 x 96, batch 2, 2 windows
of 2 steps; the tiny gct_gate shape; 16 phantom images), and without CUDA torch.compile uses the aot_eager backend
(dynamo + AOTAutograd tracing without inductor's C++ code generation, which takes ~6 minutes per model on a busy
2-core CPU; --compile-backend inductor forces it). A --quick table is a smoke test of every code path, not a
throughput figure.

--part-timeout bounds each part (one number, or train=420,dali=150,...); --append keeps the parts of an existing
PREFIX.json that this call does not run, so several shorter calls fill one table (host_sync then takes the batch
the train part found).

--record stores the numeric rows in benchmarks/history/ (suite gpu_throughput, or gpu_throughput_quick) with the
machine, commit and versions (benchmarks/history.py). benchmarks/gpu_checks_throughput.sh is the one-call wrapper
for a GPU machine. Exit status: 0 when every part ran (rows may still be skipped), 1 when a part or a configuration
failed or timed out (its rows say why), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("train", "host_sync", "small_levels", "gct_gate", "dali", "zero")
LEVERS = ["train.precision=bf16", "perf.channels_last=true", "perf.optimizer_impl=fused", "perf.host_sync=log"]
TINY = dict(expert_depth=18, width=16, num_experts=2, gn_groups=8, decoder_norm="gn")
DEMO = dict(expert_depth=18, width=16, num_experts=3, decoder_norm="gn")     # launch/configs/hip_demo.yaml
LOG_EVERY = 10
TRAIN_GOAL = 3.0
DALI_TOLERANCE = 0.03
NO_CUDA = "no CUDA device"
ZERO_SCRIPT = "benchmarks/gpu_checks_zero.sh"
DEFAULT_TIMEOUT = {"train": 1500, "host_sync": 600, "small_levels": 900, "gct_gate": 600, "dali": 900, "zero": 1200}


# ================================================================================================ small helpers

def versions() -> dict[str, str | None]:
    """Installed versions from the package metadata (nothing imported: importing DeepSpeed alone takes seconds)."""
    import history
    return history.library_versions()


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


def _hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def _shape(shape) -> str:
    return "x".join(str(v) for v in shape)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the device (the allocator's, or cuBLAS / cuDNN failing to get their workspace)."""
    import torch
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def release() -> None:
    """Drop what the last configuration left: Python garbage, the CUDA caching allocator's blocks, peak counters."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


@contextlib.contextmanager
def kernels_env(value: str | None):
    """MEDPOSE_KERNELS for the duration (read at every kernel call, so switching it in-process is exact)."""
    old = os.environ.get("MEDPOSE_KERNELS")
    if value is None:
        os.environ.pop("MEDPOSE_KERNELS", None)
    else:
        os.environ["MEDPOSE_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MEDPOSE_KERNELS", None)
        else:
            os.environ["MEDPOSE_KERNELS"] = old


def device_meta() -> dict[str, Any]:
    import torch

    import history
    cuda = torch.cuda.is_available()
    machine = history.machine_info()
    v = versions()
    meta = dict(cuda=cuda, cpu=machine["cpu_model"], logical_cpus=machine["logical_cores"],
                usable_cpus=machine["usable_cpus"], torch=torch.__version__, cuda_version=torch.version.cuda,
                triton=v.get("triton"), dali=v.get("nvidia-dali"), deepspeed=v.get("deepspeed"),
                python=platform.python_version(), torch_threads=torch.get_num_threads(),
                triton_interpret=os.environ.get("TRITON_INTERPRET"))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    else:
        meta["device"] = f"CPU {machine['cpu_model']} ({machine['usable_cpus']} usable CPUs)"
    return meta


# ================================================================================================ rows

def make_row(name: str, value: float | None, unit: str, better: str, *, status: str = "ok",
             peer: str | None = None, spread: list[float] | None = None, goal: dict | None = None,
             detail: str = "", **extra) -> dict[str, Any]:
    """One figure. status: "ok", "skipped: <why>" or "error: <why>" (value None unless ok). goal: {"text": ...,
    "min_speedup": x, "strict": bool} - met when the speed-up over `peer` is >= x (> x when strict)."""
    if status != "ok":
        value = None
    return dict(name=name, value=value, unit=unit, better=better, status=status, peer=peer, spread=spread,
                goal=goal, detail=detail, **extra)


def speedup(row: dict, peer: dict) -> float | None:
    if row.get("value") is None or peer.get("value") is None or not row["value"] or not peer["value"]:
        return None
    return peer["value"] / row["value"] if row["better"] == "lower" else row["value"] / peer["value"]


def add_ratios(rows: list[dict], not_judged: str | None = None) -> None:
    """speedup (over the peer row of the same part) and goal_met for every row that names a peer. The goals are GPU
    goals at full size: with `not_judged` (the reason, e.g. a --quick run) goal_met stays None and goal_note says
    why."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        r["speedup"] = None
        r["goal_met"] = None
        peer = by_name.get(r.get("peer")) if r.get("peer") else None
        if peer is not None:
            r["speedup"] = speedup(r, peer)
        goal = r.get("goal")
        if not goal:
            continue
        if r["status"] != "ok" or peer is None or peer.get("value") is None:
            r["goal_note"] = r["status"] if r["status"] != "ok" else "no peer figure"
        elif not_judged:
            r["goal_note"] = f"not judged: {not_judged}"
        else:
            x = goal["min_speedup"]
            r["goal_met"] = bool(r["speedup"] > x if goal.get("strict") else r["speedup"] >= x)


# ================================================================================================ the engine harness

def build_trainer(levers: list[str], model_args: dict | None, hw: tuple[int, int], batch: int, *,
                  extra: list[str] = (), train_set=None, run_dir: Path | None = None):
    """engine/trainer.py's Trainer for MultiHipPoseNet through the engine's own config -> strategy -> model ->
    criterion path (engine/run.py), every perf lever off (train_levers.OFF) except `levers`."""
    import torch

    from engine.config import load_config
    from engine.dist import DistInfo
    from engine.perf import check_perf
    from engine.run import build_model, make_criterion, make_strategy
    from engine.trainer import Trainer
    from train_levers import OFF

    overrides = [*OFF, *levers, "model.name=multihipposenet", "optim.name=adam", "optim.lr=1e-4",
                 "optim.scheduler=constant", f"train.batch_size={batch}", f"train.log_every={LOG_EVERY}",
                 "train.max_steps=1000000", "log.progress=false", "log.tensorboard=false",
                 f"data.input_hw=[{hw[0]}, {hw[1]}]", *extra]
    if model_args:
        overrides.append("model.args={" + ", ".join(f"{k}: {v}" for k, v in model_args.items()) + "}")
    cfg = load_config(None, overrides)
    check_perf(cfg, "single", cfg.train.precision)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    strategy = make_strategy(cfg, DistInfo(device=device))
    torch.manual_seed(967)
    model = build_model(cfg)
    criterion = make_criterion(cfg)
    run_dir = run_dir or Path(tempfile.gettempdir()) / f"medpose_gpu_throughput_{os.getpid()}"
    return Trainer(cfg, strategy, model, criterion, train_set if train_set is not None else list(range(64)), None,
                   run_dir)


def synthetic_batches(batch: int, hw: tuple[int, int], n_batches: int = 2, pin: bool = False) -> list:
    """In-memory Batches of random images and labels (benchmarks/plain_loop.py's synthetic_tensors), on the host;
    pinned when `pin` (the engine then copies them asynchronously)."""
    import torch

    from data_pipelines.batch import Batch
    from plain_loop import synthetic_tensors
    image, mask, heat, vis = synthetic_tensors(batch * n_batches, hw)
    out = []
    for i in range(0, batch * n_batches, batch):
        b = Batch(image[i:i + batch], torch.zeros(batch, vis.shape[1], 2), vis[i:i + batch], torch.ones(batch, 2),
                  mask[i:i + batch], heat[i:i + batch])
        out.append(b.pin_memory() if pin else b)
    return out


def cycle(items) -> Iterator:
    while True:
        yield from items


class Timed:
    """A trainer and its batch iterator, stepped and timed in windows (see the module docstring)."""

    def __init__(self, trainer, batches: Iterator, batch: int):
        self.trainer, self.batches, self.batch = trainer, batches, batch
        self.windows: list[float] = []     # seconds per step, one entry per window
        self.first_s = 0.0

    def _step(self) -> None:
        tr = self.trainer
        out = tr.train_step(self.batches)
        tr.step += 1
        if tr.deferred:
            if tr.step % LOG_EVERY == 0:
                tr.flush()
        elif out is None:
            raise RuntimeError(f"training step {tr.step} was skipped (non-finite loss or gradient)")

    def _finish(self) -> None:
        if self.trainer.deferred:
            self.trainer.flush()
        sync()

    def warm(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step()
        self._finish()
        self.first_s = time.perf_counter() - t0

    def window(self, steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step()
        self._finish()
        self.windows.append((time.perf_counter() - t0) / steps)
        return self.windows[-1]

    def check(self) -> None:
        if self.trainer.skipped_total:
            raise RuntimeError(f"{self.trainer.skipped_total} step(s) were skipped (non-finite loss or gradient); "
                               f"the timing would not be of full steps")

    def ms_row(self, name: str, **kw) -> dict:
        w = [1e3 * s for s in self.windows]
        return make_row(name, statistics.median(w), "ms/step", "lower", spread=[min(w), max(w)],
                        first_steps_s=round(self.first_s, 3), batch=self.batch, peak_gib=peak_gib(), **kw)

    def rate_row(self, name: str, **kw) -> dict:
        r = [self.batch / s for s in self.windows]
        return make_row(name, statistics.median(r), "samples/s", "higher", spread=[min(r), max(r)],
                        first_steps_s=round(self.first_s, 3), batch=self.batch, peak_gib=peak_gib(), **kw)


def run_timed(timed: Timed, s: dict) -> Timed:
    timed.warm(s["warmup"])
    for _ in range(s["windows"]):
        timed.window(s["steps"])
    timed.check()
    return timed


def compile_counters() -> dict[str, int]:
    """What torch.compile counted since the last reset: graphs compiled, graph breaks, CUDA-graph skips."""
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def reset_compile() -> None:
    import torch
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


def set_compile_backend(backend: str) -> None:
    """perf.compile calls nn.Module.compile(mode=...) with torch's default backend (inductor); for a cheaper backend
    the default is replaced by one that takes (and ignores) the mode: only inductor knows modes."""
    import torch
    if backend == "inductor":
        return
    if not hasattr(torch, "compiler") or not hasattr(torch.compiler, "set_default_backend"):
        raise RuntimeError(f"--compile-backend {backend} needs torch.compiler.set_default_backend (torch "
                           f"{torch.__version__} has none); use --compile-backend inductor")
    from torch._dynamo.backends.registry import lookup_backend
    inner = lookup_backend(backend)

    def backend_ignoring_mode(gm, example_inputs, mode=None, options=None):
        return inner(gm, example_inputs)
    backend_ignoring_mode.__name__ = f"{backend}_any_mode"
    torch.compiler.set_default_backend(backend_ignoring_mode)


# ================================================================================================ part: train

def _try_engine_batch(levers, model_args, hw, batch) -> tuple[bool, str]:
    """Two training steps at `batch`: (fits, peak GiB or the out-of-memory message)."""
    try:
        trainer = build_trainer(levers, model_args, hw, batch)
        timed = Timed(trainer, cycle(synthetic_batches(batch, hw, n_batches=1)), batch)
        timed.warm(2)
        timed.check()
        return True, f"{peak_gib():.1f} GiB peak"
    except Exception as exc:  # noqa: BLE001 - only an out-of-memory error ends the search quietly
        if is_oom(exc):
            return False, "out of memory"
        raise


def largest_batch(levers, model_args, hw, max_batch: int, log: Callable[[str], None]) -> tuple[int | None, list]:
    best, tried, b = None, [], 1
    while b <= max_batch:
        ok, what = _try_engine_batch(levers, model_args, hw, b)
        release()
        tried.append([b, what])
        log(f"  batch {b}: {'fits' if ok else 'does not fit'} ({what})")
        if not ok:
            break
        best, b = b, b * 2
    return best, tried


def plain_rate(model_args, hw, batch: int, s: dict, loader: bool) -> tuple[list[float], float]:
    """The plain loop (fp32, no Triton kernel): samples/s per window and the warm-up seconds."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from plain_loop import synthetic_tensors
    from train_levers import plain_step_times
    dl = None
    if loader:
        data = TensorDataset(*synthetic_tensors(batch * 4, hw))
        dl = DataLoader(data, batch_size=batch, shuffle=True, num_workers=s["workers"], drop_last=True,
                        pin_memory=torch.cuda.is_available(), persistent_workers=s["workers"] > 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with kernels_env("ref"):
        out = plain_step_times(model_args, hw, batch, s["steps"] * s["windows"], s["warmup"], device, loader=dl)
    times = out["times"]
    per_window = [sum(times[i:i + s["steps"]]) / s["steps"] for i in range(0, len(times), s["steps"])]
    return [batch / t for t in per_window], out["first_s"]


def part_train(s: dict, hints: dict, emit: Callable[[dict], None], note: Callable[[str], None]) -> None:
    import torch
    cuda = torch.cuda.is_available()
    args, hw, levers = s["train_args"], s["train_hw"], LEVERS

    # 1. the batch
    search_name = "largest batch that fits (engine levers, bf16)"
    if s["batch"]:
        batch = s["batch"]
        emit(make_row(search_name, None, "samples", "higher", status=f"skipped: --batch {batch} given"))
    elif cuda:
        note(f"searching the largest batch (powers of two up to {s['max_batch']})")
        batch, tried = largest_batch(levers, args, hw, s["max_batch"], note)
        if batch is None:
            emit(make_row(search_name, None, "samples", "higher",
                          status=f"error: batch 1 does not fit ({tried[0][1] if tried else '?'})"))
            return
        capped = len(tried) and tried[-1][1] != "out of memory"
        emit(make_row(search_name, float(batch), "samples", "higher", tried=tried,
                      detail=("tried " + ", ".join(f"{b} ({w})" for b, w in tried)
                              + (f"; stopped at --max-batch {s['max_batch']}" if capped else ""))))
    else:
        batch = s["cpu_batch"]
        emit(make_row(search_name, None, "samples", "higher",
                      status=f"skipped: {NO_CUDA} (the fixed batch {batch} is used)"))
    hints["train_batch"] = batch

    # 2a. plain loop + DataLoader, at the engine's batch or the largest power-of-two below it that fits in fp32
    plain_name = "(a) plain loop fp32, DataLoader"
    pb, plain_ok = batch, False
    while pb >= 1:
        try:
            rates, first = plain_rate(args, hw, pb, s, loader=True)
            emit(make_row(plain_name, statistics.median(rates), "samples/s", "higher", spread=[min(rates), max(rates)],
                          batch=pb, first_steps_s=round(first, 3), peak_gib=peak_gib(), workers=s["workers"],
                          detail=(f"batch {pb}" + (" (the engine's batch)" if pb == batch else
                                                   f" (the engine's batch {batch} does not fit in fp32)")
                                  + f", {s['workers']} workers" + (", pin_memory" if cuda else ""))))
            plain_ok = True
            break
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                emit(make_row(plain_name, None, "samples/s", "higher", status=f"error: {_error(exc)}"))
                traceback.print_exc(limit=4)
                break
            note(f"  plain loop fp32: batch {pb} does not fit, halving")
            pb //= 2
        finally:
            release()
    if pb < 1:
        emit(make_row(plain_name, None, "samples/s", "higher", status="error: batch 1 does not fit in fp32"))

    # 2a'. the plain loop on in-memory batches (no DataLoader)
    mem_name = "(a') plain loop fp32, in-memory batches"
    if plain_ok:
        try:
            rates, first = plain_rate(args, hw, pb, s, loader=False)
            emit(make_row(mem_name, statistics.median(rates), "samples/s", "higher", spread=[min(rates), max(rates)],
                          batch=pb, first_steps_s=round(first, 3), peak_gib=peak_gib(), peer=plain_name,
                          detail="what the DataLoader costs the plain loop (× peer > 1: the loader slows it)"))
        except Exception as exc:  # noqa: BLE001
            emit(make_row(mem_name, None, "samples/s", "higher", status=f"error: {_error(exc)}"))
            traceback.print_exc(limit=4)
        finally:
            release()

    # 2b, 2c. the engine
    goal = dict(text=f">= {TRAIN_GOAL:g}x the plain loop (a), samples/s", min_speedup=TRAIN_GOAL)
    for name, extra in (("(b) engine, levers (bf16, channels_last, fused, host_sync=log)", []),
                        ("(c) engine, levers + compile model", ["perf.compile=model"])):
        b = batch
        while b >= 1:
            timed = None
            try:
                if extra:
                    reset_compile()
                timed = Timed(build_trainer(levers + extra, args, hw, b),
                              cycle(synthetic_batches(b, hw, pin=cuda)), b)
                run_timed(timed, s)
                info = compile_counters() if extra else {}
                detail = (f"batch {b}" + ("" if b == batch else f" (batch {batch} ran out of memory)")
                          + (", pinned in-memory batches" if cuda else ", in-memory batches")
                          + (f"; compile backend {s['compile_backend']}, warm-up (compilation) "
                             f"{timed.first_s:.0f} s, {info['graphs']} graph(s), {info['graph_breaks']} graph "
                             f"break(s)" if extra else ""))
                emit(timed.rate_row(name, peer=plain_name, goal=goal, detail=detail, compile=info or None))
                break
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc) or b == 1:
                    emit(make_row(name, None, "samples/s", "higher", status=f"error: {_error(exc)}"))
                    traceback.print_exc(limit=4)
                    break
                note(f"  {name}: batch {b} ran out of memory, halving")
                b //= 2
            finally:
                del timed
                release()


# ================================================================================================ part: host_sync

def part_host_sync(s: dict, hints: dict, emit, note) -> None:
    import torch
    cuda = torch.cuda.is_available()
    if s["sync_batch"]:
        batch, why = s["sync_batch"], "--sync-batch"
    elif cuda and hints.get("train_batch"):
        batch, why = max(1, hints["train_batch"] // 2), f"half the train part's batch {hints['train_batch']}"
    else:
        batch, why = (16 if cuda else 2), "default"
    note(f"batch {batch} ({why})")
    hw, args = s["train_hw"], s["train_args"]
    base = [lv for lv in LEVERS if not lv.startswith("perf.host_sync")]
    names = {"step": "engine step, host_sync=step", "log": "engine step, host_sync=log"}
    timed = {}
    try:
        for mode in ("step", "log"):
            tr = build_trainer(base + [f"perf.host_sync={mode}"], args, hw, batch)
            timed[mode] = Timed(tr, cycle(synthetic_batches(batch, hw, pin=cuda)), batch)
            timed[mode].warm(s["warmup"])
        for _ in range(s["windows"]):          # alternate: slow drift of the machine falls on both
            for mode in ("step", "log"):
                timed[mode].window(s["steps"])
        for mode in ("step", "log"):
            timed[mode].check()
    except Exception as exc:  # noqa: BLE001
        for mode in ("step", "log"):
            emit(make_row(names[mode], None, "ms/step", "lower", status=f"error: {_error(exc)}"))
        traceback.print_exc(limit=4)
        return
    detail = (f"batch {batch} ({why}), {_hw(hw)}, levers bf16 + channels_last + fused; windows alternate between the "
              f"two trainers")
    emit(timed["step"].ms_row(names["step"], detail=detail))
    emit(timed["log"].ms_row(names["log"], peer=names["step"], detail=detail + "; × peer = speed-up of log over step"))


# ================================================================================================ part: small_levels

def part_small_levels(s: dict, hints: dict, emit, note) -> None:
    import torch
    cuda = torch.cuda.is_available()
    hw, args, batch = s["small_hw"], s["small_args"], s["small_batch"]
    eager = "small ME-GCT net, eager"
    configs = [(eager, [], None),
               ("small ME-GCT net, compile mode default", ["perf.compile=model", "perf.compile_mode=default"], None),
               ("small ME-GCT net, compile mode reduce-overhead",
                ["perf.compile=model", "perf.compile_mode=reduce-overhead"],
                dict(text="faster than eager (CUDA graphs remove the host-bound launches)", min_speedup=1.0,
                     strict=True))]
    arch = ", ".join(f"{k}={v}" for k, v in args.items())
    for name, extra, goal in configs:
        timed = None
        try:
            reset_compile()
            timed = Timed(build_trainer(LEVERS + extra, args, hw, batch), cycle(synthetic_batches(batch, hw, pin=cuda)),
                          batch)
            run_timed(timed, s)
            detail = f"MultiHipPoseNet({arch}) at {_hw(hw)}, batch {batch}, levers"
            info = None
            if extra:
                info = compile_counters()
                detail += (f"; compile backend {s['compile_backend']}, warm-up (compilation) {timed.first_s:.0f} s, "
                           f"{info['graphs']} graph(s), {info['graph_breaks']} graph break(s)")
                if "reduce-overhead" in extra[-1]:
                    if not cuda:
                        detail += "; no CUDA: reduce-overhead makes no CUDA graphs here (same code as mode default)"
                    elif s["compile_backend"] != "inductor":
                        detail += f"; backend {s['compile_backend']}: no CUDA graphs (only inductor makes them)"
                    else:
                        detail += f", {info['cudagraph_skips']} CUDA-graph skip(s)"
            emit(timed.ms_row(name, peer=None if name == eager else eager, goal=goal, detail=detail, compile=info))
        except Exception as exc:  # noqa: BLE001
            emit(make_row(name, None, "ms/step", "lower", status=f"error: {_error(exc)}",
                          peer=None if name == eager else eager, goal=goal))
            traceback.print_exc(limit=4)
        finally:
            del timed
            release()
    # reduce-overhead against mode default, as its own figure
    by = {r["name"]: r for r in s["_rows"]}
    ro, df = by.get(configs[2][0]), by.get(configs[1][0])
    if ro and df and ro["value"] is not None and df["value"] is not None:
        emit(make_row("small ME-GCT net, reduce-overhead (vs mode default)", ro["value"], "ms/step", "lower",
                      peer=configs[1][0], spread=ro["spread"],
                      detail="the reduce-overhead row again, its peer the mode-default row: what CUDA graphs add "
                             "to compilation" + ("" if cuda else " (no CUDA: nothing; both rows are the same code)")))


# ================================================================================================ part: gct_gate

def part_gct_gate(s: dict, hints: dict, emit, note) -> None:
    import torch

    from kernel_bench import GCT_SHAPES, QUICK_GCT, time_ms
    from kernels._dispatch import interpreting
    from kernels.gct_gate import gct_gate, gct_gate_ref
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        note("no CUDA: the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) - these timings "
             "check the code path and measure the interpreter, not the kernel")
    elif interpreting():
        note("WARNING: TRITON_INTERPRET is set on a CUDA machine: the kernels are interpreted, the timings mean "
             "nothing (unset it)")
    shapes = QUICK_GCT if s["quick"] else GCT_SHAPES
    provs = {"triton": lambda *a: gct_gate(*a, impl="triton"), "torch": lambda *a: gct_gate_ref(*a)}
    reps = 5 if not cuda else 20
    for shape in shapes:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for prov, fn in provs.items():
                names = {m: f"gct_gate {prov} {m} {_shape(shape)} {dtype_name}" for m in ("fwd", "bwd", "fwd+bwd")}
                try:
                    g = torch.Generator(device="cpu").manual_seed(0)
                    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
                    params = [(torch.rand(1, shape[1], 1, 1, generator=g) * 2).to(device).requires_grad_()
                              for _ in range(3)]
                    ins = [x, *params]
                    y = fn(*ins)
                    dy = torch.randn_like(y)
                    calls = {"fwd": lambda: fn(*ins),
                             "bwd": lambda: torch.autograd.grad(y, ins, dy, retain_graph=True),
                             "fwd+bwd": lambda: torch.autograd.grad(fn(*ins), ins, dy)}
                    for mode, call in calls.items():
                        call()                                   # compile / autotune outside the timing
                        ms = time_ms(call, device, reps=reps)
                        peer = names[mode].replace("bf16", "fp32") if dtype_name == "bf16" else None
                        goal = (dict(text="bf16 backward faster than fp32 backward", min_speedup=1.0, strict=True)
                                if prov == "triton" and mode == "bwd" and dtype_name == "bf16" else None)
                        emit(make_row(names[mode], ms, "ms", "lower", peer=peer, goal=goal, shape=list(shape),
                                      dtype=dtype_name, provider=prov, mode=mode,
                                      detail=("Triton CPU interpreter: not a kernel timing" if not cuda and
                                              prov == "triton" else "")))
                    del x, params, ins, y, dy
                except Exception as exc:  # noqa: BLE001
                    for mode in ("fwd", "bwd", "fwd+bwd"):
                        emit(make_row(names[mode], None, "ms", "lower", status=f"error: {_error(exc)}",
                                      shape=list(shape), dtype=dtype_name, provider=prov, mode=mode))
                    traceback.print_exc(limit=4)
                finally:
                    release()


# ================================================================================================ part: dali

def part_dali(s: dict, hints: dict, emit, note) -> None:
    import torch

    from loader_bench import HEATMAP_PEAK, have_dali, in_memory_feed, loader_feed, sigma_for, skip_reason
    from data_pipelines.synthetic.hip import generate_hip_dataset
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    hw, args, batch = s["dali_hw"], s["dali_args"], s["dali_batch"]
    providers = [p for p in s["dali_providers"]]
    mem = "engine step, in-memory batch on the device"
    goal = dict(text=f"DALI-fed step at most {100 * DALI_TOLERANCE:g} % slower than in-memory",
                min_speedup=1.0 / (1.0 + DALI_TOLERANCE))
    reasons = {p: skip_reason(p, device) for p in providers}
    if not any(r is None for r in reasons.values()):
        why = "; ".join(f"{p}: {r}" for p, r in reasons.items())
        emit(make_row(mem, None, "ms/step", "lower", status=f"skipped: no DALI provider can run ({why})"))
        for p in providers:
            for fmt in s["dali_formats"]:
                emit(make_row(f"engine step, {p}-t{s['dali_threads']} {fmt}", None, "ms/step", "lower",
                              status=f"skipped: {reasons[p]}", peer=mem, goal=goal if p == "dali-gpu" else None))
        return
    note(f"DALI {versions().get('nvidia-dali')}; {s['dali_images']} phantom images {_hw(s['dali_image_hw'])}, "
         f"batch {batch}, network input {_hw(hw)}")
    extra = [f"data.sigma_px={sigma_for(hw)}", f"data.heatmap_peak={HEATMAP_PEAK}", "data.targets=device"]
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_dali_") as tmp:
        tmp = Path(tmp)
        files = {fmt: generate_hip_dataset(tmp / fmt, s["dali_images"], seed=0, image_hw=s["dali_image_hw"],
                                           image_format=fmt) for fmt in s["dali_formats"]}
        first = s["dali_formats"][0]
        trainer = None
        try:
            ds, batches, close = in_memory_feed(files[first], hw, batch, device)
            trainer = build_trainer(LEVERS, args, hw, batch, extra=extra, train_set=ds, run_dir=tmp / "run")
            timed = run_timed(Timed(trainer, batches, batch), s)
            close()
            emit(timed.ms_row(mem, detail=f"one Batch (with heatmap targets) of {first} phantoms at {_hw(hw)} "
                                          f"already on {device.type}, reused; batch {batch}, levers"))
        except Exception as exc:  # noqa: BLE001
            emit(make_row(mem, None, "ms/step", "lower", status=f"error: {_error(exc)}"))
            traceback.print_exc(limit=4)
            trainer = None
        for p in providers:
            for fmt in s["dali_formats"]:
                name = f"engine step, {p}-t{s['dali_threads']} {fmt}"
                g = goal if p == "dali-gpu" else None
                if reasons[p]:
                    emit(make_row(name, None, "ms/step", "lower", status=f"skipped: {reasons[p]}", peer=mem, goal=g))
                    continue
                if trainer is None:
                    emit(make_row(name, None, "ms/step", "lower", status="skipped: the in-memory row failed (no "
                                  "trainer, no peer)", peer=mem, goal=g))
                    continue
                close = None
                try:
                    _, batches, close = loader_feed(p, s["dali_threads"], files[fmt], hw, batch, device)
                    timed = run_timed(Timed(trainer, batches, batch), s)   # the same trainer: same weights path
                    emit(timed.ms_row(name, peer=mem, goal=g,
                                      detail=f"{p} pipeline, {s['dali_threads']} thread(s), {fmt} phantoms "
                                             f"{_hw(s['dali_image_hw'])} decoded + augmented every time, targets "
                                             f"rendered by the loss on {device.type}"
                                             + ("" if p == "dali-gpu" else "; a code-path check, no goal")))
                except Exception as exc:  # noqa: BLE001
                    emit(make_row(name, None, "ms/step", "lower", status=f"error: {_error(exc)}", peer=mem, goal=g))
                    traceback.print_exc(limit=4)
                finally:
                    if close is not None:
                        close()
                    release()
        if not have_dali():
            note("nvidia.dali is not installed")


# ================================================================================================ part: zero

def zero_command(prefix: str) -> str:
    """The call of gpu_checks_zero.sh from the repository root (`prefix` is relative to it or absolute)."""
    return f"OUT={shlex.quote(prefix + '_zero')} bash {ZERO_SCRIPT}"


def part_zero(s: dict, hints: dict, emit, note) -> None:
    import torch
    cuda = torch.cuda.is_available()
    cmd = zero_command(s["zero_prefix"])
    note(f"command: {cmd}   (env WORLD = GPUs to use; LARGEST_S, TPUT_S = stage time limits; see the script's header)")
    names = [("largest hourglass at batch 4/device, " + st, "M parameters") for st in
             ("ddp", "zero2", "zero3", "zero2_offload", "zero3_offload")]
    names += [("samples/s " + m + ", " + st, "samples/s") for m in ("2x256", "mhp") for st in ("ddp", "zero2")]
    if not cuda or not s["run_zero"]:
        why = (f"{NO_CUDA} (DeepSpeed {versions().get('deepspeed') or 'not installed'} here)" if not cuda else
               f"run separately: {cmd} (or pass --run-zero; ~8 minutes)")
        for name, unit in names:
            emit(make_row(name, None, unit, "higher", status=f"skipped: {why}"))
        return
    out = Path(s["zero_prefix"] + "_zero")
    note(f"running {cmd}")
    # its stages end on their own time limits (LARGEST_S, TPUT_S); --part-timeout of zero bounds the whole
    proc = subprocess.run(["bash", ZERO_SCRIPT], cwd=REPO, env={**os.environ, "OUT": str(out)})
    note(f"{ZERO_SCRIPT} exited with {proc.returncode}")
    largest = _read_json(out / "largest" / "largest.json") or []
    for r in largest:
        name = f"largest hourglass at batch 4/device, {r.get('strategy')}"
        if r.get("params"):
            emit(make_row(name, r["params"] / 1e6, "M parameters", "higher",
                          detail=f"variant {r.get('largest')}, first failing {r.get('first_failing') or 'none'}"
                                 + (f" ({r['error']})" if r.get("error") else "")))
        else:
            emit(make_row(name, None, "M parameters", "higher", status=f"error: none trains ({r.get('error')})"))
    tput = _read_json(out / "throughput" / "throughput.json") or []
    for r in tput:
        name = f"samples/s {r.get('model')}, {r.get('strategy')}"
        peer = f"samples/s {r.get('model')}, ddp" if r.get("strategy") != "ddp" else None
        if "samples_per_s" in r:
            emit(make_row(name, r["samples_per_s"], "samples/s", "higher", peer=peer,
                          detail=f"input {r.get('hw')}, device peak {r.get('device_peak')} B"))
        else:
            emit(make_row(name, None, "samples/s", "higher", status=f"error: {r.get('error')}", peer=peer))
    if not largest and not tput:
        emit(make_row("gpu_checks_zero.sh", None, "-", "higher",
                      status=f"error: no largest/largest.json nor throughput/throughput.json in {out} (exit "
                             f"{proc.returncode})"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


PART_FUNCS = {"train": part_train, "host_sync": part_host_sync, "small_levels": part_small_levels,
              "gct_gate": part_gct_gate, "dali": part_dali, "zero": part_zero}


# ================================================================================================ settings

def resolve_settings(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Every size and count the parts use, from the options, --quick and whether CUDA is present."""
    q = args.quick
    cpus = os.cpu_count() or 1
    backend = args.compile_backend
    if backend == "auto":
        backend = "aot_eager" if q and not cuda else "inductor"
    dali_providers = ["dali-gpu"] if cuda else ["dali-cpu", "dali-gpu"]
    if args.dali_providers:
        dali_providers = args.dali_providers
    return dict(
        quick=q,
        train_args=TINY if q else None, train_hw=(64, 96) if q else (384, 512),
        batch=args.batch, cpu_batch=args.batch or 2, max_batch=args.max_batch or (8 if q else 256),
        workers=args.workers if args.workers is not None else (2 if q else min(8, cpus)),
        warmup=args.warmup if args.warmup is not None else (1 if q else 2),
        steps=args.steps or (2 if q else 4), windows=args.windows or (2 if q else 3),
        compile_backend=backend,
        sync_batch=args.sync_batch,
        small_args=TINY if q else DEMO, small_hw=(64, 96) if q else (128, 160), small_batch=args.small_batch or (2 if q
                                                                                                              else 8),
        dali_args=TINY if q else None, dali_hw=(64, 96) if q else (384, 512),
        dali_batch=args.dali_batch or (2 if q else 16),
        dali_formats=args.dali_formats or (["png"] if q else ["jpg", "png"]),
        dali_threads=args.dali_threads or (1 if q else cpus),
        dali_image_hw=(120, 160) if q else (480, 640),
        dali_images=16 if q else max(64, 8 * (args.dali_batch or 16)),
        dali_providers=dali_providers,
        zero_prefix=_repo_relative(args.out) if args.out else "/tmp/gpu_throughput", run_zero=args.run_zero,
    )


def _repo_relative(path: str) -> str:
    """The path as the workers (which run in the repository root) must see it: relative to the root when inside it."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(REPO))
    except ValueError:
        return str(full)


def describe_settings(s: dict) -> str:
    model = "tiny MultiHipPoseNet (" + ", ".join(f"{k}={v}" for k, v in TINY.items()) + ")" if s["quick"] else \
        "published MultiHipPoseNet (builder defaults)"
    return (f"train / host_sync: {model} at {_hw(s['train_hw'])}; small_levels at {_hw(s['small_hw'])}, batch "
            f"{s['small_batch']}; {s['warmup']} warm-up step(s), then {s['windows']} windows of {s['steps']} steps; "
            f"DataLoader workers {s['workers']}; torch.compile backend {s['compile_backend']}; dali: batch "
            f"{s['dali_batch']}, {', '.join(s['dali_formats'])}, {s['dali_threads']} thread(s)")


# ================================================================================================ the worker

def worker_main(part: str, job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    s, hints, result_path = job["settings"], job["hints"], Path(job["result"])
    for key in ("train_hw", "small_hw", "dali_hw", "dali_image_hw"):
        s[key] = tuple(s[key])
    import torch
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    result = dict(part=part, status="running", rows=[], notes=[], hints=hints, started=time.time())
    s["_rows"] = result["rows"]

    def save() -> None:
        result["seconds"] = round(time.time() - result["started"], 1)
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(result_path)

    def emit(row: dict) -> None:
        row["part"] = part
        result["rows"].append(row)
        value = f"{row['value']:.4g} {row['unit']}" if row["value"] is not None else row["status"]
        print(f"[{part}] {row['name']}: {value}" + (f"  ({row['detail']})" if row.get("detail") else ""), flush=True)
        save()

    def note(text: str) -> None:
        result["notes"].append(text)
        print(f"[{part}] {text}", flush=True)
        save()

    try:
        result["device"] = device_meta()
        save()
        if part in ("train", "host_sync", "small_levels"):
            set_compile_backend(s["compile_backend"])
        PART_FUNCS[part](s, hints, emit, note)
        bad = [r for r in result["rows"] if r["status"].startswith("error")]
        result["status"] = f"error: {len(bad)} configuration(s) failed" if bad else "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the table, the parent goes on with the next part
        result["status"] = f"error: {_error(exc)}"
        result["traceback"] = traceback.format_exc()[-3000:]
        traceback.print_exc()
    save()
    return 0


# ================================================================================================ the parent

def run_part(part: str, settings: dict, hints: dict, timeout: int, env: dict, workdir: Path) -> dict:
    """One part in a child process; its output is echoed; on a time-out the child's process group is killed and what
    it had written is kept."""
    job = workdir / f"{part}.job.json"
    result = workdir / f"{part}.result.json"
    job.write_text(json.dumps(dict(settings=settings, hints=hints, result=str(result)), default=list))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--job", str(job)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(line, end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    out = _read_json(result) or dict(part=part, rows=[], notes=[])
    out["seconds"] = round(time.time() - t0, 1)
    if timed_out:
        out["status"] = f"error: timed out after {timeout} s (--part-timeout); {len(out['rows'])} row(s) kept"
    elif proc.returncode != 0 or out.get("status") in (None, "running"):
        out["status"] = (f"error: the worker exited with code {proc.returncode} before finishing; "
                         f"{len(out['rows'])} row(s) kept")
        out["output_tail"] = list(tail)
    on_cuda = bool((out.get("device") or {}).get("cuda"))
    add_ratios(out["rows"], None if on_cuda and not settings["quick"] else
               "--quick smoke run" if on_cuda else f"{NO_CUDA} (a GPU goal)")
    return out


def fmt_value(v: float | None) -> str:
    if v is None:
        return ""
    if v == 0:
        return "0"
    mag = abs(v)
    return f"{v:.0f}" if mag >= 1000 else f"{v:.1f}" if mag >= 100 else f"{v:.2f}" if mag >= 1 else f"{v:.4f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(meta: dict, parts: dict[str, dict]) -> str:
    dev = meta.get("device_meta") or {}
    lines = [f"# Training throughput checks — {dev.get('device', '?')}, {meta['date']}", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    if meta["quick"]:
        lines += ["**Smoke run (--quick): tiny sizes, every code path exercised; the figures are not throughput "
                  "figures.**", ""]
    if dev.get("cuda"):
        where = (f"Device: {dev.get('device')} ({dev.get('gpu_memory_gib')} GiB, {dev.get('gpu_count')} GPU(s) "
                 f"visible); host CPU: {dev.get('cpu', '?')} ({dev.get('usable_cpus', '?')} usable CPUs)")
    else:
        where = f"Device: {dev.get('device', '?')}, no CUDA device"
    git = meta["git"]
    lines += [f"{where}; torch {dev.get('torch', '?')} (CUDA build {dev.get('cuda_version')}), Triton "
              f"{dev.get('triton')}, DALI {dev.get('dali')}, DeepSpeed {dev.get('deepspeed')}, Python "
              f"{dev.get('python')}; commit {git.get('short')}"
              f"{' (with uncommitted changes)' if git.get('dirty') else ''}.", ""]
    for run in meta["runs"]:
        lines += [f"Command ({run['date']}, parts {', '.join(run['parts'])}): `{run['command']}`", "",
                  f"Settings: {run['settings_text']}.", ""]
    lines += ["Every ratio divides two figures of the same run. Values are medians over the timing windows; spread = "
              "slowest–fastest window; × peer = speed-up over the peer row (> 1 = faster).", ""]
    goals = [r for p in parts.values() for r in p["rows"] if r.get("goal")]
    if goals:
        lines += ["## Goals", "", "| part | figure | goal | × peer | met? |", "|---|---|---|---|---|"]
        for r in goals:
            met = r.get("goal_note") or "?" if r.get("goal_met") is None else "**yes**" if r["goal_met"] else "**no**"
            sp = f"{r['speedup']:.2f}×" if r.get("speedup") is not None else ""
            lines.append(f"| {r['part']} | {_cell(r['name'])} | {_cell(r['goal']['text'])} | {sp} | {_cell(met)} |")
        lines.append("")
    lines += ["## Figures", "",
              "| part | figure | value | unit | spread | peer (same run) | × peer | status / detail |",
              "|---|---|---|---|---|---|---|---|"]
    for name, p in parts.items():
        rows = [r for r in p["rows"] if not (name == "gct_gate" and r.get("provider") and not r.get("goal"))]
        for r in rows:
            spread = f"{fmt_value(r['spread'][0])}–{fmt_value(r['spread'][1])}" if r.get("spread") else ""
            sp = f"{r['speedup']:.2f}×" if r.get("speedup") is not None else ""
            status = r["detail"] if r["status"] == "ok" else r["status"] + (f" ({r['detail']})" if r["detail"] else "")
            lines.append(f"| {name} | {_cell(r['name'])} | {fmt_value(r['value'])} | {r['unit']} | {spread} | "
                         f"{_cell(r.get('peer') or '')} | {sp} | {_cell(status)} |")
        if not p["rows"]:
            lines.append(f"| {name} | (no figure) | | | | | | {_cell(p.get('status', '?'))} |")
    gct = parts.get("gct_gate")
    if gct and any(r.get("provider") for r in gct["rows"]):
        lines += ["", "### gct_gate, every timing (ms; bf16 speed-up = fp32 ms / bf16 ms)", "",
                  "| shape | provider | mode | fp32 ms | bf16 ms | bf16 speed-up |", "|---|---|---|---|---|---|"]
        by = {(tuple(r["shape"]), r["provider"], r["mode"], r["dtype"]): r for r in gct["rows"] if r.get("provider")}
        for (shape, prov, mode, dt), r in by.items():
            if dt != "fp32":
                continue
            b = by.get((shape, prov, mode, "bf16"), {})
            sp = f"{b['speedup']:.2f}×" if b.get("speedup") is not None else b.get("status", "")
            lines.append(f"| {_shape(shape)} | {prov} | {mode} | {fmt_value(r['value']) or r['status']} | "
                         f"{fmt_value(b.get('value')) or b.get('status', '')} | {_cell(sp)} |")
    lines += ["", "## Parts", ""]
    for name, p in parts.items():
        other = (p.get("device") or {}).get("device")
        lines.append(f"- **{name}**: {_cell(p.get('status', '?'))}, {p.get('seconds', 0):.0f} s"
                     + (f" (on {other})" if other and other != dev.get("device") else "")
                     + "".join(f"\n  - {_cell(n)}" for n in p.get("notes", [])))
        if p.get("output_tail"):
            lines.append("  - last output lines: `" + _cell(" / ".join(p["output_tail"][-5:]))[:800] + "`")
    return "\n".join(lines) + "\n"


def history_rows(parts: dict[str, dict]) -> list[dict]:
    rows = []
    for name, p in parts.items():
        ok = {r["name"] for r in p["rows"] if r["value"] is not None}
        for r in p["rows"]:
            if r["value"] is None:
                continue
            row = {"group": name, "name": r["name"], "value": float(r["value"]), "unit": r["unit"],
                   "better": r["better"]}
            if r.get("spread"):
                row["spread"] = [float(v) for v in r["spread"]]
            if r.get("peer") in ok:
                row["ratio_to"] = r["peer"]
            rows.append(row)
    return rows


def parse_timeouts(text: str | None) -> dict[str, int]:
    """"600" -> {"*": 600}; "train=420,dali=150" -> {"train": 420, "dali": 150}."""
    if not text:
        return {}
    out = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, _, value = item.rpartition("=")
        key = key.strip() or "*"
        if key != "*" and key not in PARTS:
            raise ValueError(f"unknown part {key!r} (choose from {', '.join(PARTS)})")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{item!r}: not a number of seconds") from None
        if out[key] < 1:
            raise ValueError(f"{item!r}: must be >= 1 second")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write PREFIX.md and PREFIX.json (folders are created)", metavar="PREFIX")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every code path (see above)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)} "
                                                              f"(default all, in that order)")
    ap.add_argument("--record", action="store_true", help="store the numeric rows in benchmarks/history/")
    ap.add_argument("--note", default="", help="a sentence printed in bold at the top of PREFIX.md")
    ap.add_argument("--append", action="store_true",
                    help="keep the parts of an existing PREFIX.json that this call does not run (several calls, e.g. "
                         "under a per-command time limit, fill one table; host_sync takes the train part's batch "
                         "from it)")
    g = ap.add_argument_group("sizes and counts (defaults depend on --quick and on CUDA)")
    g.add_argument("--batch", type=int, help="train: use this batch instead of searching the largest (no search)")
    g.add_argument("--max-batch", type=int, help="train: largest batch the search tries (default 256; 8 --quick)")
    g.add_argument("--workers", type=int, help="train: DataLoader workers of the plain loop (default min(8, CPUs); "
                                               "2 --quick)")
    g.add_argument("--warmup", type=int, help="untimed steps before the windows (default 2; 1 --quick)")
    g.add_argument("--steps", type=int, help="steps per timing window (default 4; 2 --quick)")
    g.add_argument("--windows", type=int, help="timing windows per configuration (default 3; 2 --quick)")
    g.add_argument("--sync-batch", type=int, help="host_sync: batch (default: half the train part's batch, else 16; "
                                                  "2 without CUDA)")
    g.add_argument("--small-batch", type=int, help="small_levels: batch (default 8; 2 --quick)")
    g.add_argument("--dali-batch", type=int, help="dali: batch (default 16; 2 --quick)")
    g.add_argument("--dali-formats", help="dali: phantom image formats, comma-separated png,jpg (default jpg,png; "
                                          "png --quick)")
    g.add_argument("--dali-threads", type=int, help="dali: DALI num_threads (default os.cpu_count(); 1 --quick)")
    g.add_argument("--dali-providers", help="dali: dali-gpu,dali-cpu subset (default dali-gpu with CUDA, both "
                                            "without: dali-gpu then reads skipped)")
    g.add_argument("--compile-backend", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="torch.compile backend of the compiled rows (auto: inductor, but aot_eager for --quick "
                        "without CUDA)")
    g.add_argument("--part-timeout", metavar="S | PART=S,...",
                   help="seconds a part may run before its process is killed: one number for every part, or per part "
                        "as train=420,dali=150 (default " + ",".join(f"{k}={v}" for k, v in DEFAULT_TIMEOUT.items())
                        + ")")
    g.add_argument("--run-zero", action="store_true", help=f"zero: run {ZERO_SCRIPT} here (CUDA + DeepSpeed wheels "
                                                           f"in .whl/; ~8 minutes)")
    ap.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        if not args.job:
            ap.error("--worker needs --job")
        return worker_main(args.worker, args.job)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts: unknown {', '.join(unknown) or repr(args.parts)} (choose from {', '.join(PARTS)})")
    parts = [p for p in PARTS if p in parts]
    for key in ("batch", "max_batch", "steps", "windows", "sync_batch", "small_batch", "dali_batch", "dali_threads"):
        v = getattr(args, key)
        if v is not None and v < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if (args.workers is not None and args.workers < 0) or (args.warmup is not None and args.warmup < 0):
        ap.error("--workers and --warmup must be >= 0")
    try:
        timeouts = parse_timeouts(args.part_timeout)
    except ValueError as exc:
        ap.error(f"--part-timeout: {exc}")
    if args.append and not args.out:
        ap.error("--append needs --out")
    if args.dali_formats:
        args.dali_formats = [f.strip() for f in args.dali_formats.split(",") if f.strip()]
        if not args.dali_formats or any(f not in ("png", "jpg") for f in args.dali_formats):
            ap.error("--dali-formats: png and/or jpg")
    if args.dali_providers:
        args.dali_providers = [p.strip() for p in args.dali_providers.split(",") if p.strip()]
        if not args.dali_providers or any(p not in ("dali-gpu", "dali-cpu") for p in args.dali_providers):
            ap.error("--dali-providers: dali-gpu and/or dali-cpu")

    import torch

    import history
    cuda = torch.cuda.is_available()
    settings = resolve_settings(args, cuda)
    out = Path(args.out) if args.out else None
    words = argv if argv is not None else sys.argv[1:]
    run = dict(date=time.strftime("%Y-%m-%d %H:%M"), parts=parts, settings=settings,
               settings_text=describe_settings(settings),
               command="python benchmarks/gpu_throughput.py " + " ".join(shlex.quote(a) for a in words))
    meta = dict(date=run["date"], quick=args.quick, note=args.note, runs=[run], git=history.git_info(),
                versions=history.library_versions(), goals=dict(train_min_speedup=TRAIN_GOAL,
                                                                dali_max_slowdown=DALI_TOLERANCE))
    results: dict[str, dict] = {}
    hints: dict[str, Any] = {}
    if args.append and Path(f"{out}.json").exists():
        old = _read_json(Path(f"{out}.json"))
        if not isinstance(old, dict) or not isinstance(old.get("parts"), dict) or "meta" not in old:
            ap.error(f"--append: {out}.json is not a gpu_throughput result")
        if bool(old["meta"].get("quick")) != args.quick:
            ap.error(f"--append: {out}.json was {'' if old['meta'].get('quick') else 'not '}a --quick run; this one "
                     f"is{'' if args.quick else ' not'}")
        kept = {k: v for k, v in old["parts"].items() if k not in parts}
        for p in kept.values():
            hints.update(p.get("hints") or {})
        meta["runs"] = [r for r in old["meta"].get("runs", []) if set(r["parts"]) & set(kept)] + meta["runs"]
        meta["note"] = args.note or old["meta"].get("note", "")
        results.update({k: kept[k] for k in PARTS if k in kept})
        print(f"--append: keeping {', '.join(kept) or 'no part'} from {out}.json", flush=True)
    print(f"gpu_throughput: parts {', '.join(parts)}; {'CUDA' if cuda else 'no CUDA'}; {run['settings_text']}",
          flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    env.setdefault("MPLBACKEND", "Agg")

    def write() -> None:
        ordered = {k: results[k] for k in PARTS if k in results}
        meta["device_meta"] = next((p["device"] for k, p in ordered.items() if k in parts and p.get("device")),
                                   next((p["device"] for p in ordered.values() if p.get("device")),
                                        dict(device="?", cuda=cuda, torch=torch.__version__)))
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(dict(meta=meta, parts=ordered), indent=1, default=str) + "\n")
        Path(f"{out}.md").write_text(markdown(meta, ordered))

    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as work:
        for part in parts:
            part_env = dict(env)
            if part == "gct_gate" and not cuda and "TRITON_INTERPRET" not in env:
                part_env["TRITON_INTERPRET"] = "1"      # must be set before the kernels are defined
            timeout = timeouts.get(part) or timeouts.get("*") or DEFAULT_TIMEOUT[part]
            print(f"\n== part {part} (time limit {timeout} s)", flush=True)
            res = run_part(part, settings, hints, timeout, part_env, Path(work))
            hints.update(res.get("hints") or {})
            res["hints"] = {k: v for k, v in (res.get("hints") or {}).items() if k == "train_batch" and part == "train"}
            results[part] = res
            print(f"== part {part}: {res['status']} ({res['seconds']:.0f} s)", flush=True)
            write()
    write()
    md = markdown(meta, {k: results[k] for k in PARTS if k in results})
    print("\n" + md, flush=True)
    if args.record:
        rows = history_rows(results)
        if rows:
            suite = "gpu_throughput" + ("_quick" if args.quick else "")
            print("recorded:", history.record_rows(suite, rows, notes=f"{meta['device_meta'].get('device')}; "
                                                                      f"{meta['settings_text']}"))
        else:
            print("--record: no numeric figure to record")
    failed = [p for p, r in results.items() if str(r.get("status", "")).startswith("error")]
    if failed:
        print(f"failed parts: {', '.join(failed)} (see their rows)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
