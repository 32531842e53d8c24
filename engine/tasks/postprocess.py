"""Keeping only the largest predicted region of a class: nnU-Net's connected-component post-processing.

A class that is one connected region in every truth mask (a fetal head, a liver, a bladder) can still come out of the
arg-max as the region plus a few stray islands elsewhere in the image. One island far from the object costs little
Dice but dominates HD95 and any measurement taken from the mask. `eval.task_args.largest_component` lists the classes
for which only the largest 8-connected region of the predicted mask is kept; the other regions of that class become
background. It acts on the decoded mask in the network's input frame, so evaluation, the validation that picks the
best checkpoint, `medpose predict` and the overlays all see the same mask.

    largest_component: false (default) | true ("all": every foreground class) | a class name or index | a list of them

`medpose plan` sets it from the dataset's fingerprint (data_pipelines/fingerprint.py): the classes that are one region
in at least LCC_MIN_SHARE (98 %) of the dataset's masks that hold them (launch/plan.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

_KEY = "eval.task_args.largest_component"
_EIGHT = np.ones((3, 3), dtype=bool)


def parse_largest_component(value: Any) -> str | tuple[str | int, ...] | None:
    """The option as given -> None (off), "all", or a tuple of class names / indices; ConfigError otherwise."""
    from engine.config import ConfigError
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "none", "false", "off")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("all", "true", "on")):
        return "all"
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[str | int] = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigError(f"{_KEY}: expected true/false, 'all', a class name or index, or a list of them; got "
                              f"{value!r}")
        out.append(v)
    return tuple(out) or None


def resolve_classes(spec: str | tuple[str | int, ...] | None, class_names: Sequence[str],
                    num_classes: int) -> list[int]:
    """The class indices the option names (never the background, index 0); ConfigError naming an unknown class."""
    from engine.config import ConfigError
    if spec is None:
        return []
    if spec == "all":
        return list(range(1, int(num_classes)))
    names = list(class_names)
    ids: list[int] = []
    for v in spec:
        if isinstance(v, str) and not v.lstrip("-").isdigit():
            if v not in names:
                raise ConfigError(f"{_KEY}: no class named {v!r} (classes: {', '.join(names) or 'unknown'})")
            c = names.index(v)
        else:
            c = int(v)
        if not 1 <= c < int(num_classes):
            raise ConfigError(f"{_KEY}: class {v!r} is not a foreground class (1 to {int(num_classes) - 1}; 0 is the "
                              f"background)")
        ids.append(c)
    return sorted(set(ids))


def largest_region(fg_HW: np.ndarray) -> np.ndarray:
    """bool mask of the largest 8-connected region of a bool mask (ties: the region met first in raster order;
    empty when the mask is)."""
    fg = np.asarray(fg_HW, dtype=bool)
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n <= 1:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def keep_largest_region(mask_HW: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """A copy of an integer mask where each listed class keeps only its largest 8-connected region; the other
    regions of that class become 0."""
    out = np.array(mask_HW, copy=True)
    for c in class_ids:
        sel = out == c
        out[sel & ~largest_region(sel)] = 0
    return out


def keep_largest_regions(mask_BHW: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """keep_largest_region over a batch of masks (same dtype and device)."""
    if not class_ids:
        return mask_BHW
    m = mask_BHW.detach().cpu().numpy()
    return torch.as_tensor(np.stack([keep_largest_region(x, class_ids) for x in m]), dtype=mask_BHW.dtype,
                           device=mask_BHW.device)


def with_largest_regions(out: dict[str, Any], class_ids: list[int]) -> dict[str, Any]:
    """A decoder's output with the listed classes' largest regions kept in its input-frame "mask_BHW" and the
    classes named in "keep_largest_classes", for the original-frame mask (engine/evaluate.sample_prediction)."""
    mask = out.get("mask_BHW")
    return {**out, **({"mask_BHW": keep_largest_regions(mask, class_ids)} if mask is not None else {}),
            "keep_largest_classes": class_ids}


class ClassNamesState:
    """Mixin for mask tasks: the class names are learnt from the training split and travel in every checkpoint (task
    state), so `medpose predict` names its columns and resolves `largest_component` without the data; an unknown
    class in the option stops before training."""
    class_names: list[str]
    largest_component: str | tuple[str | int, ...] | None

    def fit(self, train_dataset) -> None:
        names = getattr(train_dataset, "class_names", None)
        if names:
            self.class_names = list(names)
        if self.class_names:
            resolve_classes(self.largest_component, self.class_names, len(self.class_names))

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_names = list(state.get("class_names") or self.class_names)
