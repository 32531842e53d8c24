"""Flip-test averaging (test-time augmentation): average a model's outputs on an image and on its horizontal mirror.

The network sees the image twice, as is and flipped left/right (x -> W - 1 - x, pixel centres at integers, W the
input width); the second pass is mapped back into the frame of the first and the two are averaged. This cancels the
part of the error that is not mirror-symmetric (a left/right bias of the network, a half-pixel skew of its
upsampling) and halves the variance of what is independent between the two passes; heatmap pose estimators
(Newell et al. 2016, Xiao et al. 2018, Sun et al. 2019) report it as a consistent small gain.

Rules, per output key (the contract of models/*: maps at the input resolution, points in input pixels):
  "heatmap_BKHW"     flipped back by reversing the W axis (at input resolution x -> W - 1 - x is exactly an index
                     flip, no resampling), channels swapped by `flip_pairs`, then the mean of the two maps; the
                     decoder (DARK / soft-argmax / argmax) then runs on the averaged map.
  "heatmaps_SBKHW"   the per-stack maps of the hourglass: the same rule on each stack.
  "kpts_px_BK2"      regressed points mirrored, x' = W - 1 - x (y unchanged), landmarks swapped by `flip_pairs`,
                     then the mean of the two point sets.
  "seg_logits_BCHW"  flipped back along W and averaged (class channels have no left/right meaning here, so no
                     swap: a dataset with lateralised classes would need its own pairs).
  any other key      passes through from the plain (unflipped) outputs: its geometry is not known here.
`flip_pairs`: (i, j) landmark index pairs that trade places under a left/right mirror (left eye <-> right eye);
an empty tuple swaps nothing (every landmark is its own mirror image, e.g. midline points).
"""
from __future__ import annotations

from typing import Sequence

import torch

WHERE = "models/flip_test.py"


def flip_permutation(num_keypoints: int, flip_pairs: Sequence[Sequence[int]]) -> list[int]:
    """perm[k] = the landmark whose mirror image landmark k is: k itself, or its partner in `flip_pairs`.
    Each index may appear in one pair at most, and all must lie in [0, num_keypoints)."""
    perm = list(range(num_keypoints))
    seen: set[int] = set()
    for pair in flip_pairs:
        if len(pair) != 2:
            raise ValueError(f"{WHERE}: flip_pairs entries must be (i, j) pairs, got {tuple(pair)!r}")
        i, j = int(pair[0]), int(pair[1])
        if not (0 <= i < num_keypoints and 0 <= j < num_keypoints) or i == j or {i, j} & seen:
            raise ValueError(f"{WHERE}: flip_pairs {tuple(map(tuple, flip_pairs))} must pair distinct indices in "
                             f"[0, {num_keypoints}), each at most once (bad pair {(i, j)})")
        seen |= {i, j}
        perm[i], perm[j] = j, i
    return perm


def _unflip_maps(maps: torch.Tensor, perm: list[int] | None, channel_dim: int) -> torch.Tensor:
    """A map of the flipped input back in the plain frame: W reversed, channels reordered by perm."""
    back = maps.flip(-1)
    if perm is not None:
        back = back.index_select(channel_dim, torch.tensor(perm, device=maps.device))
    return back


def _unflip_points(kpts_BK2: torch.Tensor, perm: list[int], input_w: int) -> torch.Tensor:
    """Points of the flipped input back in the plain frame: x' = W - 1 - x, landmarks reordered by perm."""
    mirrored = torch.stack([(input_w - 1) - kpts_BK2[..., 0], kpts_BK2[..., 1]], dim=-1)
    return mirrored.index_select(1, torch.tensor(perm, device=kpts_BK2.device))


def _num_keypoints(outputs: dict) -> int | None:
    for key, dim in (("heatmap_BKHW", 1), ("kpts_px_BK2", 1), ("heatmaps_SBKHW", 2)):
        if torch.is_tensor(outputs.get(key)):
            return int(outputs[key].shape[dim])
    return None


def flip_average(outputs: dict, outputs_of_flipped: dict, flip_pairs: Sequence[Sequence[int]],
                 input_w: int) -> dict:
    """The plain outputs with every key of the module docstring's rules replaced by the mean of the plain value and
    the flipped pass's value mapped back; `input_w` is the network input width W. Other keys pass through."""
    k = _num_keypoints(outputs)
    perm = flip_permutation(k, flip_pairs) if k is not None else None
    averaged = dict(outputs)
    for key, value in outputs.items():
        other = outputs_of_flipped.get(key)
        if key not in ("heatmap_BKHW", "heatmaps_SBKHW", "kpts_px_BK2", "seg_logits_BCHW") or value is None:
            continue
        if not torch.is_tensor(other) or other.shape != value.shape:
            raise ValueError(f"{WHERE}: '{key}' of the flipped pass is "
                             f"{None if not torch.is_tensor(other) else tuple(other.shape)}, the plain pass "
                             f"{tuple(value.shape)}")
        if key == "kpts_px_BK2":
            back = _unflip_points(other, perm, input_w)
        elif key == "seg_logits_BCHW":
            back = _unflip_maps(other, None, 1)
        else:
            back = _unflip_maps(other, perm, 1 if key == "heatmap_BKHW" else 2)
        averaged[key] = 0.5 * (value + back)
    return averaged
