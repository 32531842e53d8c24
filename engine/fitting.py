"""Models shaped by the data, and the checks that task, model and data fit - before any data is made or any step run.

The data's DataInfo (data_pipelines.describe_data: landmark names, mask classes, image channels; read from the
annotations' headers, or from what a generator would write) fills the model's `num_keypoints`, `in_channels`,
`num_classes` and `input_hw` arguments - and the loss's `num_classes` - wherever the builder takes them and the run
config leaves them out or says "auto"; a builder's `heatmap_peak` follows data.heatmap_peak unless set. A value the config fixes must agree with the data; every disagreement is a
ConfigError naming the config field, the data's value and what to do. The filled-in values go into the resolved
config (config.yaml and every checkpoint), so `eval` and `predict` rebuild the same network from the checkpoint alone.

Task requirements are the task's (engine/tasks: `needs_masks`, `needs_landmarks`, `num_keypoints` = the exact K a
clinical measure needs, None for any; `landmarks_from_mask`: a segmentation-only model will do, the task derives its
landmarks from the mask); the loss's are its `requires_masks` attribute.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from data_pipelines.records import DataInfo

from .config import Config, ConfigError

# builder argument -> (what it counts, the DataInfo value)
_DATA_ARGS: dict[str, tuple[str, Callable[[DataInfo], int]]] = {
    "num_keypoints": ("landmarks", lambda info: info.num_keypoints),
    "in_channels": ("image channels", lambda info: info.channels),
    "num_classes": ("mask classes (background included)", lambda info: info.num_classes),
}


def _params(fn: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def _where(cfg: Config) -> str:
    return f"data.format={cfg.data.format} in {cfg.data.root}"


def _describe(info: DataInfo, key: str) -> str:
    if key == "num_keypoints":
        names = ", ".join(info.kpt_names[:8]) + (", ..." if info.num_keypoints > 8 else "")
        return f"{info.num_keypoints} landmarks ({names})"
    if key == "num_classes":
        return (f"{info.num_classes} mask classes ({', '.join(info.class_names)})" if info.class_names
                else "no masks")
    return f"{info.channels}-channel images" + (" (grey)" if info.channels == 1 else "")


def _fill(args: dict[str, Any], params: dict, section: str, cfg: Config, info: DataInfo) -> dict[str, Any]:
    """args with the data's values for the builder's data-shaped parameters (module docstring)."""
    out = dict(args)
    for key, (what, value_of) in _DATA_ARGS.items():
        if key not in params:
            continue
        value = value_of(info)
        given = out.get(key, "auto")
        if key == "num_classes" and value == 0:          # data without masks: the model keeps its own default
            if given == "auto":
                out.pop(key, None)
            continue
        if given == "auto":
            out[key] = value
        elif not isinstance(given, int) or isinstance(given, bool) or given != value:
            raise ConfigError(f"{section}.{key}: {given!r}, but the data ({_where(cfg)}) has {_describe(info, key)}; "
                              f"leave {section}.{key} out (or auto) and it follows the data")
    if "heatmap_peak" in params and "heatmap_peak" not in out:     # the model's heatmaps peak where the targets do
        out["heatmap_peak"] = float(cfg.data.heatmap_peak)
    if "input_hw" in params:
        given = out.get("input_hw", "auto")
        data_hw = [int(n) for n in cfg.data.input_hw]
        if given == "auto":
            out["input_hw"] = data_hw
        elif [int(n) for n in given] != data_hw:
            raise ConfigError(f"{section}.input_hw: {list(given)}, but data.input_hw is {data_hw}: the network "
                              f"predicts in the input frame, so they must agree; leave {section}.input_hw out")
    return out


def shape_model_by_data(cfg: Config, info: DataInfo) -> Config:
    """cfg with model.args and model.criterion_args filled from the data (module docstring)."""
    from models import CRITERIA, MODELS
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name: unknown model '{cfg.model.name}' (choose from {sorted(MODELS)}; "
                          f"`medpose models` lists them)")
    args = _fill(cfg.model.args, _params(MODELS[cfg.model.name]), "model.args", cfg, info)
    crit_name = cfg.model.criterion or cfg.model.name
    if crit_name not in CRITERIA:
        raise ConfigError(f"model.criterion: no loss named '{crit_name}' (choose from {sorted(CRITERIA)})")
    crit_params = _params(CRITERIA[crit_name])
    crit_args = dict(cfg.model.criterion_args)
    if "num_classes" in crit_params:          # only num_classes: a loss's other arguments are the config's
        crit_args = _fill(crit_args, {"num_classes": crit_params["num_classes"]}, "model.criterion_args", cfg, info)
    model = dataclasses.replace(cfg.model, args=args, criterion_args=crit_args)
    return dataclasses.replace(cfg, model=model)


def check_fit(cfg: Config, task, info: DataInfo) -> None:
    """Task, model and data agree (module docstring); a ConfigError names the fields otherwise."""
    from models import CRITERIA, MODELS
    where = _where(cfg)
    if getattr(task, "needs_masks", False) and not info.class_names:
        raise ConfigError(f"data.task={task.name} needs masks, but {where} gives none"
                          + (" (reader_args.masks: true reads COCO segmentations)" if cfg.data.format == "coco"
                             else "") + "; use data.task=landmarks for landmarks alone")
    want_k = getattr(task, "num_keypoints", None)
    if want_k is not None and info.num_keypoints != want_k:
        raise ConfigError(f"data.task={task.name} needs exactly {want_k} landmarks (its clinical measures are built "
                          f"on them), but {where} has {_describe(info, 'num_keypoints')}; use data.task=landmarks")
    builder = _params(MODELS[cfg.model.name])
    if (getattr(task, "needs_landmarks", True) and "num_keypoints" not in builder
            and not getattr(task, "landmarks_from_mask", False)):
        raise ConfigError(f"model.name={cfg.model.name} predicts no landmarks, but data.task={task.name} scores "
                          f"landmarks; choose a landmark model or data.task=segmentation")
    crit = CRITERIA[cfg.model.criterion or cfg.model.name]
    if getattr(crit, "requires_masks", False) and not info.class_names:
        raise ConfigError(f"model.name={cfg.model.name} trains a segmentation head (loss "
                          f"{cfg.model.criterion or cfg.model.name}), but {where} gives no masks; choose a "
                          f"landmark-only model (e.g. landmark_unet, landmark_hrnet, hourglass, efficientnet_heatmap)")
