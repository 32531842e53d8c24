"""Loader benchmark (issue 5): the hip dataset's batches per second through every loader, side by side in one run,
and what each loader costs a MultiHipPoseNet training step.

    python benchmarks/loader_bench.py --out benchmarks/results/loaders      # full run (GPU: every provider)
    python benchmarks/loader_bench.py --quick                                # seconds-scale smoke run (any device)
    python benchmarks/loader_bench.py --sizes 384x512,256x256 --workers 0,2 --n-images 32 --providers torch-pil,dali-cpu

Data: `--n-images` phantom hips (data_pipelines.synthetic.hip, 240x320 unless --image-hw) written once per `--format`
(png, and jpg = quality-95 JPEG, what DALI's nvJPEG decodes) into a temporary folder. Every sample is decoded each
time it is loaded (cache_decoded=False) and augmented (AugmentParams(flip_p=0.5): affine, flip, intensity).

Throughput section, per input size (`--sizes`; 384x512 = MultiHipPoseNet's input, 256x256 = the hourglass's) and
format, samples/s of "decode + augment + heatmap targets" for a batch of `--batch`:
  torch-pil-wW, torch-cv2-wW   make_batches(kind="torch", num_workers=W) over HipDataset(image_decoder="pil"|"cv2",
                               heatmap_impl="numba"): targets rendered in the workers. W from --workers (default 2
                               and os.cpu_count()).
  dali-cpu-tT, dali-gpu-tT     make_batches(kind="dali", device_id=None|0, num_threads=T) over HipDataset(
                               heatmap_impl="none"); the DALI Batch has no heatmaps, so the timed loop renders them with
                               kernels.heatmap_render.render_heatmaps on the batch's device (the GPU when present).
                               T from --threads (default: --workers, 0 read as 1). Skipped, with the reason printed,
                               without nvidia.dali (both) or without CUDA (gpu).
One warm-up epoch, then `--epochs` whole epochs are timed (a fresh DataLoader iterator per epoch, as the trainer
did until 2026-12-04: worker start-up is part of an epoch; the trainer now keeps one loader across epochs, so the
torch rows are a lower bound for it - benchmarks/loader_epochs.py measures the difference). On CUDA every batch is moved with batch.to("cuda", non_blocking=True)
(the torch rows ask for pin_memory=True; the `pinned` field says whether the batch arrived pinned) and the clock
stops after torch.cuda.synchronize(). samples/s = samples / seconds. The `x torch-pil-w2` column divides by the
torch-pil-w2 row of the same size and format. `1st batch s` is the mean time to an epoch's first batch (DataLoader
worker start-up, DALI prefetch) and `samples/s after it` the rate of the rest of the epoch (the steady state a long
epoch approaches; with few batches per epoch and many workers the whole-epoch figure is mostly start-up).

Training-step section (`--steps` K > 0): at `--step-size` (default 384x512 on CUDA, 128x160 on CPU), ms per
engine training step (engine.trainer.Trainer.train_step: forward under the strategy's autocast - bf16 on CUDA -,
loss, backward, clip, optimizer step) of the model of `--model` (published: the builder's defaults = 3 ResNet-50
experts, width 64, the hip task's published size; demo: launch/configs/hip_demo.yaml, what a CPU can run) fed by
  in-memory                    one pre-built Batch (with heatmap targets) already on the device, reused: no data path;
  every loader above           cycling over epochs; DALI batches get their targets rendered by the loss on the device
                               (data.targets=device, as the engine does).
after `--warmup-steps` untimed steps. ratio = ms/step over the in-memory ms/step: 1.0 = the data path is hidden.

Every row is measured inside its own try/except: a provider that fails prints the error and its row records
"error" instead of ending the run. Results (JSON + markdown) are rewritten after every row when --out is given.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.batch import Batch, collate_samples  # noqa: E402
from data_pipelines.readers.labelme_reader import HipDataset  # noqa: E402
from data_pipelines.loaders import make_batches  # noqa: E402
from data_pipelines.sampler import ShardedSampler  # noqa: E402
from data_pipelines.synthetic.hip import generate_hip_dataset  # noqa: E402
from data_pipelines.transforms import AugmentParams  # noqa: E402
from kernels.heatmap_render import render_heatmaps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "launch" / "configs" / "hip_demo.yaml"
PROVIDERS = ("torch-pil", "torch-cv2", "dali-cpu", "dali-gpu")
BASELINE = "torch-pil-w2"
HEATMAP_PEAK = 255.0
PUBLISHED_SIGMA_PX, PUBLISHED_HW = 7.0, (384, 512)
QUICK = dict(sizes="128x160", format="png", workers="0,2", n_images=16, epochs=2, steps=2, warmup_steps=1,
             step_size="128x160")
FULL = dict(sizes="384x512,256x256", format="png,jpg", workers=None, n_images=64, epochs=3, steps=10, warmup_steps=3,
            step_size="auto")


# ----------------------------------------------------------------------------------------------------------------
# small helpers

def parse_hw_list(text: str) -> list[tuple[int, int]]:
    """"384x512,256x256" -> [(384, 512), (256, 256)]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {part!r} is not HxW (e.g. 384x512)") from None
        if h < 2 or w < 2:
            raise argparse.ArgumentTypeError(f"size {part!r}: both sides must be >= 2")
        out.append((h, w))
    if not out:
        raise argparse.ArgumentTypeError("no size given")
    return out


def parse_int_list(text: str, what: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{what}: need integers >= {minimum}, got {text!r}")
    return list(dict.fromkeys(values))


def parse_choices(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{what}: unknown {bad or text!r} (choose from {', '.join(choices)})")
    return list(dict.fromkeys(values))


def hw_name(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def sigma_for(hw: tuple[int, int]) -> float:
    """The published 7 px at 384x512, scaled with the letterbox factor (2.2 px at 128x160, 3.5 px at 256x256)."""
    return round(PUBLISHED_SIGMA_PX * min(hw[0] / PUBLISHED_HW[0], hw[1] / PUBLISHED_HW[1]), 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def have_dali() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(__import__(module, fromlist=["__version__"]), "__version__", "?"))
    except Exception as exc:  # a broken install is worth a note, not a crash
        return f"import failed: {type(exc).__name__}"


def run_meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cores = os.cpu_count()
    cpu = f"{platform.processor() or platform.machine()} ({cores} cores)"
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu}", cpu=cpu,
                cpu_count=cores, date=time.strftime("%Y-%m-%d %H:%M"), python=platform.python_version(),
                torch=torch.__version__, dali=_version("nvidia.dali"), opencv=_version("cv2"),
                pillow=_version("PIL"), numba=_version("numba"), torch_threads=torch.get_num_threads(),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:400]}"


# ----------------------------------------------------------------------------------------------------------------
# datasets and loaders

def provider_spec(family: str) -> dict[str, Any]:
    """loader kind, image decoder (torch rows), DALI device id, and the letter of the parallelism column."""
    kind, what = family.split("-")
    if kind == "torch":
        return dict(kind="torch", decoder=what, device_id=None, letter="w")
    return dict(kind="dali", decoder=None, device_id=0 if what == "gpu" else None, letter="t")


def skip_reason(family: str, device: torch.device) -> str | None:
    if family.startswith("dali") and not have_dali():
        return "nvidia.dali is not installed (pip install nvidia-dali-cuda130)"
    if family == "dali-gpu" and device.type != "cuda":
        return "no CUDA device"
    return None


def make_dataset(files: list[Path], hw: tuple[int, int], family: str) -> HipDataset:
    """Every sample decoded on every load; torch rows render numba targets in the workers, DALI rows none."""
    common = dict(input_hw=hw, augment=AugmentParams(flip_p=0.5), sigma_px=sigma_for(hw),
                  heatmap_peak=HEATMAP_PEAK, cache_decoded=False)
    spec = provider_spec(family)
    if spec["kind"] == "torch":
        return HipDataset(files, heatmap_impl="numba", image_decoder=spec["decoder"], **common)
    return HipDataset(files, heatmap_impl="none", **common)


def make_loader(ds: HipDataset, batch: int, family: str, count: int, device: torch.device):
    """(loader, sampler) exactly as the trainer asks make_batches for them."""
    sampler = ShardedSampler(len(ds), shuffle=True, drop_last=True, batch_size=batch, seed=0)
    spec = provider_spec(family)
    if spec["kind"] == "torch":
        loader = make_batches(ds, batch, sampler, kind="torch", num_workers=count,
                              pin_memory=device.type == "cuda")
    else:
        loader = make_batches(ds, batch, sampler, kind="dali", device_id=spec["device_id"], num_threads=count)
    return loader, sampler


def set_epoch(epoch: int, *objs) -> None:
    for obj in objs:
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def deliver(batch: Batch, device: torch.device, hw: tuple[int, int]) -> Batch:
    """What the training loop needs from a batch: on the device, with heatmap targets (rendered here, on the
    batch's device after the move, when the loader brought none - the DALI rows)."""
    batch = batch.to(device, non_blocking=True)
    if batch.heatmap_BKHW is None:
        batch.heatmap_BKHW = render_heatmaps(batch.kpts_px_BK2, batch.kpts_visible_BK, hw, sigma_for(hw),
                                             HEATMAP_PEAK)
    return batch


def cycle_batches(loader, ds, sampler) -> Iterator[Batch]:
    """Endless batches, epoch after epoch (set_epoch on dataset, sampler and loader before each one)."""
    for epoch in itertools.count():
        set_epoch(epoch, ds, sampler, loader)
        yield from loader


# ----------------------------------------------------------------------------------------------------------------
# throughput section

def time_epochs(loader, ds, sampler, epochs: int, device: torch.device, hw: tuple[int, int]) -> dict[str, Any]:
    """One warm-up epoch, then `epochs` timed epochs (each from its own loader iterator). Besides the whole-epoch
    figure: the time to each epoch's first batch (worker start-up, pipeline prefetch) and the rate after it."""
    epoch_s, first_s, samples, rest, pinned, batch_shape = [], [], 0, 0, None, None
    for epoch in range(epochs + 1):
        set_epoch(epoch, ds, sampler, loader)
        sync(device)
        t0 = time.perf_counter()
        n = n_first = 0
        t_first = None
        for batch in loader:
            if device.type == "cuda" and pinned is None and batch.image_BCHW.device.type == "cpu":
                pinned = bool(batch.image_BCHW.is_pinned())
            out = deliver(batch, device, hw)
            n += out.size
            batch_shape = list(out.image_BCHW.shape)
            if t_first is None:
                sync(device)
                t_first, n_first = time.perf_counter() - t0, out.size
        sync(device)
        if epoch > 0:
            epoch_s.append(time.perf_counter() - t0)
            first_s.append(t_first or 0.0)
            samples += n
            rest += n - n_first
    seconds = sum(epoch_s)
    if samples == 0 or seconds <= 0:
        raise RuntimeError(f"the loader yielded no batch in {epochs} timed epoch(s)")
    after = seconds - sum(first_s)
    return dict(samples=samples, seconds=seconds, samples_per_s=samples / seconds, epoch_s=epoch_s,
                first_batch_s=first_s, after_first_samples_per_s=rest / after if rest and after > 0 else None,
                pinned=pinned, batch_shape=batch_shape)


def throughput_row(family: str, count: int, files: list[Path], hw, fmt: str, args, device) -> dict[str, Any]:
    spec = provider_spec(family)
    row = dict(section="throughput", provider=f"{family}-{spec['letter']}{count}", family=family, loader=spec["kind"],
               decoder=spec["decoder"] or "dali", size=hw_name(hw), format=fmt, batch=args.batch,
               workers=count if spec["kind"] == "torch" else None, threads=count if spec["kind"] == "dali" else None,
               epochs=args.epochs, n_images=len(files), sigma_px=sigma_for(hw))
    loader = ds = None
    try:
        t0 = time.perf_counter()
        ds = make_dataset(files, hw, family)
        loader, sampler = make_loader(ds, args.batch, family, count, device)
        row["setup_s"] = time.perf_counter() - t0
        row.update(time_epochs(loader, ds, sampler, args.epochs, device, hw))
    except Exception as exc:  # one provider failing must not lose the others (the GPU run is a one-shot)
        row["error"] = _error(exc)
        traceback.print_exc(limit=3)
    finally:
        del loader, ds
        release(device)
    return row


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# training-step section

def build_trainer(model: str, hw: tuple[int, int], batch: int, device: torch.device, train_set, run_dir: Path):
    """THE training setup of every step row (in-memory and each loader): the engine's own config -> model ->
    criterion -> strategy -> Trainer path (engine/run.py), so the model, optimizer, loss, precision and step are the
    same for all. model "published": the builder's defaults (3 ResNet-50 experts, width 64, decoder_norm none, CoV
    task balancing); "demo": launch/configs/hip_demo.yaml. Weights from torch.manual_seed(0)."""
    from engine.config import load_config
    from engine.dist import DistInfo
    from engine.run import build_model, make_criterion, make_strategy
    from engine.trainer import Trainer
    overrides = [f"data.input_hw=[{hw[0]}, {hw[1]}]", f"data.sigma_px={sigma_for(hw)}",
                 f"data.heatmap_peak={HEATMAP_PEAK}", "data.targets=device", f"train.batch_size={batch}",
                 "train.max_steps=100000", "train.precision=auto", "log.tensorboard=false"]
    cfg = load_config(DEMO_CONFIG if model == "demo" else None, overrides=overrides)
    torch.manual_seed(0)
    net = build_model(cfg)
    criterion = make_criterion(cfg)
    strategy = make_strategy(cfg, DistInfo(device=device))
    return Trainer(cfg, strategy, net, criterion, train_set, None, run_dir)


def time_steps(trainer, batches: Iterator[Batch], warmup: int, steps: int, device: torch.device) -> float:
    """ms per Trainer.train_step after `warmup` untimed steps."""
    for _ in range(warmup):
        trainer.train_step(batches)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        if trainer.train_step(batches) is None:
            raise RuntimeError("a training step was skipped (non-finite loss or gradient)")
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def step_row(provider: str, fmt: str, hw, args, device, run_dir: Path,
             feed: Callable[[], tuple[Any, Iterator[Batch], Callable[[], None]]]) -> dict[str, Any]:
    """feed() -> (train set, batch iterator, close); the trainer comes from build_trainer for every provider."""
    row = dict(section="step", provider=provider, size=hw_name(hw), format=fmt, batch=args.batch, model=args.model,
               steps=args.steps, warmup_steps=args.warmup_steps)
    trainer = close = None
    try:
        train_set, batches, close = feed()
        trainer = build_trainer(args.model, hw, args.batch, device, train_set, run_dir)
        row["params"] = sum(p.numel() for p in trainer.model.parameters())
        row["precision"] = trainer.strategy.precision
        row["ms_per_step"] = time_steps(trainer, batches, args.warmup_steps, args.steps, device)
        row["samples_per_s"] = args.batch * 1e3 / row["ms_per_step"]
    except Exception as exc:
        row["error"] = _error(exc)
        traceback.print_exc(limit=3)
    finally:
        if close is not None:
            close()
        del trainer
        release(device)
    return row


def in_memory_feed(files: list[Path], hw, batch: int, device: torch.device):
    ds = make_dataset(files, hw, "torch-pil")
    fixed = collate_samples([ds[i] for i in range(batch)]).to(device)
    return ds, itertools.repeat(fixed), lambda: None


def loader_feed(family: str, count: int, files: list[Path], hw, batch: int, device: torch.device):
    ds = make_dataset(files, hw, family)
    loader, sampler = make_loader(ds, batch, family, count, device)
    gen = cycle_batches(loader, ds, sampler)
    return ds, gen, gen.close


# ----------------------------------------------------------------------------------------------------------------
# output

def row_line(r: dict) -> str:
    head = f"{r['section']:10s} {r['provider']:16s} {r['size']:8s} {r['format']:4s}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if r["section"] == "throughput":
        return f"{head} {r['samples']:5d} samples in {r['seconds']:7.3f} s = {r['samples_per_s']:8.1f} samples/s"
    ratio = r.get("ratio_to_in_memory")
    return (f"{head} {r['ms_per_step']:9.1f} ms/step {r['samples_per_s']:7.1f} samples/s"
            + (f"  x{ratio:.2f} of in-memory" if ratio is not None else ""))


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_in_memory for every step row (in-memory of the same size), speedup vs torch-pil-w2 (same size and
    format) for every throughput row."""
    mem = {r["size"]: r["ms_per_step"] for r in rows if r["section"] == "step" and r["provider"] == "in-memory"
           and "ms_per_step" in r}
    base = {(r["size"], r["format"]): r["samples_per_s"] for r in rows
            if r["section"] == "throughput" and r["provider"] == BASELINE and "samples_per_s" in r}
    for r in rows:
        if r["section"] == "step" and "ms_per_step" in r and r["size"] in mem:
            r["ratio_to_in_memory"] = r["ms_per_step"] / mem[r["size"]]
        if r["section"] == "throughput" and "samples_per_s" in r and (r["size"], r["format"]) in base:
            r["speedup_vs_baseline"] = r["samples_per_s"] / base[(r["size"], r["format"])]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Loader benchmark - {meta['device']}, {meta['date']}", "",
             f"CPU {meta['cpu']}; torch {meta['torch']}, DALI {meta['dali']}, OpenCV {meta['opencv']}, Pillow "
             f"{meta['pillow']}, numba {meta['numba']}.", "",
             f"## Throughput: decode + augment + heatmap targets ({meta['args']['n_images']} images, batch "
             f"{meta['args']['batch']}, {meta['args']['epochs']} timed epochs after 1 warm-up)", "",
             f"| provider | size | format | workers / threads | samples | seconds | samples/s | x {BASELINE} | "
             "1st batch s | samples/s after it |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["section"] == "throughput"):
        par = r["workers"] if r["workers"] is not None else r["threads"]
        if "error" in r or "skipped" in r:
            why = f"error: {r['error'][:120]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['provider']} | {r['size']} | {r['format']} | {par} | {why} | | | | | |")
            continue
        speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
        first = f"{sum(r['first_batch_s']) / len(r['first_batch_s']):.3f}" if r.get("first_batch_s") else ""
        after = f"{r['after_first_samples_per_s']:.1f}" if r.get("after_first_samples_per_s") else ""
        lines.append(f"| {r['provider']} | {r['size']} | {r['format']} | {par} | {r['samples']} | "
                     f"{r['seconds']:.3f} | {r['samples_per_s']:.1f} | {speed} | {first} | {after} |")
    steps = [r for r in rows if r["section"] == "step"]
    if steps:
        first = next((r for r in steps if "params" in r), steps[0])
        lines += ["", f"## Training step ({first['model']} MultiHipPoseNet, {first.get('params', 0) / 1e6:.2f} M "
                      f"parameters, {first.get('precision', '?')}, batch {first['batch']}, {first['steps']} timed "
                      f"steps after {first['warmup_steps']})", "",
                  "| loader | size | format | ms/step | samples/s | ratio to in-memory |", "|---|---|---|---|---|---|"]
        for r in steps:
            if "error" in r or "skipped" in r:
                why = f"error: {r['error'][:120]}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"| {r['provider']} | {r['size']} | {r['format']} | {why} | | |")
                continue
            ratio = f"{r['ratio_to_in_memory']:.2f}" if "ratio_to_in_memory" in r else ""
            lines.append(f"| {r['provider']} | {r['size']} | {r['format']} | {r['ms_per_step']:.1f} | "
                         f"{r['samples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def save(out: Path | None, meta: dict, rows: list[dict]) -> None:
    if out is None:
        return
    add_ratios(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "loader_bench.md").write_text(markdown(meta, rows))


# ----------------------------------------------------------------------------------------------------------------
# main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: defaults become {QUICK} (explicit options still win)")
    ap.add_argument("--out", type=Path, default=None, help="folder for loader_bench.json / loader_bench.md")
    ap.add_argument("--sizes", default=None, help="network input sizes HxW, comma-separated (default 384x512,256x256)")
    ap.add_argument("--format", default=None, help="image file formats, comma-separated: png, jpg (default both)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {', '.join(PROVIDERS)}")
    ap.add_argument("--workers", default=None, help="DataLoader workers of the torch rows (default 2,os.cpu_count())")
    ap.add_argument("--threads", default=None, help="DALI num_threads (default: --workers, 0 read as 1)")
    ap.add_argument("--n-images", type=int, default=None, help="phantom images per format (default 64)")
    ap.add_argument("--image-hw", default="240x320", help="phantom image size HxW (default 240x320)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs per throughput row (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per loader, 0 = no step section "
                                                            "(default 10)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps before them (default 3)")
    ap.add_argument("--step-size", default=None, help="input HxW of the step section (default 384x512 on CUDA, "
                                                      "128x160 on CPU)")
    ap.add_argument("--model", default="auto", choices=["auto", "published", "demo"],
                    help="step-section model: published size on CUDA, hip_demo.yaml's on CPU (auto)")
    ap.add_argument("--seed", type=int, default=0, help="phantom generator seed")
    return ap


def resolve_args(argv: list[str] | None, device: torch.device) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.size_list = parse_hw_list(args.sizes)
        args.image_hw_t = parse_hw_list(args.image_hw)[0]
        args.format_list = parse_choices(args.format, ("png", "jpg"), "--format")
        args.provider_list = parse_choices(args.providers, PROVIDERS, "--providers")
        cpus = os.cpu_count() or 1
        args.worker_list = parse_int_list(args.workers or f"2,{cpus}", "--workers", 0)
        args.thread_list = parse_int_list(args.threads or ",".join(str(max(w, 1)) for w in args.worker_list),
                                          "--threads", 1)
        if args.step_size == "auto":
            args.step_size = "384x512" if device.type == "cuda" else "128x160"
        args.step_hw = parse_hw_list(args.step_size)[0]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if args.model == "auto":
        args.model = "published" if device.type == "cuda" else "demo"
    for key in ("n_images", "batch", "epochs"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.steps < 0 or args.warmup_steps < 0:
        ap.error("--steps and --warmup-steps must be >= 0")
    if args.n_images < args.batch:
        ap.error(f"--n-images {args.n_images} gives no full batch of {args.batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    args = resolve_args(argv, device)
    meta = run_meta(args, device)
    print(f"device {meta['device']} | torch {meta['torch']} | DALI {meta['dali']} | OpenCV {meta['opencv']}",
          flush=True)
    batches_per_epoch = args.n_images // args.batch
    if batches_per_epoch < 2 * max(args.worker_list):
        print(f"note: {batches_per_epoch} batches per epoch for up to {max(args.worker_list)} workers - the many-"
              f"worker rows measure start-up and latency more than throughput (raise --n-images)", flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(row_line(row), flush=True)
        save(args.out, meta, rows)

    families = [f for f in PROVIDERS if f in args.provider_list]
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        tmp = Path(tmp)
        files = {fmt: generate_hip_dataset(tmp / fmt, args.n_images, seed=args.seed, image_hw=args.image_hw_t,
                                           image_format=fmt) for fmt in args.format_list}
        # torch rows first, DALI rows after: no DataLoader worker is forked from a process running DALI threads
        groups = [[f for f in families if f.startswith("torch")], [f for f in families if f.startswith("dali")]]
        for gi, group in enumerate(groups):
            for family in group:
                counts = args.worker_list if family.startswith("torch") else args.thread_list
                reason = skip_reason(family, device)
                for hw, fmt, count in itertools.product(args.size_list, args.format_list, counts):
                    if reason:
                        torch_row = family.startswith("torch")
                        record(dict(section="throughput", provider=f"{family}-{provider_spec(family)['letter']}"
                                    f"{count}", family=family, size=hw_name(hw), format=fmt,
                                    workers=count if torch_row else None, threads=None if torch_row else count,
                                    skipped=reason))
                        continue
                    record(throughput_row(family, count, files[fmt], hw, fmt, args, device))
            if args.steps == 0:
                continue
            hw = args.step_hw
            if gi == 0:
                first = args.format_list[0]
                record(step_row("in-memory", "-", hw, args, device, tmp,
                                lambda: in_memory_feed(files[first], hw, args.batch, device)))
            for family in group:
                if skip_reason(family, device):
                    continue
                counts = args.worker_list if family.startswith("torch") else args.thread_list
                letter = provider_spec(family)["letter"]
                for fmt, count in itertools.product(args.format_list, counts):
                    record(step_row(f"{family}-{letter}{count}", fmt, hw, args, device, tmp,
                                    lambda f=family, c=count, fm=fmt: loader_feed(f, c, files[fm], hw, args.batch,
                                                                                  device)))
    add_ratios(rows)
    save(args.out, meta, rows)
    print()
    print(markdown(meta, rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
