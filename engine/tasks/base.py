"""The task contract: what the engine needs to evaluate, report and predict for one clinical task.

A task is chosen by `data.task` (keys of engine.tasks.TASKS). The engine's generic loop (engine/evaluate.py) runs the
model, decodes with `task.decoder(cfg)`, maps the predictions back to each sample's original frame and hands them to
the task's accumulator; `write_figures`, `summary_lines` and `predict_row` / `draw_prediction` turn the results into
files. Nothing here knows which model produced the outputs beyond the `forward -> dict` contract:

    outputs: {"seg_logits_BCHW"?, "heatmap_BKHW"?, "kpts_px_BK2"? (regression, input-frame px), ...}
    decoder(outputs) -> {"kpts_px_BK2": input-frame px (required), "kpt_score_BK"?, "kpt_present_BK"? (bool: the
                         decoder's own presence decision), "mask_BHW"?}

Per sample the accumulator receives `pred` in the ORIGINAL frame:
    {"kpts_px_K2": float32 (K, 2), "kpt_score_K"?, "kpt_present_K"?, "mask_HW"? (int64, original H x W)}
and `orig = dataset.original(i)` (truth in the original frame, spacing in mm per original pixel) and the sample meta.

Accumulator contract (sums and counts only, so ranks reduce with all-reduce SUM; engine/metrics.py explains why):
    update_sample(pred, orig, meta); state() -> {name: float64 tensor}; load_state(state); compute() -> {key: float};
    records: list of per-image dicts (JSON-able; written to per_image.jsonl and used by write_figures).
"""
from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np


class Task(abc.ABC):
    """Base class of the tasks (plain object; subclasses override what differs)."""

    name: str = ""
    default_format: str = ""           # data.format used when data.format = "auto"
    headline: tuple[str, ...] = ()     # report.json top-level keys (always present, null when undefined)
    best_metric: str = "loss"          # train.best_metric = "auto" resolves to this
    best_mode: str = "min"
    shown: tuple[str, ...] = ()        # figures printed on the validation line
    # What the data must give (engine/fitting.py checks it before any data is made or any step is run):
    needs_masks: bool = False          # truth masks (segmentation figures, HC from the mask ...)
    needs_landmarks: bool = True       # landmarks (every task scores them but segmentation)
    num_keypoints: int | None = None   # exactly this many landmarks (clinical measures built on them); None: any

    def headline_keys(self, figures: dict[str, float]) -> tuple[str, ...]:
        """report.json's top-level keys for these figures: `headline`, unless a key depends on the data (the
        landmarks task's SDR key is in mm or px depending on whether the images have a spacing)."""
        return self.headline

    @abc.abstractmethod
    def accumulator(self, cfg, data: dict[str, Any]):
        """A fresh accumulator for one evaluation pass (contract in the module docstring)."""

    def decoder(self, cfg) -> Callable[[dict], dict]:
        """Network outputs -> predictions in the input frame (see module docstring)."""
        from models import decode_outputs
        method, sigma, peak = cfg.model.decode, cfg.data.sigma_px, cfg.data.heatmap_peak
        return lambda outputs: decode_outputs(outputs, method=method, sigma=sigma, peak=peak)

    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        """Task figures (PNG) into out_dir; returns the paths written."""
        return []

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        """The few lines of summary.txt / the console report."""
        return [f" {k} {_fmt(figures.get(k))}" for k in self.headline]

    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        """One CSV/JSON row of `medpose predict` from original-frame predictions (pred as for the accumulator);
        item is the reader's load_for_predict dict. Default: landmark coordinates."""
        row: dict[str, Any] = {}
        names = item.get("kpt_names") or [f"P{k + 1}" for k in range(len(pred["kpts_px_K2"]))]
        present = pred.get("kpt_present_K")
        for k, (x, y) in enumerate(np.asarray(pred["kpts_px_K2"], dtype=float)):
            ok = present is None or bool(present[k])
            row[f"{names[k]}_x"] = round(float(x), 2) if ok else None
            row[f"{names[k]}_y"] = round(float(y), 2) if ok else None
        return row

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        """The overlay figure of one prediction (truth drawn too when given); pred may carry "spacing_mm_2" (mm per
        original pixel) for measurements in mm."""
        from engine.plots import plot_overlay
        mask = pred.get("mask_HW")
        return plot_overlay(image_HW3, mask, pred["kpts_px_K2"], out_path,
                            true_mask_HW=None if truth is None else truth.get("mask_HW"),
                            true_kpts_K2=None if truth is None else truth.get("kpts_px_K2"), title=title)

    # State a task learns from the training split (e.g. spine_disc's mean skeleton); stored in every checkpoint.
    def fit(self, train_dataset) -> None:
        """Learn task state from the training split (default: nothing to learn)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def figure_formatter(figures: dict[str, float], digits: int = 3) -> Callable[..., str]:
    """f(key, unit="", scale=1.0, digits=...) for summary lines: "n/a" for a missing or non-finite figure."""
    default_digits = digits

    def f(key: str, unit: str = "", scale: float = 1.0, digits: int = default_digits) -> str:
        v = figures.get(key)
        return "n/a" if v is None or not math.isfinite(v) else f"{v * scale:.{digits}g}{unit}"
    return f


def predict_originals(ids, model, dataset, decode: Callable):
    """(id, original sample, prediction in its original frame) for each id of `ids` the dataset holds: one
    eval-mode forward pass each (the task figures' overlays). The model's training mode is restored."""
    import contextlib

    import torch

    from engine.evaluate import predict_batch, sample_prediction
    index_of = {dataset.sample_id(i): i for i in range(len(dataset))}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for sid in ids:
                if sid not in index_of:
                    continue
                i = index_of[sid]
                sample, orig = dataset[i], dataset.original(i)
                outputs, preds = predict_batch(model, sample["image_CHW"][None].to(device), decode,
                                               contextlib.nullcontext)
                hw = np.asarray(orig["image_HW3"]).shape[:2]
                yield sid, orig, sample_prediction(outputs, preds, 0, sample["meta"]["to_input_3x3"], hw)
    finally:
        model.train(was_training)


def spread_picks(records: list[dict[str, Any]], field: str, n: int, by_abs_descending: bool = False) -> list[Any]:
    """Ids of up to n records spread evenly over the range of a finite `field`: the worst, the median and the best
    (ascending order of the field, or of its absolute value descending, for signed errors)."""
    scored = sorted((r for r in records if r.get(field) is not None and math.isfinite(r[field])),
                    key=lambda r: abs(r[field]) if by_abs_descending else r[field], reverse=by_abs_descending)
    if len(scored) <= n:
        return [r["id"] for r in scored]
    return [scored[i]["id"] for i in np.unique(np.linspace(0, len(scored) - 1, n).round().astype(int))]
