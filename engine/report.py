"""The end-of-run report: report.json with the held-out figures, plus the figures people look at."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import versions
from .evaluate import predict_batch, to_original_logits, to_original_points
from .logger import LOG
from . import plots

# The headline figures every hip report carries (issue: "report.json ... at least under the keys").
HEADLINE = ("seg_miou", "seg_dice", "landmark_mre_px", "landmark_mre_mm", "alpha_mae_deg", "beta_mae_deg",
            "screening_accuracy")


def _finite_or_none(v: Any) -> Any:
    """JSON has no NaN/Inf: write null (recursively through dicts and lists)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


@torch.no_grad()
def write_overlays(model: torch.nn.Module, dataset, decode: Callable, out_dir: Path, count: int,
                   class_names=None) -> list[Path]:
    """Prediction vs truth on the first `count` samples, drawn in the original image frame."""
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
        logits = to_original_logits(outputs["seg_logits_BCHW"][0], meta["to_input_3x3"], orig["mask_HW"].shape)
        pred_kpts = to_original_points(preds["kpts_px_BK2"][0].cpu().numpy(), meta["to_input_3x3"])
        path = out_dir / f"overlay_{meta['id']}.png"
        plots.plot_overlay(orig["image_HW3"], logits.argmax(0).cpu().numpy(), pred_kpts, path,
                           true_mask_HW=orig["mask_HW"], true_kpts_K2=orig["kpts_px_K2"], class_names=class_names,
                           title=str(meta["id"]))
        paths.append(path)
    return paths


def format_summary(figures: dict[str, float], extra: dict[str, Any]) -> str:
    def f(key, unit="", scale=1.0, digits=3):
        v = figures.get(key)
        return "n/a" if v is None or not math.isfinite(v) else f"{v * scale:.{digits}g}{unit}"

    lines = [
        "=" * 64,
        f" MedPose report — {extra.get('split', 'test')} split, {int(figures.get('num_images', 0))} images",
        "=" * 64,
        f" segmentation  mIoU (7 structures) {f('seg_miou')}   Dice {f('seg_dice')}   HD95 {f('seg_hd95_mm', ' mm')}",
        f" landmarks     MRE {f('landmark_mre_px', ' px')} = {f('landmark_mre_mm', ' mm')}",
        "               " + "   ".join(f"SDR@{k[4:]} {f(k, ' %')}" for k in figures if k.startswith("sdr_")),
        f" Graf angles   alpha MAE {f('alpha_mae_deg', '°')}   beta MAE {f('beta_mae_deg', '°')}   "
        f"alpha within 5° {f('alpha_within_5deg', ' %')}",
        f" screening     type II accuracy {f('screening_accuracy', ' %', 100.0)}   "
        f"precision {f('screening_precision', ' %', 100.0)}   recall {f('screening_recall', ' %', 100.0)}",
        "=" * 64,
    ]
    return "\n".join(lines)


def write_report(out_dir: Path, cfg, figures: dict[str, float], records: list[dict[str, Any]],
                 model: torch.nn.Module, dataset, decode: Callable, extra: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = [str(p) for p in sorted(fig_dir.glob("curve_*.png"))]
    names = getattr(dataset, "class_names", None)
    written += [str(p) for p in write_overlays(model, dataset, decode, fig_dir / "overlays", cfg.log.overlays,
                                               names)]
    angles = [r for r in records if r.get("alpha_true_deg") is not None and r.get("alpha_pred_deg") is not None]
    for name in ("alpha", "beta"):
        t = np.array([r[f"{name}_true_deg"] for r in angles], dtype=float)
        p = np.array([r[f"{name}_pred_deg"] for r in angles], dtype=float)
        ok = np.isfinite(t) & np.isfinite(p)
        if ok.sum() >= 3:
            path = fig_dir / f"{name}_agreement.png"
            plots.plot_angle_agreement(t[ok], p[ok], path, name=name)
            written.append(str(path))
    dists = [d for r in records for d in (r.get("kpt_err_mm") or []) if d is not None and math.isfinite(d)]
    if dists:
        path = fig_dir / "sdr_curve.png"
        plots.plot_sdr_curve(np.asarray(dists), path)
        written.append(str(path))
    ious = {k[len("seg_iou_"):]: v for k, v in figures.items() if k.startswith("seg_iou_")}
    if ious:
        path = fig_dir / "iou_per_class.png"
        plots.plot_per_class_bars(ious, path, ylabel="IoU")
        written.append(str(path))
    report = {**{k: _finite_or_none(figures.get(k)) for k in HEADLINE},
              "figures": _finite_or_none(figures),
              "run": {**extra, "versions": versions()}, "figure_files": written}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "per_image.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(_finite_or_none(r)) + "\n")
    summary = format_summary(figures, extra)
    (out_dir / "summary.txt").write_text(summary + "\n")
    LOG.info("report written to %s\n%s", out_dir / "report.json", summary)
    return report
