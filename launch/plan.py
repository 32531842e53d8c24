"""`medpose plan DIR --task TASK`: fingerprint a dataset, look at the machine, and write a run config for it.

In the spirit of nnU-Net's planner: the dataset is read exactly as training reads it (the reader of data.format,
detected from the folder as `medpose data inspect` does when --format is not given) and fingerprinted
(data_pipelines/fingerprint.py: sizes, spacing, landmark spread and nearest-neighbour distances, orientation and size
spread, class balance); the hardware is read (CPU cores from os.sched_getaffinity, or with CUDA the GPU's free memory
from torch.cuda.mem_get_info); then each planned value follows a rule from a figure of the fingerprint or the machine.
The plan starts from the task's bundled config (TASK_TEMPLATES, or --base) and overrides only the planned keys (and
the data's location); KEY=VALUE overrides on the command line are applied to the base and never re-planned. The
result is written as YAML with the reason for every planned value beside it, validated with the engine's own loader
(engine.config.load_config, then engine.run.prepare: resolve the auto fields, shape the model by the data, check
that task, model and data fit), so `medpose train --config plan.yaml` runs it as is; fingerprint.json goes beside it.

Rules (the constants below hold the numbers):
  input_hw      the median aspect ratio H/W of the images, in multiples of the network's stride (the built model's
                `multiple` where it has one, a known value for the others, at least 32 - data.input_hw must divide by
                32), the largest such size within the pixel budget whose width is within one stride of
                H / aspect; never larger than the median image (no upsampling; one stride at least). Budget: on a CPU
                CPU_PIXEL_BUDGET (36k px, the bundled CPU configs' 160 x 224) or the task's own CPU config's input when
                larger (landmarks: 320 x 256, sub-pixel landmarks need it); on a GPU by free memory
                (GPU_PIXEL_BUDGETS: 224k px from 24 GiB, the 384 x 544 class). On a CPU, when fewer than MIN_STEPS
                steps of batch 4 would fit at that size (THROUGHPUT estimate), the base config's pixels instead.
  sigma_px      heatmap tasks only (the loss renders Gaussian targets): SIGMA_FRACTION (0.15) x the median
                nearest-neighbour landmark distance in input pixels at the planned input size, clamped to SIGMA_RANGE
                ([1.5, 4] px), so neighbouring heatmaps stay apart; reported in mm too (the median mm per input px).
  model width   where the task's model has a width argument (WIDTHS): the CPU value (the bundled CPU configs' width)
                on a CPU, the GPU value on a GPU; never wider than the base config on a CPU.
  augmentation  rotation_deg = the 95th percentile of the per-image orientation deviation (landmark-shape Procrustes
                rotation; the landmarks' or the mask's principal axis where labels follow a position rule or only
                masks exist), clamped to ROTATION_RANGE ([5, 30] deg); without an orientation, the base config's.
                flip_p = the base config's (0.5 where it has none) when the data has left/right flip pairs, else 0.
                scale_range = the 5th / 95th percentile of the object size at the input scale over its median,
                clamped to SCALE_LOW ([0.75, 0.95]) and SCALE_HIGH ([1.05, 1.33]). A run of fewer than
                AUG_FULL_EPOCHS (100) epochs keeps rotation and scale within the base config's ranges: the data's
                own spread (HC18 heads: +-57 deg) needs more epochs than a short budget gives (HC18, 900 steps:
                +-30 deg / 0.75-1.23 -> Dice 0.960 against the bundled +-15 deg / 0.9-1.1's 0.974 at 1200).
  class weights tasks with masks whose loss takes class_weights: all 1.0 (unweighted). Imbalance is left to the
                loss's Dice / IoU term (a 'wce' term becomes 'ce'; a Dice term is added to a loss without one):
                weighted cross-entropy or focal terms push the predicted boundary outward, a systematic size bias.
  regions       eval.task_args.largest_component (tasks that take it): the classes that are one 8-connected region
                in >= LCC_MIN_SHARE (98 %) of the dataset's masks holding them (at least LCC_MIN_IMAGES, 10) keep
                only their largest predicted region (engine/tasks/postprocess.py); true when every class qualifies.
  batch, steps  a short timed probe (`--no-probe`: THROUGHPUT, measured figures of the bundled configs, scaled by
                input pixels, width and cores): two real training steps of the planned model through the engine's
                Trainer on this machine after one warm-up step, and the per-sample loading time of the planned
                dataset. CPU: the base config's batch (at most a quarter of the training split), halved (down to
                MIN_CPU_BATCH, 4, or the base's if smaller) while fewer than MIN_STEPS steps would fit, each halved
                batch probed again (the synthetic X-ray plan: 0.263 s/step at batch 4 against 0.743 at 16, 42 % more
                per sample); GPU: the largest power of two (<= 32, <= a quarter of the training split) whose
                measured memory (two batch sizes, linear) stays under GPU_MEMORY_SHARE of the free memory. Time per
                step = STEP_OVERHEAD (1.03) x (the probed step + the loading of its samples: in-line, or spread over
                the cores by CPU workers, or overlapped by the workers on a GPU); max_steps = (BUDGET_SHARE (0.95)
                x --budget-min - the estimated evaluations and final test report) / time per step; eval_every =
                ckpt_every = max_steps / EVALUATIONS rounded up; warmup <= max_steps / 10.
  also          data.preresize when the median image holds PRERESIZE_FACTOR x the input's pixels or more (and the
                reader supports it); data.num_workers from the cores (on a CPU 0 when the probe's loading is
                <= INLINE_LOAD_SHARE, 10 %, of the step: a worker restarted every epoch costs more);
                model.args.input_hw and model.criterion_args.normalize_hw follow data.input_hw where the base config
                sets them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from data_pipelines.errors import DataError
from data_pipelines.fingerprint import (Fingerprint, circular_spread_deg, fingerprint_dataset, input_matrices,
                                        matrix_scale, pooled_nn_distances)
from engine.config import ConfigError, load_config, parse_override

from launch import CONFIG_DIR, find_config
from launch.plan_yaml import _flow, _plain, emit_from_base, emit_yaml

# data.task -> the bundled config a plan starts from
TASK_TEMPLATES = {"hip_us": "hip_demo", "hip_xray": "xray_demo", "spine_disc": "spine_demo", "landmarks": "landmarks",
                  "segmentation": "seg_zoo", "fetal_head": "hc18_unet"}

CPU_PIXEL_BUDGET = 36_000                       # input pixels on a CPU (~160 x 224)
GPU_PIXEL_BUDGETS = ((24.0, 224_000), (8.0, 160_000), (0.0, 96_000))   # (free GiB at least, input pixels)
BUDGET_SLACK = 1.05                             # a size may pass the budget by this factor
MIN_STRIDE = 32                                 # data.input_hw must divide by 32 (engine/config.py)
SIGMA_FRACTION, SIGMA_RANGE = 0.15, (1.5, 4.0)
ROTATION_RANGE = (5.0, 30.0)
SCALE_LOW, SCALE_HIGH = (0.75, 0.95), (1.05, 1.33)
PRERESIZE_FACTOR = 4.0
BUDGET_SHARE = 0.95                             # of --budget-min for training + evaluation (the rest: start-up)
INLINE_LOAD_SHARE = 0.1                         # CPU: load in-line when a sample loads in <= this share of its step
#                                                 (spine_demo's plan, 1.5 ms/sample against 59 ms: 20 samples/s with
#                                                  num_workers=0, 11 with one worker on 2 cores)
STEP_OVERHEAD = 1.03                            # the loop around the probed step: loader restarts per epoch, logging
EVALUATIONS = 4                                 # (measured: hc18_unet, 800 steps, 656 s of steps at 0.80 s predicted)
MIN_STEPS = 200
MIN_CPU_BATCH = 4                               # BatchNorm statistics at batch 2 are noise; never below the base's
EVAL_FIXED_S = 5.0                              # per run, beside the per-image cost (measured: seg_zoo, 100 steps,
                                                # 75.5 s of training loop = 71 s of steps + 2 validations)
LCC_MIN_SHARE, LCC_MIN_IMAGES = 0.98, 10          # one-region classes -> keep the largest predicted region
AUG_FULL_EPOCHS = 100                           # shorter runs: the base config's ranges cap the data's spread
GPU_MEMORY_SHARE = 0.6
GPU_MAX_BATCH = 32
GPU_SPEEDUP = 25.0                              # --no-probe on a GPU: a rough factor over the 2-core CPU figures

# model.name -> [(argument, CPU value, GPU value)]; zoo networks with a `base` width get SEG_BASE
WIDTHS: dict[str, list[tuple[str, Any, Any]]] = {
    "multihipposenet": [("width", 16, 32)],
    "unet_multitask": [("width", 16, 32)],
    "hourglass": [("num_features", 64, 128)],
    "landmark_unet": [("width", 16, 32)],
    "landmark_hrnet": [("backbone", "hrnet_w18_small", "hrnet_w32"), ("head_channels", 64, 128)],
}
SEG_BASE = (16, 32)
# model.name -> its input multiple where the built module does not say (`multiple` attribute)
MULTIPLES = {"multihipposenet": lambda a: 32, "hourglass": lambda a: 32,
             "unet_multitask": lambda a: 2 ** int(a.get("depth", 4))}
# model.name -> (training samples/s on the 2-core CPU, at input pixels, at width) - measured with the bundled configs
# (README "Measured", benchmarks/results/seed_systems_cpu_*.md, seg_zoo_hc18_cpu_*.md, landmarks_accuracy_cpu_*.md)
THROUGHPUT = {"multihipposenet": (14.0, 128 * 160, 16), "efficientnet_ms_cbam_3scales": (14.2, 160 * 160, None),
              "hourglass": (4.7, 256 * 128, 64), "landmark_hrnet": (6.7, 320 * 256, 64),
              "unet_multitask": (4.7, 160 * 224, 16), "unet_pp": (5.6, 128 * 192, 16),
              "unet": (10.0, 160 * 224, 16)}   # hc18_unet on a quiet 2-core CPU: 800 x 8 samples in ~640 s of steps
THROUGHPUT_OTHER = (5.0, 160 * 224, None)
REFERENCE_CORES = 2


@dataclass
class Planned:
    key: str                # dotted config key
    value: Any
    reason: str             # the figure that drove it and the rule


# ----------------------------------------------------------------------------------------------------- hardware
def read_hardware(device: str = "auto") -> dict[str, Any]:
    """CPU cores this process may use and, with CUDA, the GPU's name and free / total memory."""
    import torch
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: must be auto, cpu or cuda, got {device!r}")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                      # not Linux
        cores = os.cpu_count() or 1
    hw: dict[str, Any] = {"device": "cpu", "cpu_cores": cores, "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__}
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if cuda and device in ("auto", "cuda"):
        free, total = torch.cuda.mem_get_info()
        hw.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_free_gib=round(free / 2 ** 30, 2),
                  gpu_total_gib=round(total / 2 ** 30, 2))
    return hw


# ------------------------------------------------------------------------------------------------------- rules
def plan_input_hw(median_hw: Sequence[float], aspect_hw: float, budget_px: int, stride: int) -> tuple[int, int]:
    """The largest (H, W), multiples of `stride`, with H*W <= budget (x BUDGET_SLACK), |W - H / aspect| <= stride and
    H, W no larger than the median image (module docstring); the closest aspect when none is within one stride."""
    cap_h = max(stride, int(median_hw[0]) // stride * stride)
    cap_w = max(stride, int(median_hw[1]) // stride * stride)
    best, fallback = None, None
    for h in range(stride, cap_h + 1, stride):
        for w in range(stride, cap_w + 1, stride):
            if h * w > budget_px * BUDGET_SLACK and (h, w) != (stride, stride):
                continue
            err = abs(w - h / aspect_hw)
            key = (h * w, -err)
            if err <= stride and (best is None or key > best[0]):
                best = (key, (h, w))
            fkey = (-err, h * w)
            if fallback is None or fkey > fallback[0]:
                fallback = (fkey, (h, w))
    return (best or fallback)[1]


def model_multiple(name: str, args: dict[str, Any]) -> tuple[int, str]:
    """(the input multiple of model `name` with `args`, where it comes from)."""
    if name in MULTIPLES:
        return int(MULTIPLES[name](args)), "known for this model"
    from models.seg import SEG_SPECS
    if name in SEG_SPECS:
        return int(SEG_SPECS[name].multiple), "the zoo's SegSpec.multiple"
    if name.startswith("efficientnet"):
        return 32, "EfficientNet's stride 32"
    try:
        from models import MODELS
        model = MODELS[name](**args)
        multiple = getattr(model, "multiple", None)
        if multiple:
            return int(multiple), "the built model's `multiple`"
    except Exception:                          # noqa: BLE001 - the config check reports a bad model later
        pass
    return MIN_STRIDE, "default"


def gpu_batch_size(peak2_gib: float, peak4_gib: float, free_gib: float, cap: int) -> tuple[int, float]:
    """(batch, GiB per sample): the largest power of two whose memory, linear through the peaks measured at batch 2
    and 4, stays under GPU_MEMORY_SHARE of the free memory; at most GPU_MAX_BATCH and `cap`, at least 2."""
    per = max((peak4_gib - peak2_gib) / 2.0, 1e-3)
    fixed = max(peak2_gib - 2 * per, 0.0)
    room = GPU_MEMORY_SHARE * free_gib - fixed
    batch = min(_pow2_floor(room / per) if room > 0 else 2, GPU_MAX_BATCH, _pow2_floor(max(cap, 2)))
    return max(int(batch), 2), per


def _cap_augmentation(planned: list[Planned], raw: dict, base: dict, epochs: float) -> None:
    """A short run (< AUG_FULL_EPOCHS epochs) keeps the planned rotation / scale within the base config's ranges
    (keys given on the command line are never in `planned`)."""
    for i, p in enumerate(planned):
        if p.key not in base:
            continue
        if p.key == "data.rotation_deg":
            value = min(float(p.value), base[p.key])
        else:
            value = [max(float(p.value[0]), base[p.key][0]), min(float(p.value[1]), base[p.key][1])]
        if value != p.value:
            _set(raw, p.key, _plain(value))
            why = f"{p.reason}; {epochs:.0f} epochs < {AUG_FULL_EPOCHS}: capped at the base config's {base[p.key]}"
            planned[i] = Planned(p.key, _plain(value), why)


def _round_steps(n: float) -> int:
    n = int(n)
    step = 100 if n >= 2000 else 50 if n >= 500 else 10 if n >= 100 else 1
    return max(10, n // step * step)


def eval_interval(steps: int) -> int:
    """train.eval_every for EVALUATIONS validations in `steps`: steps / EVALUATIONS rounded up (to tens from 100), so
    the last is the trainer's own at the final step, not one a few steps before it."""
    every = max(1, -(-int(steps) // EVALUATIONS))
    return -(-every // 10) * 10 if every >= 100 else every


def _pow2_floor(n: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))


def _fmt_hw(hw) -> str:
    return f"{int(hw[0])}x{int(hw[1])}"


def _get(raw: dict, dotted: str, default=None):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------------------ the probe
def _estimate_throughput(model_name: str, args: dict, input_hw, hardware: dict) -> tuple[float, str]:
    """--no-probe: seconds per training sample from THROUGHPUT scaled by pixels, width and cores (or GPU_SPEEDUP)."""
    sps, ref_px, ref_width = THROUGHPUT.get(model_name, THROUGHPUT_OTHER)
    sec = (input_hw[0] * input_hw[1] / ref_px) / sps
    width_arg = next((a for a, cpu, gpu in WIDTHS.get(model_name, []) if isinstance(cpu, int)), None)
    width_arg = width_arg or ("base" if "base" in args else None)
    if ref_width and width_arg and isinstance(args.get(width_arg), int):
        sec *= (args[width_arg] / ref_width) ** 2
    if hardware["device"] == "cuda":
        sec /= GPU_SPEEDUP
        how = f"table: {sps} samples/s on a 2-core CPU at {ref_px} px, / {GPU_SPEEDUP:g} for a GPU (rough)"
    else:
        sec /= max(hardware["cpu_cores"] / REFERENCE_CORES, 0.25) ** 0.7
        how = f"table: {sps} samples/s on a 2-core CPU at {ref_px} px, scaled to {hardware['cpu_cores']} cores"
    return sec, how


def probe(cfg, fp: Fingerprint, hardware: dict, batch_sizes: Sequence[int], steps: int = 2) -> dict[str, Any]:
    """Time real training steps of cfg's model on this machine: per batch size, the seconds per step after one
    warm-up step (the engine's Trainer.train_step on batches of the planned dataset, augmentation on) and, on a GPU,
    the peak memory; plus the seconds to load one training sample (second pass: the decoded cache warm)."""
    import torch

    from data_pipelines.batch import collate_samples
    from data_pipelines.build import augment_params, loader_heatmap_impl, reader_for
    from data_pipelines.dataset import LandmarkDataset
    from engine.dist import read_dist_info
    from engine.run import build_model, make_criterion, make_strategy, prepare, resolve_targets
    from engine.trainer import Trainer

    device = torch.device("cuda" if hardware["device"] == "cuda" else "cpu")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader="torch"),
                              log=dataclasses.replace(cfg.log, tensorboard=False, progress=False))
    cfg, _task, info = prepare(cfg)
    cfg = resolve_targets(cfg, device)
    reader, opts = reader_for(cfg.data)
    pre = reader.preprocess(opts, cfg.data, info)
    need = max(batch_sizes)
    records = [fp.records[i % len(fp.records)] for i in range(max(need, 2))]
    ids = list(dict.fromkeys(r.id for r in records))
    uniq = {r.id: r for r in records}
    ds = LandmarkDataset([uniq[i] for i in ids], info, pre,
                         augment_params(cfg.data, flip_pairs=info.flip_pairs, **reader.augment_overrides),
                         sigma_px=cfg.data.sigma_px, heatmap_peak=cfg.data.heatmap_peak,
                         heatmap_impl=loader_heatmap_impl(cfg.data), heatmaps=reader.heatmaps(opts),
                         seed=cfg.train.seed, cache_decoded=cfg.data.cache_decoded, where=str(cfg.data.root))
    order = [i % len(ds) for i in range(need)]
    [ds[(i, 0)] for i in order[:len(ds)]]                       # first pass: decode (and cache)
    t0 = time.perf_counter()
    samples = [ds[(i, 1)] for i in order]
    load_s = (time.perf_counter() - t0) / len(order)
    strategy = make_strategy(cfg, read_dist_info(env={}, use_cuda=device.type == "cuda"))
    out: dict[str, Any] = {"load_s_per_sample": round(load_s, 5), "device": str(device), "steps": {}}
    try:
        model = build_model(cfg)
        criterion = make_criterion(cfg)
        with tempfile.TemporaryDirectory(prefix="medpose_plan_") as tmp:
            one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1))   # its sampler: unused
            trainer = Trainer(one, strategy, model, criterion, ds, None, Path(tmp))
            for b in batch_sizes:
                batch = collate_samples(samples[:b])
                sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                trainer.train_step(iter([batch]))           # warm-up: allocations, kernel choice
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step(iter([batch]))
                sync()
                entry = {"s_per_step": round((time.perf_counter() - t0) / steps, 5)}
                if device.type == "cuda":
                    entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 4)
                out["steps"][b] = entry
            out["params"] = int(sum(p.numel() for p in model.parameters()))
            del trainer
    finally:
        strategy.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------------------------------------- the plan
def _base_path(task: str, base: str | None) -> Path:
    try:
        return find_config(base or TASK_TEMPLATES[task])
    except ValueError as exc:
        raise ConfigError(f"--base: {exc}") from None


def _splits(fp: Fingerprint, cfg) -> dict[str, int]:
    from data_pipelines.build import make_splits, reader_for
    from data_pipelines.errors import OptionError
    reader, opts = reader_for(cfg.data)
    try:
        s = make_splits(fp.records, cfg.data, cfg.train.seed, fp.split_source, str(cfg.data.root),
                        reader.oversample(opts, cfg.data))
    except OptionError as e:
        raise ConfigError(str(e)) from None
    return {"train": len(s["train_oversampled"]), "train_unique": len(s["train"]), "val": len(s["val"]),
            "test": len(s["test"])}


def make_plan(root: str | Path, task: str, fmt: str | None = None, out: str | Path | None = None,
              budget_min: float = 30.0, device: str = "auto", base: str | None = None,
              overrides: Sequence[str] = (), use_probe: bool = True, progress: bool = True) -> dict[str, Any]:
    """Fingerprint `root`, plan a config for `task` and write it (module docstring). Returns {"plan": path,
    "fingerprint": path, "config": the validated Config, "planned": [Planned], "report": fingerprint report,
    "hardware", "probe", "splits"}."""
    from data_pipelines.inspect import detect_format
    from data_pipelines.readers import READERS
    from engine.tasks import TASKS, build_task

    if task not in TASKS:
        raise ConfigError(f"--task: unknown task '{task}' (choose from {', '.join(sorted(TASKS))})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    if not budget_min > 0:
        raise ConfigError(f"--budget-min: must be > 0, got {budget_min}")
    base_path = _base_path(task, base)
    raw = yaml.safe_load(base_path.read_text()) or {}
    given: set[str] = set()
    for text in overrides:
        parts, value = parse_override(text)
        given.add(".".join(parts))
        _set(raw, ".".join(parts), value)
    forced = {"data.task": task, "data.root": str(root.resolve()), "data.synthetic": False}
    for key, value in forced.items():
        _set(raw, key, value)
    base_cfg = load_config(None, base=raw)                          # type / key errors name the key
    fmt_how = "given (--format)" if fmt else "given (data.format=)" if "data.format" in given else \
        "detected from the folder"
    fmt = fmt or (base_cfg.data.format if "data.format" in given else None) or \
        detect_format(root, base_cfg.data.reader_args)
    if fmt not in READERS:
        raise ConfigError(f"--format: unknown format '{fmt}' (choose from {', '.join(sorted(READERS))})")
    _set(raw, "data.format", fmt)
    dropped = []
    reader_args = dict(_get(raw, "data.reader_args", {}) or {})
    for key in list(reader_args):
        if key not in READERS[fmt].defaults and f"data.reader_args.{key}" not in given:
            dropped.append(key)
            del reader_args[key]
    if dropped:
        _set(raw, "data.reader_args", reader_args)
    cfg = load_config(None, base=raw)
    from engine.run import prepare
    prepare(cfg)                 # task, model and data fit (from the annotations' headers) before anything is read
    fp = fingerprint_dataset(cfg.data, progress=progress)
    rep = fp.report
    hardware = read_hardware(device)
    on_gpu = hardware["device"] == "cuda"
    task_obj = build_task(task, cfg.eval.task_args)
    planned: list[Planned] = [Planned(k, v, "the dataset" if k != "data.synthetic" else "plan the data as it is")
                              for k, v in forced.items()]
    planned.append(Planned("data.format", fmt, fmt_how))
    if dropped:
        planned.append(Planned("data.reader_args", reader_args, f"dropped {', '.join(dropped)}: not options of the "
                                                                 f"{fmt} reader"))

    def plan(key: str, value, reason: str) -> None:
        parts = key.split(".")
        if any(".".join(parts[:i]) in given for i in range(1, len(parts) + 1)):
            return                                                   # the command line fixed it
        _set(raw, key, _plain(value))
        planned.append(Planned(key, _plain(value), reason))

    def current(key: str, default=None):
        return _get(raw, key, default)

    # ---- model width
    model_name = current("model.name", cfg.model.name)
    args = dict(current("model.args", {}) or {})
    widths = list(WIDTHS.get(model_name, []))
    from models.seg import SEG_SPECS
    if model_name in SEG_SPECS and "base" in SEG_SPECS[model_name].defaults:
        d = SEG_SPECS[model_name].defaults["base"]
        widths.append(("base", min(d, SEG_BASE[0]), min(d, SEG_BASE[1])))
    for arg, cpu_v, gpu_v in widths:
        tmpl = args.get(arg)
        if on_gpu:
            value = gpu_v if not isinstance(gpu_v, int) or not isinstance(tmpl, int) else max(gpu_v, tmpl)
            why = f"GPU: {arg} {value} (CPU value {cpu_v}; base config {tmpl})"
        else:
            value = cpu_v if not isinstance(cpu_v, int) or not isinstance(tmpl, int) else min(cpu_v, tmpl)
            why = f"CPU ({hardware['cpu_cores']} cores): {arg} {value}, the bundled CPU configs' width (GPU: {gpu_v})"
        plan(f"model.args.{arg}", value, why)
    if not widths:
        planned.append(Planned("model.args", "(base)", f"{model_name} has no width argument the planner sizes"))
    args = dict(current("model.args", {}) or {})

    # ---- input size
    multiple, multiple_src = model_multiple(model_name, args)
    stride = math.lcm(MIN_STRIDE, multiple)
    med_hw = rep["image_size"]["median_hw"]
    aspect = rep["image_size"]["median_aspect_hw"]
    if on_gpu:
        budget_px = next(px for gib, px in GPU_PIXEL_BUDGETS if hardware["gpu_free_gib"] >= gib)
        budget_why = f"GPU with {hardware['gpu_free_gib']:.0f} GiB free: {budget_px:,} px"
    else:
        tmpl_cfg = CONFIG_DIR / f"{TASK_TEMPLATES[task]}.yaml"
        tmpl_hw = _get(yaml.safe_load(tmpl_cfg.read_text()) or {}, "data.input_hw", [0, 0])
        budget_px = max(CPU_PIXEL_BUDGET, int(tmpl_hw[0]) * int(tmpl_hw[1]))
        budget_why = (f"CPU budget {budget_px:,} px" + (f" ({TASK_TEMPLATES[task]}.yaml's CPU input)"
                                                        if budget_px > CPU_PIXEL_BUDGET else ""))
    input_hw = plan_input_hw(med_hw, aspect, budget_px, stride)
    base_hw = current("data.input_hw")
    base_px = int(base_hw[0]) * int(base_hw[1]) if base_hw else 0
    if not on_gpu and "data.input_hw" not in given and input_hw[0] * input_hw[1] > base_px > 0:
        sec, _how = _estimate_throughput(model_name, args, input_hw, hardware)
        b = min(int(current("train.batch_size", cfg.train.batch_size)), MIN_CPU_BATCH)
        fit = budget_min * 60.0 * BUDGET_SHARE / (STEP_OVERHEAD * sec * b)
        if fit < MIN_STEPS:                 # a short budget: steps matter more than pixels
            budget_why += (f"; at {_fmt_hw(input_hw)} ~{fit:.0f} steps of batch {b} fit (table) < {MIN_STEPS}: the "
                           f"base config's {_fmt_hw(base_hw)} pixels")
            input_hw = plan_input_hw(med_hw, aspect, base_px, stride)
    if "data.input_hw" in given:
        input_hw = tuple(int(v) for v in cfg.data.input_hw)
    scale_med = min(input_hw[0] / med_hw[0], input_hw[1] / med_hw[1])
    plan("data.input_hw", list(input_hw),
         f"median image {_fmt_hw(med_hw)} (aspect H/W {aspect:.3f}); {budget_why}; stride {stride} ({model_name}: "
         f"{multiple}, {multiple_src}) -> {_fmt_hw(input_hw)} (aspect {input_hw[0] / input_hw[1]:.3f}, "
         f"x{scale_med:.3f} of the median image, "
         + ("never upsampled)" if scale_med <= 1 else "upsampled: the images are smaller than one stride)"))
    for key in ("model.args.input_hw", "model.criterion_args.normalize_hw"):
        if current(key) is not None:
            plan(key, list(input_hw), "follows data.input_hw")
    mats = input_matrices(fp.hw_N2, input_hw, fp.resize)
    in_scale = np.array([matrix_scale(m) for m in mats])
    sp_iso = np.sqrt(fp.spacing_N2[:, 0] * fp.spacing_N2[:, 1])
    mm_per_input_px = float(np.nanmedian(sp_iso / in_scale)) if np.isfinite(sp_iso).any() else math.nan

    # ---- heatmap sigma
    import inspect as _inspect

    from models import CRITERIA
    crit_name = current("model.criterion", "") or model_name
    crit_params = _inspect.signature(CRITERIA[crit_name]).parameters if crit_name in CRITERIA else {}
    heatmap_task = "sigma_px" in crit_params and fp.info.num_keypoints > 0
    nn_in = pooled_nn_distances(fp.kpts_NK2, fp.vis_NK, mats) if fp.info.num_keypoints else np.zeros(0)
    if heatmap_task and len(nn_in):
        med_nn = float(np.median(nn_in))
        sigma = round(float(np.clip(SIGMA_FRACTION * med_nn, *SIGMA_RANGE)), 2)
        mm = f" = {sigma * mm_per_input_px:.2f} mm" if math.isfinite(mm_per_input_px) else ""
        nn_mm = (rep["landmarks"].get("nn_distance_mm") or {}).get("median")
        plan("data.sigma_px", sigma,
             f"median nearest-landmark distance {rep['landmarks']['nn_distance_px']['median']:.1f} px"
             + (f" ({nn_mm:.2f} mm)" if nn_mm else "") + f" = {med_nn:.1f} input px at {_fmt_hw(input_hw)}; "
             f"{SIGMA_FRACTION} x that, clamped to [{SIGMA_RANGE[0]}, {SIGMA_RANGE[1]}] -> {sigma} px{mm} "
             f"(closest 10 %: {np.percentile(nn_in, 10):.1f} input px)")
    elif fp.info.num_keypoints and getattr(task_obj, "needs_landmarks", True):
        planned.append(Planned("data.sigma_px", "(base)", f"the loss {crit_name} takes no heatmap sigma (its landmarks "
                                                          f"are regressed, or fitted to the predicted mask)"))

    # ---- augmentation
    base_aug = {"data.rotation_deg": float(current("data.rotation_deg", cfg.data.rotation_deg)),
                "data.scale_range": [float(v) for v in current("data.scale_range", cfg.data.scale_range)]}
    use_lm = getattr(task_obj, "needs_landmarks", True) and "landmarks" in fp.orientations
    okey = "landmarks" if use_lm else ("mask" if "mask" in fp.orientations else None)
    if okey is not None:
        angles, source, axial = fp.orientations[okey]
        _mean, spread = circular_spread_deg(angles, axial)
        rot = float(np.clip(round(spread), *ROTATION_RANGE))
        plan("data.rotation_deg", rot, f"orientation spread (P95 |deviation|) {spread:.1f} deg ({okey}: {source}, "
                                       f"{int(np.isfinite(angles).sum())} images) -> +-{rot:g} deg, clamped to "
                                       f"[{ROTATION_RANGE[0]:g}, {ROTATION_RANGE[1]:g}]")
    else:
        planned.append(Planned("data.rotation_deg", "(base)", "no object orientation measurable: the base config's"))
    pairs = rep["flip_pairs"]
    if pairs:
        base_p = float(current("data.flip_p", 0.0) or 0.0)
        flip = base_p if base_p > 0 else 0.5
        plan("data.flip_p", flip, f"{len(pairs)} left/right flip pair(s) ({', '.join('/'.join(p) for p in pairs[:4])}"
                                  f"{', ...' if len(pairs) > 4 else ''}) swap on a flip -> "
                                  + ("the base config's" if base_p > 0 else "0.5"))
    else:
        plan("data.flip_p", 0.0, "no left/right flip pairs in the data: no flips")
    skey = "landmarks" if (getattr(task_obj, "needs_landmarks", True) and "landmarks" in fp.sizes) else \
        ("mask" if "mask" in fp.sizes else None)
    if skey is not None:
        size_px, source = fp.sizes[skey]
        size_in = size_px * in_scale
        ok = np.isfinite(size_in)
        med = float(np.median(size_in[ok]))
        lo, hi = float(np.percentile(size_in[ok], 5)) / med, float(np.percentile(size_in[ok], 95)) / med
        rng = [round(float(np.clip(lo, *SCALE_LOW)), 2), round(float(np.clip(hi, *SCALE_HIGH)), 2)]
        plan("data.scale_range", rng, f"object size ({skey}: {source}) median {med:.1f} input px, P5-P95 "
                                      f"{lo:.2f}-{hi:.2f} x the median -> clamped to [{SCALE_LOW[0]}, {SCALE_LOW[1]}] /"
                                      f" [{SCALE_HIGH[0]}, {SCALE_HIGH[1]}]")

    # ---- class weights
    masks = rep.get("masks")
    if masks and "class_weights" in crit_params:
        nc = len(fp.info.class_names)
        small = masks["smallest_class"]
        balance = (f"foreground {100 * masks['foreground_fraction_mean']:.1f} % of the pixels (smallest class "
                   f"{small} {100 * (masks['classes'][small]['fraction_mean'] or 0):.2f} %)")
        plan("model.criterion_args.class_weights", [1.0] * nc,
             f"{balance}: unweighted, the loss's Dice/IoU term handles the imbalance (weighted CE/focal pushes the "
             f"boundary outward: a systematic size bias)")
        loss = current("model.criterion_args.loss")
        if isinstance(loss, str) and "loss" in crit_params:
            from models.losses_seg import parse_loss_spec
            terms = parse_loss_spec(loss)
            if "wce" in terms:
                terms["ce"] = terms.pop("wce") + terms.get("ce", 0.0)
            if not ({"dice", "iou"} & set(terms)):
                total = sum(terms.values())
                terms = {k: round(0.8 * v / total, 3) for k, v in terms.items()}
                terms["dice"] = 0.2
            new = " + ".join(f"{w:g}*{k}" for k, w in terms.items())
            if new.replace(" ", "") != loss.replace(" ", "") and parse_loss_spec(new) != parse_loss_spec(loss):
                plan("model.criterion_args.loss", new, "unweighted terms with a Dice/IoU term for the imbalance")

    # ---- post-processing: one-region classes keep their largest predicted region
    if masks and "largest_component" in inspect.signature(type(task_obj).__init__).parameters:
        fg = list(fp.info.class_names)[1:]
        one = [n for n in fg if masks["classes"][n]["images_with"] >= LCC_MIN_IMAGES
               and (masks["classes"][n].get("single_region_share") or 0.0) >= LCC_MIN_SHARE]
        shares = ", ".join(f"{n} {100 * (masks['classes'][n].get('single_region_share') or 0):.0f} %" for n in fg)
        plan("eval.task_args.largest_component", True if one == fg else (one or False),
             f"one 8-connected region in the masks holding the class: {shares} (>= {100 * LCC_MIN_SHARE:.0f} % of "
             f">= {LCC_MIN_IMAGES} masks: keep only the largest predicted region)")

    # ---- loading
    px_in = input_hw[0] * input_hw[1]
    px_img = med_hw[0] * med_hw[1]
    if not current("data.preresize", False) and px_img >= PRERESIZE_FACTOR * px_in:
        from data_pipelines.build import reader_for
        reader, opts = reader_for(dataclasses.replace(cfg.data, format=fmt))
        if reader.preprocess(opts, dataclasses.replace(cfg.data, preresize=True, input_hw=input_hw),
                             fp.info).preresize:
            plan("data.preresize", True, f"median image {px_img / 1e6:.2f} Mpx = {px_img / px_in:.0f}x the input: "
                                         f"decode once, keep an anti-aliased copy near the input scale")
    cores = hardware["cpu_cores"]
    workers = min(max(cores - 1, 1), 8) if on_gpu else max(1, min(cores // 2, 4))
    workers_why = f"{cores} CPU cores" + (" (GPU: all but one, at most 8)" if on_gpu else
                                          " (CPU: half for loading, the rest for the steps)")

    # ---- batch size, steps (probe)
    cfg = load_config(None, base=raw)
    splits = _splits(fp, cfg)
    n_train = splits["train"]
    base_batch = int(current("train.batch_size", cfg.train.batch_size))
    cap = max(2, n_train // 4)
    probe_out = None
    budget_s = budget_min * 60.0
    if use_probe:
        if on_gpu:
            first = probe(cfg, fp, hardware, [2, 4])
            p2, p4 = first["steps"][2]["peak_gib"], first["steps"][4]["peak_gib"]
            batch, per = gpu_batch_size(p2, p4, hardware["gpu_free_gib"], cap)
            mem_why = (f"memory {p2:.2f} GiB at batch 2, {p4:.2f} at 4 ({per:.3f} GiB/sample); "
                       f"{GPU_MEMORY_SHARE:.0%} of {hardware['gpu_free_gib']:.0f} GiB free")
            probe_out = probe(cfg, fp, hardware, [batch]) if batch not in first["steps"] else first
            probe_out["memory"] = {"batch2_gib": p2, "batch4_gib": p4, "per_sample_gib": round(per, 4)}
            t_step = probe_out["steps"][batch]["s_per_step"]
        else:
            batch = max(2, min(base_batch, cap))
            probe_out = probe(cfg, fp, hardware, [batch])
            t_step = probe_out["steps"][batch]["s_per_step"]
            mem_why = ""
        load = probe_out["load_s_per_sample"]
        sec_sample = t_step / batch
        how = (f"probe: {t_step:.3f} s/step at batch {batch} on {hardware['device']} after a warm-up step, "
               f"loading {1000 * load:.1f} ms/sample")
    else:
        batch = max(2, min(base_batch * (2 if on_gpu else 1), cap, GPU_MAX_BATCH if on_gpu else 10 ** 6))
        sec_sample, how = _estimate_throughput(model_name, args, input_hw, hardware)
        load, mem_why = 0.0, ""

    if "data.num_workers" in given:
        workers = int(cfg.data.num_workers)
    elif not on_gpu and probe_out is not None and load <= INLINE_LOAD_SHARE * sec_sample:
        workers = 0
        workers_why = (f"loading {1000 * load:.1f} ms/sample is {load / sec_sample:.1%} of a sample's step "
                       f"(<= {INLINE_LOAD_SHARE:.0%}): loaded in the training process; a worker process, restarted "
                       f"every epoch and sharing the {cores} cores, costs more than it saves on a CPU")
    plan("data.num_workers", workers, workers_why)

    def step_time(b: int) -> float:
        if on_gpu:
            return STEP_OVERHEAD * max(sec_sample * b, load * b / max(workers, 1))
        return STEP_OVERHEAD * (sec_sample * b + load * b / max(cores if workers else 1, 1))

    eval_s = EVAL_FIXED_S + (EVALUATIONS * splits["val"] + splits["test"]) * (0.5 * sec_sample + load)
    train_s = max(budget_s * BUDGET_SHARE - eval_s, 0.25 * budget_s)
    if "train.batch_size" in given:                 # the command line's batch: steps are planned for it
        batch = cfg.train.batch_size
    elif not on_gpu:
        floor = min(MIN_CPU_BATCH, base_batch)
        while batch // 2 >= max(floor, 2) and train_s / step_time(batch) < MIN_STEPS:
            batch //= 2
            if probe_out is not None:       # a smaller batch costs more per sample: time it, do not scale it
                again = probe(cfg, fp, hardware, [batch])
                probe_out["steps"][batch] = again["steps"][batch]
                sec_sample = again["steps"][batch]["s_per_step"] / batch
                how += f"; re-probed at batch {batch}: {again['steps'][batch]['s_per_step']:.3f} s/step"
    steps = cfg.train.max_steps if "train.max_steps" in given else _round_steps(train_s / step_time(batch))
    batch_why = (f"{how}; " + (f"{mem_why} -> batch {batch} (<= {GPU_MAX_BATCH}, <= a quarter of the {n_train} "
                               f"training samples)" if on_gpu else
                               f"CPU: the base config's batch {base_batch} (<= a quarter of the {n_train} training "
                               f"samples, halved down to {min(MIN_CPU_BATCH, base_batch)} while < {MIN_STEPS} "
                               f"steps fit)"))
    plan("train.batch_size", batch, batch_why)
    epochs = steps * batch / max(n_train, 1)
    plan("train.max_steps", steps, f"{budget_min:g} min x {BUDGET_SHARE} - {eval_s:.0f} s of evaluation = "
                                   f"{train_s:.0f} s / {step_time(batch):.3f} s per step (batch {batch}) -> {steps} "
                                   f"steps, {epochs:.1f} epochs of {n_train}")
    if epochs < AUG_FULL_EPOCHS:
        _cap_augmentation(planned, raw, base_aug, epochs)
    every = eval_interval(steps)
    plan("train.eval_every", every, f"max_steps / {EVALUATIONS}, rounded up: {EVALUATIONS} validations of "
                                    f"{splits['val']} images, the last at the final step")
    plan("train.ckpt_every", every, "with every validation")
    warm = current("optim.warmup_steps", 0) or 0
    if warm > steps // 10:
        plan("optim.warmup_steps", steps // 10, f"base config's {warm} capped at max_steps / 10")
    plan("log.name", f"plan_{task}_{root.resolve().name}", "the task and the dataset folder")

    # ---- write, validate with the engine's own loader
    out = Path(out) if out else Path(cfg.log.runs_root) / f"plan_{root.resolve().name}" / "plan.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = _header(rep, hardware, task, base_path, budget_min, splits, input_hw, mm_per_input_px)
    comments = {key: "given on the command line" for key in given}
    comments.update({p.key: p.reason for p in planned if p.value != "(base)"})
    text = emit_from_base(base_path.read_text(encoding="utf-8"), raw, comments, header)
    out.write_text(text if text is not None else emit_yaml(raw, comments, header), encoding="utf-8")
    final = load_config(out)
    prepare(final)                                    # resolve + shape the model by the data + task/model/data fit
    fp_path = out.parent / "fingerprint.json"
    doc = {**rep, "hardware": hardware, "splits": splits, "probe": _plain(_json_keys(probe_out)),
           "plan": {p.key: {"value": p.value, "reason": p.reason} for p in planned},
           "input_scale": {"input_hw": list(input_hw), "mm_per_input_px": None if not math.isfinite(mm_per_input_px)
                           else round(mm_per_input_px, 5),
                           "nn_distance_input_px_median": round(float(np.median(nn_in)), 3) if len(nn_in) else None}}
    fp_path.write_text(json.dumps(_plain(doc), indent=2, ensure_ascii=False), encoding="utf-8")
    return {"plan": out, "fingerprint": fp_path, "config": final, "planned": planned, "report": rep,
            "hardware": hardware, "probe": probe_out, "splits": splits, "input_hw": tuple(input_hw),
            "nn_input_px": nn_in, "mm_per_input_px": mm_per_input_px}


def _json_keys(obj):
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    return obj


def _header(rep: dict, hardware: dict, task: str, base_path: Path, budget_min: float, splits: dict,
            input_hw, mm_per_px: float) -> list[str]:
    size = rep["image_size"]
    sp = rep["spacing_mm"]
    lm = rep.get("landmarks") or {}
    hwline = (f"{hardware['gpu']} ({hardware['gpu_free_gib']:.1f} of {hardware['gpu_total_gib']:.1f} GiB free), "
              if hardware["device"] == "cuda" else "") + f"{hardware['cpu_cores']} CPU cores, torch {hardware['torch']}"
    lines = [f"Planned by `medpose plan` for data.task={task} from {base_path.name} ({time.strftime('%Y-%m-%d')}).",
             f"  medpose train --config <this file>     (fingerprint.json beside it holds every figure)",
             f"Data: {rep['root']} ({rep['format']}): {rep['samples']} samples, {rep['patients']} patients, "
             f"{rep['skipped']} skipped; splits train {splits['train']} / val {splits['val']} / test {splits['test']}",
             f"  median image {_fmt_hw(size['median_hw'])} (aspect H/W {size['median_aspect_hw']}), spacing "
             + (f"{sp['median_xy']} mm/px ({sp['unknown']} unknown)" if sp["median_xy"] else "unknown")]
    if lm.get("nn_distance_px"):
        lines.append(f"  {lm['count']} landmarks, median nearest-neighbour distance {lm['nn_distance_px']['median']} px"
                     + (f" ({lm['nn_distance_mm']['median']} mm)" if lm.get("nn_distance_mm") else "")
                     + f", extent {lm['extent_rel']['median_w']:.2f} x {lm['extent_rel']['median_h']:.2f} of the "
                       f"image (W x H)")
    if rep.get("masks"):
        m = rep["masks"]
        lines.append(f"  masks: foreground {100 * m['foreground_fraction_mean']:.1f} % of the pixels; "
                     + ", ".join(f"{n} {100 * (c['fraction_mean'] or 0):.2f} %" for n, c in m["classes"].items()
                                 if n != "background"))
    lines.append(f"Hardware: {hardware['device']}: {hwline}; budget {budget_min:g} min")
    if math.isfinite(mm_per_px):
        lines.append(f"  input {_fmt_hw(input_hw)}: {mm_per_px:.4f} mm per input pixel (median)")
    lines.append("Values marked with a comment are planned (the comment gives the figure and the rule); the rest is "
                 "the base config's.")
    return lines


# ---------------------------------------------------------------------------------------------------- the summary
def format_summary(result: dict[str, Any]) -> str:
    """A short table: fingerprint highlights, then each planned value with its reason."""
    rep, hw = result["report"], result["hardware"]
    size, sp = rep["image_size"], rep["spacing_mm"]
    rows = [("samples / patients", f"{rep['samples']} / {rep['patients']} ({rep['skipped']} skipped)"),
            ("format", rep["format"]),
            ("median image (H x W)", f"{_fmt_hw(size['median_hw'])}, aspect {size['median_aspect_hw']}"),
            ("spacing (mm/px, median)", f"{sp['median_xy']}" if sp["median_xy"] else "unknown")]
    lm = rep.get("landmarks") or {}
    if lm.get("nn_distance_px"):
        mm = lm.get("nn_distance_mm") or {}
        rows.append(("landmarks", f"{lm['count']}, nearest neighbour median {lm['nn_distance_px']['median']} px"
                                  + (f" / {mm['median']} mm" if mm else "")
                                  + f", closest pair {'-'.join(lm['closest_pair']['names'])}"))
        ext = lm["extent_rel"]
        rows.append(("landmark extent (W x H)", f"{ext['median_w']:.2f} x {ext['median_h']:.2f} of the image"))
    for key, o in (rep.get("orientation") or {}).items():
        rows.append((f"orientation ({key})", f"P95 deviation {o['spread_p95_deg']} deg"))
    for key, s in (rep.get("object_size") or {}).items():
        rows.append((f"object size ({key})", f"median {s['median_px']} px"
                     + (f" / {s['median_mm']} mm" if s.get("median_mm") else "")
                     + f", P5-P95 {s['p05_over_median']}-{s['p95_over_median']} x"))
    if rep.get("masks"):
        m = rep["masks"]
        rows.append(("class balance", ", ".join(f"{n} {100 * (c['fraction_mean'] or 0):.1f} %"
                                                for n, c in m["classes"].items())))
    hwtxt = (f"cuda: {hw['gpu']}, {hw['gpu_free_gib']} GiB free" if hw["device"] == "cuda" else "cpu") + \
        f", {hw['cpu_cores']} cores"
    rows.append(("hardware", hwtxt))
    width = max(len(a) for a, _ in rows)
    lines = ["fingerprint"] + [f"  {a:<{width}}  {b}" for a, b in rows]
    shown = [p for p in result["planned"] if p.key not in ("data.task", "data.root", "data.synthetic", "log.name")]
    kw = max(len(p.key) for p in shown)
    vw = min(24, max(len(_flow(p.value)) for p in shown))
    lines.append("plan")
    for p in shown:
        lines.append(f"  {p.key:<{kw}}  {_flow(p.value):<{vw}}  {p.reason}")
    lines.append(f"  plan: {result['plan']}\n  fingerprint: {result['fingerprint']}\n  train: medpose train --config "
                 f"{result['plan']}")
    return "\n".join(lines)
