"""`medpose predict --onnx model.onnx`: the predict loop on an exported network, without the training stack.

The sidecar beside the file (`model.onnx.json`, engine/export.py) gives the resolved config, the data description,
the preprocessing and the task's learned state; inputs are read and preprocessed exactly as `predict --checkpoint`
does (data_pipelines/predict_input.py), the network runs in onnxruntime (CPU) - or as TorchScript for a `.pt`
export - and the same Python decoding, flip test, mapping to the original frame and task rows follow
(engine/predict.py: predict_with). Nothing here imports the trainer, the distributed strategies' back-ends
(DeepSpeed) or DALI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.records import DataInfo, Preprocess

from .config import load_config
from .export import ExportError, load_exported, read_sidecar
from .predict import predict_with
from .tasks import build_task


class ExportedNetwork:
    """An exported network behind the eager model's call: image_BCHW tensor -> {output name: float32 tensor}.
    A file exported with a fixed batch runs the inputs that many at a time (the last group padded with copies of
    its last image, whose outputs are dropped)."""

    def __init__(self, path: str | Path, sidecar: dict[str, Any]):
        model = sidecar["model"]
        self.path = Path(path)
        self.run = load_exported(path, model.get("format"))
        self.batch = model.get("batch")
        self.output_names = list(model["output_names"])
        self.input_chw = tuple(int(n) for n in model["input_shape"][1:])

    def __call__(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image_BCHW.detach().float().cpu().numpy()
        if tuple(x.shape[1:]) != self.input_chw:
            raise ExportError(f"{self.path}: input of shape {tuple(x.shape[1:])}, the exported network takes "
                              f"{self.input_chw} (C, H, W)")
        n = x.shape[0]
        step = self.batch or n
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.output_names}
        for i in range(0, n, step):
            chunk = x[i:i + step]
            real = chunk.shape[0]
            if real < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - real, axis=0)])
            out = self.run(chunk)
            for k in self.output_names:
                parts[k].append(np.asarray(out[k])[:real])
        return {k: torch.from_numpy(np.concatenate(v)).to(image_BCHW.device) for k, v in parts.items()}


def load_exported_predictor(path: str | Path):
    """(network, resolved config, task with its learned state, {"info", "preprocess"}) from an exported file and
    its sidecar: what engine.run.load_for_inference gives for a checkpoint."""
    sidecar = read_sidecar(path)
    cfg = load_config(None, base=sidecar["config"])
    task = build_task(cfg.data.task, cfg.eval.task_args)
    task.load_state_dict(sidecar.get("task_state") or {})
    saved = sidecar["data_state"]
    state = {"info": DataInfo.from_dict(saved["info"]), "preprocess": Preprocess.from_dict(saved["preprocess"])}
    return ExportedNetwork(path, sidecar), cfg, task, state


@torch.no_grad()
def predict_files_exported(model_path: str | Path, inputs: list[str | Path], out_dir: Path, batch_size: int = 8,
                           overlays: int | None = None, skip_bad: bool = False,
                           progress: bool = False, spacing_mm=None) -> list[dict[str, Any]]:
    """`predict_files` with an exported network (ONNX or TorchScript) in place of the checkpoint; same rows."""
    network, cfg, task, state = load_exported_predictor(model_path)
    return predict_with(network, cfg, task, state, inputs, out_dir, torch.device("cpu"), batch_size, overlays,
                        skip_bad, progress, spacing_mm)
