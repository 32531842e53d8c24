"""Checkpoint files: atomic writes, the `latest` pointer, RNG states and versions.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over its final name
(rename is atomic on POSIX), then `latest` is re-pointed the same way. A kill at any moment therefore leaves either the
previous complete checkpoint or the new one, never a truncated file behind `latest`; older checkpoints are removed only
after the new one is complete.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt_step(\d+)\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                  before_publish: Callable[[], None] | None = None) -> None:
    """Write through `write(file)` into a temp file beside `path`, fsync, rename over `path`, fsync the directory.
    `before_publish` (the fault-injection tests' hook) runs between the complete temp file and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_publish is not None:
            before_publish()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path, before_publish: Callable[[], None] | None = None) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f), before_publish)


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt_step{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def update_latest(ckpt_dir: str | Path, ckpt: Path) -> None:
    atomic_write_bytes(ckpt.name.encode() + b"\n", Path(ckpt_dir) / "latest")


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing/stale."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if target.is_file():
            return target
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> None:
    """Rank 0, after publishing a checkpoint: delete all but the newest `keep_last` (at least 1: the newest is never
    deleted), and the temp files of checkpoint writes that a killed process left behind (only rank 0 writes, and its
    own write is complete, so any such file is stale)."""
    found = list_checkpoints(ckpt_dir)
    for _, p in found[:-max(1, keep_last)]:
        p.unlink(missing_ok=True)
    for p in Path(ckpt_dir).glob(".ckpt_step*.pt.*.tmp"):
        p.unlink(missing_ok=True)


def resolve_resume(arg: str, run_dir: str | Path | None) -> Path | None:
    """`--resume auto` → latest in the run's checkpoints (None if there is none yet); a directory → its latest;
    a file → itself."""
    if arg == "auto":
        return find_latest(Path(run_dir) / "checkpoints") if run_dir is not None else None
    p = Path(arg)
    if p.is_dir():
        found = find_latest(p / "checkpoints") or find_latest(p)
        if found is None:
            raise FileNotFoundError(f"--resume {arg}: no checkpoint in this directory")
        return found
    if not p.is_file():
        raise FileNotFoundError(f"--resume {arg}: checkpoint file not found")
    return p


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / foreign file: say which file
        raise RuntimeError(f"{path}: not a readable MedPose checkpoint ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------ RNG and versions

def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "cuda": str(torch.version.cuda)}
    for dist_name in ("torchvision", "torch-geometric", "numba", "triton", "timm", "deepspeed",
                      "nvidia-dali-cuda130"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    return out
