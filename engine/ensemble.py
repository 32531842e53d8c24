"""Ensembles of checkpoints (the k-fold models of `medpose train --folds`, nnU-Net style): one prediction from several
networks.

Every member sees the same preprocessed batch. Its float outputs - after its own flip-test averaging when
eval.flip_test is set (engine/evaluate.predict_batch) - are averaged key by key, and the averaged output dict goes
through the task's decoding and the mapping back to the original frame exactly as one model's outputs do. So flip
test and ensembling compose: the ensemble's outputs are the mean over members of each member's flip-averaged outputs.

What is averaged is the raw network output - seg logits, heatmaps, regressed points, any other key - not softmax
probabilities: the decoders consume raw outputs (arg-max of the logits, DARK / soft-argmax on the heatmaps), so the
mean of the raw maps is decoded exactly like one model's map. For segmentation the mean of the logits is the
normalised geometric mean of the members' class probabilities; nnU-Net averages the probabilities themselves (the
arithmetic mean), which differs only where members disagree strongly. For heatmaps and points the mean of the raw
outputs is the usual model averaging.

Members must agree on everything that makes their outputs comparable: data.task, data.input_hw, the number of
landmarks and mask classes, the input channels and the rest of the preprocessing (each sees the same input), and
the output keys and shapes (checked on a probe batch when loading, and on every averaged batch). They may be
different architectures. A mismatch is a ConfigError naming both checkpoint files and the field.

Checkpoint arguments (`medpose eval / predict --checkpoint`, repeatable): a file is itself; a folder holding
fold_<k>/ run directories (a `train --folds` base) stands for every fold's checkpoint, in fold order; a run directory
for its checkpoint. A run's checkpoint is checkpoints/best.pt, else its latest checkpoint (`run_checkpoint`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import ConfigError

FOLD_DIR = re.compile(r"^fold_(\d+)$")


# --------------------------------------------------------------------------------------------- which checkpoints
def run_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint that stands for a run: checkpoints/best.pt, else the latest checkpoint (None: none yet)."""
    from .checkpoint import find_latest
    ckpts = Path(run_dir) / "checkpoints"
    best = ckpts / "best.pt"
    return best if best.is_file() else find_latest(ckpts)


def fold_dirs(base: str | Path) -> list[tuple[int, Path]]:
    """(k, base/fold_<k>) for every fold run directory under `base`, in fold order."""
    base = Path(base)
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := FOLD_DIR.match(p.name))]
    return sorted(found)


def resolve_checkpoints(specs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The checkpoint files of `--checkpoint` arguments (module docstring): a folder of fold_<k> runs gives each
    fold's checkpoint, a run directory its own; anything else is taken as a file (loading it says if it is not)."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if not specs:
        raise ConfigError("no checkpoint given (--checkpoint FILE, repeatable, or a folder of fold_<k> runs)")
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if not p.is_dir():
            out.append(p)
            continue
        folds = fold_dirs(p)
        if folds:
            for k, d in folds:
                ckpt = run_checkpoint(d)
                if ckpt is None:
                    raise FileNotFoundError(f"{d}: fold {k} of {p} has no checkpoint (checkpoints/best.pt or "
                                            f"ckpt_step*.pt); finish it (medpose train --folds ... --resume auto) "
                                            f"or name the other folds' checkpoints one by one")
                out.append(ckpt)
            continue
        ckpt = run_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"{p}: a folder with neither fold_<k>/ runs nor checkpoints/ (best.pt or "
                                    f"ckpt_step*.pt); name a checkpoint file, a run directory or a --folds base")
        out.append(ckpt)
    return out


# ------------------------------------------------------------------------------------------------------ averaging
def _shape(value: Any) -> Any:
    if torch.is_tensor(value):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return type(value).__name__


def _mean(values: list[Any]) -> Any:
    if torch.is_tensor(values[0]):
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total / len(values)
    return [_mean([v[i] for v in values]) for i in range(len(values[0]))]


def average_outputs(outputs: Sequence[dict], names: Sequence[str]) -> dict:
    """The key-by-key mean of the members' float output dicts (tensors, or lists of tensors such as per-stack maps).
    One member: its outputs unchanged. Keys or shapes that differ: a ConfigError naming both members."""
    if len(outputs) == 1:
        return dict(outputs[0])
    first = outputs[0]
    for name, out in zip(names[1:], outputs[1:]):
        if set(out) != set(first):
            raise ConfigError(f"ensemble members disagree on their output keys: {names[0]} gives "
                              f"{sorted(first)}, {name} gives {sorted(out)}")
        for key in first:
            if _shape(out[key]) != _shape(first[key]):
                raise ConfigError(f"ensemble members disagree on output '{key}': {names[0]} gives shape "
                                  f"{_shape(first[key])}, {name} gives {_shape(out[key])}")
    return {key: _mean([out[key] for out in outputs]) for key in first}


class Ensemble(nn.Module):
    """Several networks behind one model's call: forward(image) -> the mean of the members' raw float outputs
    (average_outputs). engine/evaluate.predict_batch runs each member with its own flip test before averaging, so
    evaluation, reports and predict treat an Ensemble like one model. `names`: the members' checkpoint files, for
    error messages and reports. (No attribute is called `module`: strategies' unwrap would take it for DDP's.)"""

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str | Path] | None = None):
        super().__init__()
        if not members:
            raise ValueError("Ensemble: needs at least one member")
        self.members = nn.ModuleList(members)
        self.names = [str(n) for n in (names or [f"member {i}" for i in range(len(members))])]
        if len(self.names) != len(self.members):
            raise ValueError(f"Ensemble: {len(self.members)} members but {len(self.names)} names")

    def average(self, outputs: Sequence[dict]) -> dict:
        return average_outputs(outputs, self.names)

    def forward(self, image_BCHW: torch.Tensor) -> dict:
        from .evaluate import _as_float
        return self.average([_as_float(m(image_BCHW)) for m in self.members])


# ------------------------------------------------------------------------------------------------------- loading
def _agreement_fields(cfg, state: dict[str, Any]) -> dict[str, Any]:
    """What members must share (module docstring), by the name an error message uses."""
    info, pre = state["info"], state["preprocess"]
    fields = {"data.task": cfg.data.task, "data.input_hw": tuple(int(n) for n in cfg.data.input_hw),
              "number of landmarks": info.num_keypoints, "number of mask classes": info.num_classes,
              "input channels": pre.channels}
    for key, value in pre.to_dict().items():
        if key not in ("input_hw", "channels", "decoder", "preresize"):   # how a file is read, not what is fed
            fields[f"preprocessing {key}"] = value
    return fields


def check_members(members: Sequence[tuple[str | Path, Any, dict[str, Any]]]) -> None:
    """members: (checkpoint file, resolved config, data state) each; every one must agree with the first on
    _agreement_fields, else a ConfigError naming both files and the field."""
    first_path, first_cfg, first_state = members[0]
    want = _agreement_fields(first_cfg, first_state)
    for path, cfg, state in members[1:]:
        got = _agreement_fields(cfg, state)
        for field, value in want.items():
            if got.get(field) != value:
                raise ConfigError(f"ensemble members disagree on {field}: {first_path} has {value}, {path} has "
                                  f"{got.get(field)}; every member needs the same task, input size, landmarks, "
                                  f"classes, preprocessing and outputs")


@torch.no_grad()
def probe_outputs(ensemble: Ensemble, channels: int, input_hw: Sequence[int], device: torch.device) -> None:
    """One zero batch through every member: output keys and shapes must agree (ConfigError otherwise)."""
    image = torch.zeros(1, int(channels), *(int(n) for n in input_hw), device=device)
    was = ensemble.training
    ensemble.eval()
    try:
        ensemble(image)
    finally:
        ensemble.train(was)


def load_ensemble(checkpoints: Sequence[str | Path], device: torch.device | None = None):
    """(Ensemble of the checkpoints' networks, the first one's resolved config, task and data state) - what
    engine/run.load_for_inference returns for one checkpoint - after checking the members agree."""
    from .run import load_for_inference
    device = device or torch.device("cpu")
    loaded = [(Path(p), *load_for_inference(p, device)) for p in checkpoints]
    check_members([(path, cfg, state) for path, _, cfg, _, state in loaded])
    _, _, cfg, task, state = loaded[0]
    ensemble = Ensemble([model for _, model, *_ in loaded], [path for path, *_ in loaded]).to(device).eval()
    probe_outputs(ensemble, state["preprocess"].channels, cfg.data.input_hw, device)
    return ensemble, cfg, task, state
