"""Putting a run together: config → dist info → strategy → run dir → data → model → trainer → report."""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines import LOADERS
from models import MODELS, build_criterion, decode_outputs

from .checkpoint import load_checkpoint_file, resolve_resume, seed_everything, versions
from .config import Config, ConfigError, save_config
from .dist import DistInfo, read_dist_info
from .evaluate import evaluate_dataset
from .logger import LOG, setup_console_logging
from .plots import plot_training_curves
from .report import write_report
from .strategies import build_strategy
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
                          timeout_s=cfg.dist.timeout_s, find_unused_parameters=cfg.dist.find_unused_parameters)


def build_model(cfg: Config) -> torch.nn.Module:
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name: unknown model '{cfg.model.name}' (choose from {sorted(MODELS)})")
    builder = MODELS[cfg.model.name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg.model.args) - set(params))
        if unknown:
            raise ConfigError(f"model.args: unknown key '{unknown[0]}' for model '{cfg.model.name}' "
                              f"(valid: {', '.join(params)})")
    return builder(**cfg.model.args)


def make_run_dir(cfg: Config, strategy, resuming: bool) -> Path:
    """runs_root/name, or name-2, name-3 ... when it exists and this is a fresh run; rank 0 decides for all."""
    if cfg.log.run_dir:
        choice = Path(cfg.log.run_dir)
    else:
        base = Path(cfg.log.runs_root) / cfg.log.name
        choice = base
        if strategy.info.is_main and not resuming:
            k = 2
            while (choice / "config.yaml").exists():
                choice = base.with_name(f"{base.name}-{k}")
                k += 1
    choice = Path(strategy.all_gather_object(str(choice))[0])
    if strategy.info.is_main:
        (choice / "checkpoints").mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    return choice


def train(cfg: Config, resume: str | None = None, final_test: bool = True) -> dict[str, Any]:
    t_start = time.time()
    strategy = make_strategy(cfg)
    info = strategy.info
    seed_everything(cfg.train.seed + info.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = make_run_dir(cfg, strategy, resuming=resume is not None)
    setup_console_logging(info.rank, run_dir)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    LOG.info("run dir %s | strategy %s | world size %d | device %s", run_dir, strategy.name, info.world_size,
             info.device)
    try:
        data = LOADERS[cfg.data.loader](cfg.data, run_dir, strategy, seed=cfg.train.seed)
        model = build_model(cfg)
        criterion = build_criterion(cfg.model.name, **cfg.model.criterion_args)

        def evaluate_fn(m, step):
            return _evaluate(cfg, strategy, data, "val", m, criterion)[0]

        trainer = Trainer(cfg, strategy, model, criterion, data["train"], evaluate_fn, run_dir)
        resume_path = resolve_resume(resume, run_dir) if resume else None
        result = trainer.fit(resume_path)
        result["run_dir"] = str(run_dir)
        if info.is_main:
            curves = plot_training_curves(run_dir / "metrics.jsonl", run_dir / "figures")
            LOG.info("training curves: %s", ", ".join(p.name for p in curves))
        if final_test:
            best = run_dir / "checkpoints" / "best.pt"
            if best.is_file():
                trainer.resume_weights_only(best)
            result["report"] = held_out_report(cfg, strategy, data, trainer.model, criterion, run_dir, extra={
                "checkpoint": str(best if best.is_file() else "final weights"), "best_step": result["best_step"],
                "steps": result["step"], "wall_time_s": round(time.time() - t_start, 1)})
        strategy.barrier()
        return result
    finally:
        strategy.close()


def held_out_report(cfg: Config, strategy, data: dict, model, criterion, out_dir: Path, split: str = "test",
                extra: dict | None = None) -> dict[str, Any] | None:
    """Evaluate `split` on every rank, then rank 0 writes report.json and the figures into out_dir."""
    figures, records = _evaluate(cfg, strategy, data, split, model, criterion, gather_records=True)
    if not strategy.info.is_main:
        return None
    extra = {"split": split, "world_size": strategy.info.world_size, "strategy": strategy.name, **(extra or {})}
    return write_report(out_dir, cfg, figures, records, strategy.unwrap(model), data[split], _decoder(cfg), extra)


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, out_dir: str | Path, split: str = "test"
                        ) -> dict[str, Any] | None:
    """`medpose eval`: the checkpoint's weights on the config's data split; report + figures in out_dir."""
    strategy = make_strategy(cfg)
    out_dir = Path(out_dir)
    try:
        if strategy.info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        setup_console_logging(strategy.info.rank, out_dir)
        data = LOADERS[cfg.data.loader](cfg.data, out_dir, strategy, seed=cfg.train.seed)
        model = build_model(cfg)
        ckpt = load_checkpoint_file(checkpoint)
        model.load_state_dict(ckpt["model"])
        model.to(strategy.info.device)
        criterion = build_criterion(cfg.model.name, **cfg.model.criterion_args).to(strategy.info.device)
        return held_out_report(cfg, strategy, data, model, criterion, out_dir, split, extra={"checkpoint": str(checkpoint)})
    finally:
        strategy.close()


def _evaluate(cfg: Config, strategy, data: dict, split: str, model, criterion, gather_records: bool = False):
    return evaluate_dataset(model, data[split], strategy, _decoder(cfg), criterion, cfg.train.batch_size,
                            num_workers=cfg.eval.num_workers, gather_records=gather_records,
                            num_classes=data["num_classes"], class_names=data["class_names"],
                            sdr_radii_mm=cfg.eval.sdr_radii_mm, angle_tolerances_deg=cfg.eval.angle_tolerances_deg)


def _decoder(cfg: Config):
    """Heatmap decoding with the data's sigma and peak (DARK's blur kernel scales with sigma)."""
    method, sigma, peak = cfg.model.decode, cfg.data.sigma_px, cfg.data.heatmap_peak
    return lambda outputs: decode_outputs(outputs, method=method, sigma=sigma, peak=peak)


def load_for_inference(checkpoint: str | Path, device: torch.device | None = None) -> tuple[torch.nn.Module, Config]:
    """A model and its resolved config from any checkpoint file (weights only)."""
    from .config import load_config
    ckpt = load_checkpoint_file(checkpoint)
    client = ckpt.get("client", {})
    if "config" not in client:
        raise ConfigError(f"{checkpoint}: the checkpoint carries no resolved config")
    cfg = load_config(None, base=client["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(device or torch.device("cpu")).eval()
    return model, cfg
