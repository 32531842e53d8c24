"""Putting a run together: config → dist info → strategy → run dir → data → model → trainer → report."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from data_pipelines import DALI_FORMATS, READERS
from data_pipelines.build import build_data as build_reader_data
from data_pipelines.build import describe_data
from data_pipelines.errors import DataError, OptionError
from data_pipelines.records import DataInfo, Preprocess
from models import CRITERIA, MODELS, build_criterion

from .checkpoint import CheckpointError, load_checkpoint_file, resolve_resume, seed_everything, versions
from .config import Config, ConfigError, check_flip_test, save_config
from .dist import DistInfo, read_dist_info
from .evaluate import evaluate_dataset
from .fitting import check_fit, shape_model_by_data
from .logger import LOG, log_failure, setup_console_logging
from .plots import plot_training_curves
from .perf import check_perf
from .report import write_report
from .strategies import build_strategy, check_resumable
from .tasks import build_task
from .trainer import Trainer


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def make_strategy(cfg: Config, info: DistInfo | None = None):
    info = info or read_dist_info()
    return build_strategy(cfg.dist.strategy, info, grad_accum=cfg.train.grad_accum, grad_clip=cfg.optim.grad_clip,
                          precision=resolve_precision(cfg.train.precision, info.device), backend=cfg.dist.backend,
                          timeout_s=cfg.dist.timeout_s, find_unused_parameters=cfg.dist.find_unused_parameters,
                          batch_size=cfg.train.batch_size, deepspeed=cfg.dist.deepspeed)


def check_model_args(cfg: Config) -> None:
    """model.name exists and model.args names only the builder's arguments (no data needed)."""
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name: unknown model '{cfg.model.name}' (choose from {sorted(MODELS)}; "
                          f"`medpose models` lists them)")
    params = inspect.signature(MODELS[cfg.model.name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg.model.args) - set(params))
        if unknown:
            raise ConfigError(f"model.args: unknown key '{unknown[0]}' for model '{cfg.model.name}' "
                              f"(valid: {', '.join(params)})")


def build_model(cfg: Config) -> torch.nn.Module:
    check_model_args(cfg)
    model = MODELS[cfg.model.name](**cfg.model.args)
    if cfg.model.init_from:
        from .pretrain import init_weights
        init_weights(model, cfg.model.init_from)
    return model


def resolve_config(cfg: Config) -> Config:
    """Fill the `auto` fields from the task (data.format, train.best_metric / best_mode): the saved config is the
    resolved one, so a checkpoint says exactly what ran. An unknown model.name (or model.args key) is a ConfigError
    here, before any caller generates or reads data."""
    check_model_args(cfg)
    task = build_task(cfg.data.task, cfg.eval.task_args)
    data = dataclasses.replace(cfg.data, format=task.default_format if cfg.data.format == "auto" else cfg.data.format)
    train = dataclasses.replace(
        cfg.train, best_metric=task.best_metric if cfg.train.best_metric == "auto" else cfg.train.best_metric,
        best_mode=task.best_mode if cfg.train.best_mode == "auto" else cfg.train.best_mode)
    return dataclasses.replace(cfg, data=data, train=train)


def describe(cfg: Config) -> DataInfo:
    """The data's DataInfo without generating or decoding anything (data_pipelines.describe_data)."""
    if cfg.data.format not in READERS:
        raise ConfigError(f"data.format: unknown format '{cfg.data.format}' (choose from {sorted(READERS)} or auto)")
    try:
        return describe_data(cfg.data)
    except OptionError as e:
        raise ConfigError(str(e)) from None


def prepare(cfg: Config):
    """(resolved config with the model shaped by the data, task, DataInfo): every check that task, model and data
    fit happens here, before any data is generated or any step is run (engine/fitting.py)."""
    cfg = resolve_config(cfg)
    check_flip_test(cfg)
    task = build_task(cfg.data.task, cfg.eval.task_args)
    check_model_args(cfg)
    make_criterion_check(cfg)
    check_perf(cfg, cfg.dist.strategy, cfg.train.precision)
    info = describe(cfg)
    cfg = shape_model_by_data(cfg, info)
    check_fit(cfg, task, info)
    return cfg, task, info


def build_data(cfg: Config, run_dir: Path, strategy, split: str = "runs", expect: DataInfo | None = None
               ) -> dict[str, Any]:
    """The reader of data.format behind data.loader: train / val / test datasets (or split="all": one dataset of
    every sample) and their metadata (data_pipelines/build.py). `expect`: the DataInfo the model was shaped by."""
    if cfg.data.format not in READERS:
        raise ConfigError(f"data.format: unknown format '{cfg.data.format}' (choose from {sorted(READERS)} or auto)")
    if cfg.data.loader == "dali" and cfg.data.format not in DALI_FORMATS:
        raise ConfigError(f"data.loader=dali: the '{cfg.data.format}' reader has no DALI path (those that have: "
                          f"{', '.join(DALI_FORMATS)}); use data.loader=torch or auto")
    try:
        data = build_reader_data(cfg.data, run_dir, strategy, seed=cfg.train.seed, split=split,
                                 split_seed=cfg.data.split_seed)
    except OptionError as e:
        raise ConfigError(str(e)) from None
    if expect is not None:
        _check_same_data(data["info"], expect, cfg)
    return data


def _check_same_data(found: DataInfo, expect: DataInfo, cfg: Config) -> None:
    """The data read must be the data the model was shaped by (same K and channels, same classes)."""
    problems = []
    if found.num_keypoints != expect.num_keypoints:
        problems.append(f"{found.num_keypoints} landmarks instead of {expect.num_keypoints}")
    if found.channels != expect.channels:
        problems.append(f"{found.channels}-channel images instead of {expect.channels}")
    if found.num_classes != expect.num_classes:
        problems.append(f"{found.num_classes} mask classes instead of {expect.num_classes}")
    if problems:
        raise DataError(cfg.data.root, "the data read has " + "; ".join(problems) + " (what the model was built for)")
    if tuple(found.kpt_names) != tuple(expect.kpt_names):
        LOG.warning("landmark names differ from the model's: %s vs %s (matched by position)",
                    list(found.kpt_names)[:6], list(expect.kpt_names)[:6])


def resolve_loader(cfg: Config, device: torch.device) -> Config:
    """data.loader=auto -> dali when training on CUDA with DALI installed and the reader has a DALI path, else torch
    (data_pipelines/loaders.resolve_loader)."""
    from data_pipelines.loaders import resolve_loader as pick
    kind = cfg.data.loader
    if kind == "auto":
        kind = pick("auto", str(torch.device(device))) if cfg.data.format in DALI_FORMATS else "torch"
    elif kind == "dali" and cfg.data.format not in DALI_FORMATS:
        raise ConfigError(f"data.loader=dali: the '{cfg.data.format}' reader has no DALI path (those that have: "
                          f"{', '.join(DALI_FORMATS)}); use data.loader=torch or auto")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=kind))


def resolve_targets(cfg: Config, device: torch.device) -> Config:
    """data.targets=auto -> device when training on CUDA or with the DALI loader (the loader then skips heatmap
    rendering and the loss renders the targets, with the Triton kernel on a GPU), else loader. Call after
    resolve_loader."""
    cfg = resolve_loader(cfg, device)
    if cfg.data.loader == "dali" and cfg.data.targets == "loader":
        raise ConfigError("data.targets=loader: the DALI loader renders no heatmap targets; use data.targets=device "
                          "(or auto) with data.loader=dali")
    if cfg.data.targets != "auto":
        return cfg
    where = "device" if torch.device(device).type == "cuda" or cfg.data.loader == "dali" else "loader"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, targets=where))


def make_criterion_check(cfg: Config) -> None:
    """The loss exists and model.criterion_args names only its arguments (no data needed)."""
    name = cfg.model.criterion or cfg.model.name
    if name not in CRITERIA:
        raise ConfigError(f"model.criterion: no loss named '{name}' (choose from {sorted(CRITERIA)})")
    params = inspect.signature(CRITERIA[name]).parameters
    unknown = sorted(set(cfg.model.criterion_args) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"model.criterion_args: unknown key '{unknown[0]}' for loss '{name}' "
                          f"(valid: {', '.join(params)})")


def make_criterion(cfg: Config) -> torch.nn.Module:
    make_criterion_check(cfg)
    name = cfg.model.criterion or cfg.model.name
    params = inspect.signature(CRITERIA[name]).parameters
    kwargs = dict(cfg.model.criterion_args)
    # Heatmap losses render their targets from the keypoints when the loader did not (data.targets=device): they take
    # the data section's sigma and peak unless the run config sets them for the loss explicitly.
    for key in ("sigma_px", "heatmap_peak"):
        if key in params and key not in kwargs:
            kwargs[key] = getattr(cfg.data, key)
    return build_criterion(name, **kwargs)


def make_run_dir(cfg: Config, strategy, resuming: bool) -> Path:
    """runs_root/name, or name-2, name-3 ... when it exists and this is a fresh run; rank 0 decides for all."""
    return _make_run_dir(cfg, strategy, resuming)[0]


def choose_run_dir(cfg: Config, strategy, resuming: bool, taken=lambda d: (d / "config.yaml").exists()) -> Path:
    """log.run_dir, or runs_root/name - name-2, name-3 ... while `taken(dir)` and this is no resume; rank 0 decides
    for all ranks."""
    if cfg.log.run_dir:
        choice = Path(cfg.log.run_dir)
    else:
        base = Path(cfg.log.runs_root) / cfg.log.name
        choice = base
        if strategy.info.is_main and not resuming:
            k = 2
            while taken(choice):
                choice = base.with_name(f"{base.name}-{k}")
                k += 1
    return Path(strategy.all_gather_object(str(choice))[0])


def _make_run_dir(cfg: Config, strategy, resuming: bool) -> tuple[Path, bool]:
    """(make_run_dir's directory, whether this launch created it — known on rank 0, False elsewhere)."""
    choice = choose_run_dir(cfg, strategy, resuming)
    created = False
    if strategy.info.is_main:
        created = not choice.exists()
        (choice / "checkpoints").mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    return choice, created


# What a launch writes into a new run directory before its first training step (nothing else is ever removed).
SETUP_FILES = ("config.yaml", "versions.json", "train.log", "splits.json")


def _named_error(exc: BaseException) -> bool:
    """A bad config, argument, checkpoint or input file, whose one-line message is the whole story: a ConfigError,
    OptionError, CheckpointError, DataError or FileNotFoundError whose explicit causes are value / OS errors too. Any
    other cause (a TypeError, ZeroDivisionError ... raised in our own code and wrapped, e.g. by naming_file) is a
    bug whose traceback train.log keeps."""
    if not isinstance(exc, (ConfigError, OptionError, CheckpointError, DataError, FileNotFoundError)):
        return False
    seen: set[int] = set()
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if not isinstance(cause, (ValueError, OSError)):
            return False
        cause = cause.__cause__
    return True


def discard_run_dir(run_dir: Path) -> bool:
    """Rank 0, after a launch that created `run_dir` failed before its first training step: remove what it wrote
    there (SETUP_FILES, the empty checkpoints folder) and the directory when nothing else is in it. A directory
    holding any checkpoint is never touched. True when the directory is gone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(run_dir.rglob("*.pt")):
        return False
    for h in list(LOG.handlers):  # this run's train.log: close it before its folder goes
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir:
            LOG.removeHandler(h)
            h.close()
    for name in SETUP_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in (run_dir / "checkpoints" / "deepspeed", run_dir / "checkpoints", run_dir):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    return not run_dir.exists()


def check_resume_file(path: Path, strategy) -> None:
    """The --resume file can restore this run exactly (read with the weights-only unpickler, then
    strategies.check_resumable): a CheckpointError naming the file and what is missing, before any data is made."""
    check_resumable(path, load_checkpoint_file(path), strategy.name, strategy.info.world_size)


def check_train_size(cfg: Config, data: dict[str, Any], world_size: int) -> None:
    """At least one batch per rank in the training split (the sampler drops the tail that does not fill one)."""
    n, need = len(data["train"]), cfg.train.batch_size * world_size
    if n < need:
        sizes = ", ".join(f"{split} {len(data[split])}" for split in ("train", "val", "test") if split in data)
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} with world size {world_size} needs at least "
                          f"{need} samples in the training split, which has {n} (data.root={cfg.data.root}: "
                          f"{sizes}); lower train.batch_size, launch fewer processes or add data")


def load_start_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path, cfg: Config) -> None:
    """--resume-weights-only: the weights of checkpoint `source` into the freshly built model, before the strategy
    wraps it (so ZeRO's fp32 master copies start from them too)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{source}: its weights do not fit model.name={cfg.model.name} with this config's "
                              f"model.args ({detail})") from None
    LOG.info("--resume-weights-only: weights from %s; training starts at step 0 with a fresh optimizer and LR "
             "schedule", source)


def data_state(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """What a checkpoint keeps of the data: DataInfo and Preprocess (predict / export rebuild the input from them)."""
    return {"format": cfg.data.format, "info": data["info"].to_dict(), "preprocess": data["preprocess"].to_dict()}


def check_evaluation(cfg: Config, task, strategy, data: dict, model, criterion, split: str = "val") -> None:
    """One batch of `split` through decoding and the task's metrics before training starts, so a run never trains
    for an hour and then fails at its first evaluation."""
    from data_pipelines.dataset import subset_by_ids
    ds = data[split]
    n = min(len(ds), cfg.train.batch_size * strategy.info.world_size)
    ids = list(dict.fromkeys(ds.sample_id(i) for i in range(len(ds))))[:n]
    probe = {**data, split: subset_by_ids(ds, ids, None)}
    try:
        _evaluate(cfg, task, strategy, probe, split, model, criterion)
    except (ConfigError, DataError):
        raise
    except Exception as exc:
        raise ConfigError(f"evaluation of data.task={cfg.data.task} with model.name={cfg.model.name} fails on the "
                          f"{split} split before training ({type(exc).__name__}: {exc}); nothing was trained") from exc


def train(cfg: Config, resume: str | None = None, final_test: bool = True, resume_weights_only: bool = False
          ) -> dict[str, Any]:
    """Train cfg's run. resume: a checkpoint file, a run directory or "auto" (the latest checkpoint of this run's
    directory, if any) to continue exactly — model, optimizer, LR schedule, data position, RNG; a file that cannot
    (weights only, consolidated, another strategy's) is a CheckpointError that says so. resume_weights_only: take
    only the model weights of `resume` (any strategy's checkpoint) and start a new run in a new directory at step 0
    with a fresh optimizer, LR schedule and data order.

    A launch that fails before its first training step removes the run directory it created, unless train.log holds
    a traceback worth keeping (an error from our own code; _named_error); a directory with checkpoints stays."""
    t_start = time.time()
    if resume_weights_only and not resume:
        raise ConfigError("--resume-weights-only needs --resume PATH (the checkpoint whose weights to start from)")
    cfg, task, info = prepare(cfg)                   # every task / model / data check, before any data is made
    strategy = make_strategy(cfg)
    dist = strategy.info
    seed_everything(cfg.train.seed + dist.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    cfg = resolve_targets(cfg, dist.device)
    source = None
    if resume_weights_only:  # `auto`: the latest checkpoint of the run directory this config names
        source = resolve_resume(resume, cfg.log.run_dir or Path(cfg.log.runs_root) / cfg.log.name)
        if source is None:
            raise ConfigError(f"--resume {resume} --resume-weights-only: no checkpoint found to take the weights "
                              f"from")
    run_dir, created = _make_run_dir(cfg, strategy, resuming=resume is not None and not resume_weights_only)
    setup_console_logging(dist.rank, run_dir)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    LOG.info("run dir %s | task %s | format %s (%d landmarks, %s, %d channels) | model %s | strategy %s | world size "
             "%d | device %s", run_dir, task.name, cfg.data.format, info.num_keypoints,
             f"{info.num_classes} classes" if info.class_names else "no masks", info.channels, cfg.model.name,
             strategy.name, dist.world_size, dist.device)
    training = False
    try:
        resume_path, start_weights = None, None
        if resume and not resume_weights_only:
            resume_path = resolve_resume(resume, run_dir)
            if resume_path is not None:
                check_resume_file(resume_path, strategy)
        elif source is not None:                 # read (or merged from shards) before any data is made
            from .consolidate import checkpoint_weights
            start_weights = checkpoint_weights(source)
        data = build_data(cfg, run_dir, strategy, expect=info)
        check_train_size(cfg, data, dist.world_size)
        task.fit(data["train"])
        model = build_model(cfg)
        if start_weights is not None:
            load_start_weights(model, start_weights, source, cfg)
            del start_weights
        criterion = make_criterion(cfg)
        check_evaluation(cfg, task, strategy, data, model.to(dist.device), criterion.to(dist.device))

        def evaluate_fn(m, step):
            return _evaluate(cfg, task, strategy, data, "val", m, criterion)[0]

        trainer = Trainer(cfg, strategy, model, criterion, data["train"], evaluate_fn, run_dir,
                          extra_state=lambda: {"task": task.state_dict(), "data": data_state(data, cfg)},
                          shown=task.shown)
        training = True
        result = trainer.fit(resume_path)
        result["run_dir"] = str(run_dir)
        if dist.is_main:
            curves = plot_training_curves(run_dir / "metrics.jsonl", run_dir / "figures")
            LOG.info("training curves: %s", ", ".join(p.name for p in curves))
        if final_test:
            best = run_dir / "checkpoints" / "best.pt"
            if best.is_file():
                trainer.resume_weights_only(best)
            result["report"] = held_out_report(cfg, task, strategy, data, trainer.model, criterion, run_dir, extra={
                "checkpoint": str(best if best.is_file() else "final weights"), "best_step": result["best_step"],
                "steps": result["step"], "wall_time_s": round(time.time() - t_start, 1)})
        strategy.barrier()
        return result
    except Exception as exc:
        discarded = not training and created and _named_error(exc) and discard_run_dir(run_dir)
        if not discarded:
            log_failure(exc)  # the traceback, cause chain included, stays in train.log
        raise
    finally:
        strategy.close()


def held_out_report(cfg: Config, task, strategy, data: dict, model, criterion, out_dir: Path, split: str = "test",
                    extra: dict | None = None) -> dict[str, Any] | None:
    """Evaluate `split` on every rank, then rank 0 writes report.json and the figures into out_dir."""
    figures, records = _evaluate(cfg, task, strategy, data, split, model, criterion, gather_records=True)
    robust = robustness(cfg, task, strategy, data, split, model, criterion, figures) if cfg.eval.corrupt else None
    if not strategy.info.is_main:
        return None
    extra = {"split": split, "world_size": strategy.info.world_size, "strategy": strategy.name, **(extra or {})}
    return write_report(out_dir, cfg, task, figures, records, strategy.unwrap(model), data[split],
                        task.decoder(cfg), extra, robustness=robust)


def robustness(cfg: Config, task, strategy, data: dict, split: str, model, criterion, clean: dict[str, float]
               ) -> dict[str, dict[str, dict[str, float]]]:
    """eval.corrupt: {kind: {level: figures}} of `split` evaluated once per level with its images corrupted in their
    original frame (engine/corrupt.py), on every rank (each scores its shard; the task's sums are all-reduced as in the
    plain evaluation). Every kind's table starts at level 0: the plain figures `clean`, or, when 0 is asked for, the
    corrupted path at level 0 (the identity, so the same figures). Levels above 0 are read by the torch loader: the
    DALI loader decodes the files itself, where no corruption could be applied."""
    from .corrupt import Corruption, corrupted_view, level_key, parse_corruptions
    plan = parse_corruptions(cfg.eval.corrupt, "eval.corrupt")
    if cfg.data.loader == "dali" and any(v > 0 for levels in plan.values() for v in levels):
        LOG.info("eval.corrupt: corrupted images are read with the torch loader (DALI decodes the files itself)")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, levels in plan.items():
        rows = {} if 0.0 in levels else {level_key(0.0): dict(clean)}
        for level in levels:
            view = corrupted_view(data[split], Corruption(kind, level))
            rows[level_key(level)] = _evaluate(cfg, task, strategy, data, split, model, criterion, dataset=view,
                                               loader_kind=cfg.data.loader if level == 0 else "torch")[0]
            shown = ", ".join(f"{k} {rows[level_key(level)].get(k, float('nan')):.4g}" for k in task.shown
                              if k in rows[level_key(level)])
            LOG.info("robustness %s %s: %s", kind, level_key(level), shown)
        out[kind] = rows
    return out


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path | Sequence[str | Path], out_dir: str | Path,
                        split: str = "test") -> dict[str, Any] | None:
    """`medpose eval`: the checkpoint's weights on the config's data; split test / val / train of the run's
    splits, or "all" (every sample of data.root scored, no splitting: a model scored on another dataset as a whole).
    Report + figures in out_dir. `checkpoint` may also be a list of checkpoints, or a folder of fold_<k> runs (a
    `train --folds` base): more than one checkpoint is evaluated as their ensemble (evaluate_ensemble)."""
    from .consolidate import checkpoint_weights
    from .ensemble import resolve_checkpoints
    paths = resolve_checkpoints(checkpoint)           # a file is itself; a list or a folds folder may be several
    if len(paths) > 1:
        return evaluate_ensemble(cfg, paths, out_dir, split)
    checkpoint = paths[0]
    ckpt = load_checkpoint_file(checkpoint)
    weights = checkpoint_weights(checkpoint, ckpt)  # merged from DeepSpeed shards when the file holds none
    client = ckpt.get("client", {})
    cfg, task, info = prepare(cfg)
    saved = client.get("data", {}).get("info")
    expect = DataInfo.from_dict(saved) if saved else info
    strategy = make_strategy(cfg)
    cfg = resolve_targets(cfg, strategy.info.device)          # and data.loader
    out_dir = Path(out_dir)
    try:
        _open_eval_dir(strategy, out_dir)
        data = build_data(cfg, out_dir, strategy, split="all" if split == "all" else "runs", expect=expect)
        task_state = client.get("task")
        if task_state:
            task.load_state_dict(task_state)
        elif split != "all":
            task.fit(data["train"])
        model = build_model(cfg)
        model.load_state_dict(weights)
        model.to(strategy.info.device)
        criterion = make_criterion(cfg).to(strategy.info.device)
        return held_out_report(cfg, task, strategy, data, model, criterion, out_dir, split,
                               extra={"checkpoint": str(checkpoint), "data_root": str(cfg.data.root)})
    except Exception as exc:
        log_failure(exc)  # the traceback, cause chain included, into out_dir/train.log
        raise
    finally:
        strategy.close()


def _open_eval_dir(strategy, out_dir: Path) -> None:
    """Rank 0 creates the evaluation's output folder; every rank logs into it."""
    if strategy.info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    setup_console_logging(strategy.info.rank, out_dir)


def evaluate_ensemble(cfg: Config, checkpoints: Sequence[str | Path], out_dir: str | Path, split: str = "test"
                      ) -> dict[str, Any] | None:
    """evaluate_checkpoint for several checkpoints: each network is built from its own checkpoint's config (members
    may differ in architecture) and the ensemble (engine/ensemble.py: raw outputs averaged per batch, after each
    member's flip test when eval.flip_test is set) is scored on `cfg`'s data and split - cfg is the evaluation's
    config (by default the first checkpoint's, as `medpose eval` reads it), whose data.task and data.input_hw must be
    the members'. The task's learned state is the first member's. report.json's run.checkpoints lists the members."""
    from .ensemble import load_ensemble
    if not checkpoints:
        raise ConfigError("an ensemble evaluation needs at least one checkpoint")
    cfg, task, info = prepare(cfg)
    strategy = make_strategy(cfg)
    cfg = resolve_targets(cfg, strategy.info.device)          # and data.loader
    out_dir = Path(out_dir)
    try:
        _open_eval_dir(strategy, out_dir)
        model, member_cfg, member_task, state = load_ensemble(checkpoints, strategy.info.device)
        for field, ours, theirs in (("data.task", cfg.data.task, member_cfg.data.task),
                                    ("data.input_hw", tuple(cfg.data.input_hw), tuple(member_cfg.data.input_hw)),
                                    ("model.name", cfg.model.name, member_cfg.model.name),
                                    ("model.args", cfg.model.args, member_cfg.model.args)):
            if ours != theirs:     # each member's network is built from its own checkpoint: a model override is void
                raise ConfigError(f"the evaluation config has {field}={ours} but the ensemble's checkpoints (first: "
                                  f"{checkpoints[0]}) were trained with {theirs}; each member's network is built "
                                  f"from its own checkpoint's config")
        LOG.info("ensemble of %d checkpoints: %s", len(checkpoints), ", ".join(map(str, checkpoints)))
        data = build_data(cfg, out_dir, strategy, split="all" if split == "all" else "runs", expect=state["info"])
        task.load_state_dict(member_task.state_dict())
        criterion = make_criterion(cfg).to(strategy.info.device)
        return held_out_report(cfg, task, strategy, data, model, criterion, out_dir, split, extra={
            "checkpoints": [str(p) for p in checkpoints], "ensemble_size": len(checkpoints),
            "ensemble_average": "raw outputs (logits, heatmaps, points) per batch, after each member's flip test",
            "data_root": str(cfg.data.root)})
    except Exception as exc:
        log_failure(exc)  # the traceback, cause chain included, into out_dir/train.log
        raise
    finally:
        strategy.close()


def _evaluate(cfg: Config, task, strategy, data: dict, split: str, model, criterion, gather_records: bool = False,
              dataset=None, loader_kind: str | None = None):
    """evaluate_dataset of data[split] (or of `dataset`, e.g. a corrupted view of it) with the config's settings."""
    return evaluate_dataset(model, data[split] if dataset is None else dataset, strategy, task.decoder(cfg),
                            task.accumulator(cfg, data), criterion, cfg.train.batch_size,
                            num_workers=cfg.eval.num_workers, gather_records=gather_records,
                            loader_kind=loader_kind or cfg.data.loader, dali_threads=cfg.data.dali_threads,
                            flip_test=cfg.eval.flip_test)


def load_for_inference(checkpoint: str | Path, device: torch.device | None = None):
    """(model, resolved config, task with its learned state, data state {"info": DataInfo, "preprocess":
    Preprocess}) from any checkpoint file (weights only). Checkpoints written before the data state was kept get it
    from the config's data (data_pipelines.describe_data)."""
    from .config import load_config
    from .consolidate import checkpoint_weights
    ckpt = load_checkpoint_file(checkpoint)
    client = ckpt.get("client", {})
    if "config" not in client:
        raise ConfigError(f"{checkpoint}: the checkpoint carries no resolved config")
    cfg = resolve_config(load_config(None, base=client["config"]))
    weights = checkpoint_weights(checkpoint, ckpt)  # merged from DeepSpeed shards when the file holds none
    model = build_model(cfg)
    model.load_state_dict(weights)
    model.to(device or torch.device("cpu")).eval()
    task = build_task(cfg.data.task, cfg.eval.task_args)
    task.load_state_dict(client.get("task") or {})
    saved = client.get("data") or {}
    if saved.get("info"):
        state = {"info": DataInfo.from_dict(saved["info"]), "preprocess": Preprocess.from_dict(saved["preprocess"])}
    else:
        from data_pipelines.build import reader_for
        info = describe(cfg)
        reader, opts = reader_for(cfg.data)
        state = {"info": info, "preprocess": reader.preprocess(opts, cfg.data, info)}
    return model, cfg, task, state
