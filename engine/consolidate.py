"""Consolidate a DeepSpeed checkpoint into the engine's plain checkpoint file (fp32 `model` state_dict + client).

The deepspeed strategy writes `ckpt_stepN.pt` / `best.pt` with a pointer to the per-rank shard folder
(`<ckpt dir>/deepspeed/<tag>/`) and, by default, the consolidated weights already. For checkpoints saved with
dist.deepspeed.consolidate_on_save=false (or to get a self-contained copy without the shards), `consolidate` merges
the shards with DeepSpeed's zero_to_fp32 utility on one process, no process group needed:

    python -m engine.consolidate runs/x/checkpoints/best.pt [best_fp32.pt]

The result carries `model` and `client` like a single/DDP checkpoint, so `medpose eval`, `predict`, export and
`--resume-weights-only` load it; it no longer points to the shards (it cannot resume the optimizer).

`checkpoint_weights` is what every reader of weights uses (the final report, eval, predict, --resume-weights-only):
the file's `model`, or — for a file saved without it — the same merge done on the fly from the shard folder it
points to. DeepSpeed reads shard files with the full unpickler (weights_only=False); every file of the folder is
first read here with the weights-only unpickler and DeepSpeed's few inert classes allowed (`check_shard_folder`), so
a shard folder that holds anything else is refused before DeepSpeed opens it (MEDPOSE_TRUST_CHECKPOINTS=1 skips the
check).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint_file, safe_torch_load,
                         trust_checkpoints)


def deepspeed_safe_classes() -> tuple[type, ...]:
    """The classes DeepSpeed's own shard files hold besides tensors and containers (ZeRO stage enum, loss scaler,
    fragment addresses): plain records, allowed for the weights-only unpickler. Those this DeepSpeed has."""
    import importlib
    found = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.offload_config", "OffloadDeviceEnum")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def check_shard_folder(folder: str | Path) -> None:
    """Read every torch file in a DeepSpeed shard folder with the weights-only unpickler (memory-mapped, so the
    tensors are not read) before DeepSpeed loads them with its full unpickler; a CheckpointError names the first file
    that holds anything else. Skipped with MEDPOSE_TRUST_CHECKPOINTS=1."""
    if trust_checkpoints():
        return
    folder = Path(folder)
    allow = deepspeed_safe_classes()
    for file in sorted(folder.glob("*.pt")):
        safe_torch_load(file, f"DeepSpeed shard (in {folder})", allow=allow, mmap=True)


def _shard_folder(checkpoint: Path, ds: dict[str, Any]) -> Path:
    return checkpoint.parent / str(ds.get("dir", "deepspeed")) / str(ds.get("tag", ""))


def merge_shards(checkpoint: str | Path, ckpt: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a deepspeed checkpoint file, merged over all ranks' shards (one process). Errors name the
    file and say what to do."""
    from .strategy_deepspeed import consolidated_state_dict
    checkpoint = Path(checkpoint)
    ckpt = ckpt if ckpt is not None else load_checkpoint_file(checkpoint)
    ds = ckpt.get("deepspeed")
    if not isinstance(ds, dict):
        raise CheckpointError(f"{checkpoint}: not written by the deepspeed strategy (no shard pointer); its weights "
                              f"are already plain")
    folder = _shard_folder(checkpoint, ds)
    if not folder.is_dir():
        raise CheckpointError(
            f"{checkpoint}: saved with dist.deepspeed.consolidate_on_save=false, it holds no model weights, and its "
            f"DeepSpeed shard folder {folder} is missing. Consolidate it where the shards are (`python -m "
            f"engine.consolidate <run>/checkpoints/{checkpoint.name}` writes {checkpoint.stem}_fp32.pt beside it) "
            f"and use that file, or keep consolidate_on_save=true")
    check_shard_folder(folder)
    try:
        model = consolidated_state_dict(folder.parent, folder.name, int(ds["zero_stage"]))
    except ImportError as e:
        raise CheckpointError(f"{checkpoint}: its weights are in DeepSpeed shards ({folder}) and merging them needs "
                              f"DeepSpeed ({e}); consolidate it with `python -m engine.consolidate` where DeepSpeed "
                              f"is installed") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in model.items()}


def checkpoint_weights(checkpoint: str | Path, ckpt: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The model state_dict of any checkpoint file: its `model`, or merged from its DeepSpeed shards when it was
    saved with dist.deepspeed.consolidate_on_save=false (`ckpt`: the file's content when already read)."""
    checkpoint = Path(checkpoint)
    ckpt = ckpt if ckpt is not None else load_checkpoint_file(checkpoint)
    model = ckpt.get("model")
    if isinstance(model, dict):
        return model
    if isinstance(ckpt.get("deepspeed"), dict):
        return merge_shards(checkpoint, ckpt)
    raise CheckpointError(f"{checkpoint}: holds no model weights (no 'model' state_dict)")


def consolidate(checkpoint: str | Path, out_file: str | Path | None = None) -> Path:
    """Write `checkpoint`'s fp32 weights, merged over all ranks, with its client state to `out_file` (default:
    `<name>_fp32.pt` beside it), atomically. Returns the written path."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint_file(checkpoint)
    if not isinstance(ckpt.get("deepspeed"), dict):
        raise ValueError(f"{checkpoint}: not written by the deepspeed strategy (no shard pointer); "
                         f"its weights are already plain")
    model = merge_shards(checkpoint, ckpt)
    out = Path(out_file) if out_file is not None else checkpoint.with_name(f"{checkpoint.stem}_fp32.pt")
    atomic_torch_save({"model": model, "client": ckpt.get("client", {}), "consolidated_from": str(checkpoint)}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2) or args[0] in ("-h", "--help"):
        print("usage: python -m engine.consolidate CHECKPOINT [OUT]\n  merge a deepspeed checkpoint's shards into "
              "one plain fp32 checkpoint (default OUT: <name>_fp32.pt beside it)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        out = consolidate(*args)
    except (ValueError, FileNotFoundError) as e:
        print(f"engine.consolidate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
