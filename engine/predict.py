"""`medpose predict`: files, folders or glob patterns in; predictions.csv / predictions.json and overlays out.

Each input is read by the checkpoint's reader and preprocessed with the checkpoint's own DataInfo and Preprocess
(data_pipelines/predict_input.py: exactly like an evaluation sample), inputs run through the model `batch_size` at a
time, every prediction is mapped back to its input's original frame, and the task writes its row (landmarks in
original pixels with a confidence each, angles, grades, circumference ...) and draws the overlay. `predict_with` is
that loop for any network behind the model's call: `predict --onnx` runs it on an exported network
(engine/onnx_predict.py), so both give the same rows.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_pipelines.build import reader_for
from data_pipelines.errors import DataError
from data_pipelines.predict_input import expand_inputs, load_for_predict
from data_pipelines.readers.base import spacing_pair

from .config import check_flip_test
from .evaluate import predict_batch, sample_prediction
from .report import _finite_or_none

log = logging.getLogger("medpose")


def _safe_name(path: Path) -> str:
    return path.name.replace(".", "_")  # a.png and a.json must not share an overlay


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc="predict", unit="batch")


@torch.no_grad()
def predict_files(checkpoint: str | Path | list[str | Path], inputs: list[str | Path], out_dir: Path,
                  device: torch.device | None = None, batch_size: int = 8, overlays: int | None = None,
                  skip_bad: bool = False, progress: bool = False,
                  spacing_mm: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Predict every input (files, folders, globs); returns the rows also written to predictions.csv / .json.
    overlays: how many overlay PNGs to draw (None: one per input; 0: none). skip_bad: an input that does not read
    is logged and listed in predictions.json's "skipped" instead of stopping the run. `checkpoint`: a file, or a
    list of checkpoints / a folder of fold_<k> runs: more than one predicts with their ensemble (engine/ensemble.py:
    raw outputs averaged per batch, each member's flip test first; the first checkpoint's config, reader and
    preprocessing). spacing_mm: mm per pixel (x, y; one value: both) of the inputs that carry none of their own
    (with_spacing)."""
    from .run import load_for_inference    # here, not at import: `predict --onnx` never loads the training stack
    _spacing(spacing_mm)                      # a wrong --spacing-mm stops before any checkpoint is read
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    from .ensemble import load_ensemble, resolve_checkpoints
    paths = resolve_checkpoints(checkpoint)           # a file is itself; a list or a folds folder may be several
    if len(paths) > 1:
        log.info("predict: ensemble of %d checkpoints: %s", len(paths), ", ".join(map(str, paths)))
        model, cfg, task, state = load_ensemble(paths, device)
        return predict_with(model, cfg, task, state, inputs, out_dir, device, batch_size, overlays, skip_bad,
                            progress, spacing_mm)
    checkpoint = paths[0]
    model, cfg, task, state = load_for_inference(checkpoint, device)
    return predict_with(model, cfg, task, state, inputs, out_dir, device, batch_size, overlays, skip_bad, progress,
                        spacing_mm)


def with_spacing(cfg, spacing_mm: Sequence[float] | None):
    """cfg with data.spacing_mm = spacing_mm ((x, y) mm per original pixel; one value for both): the spacing of the
    inputs that carry none (a plain image; an annotation that gives one keeps its own, as in training). None: cfg
    unchanged (the run's data.spacing_mm, else a dataset.json beside the images, else unknown)."""
    pair = _spacing(spacing_mm)
    return cfg if pair is None else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spacing_mm=pair))


def _spacing(spacing_mm: Sequence[float] | None) -> tuple[float, float] | None:
    """--spacing-mm (one or two numbers) as the readers' (x, y) pair; OptionError naming the option otherwise."""
    if spacing_mm is None:
        return None
    values = list(spacing_mm)
    return spacing_pair(values[0] if len(values) == 1 else values, "--spacing-mm")


@torch.no_grad()
def predict_with(model, cfg, task, state: dict[str, Any], inputs: list[str | Path], out_dir: Path,
                 device: torch.device, batch_size: int = 8, overlays: int | None = None, skip_bad: bool = False,
                 progress: bool = False, spacing_mm: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The predict loop for any network `model` (a torch module, or an exported model behind the same call:
    engine/onnx_predict.py): image_BCHW on `device` -> output dict of tensors. cfg, task and state are what
    load_for_inference returns (or the export sidecar holds); spacing_mm: with_spacing."""
    cfg = with_spacing(cfg, spacing_mm)
    check_flip_test(cfg, "medpose predict")
    reader, _ = reader_for(cfg.data)
    files = expand_inputs(inputs, reader.annotation_suffixes)
    decode = task.decoder(cfg)
    flip_pairs = tuple(state["info"].flip_pairs) if getattr(cfg.eval, "flip_test", False) else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped, drawn = [], [], 0
    chunks = [files[i:i + batch_size] for i in range(0, len(files), max(1, batch_size))]
    for chunk in _progress(chunks, progress, len(chunks)):
        items = []
        for path in chunk:
            try:
                items.append((path, load_for_predict(path, cfg.data, state["info"], state["preprocess"])))
            except DataError as exc:
                if not skip_bad:
                    raise
                log.warning("predict: skipped %s: %s", exc.path, exc.problem)
                skipped.append({"input": str(path), "problem": str(exc)})
        if not items:
            continue
        image = torch.stack([torch.as_tensor(np.asarray(it["input_CHW"]), dtype=torch.float32) for _, it in items])
        outputs, preds = _forward(model, image.to(device), decode, flip_pairs)
        for b, (path, item) in enumerate(items):
            pred = sample_prediction(outputs, preds, b, item["to_input_3x3"], item["image_HW3"].shape[:2])
            pred["spacing_mm_2"] = np.asarray(item["spacing_mm_2"], dtype=np.float64)
            row = {"input": str(path), **task.predict_row(pred, item)}
            if overlays is None or drawn < overlays:
                row["overlay"] = str(task.draw_prediction(item["image_HW3"], pred, item.get("truth"),
                                                          out_dir / f"{_safe_name(path)}_overlay.png",
                                                          title=path.name))
                drawn += 1
            rows.append(row)
    _write(out_dir, rows, skipped)
    return rows


def _forward(model, image_BCHW: torch.Tensor, decode, flip_pairs):
    if flip_pairs is None:
        return predict_batch(model, image_BCHW, decode, contextlib.nullcontext)
    return predict_batch(model, image_BCHW, decode, contextlib.nullcontext, flip_pairs=flip_pairs)


def _write(out_dir: Path, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(out_dir / "predictions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    payload = rows if not skipped else {"predictions": rows, "skipped": skipped}
    (out_dir / "predictions.json").write_text(json.dumps(_finite_or_none(payload), indent=2))
