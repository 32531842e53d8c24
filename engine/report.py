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


def robustness_table(task, figures: dict[str, float], robustness: dict[str, dict[str, dict[str, float]]]
                     ) -> dict[str, dict[str, dict[str, float | None]]]:
    """kind -> level -> the task's headline figures (null when undefined), the form report.json keeps."""
    keys = task.headline_keys(figures)
    return {kind: {level: {k: _finite_or_none(row.get(k)) for k in keys} for level, row in rows.items()}
            for kind, rows in robustness.items()}


def write_robustness_tables(out_dir: Path, table: dict[str, dict[str, dict[str, float | None]]]) -> list[Path]:
    """robustness.csv (kind, level, one column per figure) and robustness.md (one table per kind)."""
    from .corrupt import KINDS
    keys = list(next(iter(next(iter(table.values())).values())))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4g}"
    csv_lines = [",".join(["kind", "level", *keys])]
    md = ["# Robustness under image corruption", ""]
    for kind, rows in table.items():
        md += [f"## {kind} ({KINDS.get(kind, 'level')})", "", "| level | " + " | ".join(keys) + " |",
               "|---" * (len(keys) + 1) + "|"]
        for level, row in rows.items():
            csv_lines.append(",".join([kind, level, *("" if row[k] is None else repr(row[k]) for k in keys)]))
            md.append(f"| {level} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
        md.append("")
    paths = [out_dir / "robustness.csv", out_dir / "robustness.md"]
    paths[0].write_text("\n".join(csv_lines) + "\n")
    paths[1].write_text("\n".join(md))
    return paths


def write_report(out_dir: Path, cfg, task, figures: dict[str, float], records: list[dict[str, Any]],
                 model: torch.nn.Module, dataset, decode: Callable, extra: dict[str, Any],
                 robustness: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """report.json, per_image.jsonl, summary.txt and the figures; with `robustness` ({kind: {level: figures}},
    engine.run.robustness) also its table (report.json "robustness", robustness.csv / .md) and
    figures/robustness.png."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = [str(p) for p in sorted(fig_dir.glob("curve_*.png"))]
    written += [str(p) for p in write_overlays(task, model, dataset, decode, fig_dir / "overlays", cfg.log.overlays)]
    written += [str(p) for p in task.write_figures(fig_dir, figures, records, cfg, model, dataset, decode)]
    table = robustness_table(task, figures, robustness) if robustness else None
    if table:
        from .corrupt import KINDS
        from .plots import plot_robustness
        write_robustness_tables(out_dir, table)
        written.append(str(plot_robustness(table, fig_dir / "robustness.png", KINDS)))
    report = {**{k: _finite_or_none(figures.get(k)) for k in task.headline_keys(figures)},
              "task": task.name, "figures": _finite_or_none(figures),
              "run": {**extra, "versions": versions()}, "figure_files": written}
    if table:
        report["robustness"] = table
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "per_image.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(_finite_or_none(r)) + "\n")
    summary = format_summary(task, figures, extra)
    if table:
        summary += "\n" + (out_dir / "robustness.md").read_text().rstrip()
    (out_dir / "summary.txt").write_text(summary + "\n")
    LOG.info("report written to %s\n%s", out_dir / "report.json", summary)
    return report
