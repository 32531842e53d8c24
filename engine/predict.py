"""`medpose predict`: images or labelme files in, overlays and a CSV of landmarks, Graf angles and types out."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_pipelines.errors import DataError
from data_pipelines.labelme import read_labelme
from data_pipelines.transforms import letterbox_matrix, warp_image

from .evaluate import predict_batch, to_original_logits, to_original_points
from .geometry import graf_angles_deg, graf_type
from .plots import plot_overlay
from .run import _decoder, load_for_inference


def load_input(path: Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(image_HW3 uint8, truth or None). A .json is read as labelme (truth drawn too); anything else as an image."""
    if path.suffix.lower() == ".json":
        rec = read_labelme(path)
        return rec.image_HW3, {"mask_HW": rec.mask_HW, "kpts_px_K2": rec.kpts_px_K2}
    if not path.is_file():
        raise DataError(path, "input file not found")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(path, f"image does not decode ({e})") from None
    return arr, None


@torch.no_grad()
def predict_files(checkpoint: str | Path, inputs: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model, cfg = load_for_inference(checkpoint, device)
    decode = _decoder(cfg)
    input_hw = tuple(cfg.data.input_hw)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in inputs:
        image_HW3, truth = load_input(Path(path))
        m = letterbox_matrix(image_HW3.shape[:2], input_hw)
        x = warp_image(image_HW3.transpose(2, 0, 1).astype(np.float32) / 255.0, m, input_hw, pad_value=128 / 255)
        outputs, preds = predict_batch(model, x[None].to(device), decode, contextlib.nullcontext)
        mask = to_original_logits(outputs["seg_logits_BCHW"][0], m, image_HW3.shape[:2]).argmax(0).numpy()
        kpts = to_original_points(preds["kpts_px_BK2"][0].cpu().numpy(), m)
        alpha, beta = (float(a) for a in graf_angles_deg(kpts.astype(np.float64)))
        overlay = out_dir / f"{Path(path).name.replace('.', '_')}_overlay.png"  # a.png and a.json differ
        plot_overlay(image_HW3, mask, kpts, overlay, true_mask_HW=truth and truth["mask_HW"],
                     true_kpts_K2=truth and truth["kpts_px_K2"], title=Path(path).name)
        row = {"input": str(path), "alpha_deg": round(alpha, 2), "beta_deg": round(beta, 2),
               "graf_type": graf_type(alpha), "overlay": str(overlay)}
        for k, (px, py) in enumerate(kpts):
            row[f"P{k + 1}_x"], row[f"P{k + 1}_y"] = round(float(px), 2), round(float(py), 2)
        rows.append(row)
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows
