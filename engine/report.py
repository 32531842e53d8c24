"""The end-of-run report: report.json with the held-out figures, plus the figures people look at.

What goes in is the task's choice (engine/tasks): its headline keys lead report.json, its figures and summary lines
follow; this module only writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import versions
from .evaluate import predict_batch, sample_prediction
from .logger import LOG


def _finite_or_none(v: Any) -> Any:
    """JSON has no NaN/Inf: write null (recursively through dicts and lists)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, np.generic):
        return _finite_or_none(v.item())
    return v


@torch.no_grad()
def write_overlays(task, model: torch.nn.Module, dataset, decode: Callable, out_dir: Path, count: int) -> list[Path]:
    """Prediction vs truth on the first `count` samples, drawn by the task in the original image frame."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model.eval()
    paths = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        meta = sample["meta"]
        image = torch.as_tensor(sample["image_CHW"])[None].to(device)
        outputs, preds = predict_batch(model, image, decode, contextlib.nullcontext)
        orig = dataset.original(meta["index"])
        orig_hw = tuple(meta.get("orig_hw") or np.asarray(orig["image_HW3"]).shape[:2])
        pred = sample_prediction(outputs, preds, 0, meta["to_input_3x3"], orig_hw)
        pred["spacing_mm_2"] = np.asarray(orig["spacing_mm_2"], dtype=np.float64)
        paths.append(task.draw_prediction(orig["image_HW3"], pred, orig, out_dir / f"overlay_{meta['id']}.png",
                                          title=str(meta["id"])))
    return paths


def format_summary(task, figures: dict[str, float], extra: dict[str, Any]) -> str:
    rule = "=" * 64
    title = f" MedPose report — {task.name}, {extra.get('split', 'test')} split, " \
            f"{int(figures.get('num_images', 0))} images"
    return "\n".join([rule, title, rule, *task.summary_lines(figures), rule])


def write_report(out_dir: Path, cfg, task, figures: dict[str, float], records: list[dict[str, Any]],
                 model: torch.nn.Module, dataset, decode: Callable, extra: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = [str(p) for p in sorted(fig_dir.glob("curve_*.png"))]
    written += [str(p) for p in write_overlays(task, model, dataset, decode, fig_dir / "overlays", cfg.log.overlays)]
    written += [str(p) for p in task.write_figures(fig_dir, figures, records, cfg, model, dataset, decode)]
    report = {**{k: _finite_or_none(figures.get(k)) for k in task.headline_keys(figures)},
              "task": task.name, "figures": _finite_or_none(figures),
              "run": {**extra, "versions": versions()}, "figure_files": written}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "per_image.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(_finite_or_none(r)) + "\n")
    summary = format_summary(task, figures, extra)
    (out_dir / "summary.txt").write_text(summary + "\n")
    LOG.info("report written to %s\n%s", out_dir / "report.json", summary)
    return report
