"""Consolidate a DeepSpeed checkpoint into the engine's plain checkpoint file (fp32 `model` state_dict + client).

The deepspeed strategy writes `ckpt_stepN.pt` / `best.pt` with a pointer to the per-rank shard folder
(`<ckpt dir>/deepspeed/<tag>/`) and, by default, the consolidated weights already. For checkpoints saved with
dist.deepspeed.consolidate_on_save=false (or to get a self-contained copy without the shards), `consolidate` merges
the shards with DeepSpeed's zero_to_fp32 utility on one process, no process group needed:

    python -c "from engine.consolidate import consolidate; consolidate('runs/x/checkpoints/best.pt', 'best_fp32.pt')"

The result carries `model` and `client` like a single/DDP checkpoint, so `medpose eval`, `predict`, export and
`--weights-only` load it; it no longer points to the shards (it cannot resume the optimizer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import atomic_torch_save, load_checkpoint_file


def consolidate(checkpoint: str | Path, out_file: str | Path | None = None) -> Path:
    """Write `checkpoint`'s fp32 weights, merged over all ranks, with its client state to `out_file` (default:
    `<name>_fp32.pt` beside it), atomically. Returns the written path."""
    from .strategy_deepspeed import consolidated_state_dict
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint_file(checkpoint)
    ds: dict[str, Any] | None = ckpt.get("deepspeed")
    if not isinstance(ds, dict):
        raise ValueError(f"{checkpoint}: not written by the deepspeed strategy (no shard pointer); "
                         f"its weights are already plain")
    shards = checkpoint.parent / ds["dir"]
    if not (shards / ds["tag"]).is_dir():
        raise FileNotFoundError(f"{checkpoint}: its DeepSpeed shard folder {shards / ds['tag']} is missing")
    model = consolidated_state_dict(shards, ds["tag"], int(ds["zero_stage"]))
    out = Path(out_file) if out_file is not None else checkpoint.with_name(f"{checkpoint.stem}_fp32.pt")
    atomic_torch_save({"model": {k: v.float() if v.is_floating_point() else v for k, v in model.items()},
                       "client": ckpt.get("client", {}), "consolidated_from": str(checkpoint)}, out)
    return out
