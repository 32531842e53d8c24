"""k-fold training and the folds' ensemble (`medpose train --folds all | 0,2`), as nnU-Net does.

Every listed fold is trained in turn in the same process (under torchrun every rank loops the folds the same way), as
a normal run in <base>/fold_<k> with data.fold=k: its own config.yaml, splits.json, checkpoints, metrics and
validation figures (a per-fold test report only with fold_tests). <base> is log.run_dir when given, else
runs_root/name (suffixed -2, -3 ... when that already holds a run and this is no --resume). The test hold-out is the
same for every fold (data_pipelines/build.py); after the last fold the ensemble of the folds' checkpoints
(checkpoints/best.pt, else the last) is evaluated on it into <base>/ensemble_test/ (engine/run.evaluate_ensemble, the
writer of `medpose eval`), and <base>/folds.json keeps, per fold, the validation figures, the training wall time,
the validation ids and the checkpoint used, then the ensemble's test figures. folds.json is rewritten after every fold,
so an interrupted launch leaves what it finished.

--resume auto resumes each unfinished fold from its own latest checkpoint (a fold without one starts afresh) and skips
a fold whose final checkpoint and final evaluation exist; any other --resume is refused (resume one fold as a plain
run: data.fold=k log.run_dir=<base>/fold_<k> --resume auto).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from .checkpoint import list_checkpoints
from .config import Config, ConfigError, load_config
from .ensemble import fold_dirs, run_checkpoint
from .logger import LOG

NOT_HEADLINE = ("task", "figures", "run", "figure_files", "robustness")


def parse_folds(spec: str, num_folds: int) -> list[int]:
    """`--folds all` -> 0 .. num_folds-1; `--folds 0,2` -> [0, 2] (each index in [0, num_folds), repeats dropped)."""
    text = str(spec).strip()
    if num_folds < 2:
        raise ConfigError(f"--folds: data.num_folds={num_folds}; k-fold training needs at least 2 folds")
    if text.lower() == "all":
        return list(range(num_folds))
    try:
        folds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--folds {spec!r}: give 'all' or fold indices separated by commas, e.g. --folds 0,2"
                          ) from None
    if not folds:
        raise ConfigError(f"--folds {spec!r}: no fold given (use 'all' or indices such as 0,2)")
    bad = next((k for k in folds if not 0 <= k < num_folds), None)
    if bad is not None:
        raise ConfigError(f"--folds {spec}: fold {bad} is outside [0, data.num_folds={num_folds}) (folds are "
                          f"numbered from 0; data.num_folds=N sets how many there are)")
    return list(dict.fromkeys(folds))


def _holds_a_run(d: Path) -> bool:
    return (d / "config.yaml").exists() or (d / "folds.json").exists() or bool(fold_dirs(d))


def folds_base(cfg: Config, strategy, resuming: bool) -> Path:
    """log.run_dir, or runs_root/name (name-2, name-3 ... when it holds a run or folds and this is no resume); rank 0
    decides for all."""
    from .run import choose_run_dir
    return choose_run_dir(cfg, strategy, resuming, taken=_holds_a_run)


def fold_config(cfg: Config, base: Path, k: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=k),
                               log=dataclasses.replace(cfg.log, run_dir=str(base / f"fold_{k}")))


def _end_step(cfg: Config) -> int:
    tc = cfg.train
    return min(tc.max_steps, tc.stop_at_step) if tc.stop_at_step > 0 else tc.max_steps


def _metric_rows(run_dir: Path, split: str = "val") -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def fold_finished(run_dir: Path, cfg: Config) -> bool:
    """The fold's checkpoint of its last step exists and its final evaluation was logged."""
    found = list_checkpoints(run_dir / "checkpoints")
    end = _end_step(cfg)
    return bool(found) and found[-1][0] >= end and any(r["step"] >= end for r in _metric_rows(run_dir))


def _best_row(rows: list[dict[str, Any]], key: str, mode: str) -> dict[str, Any] | None:
    """The validation row the trainer kept as best (the first strict optimum of a finite value)."""
    best = None
    for r in rows:
        v = r.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if best is None or (v > best[key] if mode == "max" else v < best[key]):
            best = r
    return best


def _figures(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k not in ("step", "split")}


def fold_entry(k: int, run_dir: Path, status: str, wall_s: float | None) -> dict[str, Any]:
    """folds.json's record of one finished fold, read from its run directory (rank 0)."""
    saved = load_config(run_dir / "config.yaml")
    key = "loss" if saved.train.best_metric == "auto" else saved.train.best_metric
    rows = _metric_rows(run_dir)
    best = _best_row(rows, key, saved.train.best_mode)
    ckpt = run_checkpoint(run_dir)
    splits = json.loads((run_dir / "splits.json").read_text()) if (run_dir / "splits.json").is_file() else {}
    found = list_checkpoints(run_dir / "checkpoints")
    return {"fold": k, "run_dir": str(run_dir), "status": status,
            "train_wall_time_s": None if wall_s is None else round(wall_s, 1),
            "steps": found[-1][0] if found else None,
            "best_metric": key, "best_mode": saved.train.best_mode,
            "best_value": None if best is None else best[key], "best_step": None if best is None else best["step"],
            "val": _figures(best if best is not None else (rows[-1] if rows else None)),
            "val_last": _figures(rows[-1] if rows else None),
            "checkpoint": None if ckpt is None else str(ckpt),
            "checkpoint_kind": None if ckpt is None else ("best" if ckpt.name == "best.pt" else "last"),
            "n_train": len(splits.get("train", [])), "n_val": len(splits.get("val", [])),
            "n_test": len(splits.get("test", [])), "val_ids": list(splits.get("val", []))}


def _write_summary(base: Path, summary: dict[str, Any]) -> None:
    from .report import _finite_or_none
    tmp = base / "folds.json.tmp"
    tmp.write_text(json.dumps(_finite_or_none(summary), indent=2))
    tmp.replace(base / "folds.json")


def _cv(entries: list[dict[str, Any]]) -> dict[str, Any]:
    values = [e["best_value"] for e in entries if isinstance(e.get("best_value"), (int, float))]
    return {"metric": entries[0]["best_metric"] if entries else None,
            "mean": sum(values) / len(values) if values else None, "per_fold": [e["best_value"] for e in entries]}


def train_folds(cfg: Config, folds: str, resume: str | None = None, final_test: bool = True,
                fold_tests: bool = False, resume_weights_only: bool = False) -> dict[str, Any] | None:
    """Train the folds of `folds` (parse_folds) one after another, then evaluate their ensemble on the test split
    (module docstring; final_test=False skips it, fold_tests=True also writes each fold's own test report).
    Returns folds.json's content on rank 0, None on the other ranks."""
    from . import run
    from .dist import read_dist_info
    from .strategies import build_strategy
    if resume_weights_only:
        raise ConfigError("--folds with --resume-weights-only: start each fold from given weights with "
                          "model.init_from instead")
    if resume is not None and resume != "auto":
        raise ConfigError(f"--folds with --resume {resume}: only --resume auto is supported (each unfinished fold "
                          f"resumes from its own latest checkpoint); to resume one fold, run it alone: "
                          f"data.fold=K log.run_dir=<base>/fold_K --resume auto")
    ks = parse_folds(folds, cfg.data.num_folds)
    run.resolve_config(cfg)        # an unknown model / task is an error before any process group or folder
    resuming = resume == "auto"
    info = read_dist_info()
    # One process group for the whole launch: every fold's strategy finds it and leaves it open (strategies.py)
    outer = build_strategy("ddp" if info.world_size > 1 else "single", info, backend=cfg.dist.backend,
                           timeout_s=cfg.dist.timeout_s)
    try:
        base = folds_base(cfg, outer, resuming)
        if outer.info.is_main:
            base.mkdir(parents=True, exist_ok=True)
        outer.barrier()
        previous: dict[int, dict[str, Any]] = {}
        if resuming and (base / "folds.json").is_file():
            previous = {e["fold"]: e for e in json.loads((base / "folds.json").read_text()).get("folds", [])}
        summary: dict[str, Any] = {"base": str(base), "num_folds": cfg.data.num_folds, "folds_run": ks,
                                   "folds": [], "cv": None, "ensemble": None}
        for k in ks:
            cfg_k = fold_config(cfg, base, k)
            run_dir = base / f"fold_{k}"
            done = resuming and fold_finished(run_dir, cfg_k)
            done = bool(outer.all_gather_object(done)[0])
            t0 = time.time()
            if done:
                LOG.info("fold %d: finished already (%s), skipped", k, run_dir)
                wall, status = previous.get(k, {}).get("train_wall_time_s"), "finished before"
            else:
                had = resuming and bool(list_checkpoints(run_dir / "checkpoints"))
                run.train(cfg_k, resume="auto" if resuming else None, final_test=fold_tests)
                wall, status = time.time() - t0, "resumed" if had else "trained"
            own = None
            if outer.info.is_main:
                splits = json.loads((run_dir / "splits.json").read_text())
                own = splits.get("fold") is None
            if outer.all_gather_object(own)[0]:
                raise ConfigError(f"--folds: the data of data.root={cfg.data.root} brings its own train / val / "
                                  f"test splits (split folders, a split column or field), so every fold would "
                                  f"train on the same split; k-fold needs data without given splits")
            if outer.info.is_main:
                summary["folds"].append(fold_entry(k, run_dir, status, wall))
                summary["cv"] = _cv(summary["folds"])
                _write_summary(base, summary)
        if final_test:
            checkpoints = [base / f"fold_{k}" for k in ks]
            paths = [run_checkpoint(d) for d in checkpoints]
            missing = next((d for d, p in zip(checkpoints, paths) if p is None), None)
            if missing is not None:
                raise ConfigError(f"{missing}: no checkpoint to ensemble")
            out = base / "ensemble_test"
            eval_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fold=ks[0]))
            report = run.evaluate_checkpoint(eval_cfg, paths if len(paths) > 1 else paths[0], out, split="test")
            if outer.info.is_main and report is not None:
                summary["ensemble"] = {
                    "checkpoints": [str(p) for p in paths], "split": "test", "report": str(out / "report.json"),
                    "test": {k: v for k, v in report.items() if k not in NOT_HEADLINE},
                    "figures": report.get("figures")}
                _write_summary(base, summary)
        outer.barrier()
        return summary if outer.info.is_main else None
    finally:
        outer.close()


def format_summary(summary: dict[str, Any]) -> str:
    """The console lines: one per fold, then the ensemble's headline."""
    lines = []
    for e in summary["folds"]:
        value = e["best_value"]
        shown = "n/a" if value is None else f"{value:.4g}"
        wall = "n/a" if e["train_wall_time_s"] is None else f"{e['train_wall_time_s']:.1f} s"
        lines.append(f"fold {e['fold']}: val {e['best_metric']} {shown} (step {e['best_step']} of {e['steps']}, "
                     f"{e['n_val']} val images) | train {wall} | {e['status']} | {e['checkpoint']}")
    cv = summary.get("cv") or {}
    if cv.get("mean") is not None and len(summary["folds"]) > 1:
        lines.append(f"cross-validation: mean val {cv['metric']} {cv['mean']:.4g} over {len(summary['folds'])} "
                     f"folds")
    ens = summary.get("ensemble")
    if ens:
        head = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ens["test"].items())
        lines.append(f"ensemble of {len(ens['checkpoints'])} fold(s), test: {head}\n  report: {ens['report']}")
    lines.append(f"folds: {Path(summary['base']) / 'folds.json'}")
    return "\n".join(lines)
