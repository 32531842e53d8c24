"""Evaluation: predictions mapped back to the original image frame, metrics reduced from sums and counts.

Segmentation is scored at the original resolution (docs/systems/hip_us_multihipposenet.md): the seg logits are resampled
through the inverse of the sample's original→input matrix, then arg-maxed. Landmarks go through the same inverse;
distances use the dataset's original pixel spacing. What is measured is the task's business (engine/tasks): this loop
only feeds its accumulator.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from data_pipelines.loaders import make_batches
from data_pipelines.sampler import ShardedSampler
from data_pipelines.transforms import warp_image, warp_points
from models.flip_test import flip_average

from .ensemble import Ensemble
from .tasks.postprocess import keep_largest_region


def to_original_points(kpts_px_K2: np.ndarray, to_input_3x3) -> np.ndarray:
    """Input-frame points → original-frame points (inverse of the sample's original→input matrix)."""
    return warp_points(kpts_px_K2, np.linalg.inv(np.asarray(to_input_3x3, dtype=np.float64))).astype(np.float32)


def to_original_logits(logits_CHW: torch.Tensor, to_input_3x3, orig_hw: tuple[int, int]) -> torch.Tensor:
    """Resample input-frame maps (e.g. seg logits) onto the original pixel grid with the inverse matrix (bilinear;
    outside the input frame the logits are 0, which arg-maxes to background)."""
    inv = np.linalg.inv(np.asarray(to_input_3x3, dtype=np.float64))
    return warp_image(logits_CHW.detach().float().cpu(), inv, tuple(int(n) for n in orig_hw), pad_value=0.0)


def _as_float(outputs: dict) -> dict:
    return {k: v.float() if torch.is_tensor(v) else [t.float() for t in v] for k, v in outputs.items()}


def _float_outputs(model: nn.Module, image_BCHW: torch.Tensor, autocast,
                   flip_pairs: Sequence[tuple[int, int]] | None) -> dict:
    """One network's float32 outputs of a batch, flip-averaged when flip_pairs is not None (predict_batch)."""
    with autocast():
        outputs = model(image_BCHW)
        flipped = model(image_BCHW.flip(-1)) if flip_pairs is not None else None
    outputs = _as_float(outputs)
    if flipped is not None:
        outputs = flip_average(outputs, _as_float(flipped), flip_pairs, int(image_BCHW.shape[-1]))
    return outputs


@torch.no_grad()
def predict_batch(model: nn.Module, image_BCHW: torch.Tensor, decode_fn: Callable, autocast,
                  flip_pairs: Sequence[tuple[int, int]] | None = None) -> tuple[dict, dict]:
    """(float32 outputs, decoded predictions) of one batch. With flip_pairs not None (flip test; an empty tuple swaps
    no landmark) a second pass sees the horizontally mirrored images and models/flip_test.flip_average maps it back
    and averages it with the first before decoding, so decoding and the loss see the averaged outputs. An
    engine/ensemble.Ensemble runs each member so (its own flip test included) and averages the members' float
    outputs key by key before decoding: the mean over members of each member's flip-averaged outputs."""
    if isinstance(model, Ensemble):
        outputs = model.average([_float_outputs(m, image_BCHW, autocast, flip_pairs) for m in model.members])
    else:
        outputs = _float_outputs(model, image_BCHW, autocast, flip_pairs)
    return outputs, decode_fn(outputs)


def sample_prediction(outputs: dict[str, torch.Tensor], preds: dict[str, torch.Tensor], i: int,
                      to_input_3x3, orig_hw: tuple[int, int]) -> dict[str, Any]:
    """Sample i of a decoded batch in its original frame (engine/tasks/base.py): kpts_px_K2 through the inverse
    matrix, seg logits resampled onto the original grid then arg-maxed, scores and presence passed through. A decoder
    that keeps only the largest region of some classes (engine/tasks/postprocess.py) names them in
    preds["keep_largest_classes"]; the original-frame mask gets the same post-processing."""
    pred: dict[str, Any] = {"kpts_px_K2": to_original_points(preds["kpts_px_BK2"][i].detach().float().cpu().numpy(),
                                                             to_input_3x3)}
    for key in ("kpt_score_BK", "kpt_present_BK"):
        if preds.get(key) is not None:
            pred[key[:-3] + "_K"] = preds[key][i].detach().cpu().numpy()
    if outputs.get("seg_logits_BCHW") is not None:
        logits = to_original_logits(outputs["seg_logits_BCHW"][i], to_input_3x3, orig_hw)
        pred["mask_HW"] = logits.argmax(0).cpu().numpy().astype(np.int64)
        if preds.get("keep_largest_classes"):
            pred["mask_HW"] = keep_largest_region(pred["mask_HW"], preds["keep_largest_classes"])
    return pred


@torch.no_grad()
def evaluate_dataset(model: nn.Module, dataset: Dataset, strategy, decode_fn: Callable, accumulator,
                     criterion: nn.Module | None = None, batch_size: int = 4, num_workers: int = 0,
                     gather_records: bool = False, loader_kind: str = "torch", dali_threads: int = 0,
                     flip_test: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every sample exactly once across ranks; returns (figures, per-image records on rank 0 if asked).
    `accumulator` is the task's (engine/tasks/base.py): update_sample / state / load_state / compute / records.
    flip_test: average each batch with its mirrored pass (predict_batch), swapping the dataset's `flip_pairs`."""
    info = strategy.info
    was_training = model.training
    model.eval()
    if criterion is not None:
        criterion.eval()
    sampler = ShardedSampler(len(dataset), info.rank, info.world_size, shuffle=False, drop_last=False,
                             batch_size=batch_size)
    device_id = info.device.index if info.device.type == "cuda" else None
    loader = make_batches(dataset, batch_size, sampler, loader_kind, num_workers, device_id=device_id,
                          num_threads=dali_threads or None)
    acc = accumulator
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of per-sample loss, count)
    flip_pairs = tuple(getattr(dataset, "flip_pairs", ())) if flip_test else None
    for batch in loader:
        batch = batch.to(info.device)
        outputs, preds = predict_batch(model, batch.image_BCHW, decode_fn, strategy.autocast, flip_pairs)
        if criterion is not None:
            loss = float(criterion(outputs, batch.targets())["loss"])
            loss_sum += torch.tensor([loss * batch.size, batch.size], dtype=torch.float64)
        for i, meta in enumerate(batch.meta):
            orig = dataset.original(meta["index"])
            orig_hw = tuple(meta.get("orig_hw") or np.asarray(orig["image_HW3"]).shape[:2])
            acc.update_sample(sample_prediction(outputs, preds, i, meta["to_input_3x3"], orig_hw), orig, meta)
    state = {k: strategy.all_reduce_sum(v) for k, v in acc.state().items()}
    acc.load_state(state)
    figures = acc.compute()
    if criterion is not None:
        total = strategy.all_reduce_sum(loss_sum)
        figures["loss"] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    records: list[dict[str, Any]] = []
    if gather_records:
        for part in strategy.all_gather_object(acc.records):
            records.extend(part)
    if was_training:
        model.train()
        if criterion is not None:
            criterion.train()
    return figures, records
