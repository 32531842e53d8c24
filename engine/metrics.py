"""Generic evaluation pieces that reduce correctly across ranks: every accumulator holds only sums and counts.

An accumulator's `state()` is a dict of float64 tensors that ranks combine with all-reduce SUM; `compute()` turns
the (summed) state into the final figures. A per-rank mean followed by a mean over ranks is wrong whenever ranks see
different numbers of images, landmarks or pixels, so no mean is ever taken before the reduction. `SummedState` is
the base class of every task's accumulator (engine/tasks/*/metrics.py); a part of one accumulator may be another
(e.g. the landmark figures, engine/tasks/landmarks/metrics.py), whose sums then travel under "part.key".

Conventions shared by the tasks (the hip-ultrasound evaluation of docs/systems/hip_us_multihipposenet.md, generalised):
- Segmentation: confusion matrix with rows = truth, columns = prediction. IoU_c = TP/(TP+FP+FN) from the summed
  matrix (NaN for a class absent from truth and prediction over the whole split; means skip NaN). HD95 = 95th
  percentile of the symmetric surface distances (boundary pixels = mask minus its 4-connected erosion), only where
  the class is present in both.
- Rates given in % carry it in the key (sdr_2mm, landmark_outlier_pct, alpha_within_5deg); IoU, Dice, PCK and
  accuracies are fractions in [0, 1]. Radii and tolerances appear in keys formatted with `%g` (`radius_tag`).
- Pearson r is taken from moment sums (`pearson_r_from_sums`), which add across ranks.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

_WHERE = "engine/metrics.py"
_CROSS_3x3 = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------------------------- segmentation pieces
def confusion_matrix(pred_BHW: np.ndarray, true_BHW: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image confusion matrices (B, C, C), rows = truth, columns = prediction, int64 pixel counts."""
    pred = np.asarray(pred_BHW).astype(np.int64, copy=False)
    true = np.asarray(true_BHW).astype(np.int64, copy=False)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"{_WHERE}: masks must both be (B, H, W); got pred {pred.shape}, true {true.shape}")
    for name, m in (("pred", pred), ("true", true)):
        if m.size and (m.min() < 0 or m.max() >= num_classes):
            raise ValueError(f"{_WHERE}: {name} mask holds class ids in [{m.min()}, {m.max()}], outside "
                             f"[0, {num_classes - 1}] for num_classes={num_classes}")
    c2 = num_classes * num_classes
    idx = true * num_classes + pred + (np.arange(pred.shape[0]) * c2)[:, None, None]
    counts = np.bincount(idx.ravel(), minlength=pred.shape[0] * c2)
    return counts.reshape(pred.shape[0], num_classes, num_classes)


def iou_from_confusion(cm_CC: np.ndarray) -> np.ndarray:
    """IoU per class = TP / (TP + FP + FN); NaN where the class is in neither truth nor prediction."""
    cm = np.asarray(cm_CC, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)


def _boundary(mask_HW: np.ndarray) -> np.ndarray:
    # Outside the image counts as background (border_value=0), so an object cut by the frame has an edge there.
    return mask_HW & ~ndimage.binary_erosion(mask_HW, structure=_CROSS_3x3, border_value=0)


def hd95(pred_HW: np.ndarray, true_HW: np.ndarray, sampling_yx: Sequence[float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks, in the units of `sampling_yx`
    (row, column spacing). NaN when either mask is empty. The EDT runs on the union bounding box plus a 1-pixel
    margin: every boundary pixel of both masks lies inside it, so nearest-boundary distances are unchanged."""
    pred = np.asarray(pred_HW, dtype=bool)
    true = np.asarray(true_HW, dtype=bool)
    if not pred.any() or not true.any():
        return float("nan")
    rows, cols = np.nonzero(pred | true)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, pred.shape[0])
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, pred.shape[1])
    edge_p = _boundary(pred[r0:r1, c0:c1])
    edge_t = _boundary(true[r0:r1, c0:c1])
    to_true = ndimage.distance_transform_edt(~edge_t, sampling=sampling_yx)
    to_pred = ndimage.distance_transform_edt(~edge_p, sampling=sampling_yx)
    dists = np.concatenate([to_true[edge_p], to_pred[edge_t]])
    return float(np.percentile(dists, 95))


def pearson_r_from_sums(n: float, sx: float, sy: float, sxy: float, sxx: float, syy: float) -> float:
    """Pearson r = (n Sxy - Sx Sy) / sqrt((n Sxx - Sx^2)(n Syy - Sy^2)); NaN when n < 2 or a variance is 0."""
    if n < 2:
        return float("nan")
    var_x = max(n * sxx - sx * sx, 0.0)  # clamp tiny negative rounding
    var_y = max(n * syy - sy * sy, 0.0)
    if var_x == 0.0 or var_y == 0.0:
        return float("nan")
    return float(np.clip((n * sxy - sx * sy) / math.sqrt(var_x * var_y), -1.0, 1.0))


def ratio(num: float, den: float, scale: float = 1.0) -> float:
    """scale * num / den, NaN when den <= 0 (nothing to average)."""
    return float(scale * num / den) if den > 0 else float("nan")


def radius_tag(value: float) -> str:
    """A radius or tolerance as it appears in a figure key: `%g` (0.5 -> "0.5", 2.0 -> "2")."""
    return f"{value:g}"


def to_numpy(x: Any, name: str, dtype=None) -> np.ndarray | None:
    """A tensor (any device) or array-like as a numpy array; None stays None; errors name the argument."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_WHERE}: {name} is not array-like ({err})") from None


# ----------------------------------------------------------------------------------------------------- accumulator
class SummedState:
    """Sums and counts that ranks combine with all-reduce SUM: subclasses fill `self._state` (name -> float64
    tensor) in __init__ and set `where` (the file named in errors). A subclass may hold other SummedStates in
    `self._parts` (name -> part): their sums are part of `state()` under "name.key" and `load_state` hands them back,
    so one all-reduce covers the whole accumulator."""

    where = _WHERE
    _state: dict[str, torch.Tensor]
    _parts: Mapping[str, "SummedState"] = MappingProxyType({})   # subclasses assign their own dict

    def state(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Copies of every sum/count (float64), to be all-reduced with SUM; `device` for NCCL (GPU tensors)."""
        out = {k: v.clone() if device is None else v.to(device, copy=True) for k, v in self._state.items()}
        for name, part in self._parts.items():
            out.update({f"{name}.{k}": v for k, v in part.state(device).items()})
        return out

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        for name, part in self._parts.items():
            shapes.update({f"{name}.{k}": s for k, s in part._shapes().items()})
        return shapes

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums with reduced ones; keys and shapes must match this accumulator's configuration."""
        shapes = self._shapes()
        if set(state) != set(shapes):
            raise ValueError(f"{self.where}: load_state keys differ: missing "
                             f"{sorted(set(shapes) - set(state))}, unexpected {sorted(set(state) - set(shapes))}")
        for k, v in state.items():
            if tuple(v.shape) != shapes[k]:
                raise ValueError(f"{self.where}: load_state: {k} has shape {tuple(v.shape)}, expected "
                                 f"{shapes[k]} (accumulators configured differently?)")
        for k in self._state:
            self._state[k] = torch.as_tensor(state[k]).detach().to("cpu", torch.float64).clone()
        for name, part in self._parts.items():
            prefix = f"{name}."
            part.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def _add(self, key: str, value: Any) -> None:
        self._state[key] += torch.as_tensor(np.asarray(value, dtype=np.float64))
