"""`medpose predict`: input files in, overlays plus predictions.csv / predictions.json out, for every task.

Each input is read by the reader of the checkpoint's data.format (`load_for_predict`: preprocessed exactly like an
evaluation sample), the prediction is mapped back to the input's original frame, and the task writes its row
(landmarks, angles, grades, circumference ...) and draws the overlay.
"""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines import PREDICT_INPUTS

from .config import ConfigError
from .evaluate import predict_batch, sample_prediction
from .report import _finite_or_none
from .run import load_for_inference


def _safe_name(path: Path) -> str:
    return path.name.replace(".", "_")  # a.png and a.json must not share an overlay


@torch.no_grad()
def predict_files(checkpoint: str | Path, inputs: list[Path], out_dir: Path,
                  device: torch.device | None = None) -> list[dict[str, Any]]:
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model, cfg, task = load_for_inference(checkpoint, device)
    if cfg.data.format not in PREDICT_INPUTS:
        raise ConfigError(f"data.format: '{cfg.data.format}' has no predict reader ({sorted(PREDICT_INPUTS)})")
    load_input = PREDICT_INPUTS[cfg.data.format]
    decode = task.decoder(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in map(Path, inputs):
        item = load_input(path, cfg.data)
        image = torch.as_tensor(np.asarray(item["input_CHW"]), dtype=torch.float32)[None].to(device)
        outputs, preds = predict_batch(model, image, decode, contextlib.nullcontext)
        pred = sample_prediction(outputs, preds, 0, item["to_input_3x3"], item["image_HW3"].shape[:2])
        pred["spacing_mm_2"] = np.asarray(item["spacing_mm_2"], dtype=np.float64)
        overlay = task.draw_prediction(item["image_HW3"], pred, item.get("truth"),
                                       out_dir / f"{_safe_name(path)}_overlay.png", title=path.name)
        rows.append({"input": str(path), **task.predict_row(pred, item), "overlay": str(overlay)})
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(out_dir / "predictions.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        (out_dir / "predictions.json").write_text(json.dumps(_finite_or_none(rows), indent=2))
    return rows
