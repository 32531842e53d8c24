"""Checkpoint files: atomic writes, the `latest` pointer, RNG states and versions.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over its final name
(rename is atomic on POSIX), then `latest` is re-pointed the same way. A kill at any moment therefore leaves either the
previous complete checkpoint or the new one, never a truncated file behind `latest`; older checkpoints are removed only
after the new one is complete.

Loading never runs code from a file: every torch file a user names (a checkpoint for eval / predict / --resume, model
weights, DeepSpeed shard folders) is read by torch's weights-only unpickler (`safe_torch_load`), which accepts
tensors and plain containers only. What the engine saves is made of those alone (`plain_state`; the RNG states are
stored as tuples, lists and tensors). A file holding other Python objects (a checkpoint written by an older MedPose
kept numpy RNG arrays; a crafted file could hold anything) is refused with a CheckpointError naming the file and the
opt-out: MEDPOSE_TRUST_CHECKPOINTS=1 loads it with the full unpickler — only for files whose origin you trust.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import pickle
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

TRUST_ENV = "MEDPOSE_TRUST_CHECKPOINTS"
"""Set to 1 to load torch files with the full unpickler (can run code): only for files whose origin you trust."""

log = logging.getLogger("medpose")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: the message names the file and what to do."""


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


SHARDS_DIR = "deepspeed"   # <ckpt dir>/deepspeed/<checkpoint stem>-<nonce>/: a DeepSpeed checkpoint's shard folder


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> None:
    """Rank 0, after publishing a checkpoint: delete all but the newest `keep_last` (at least 1: the newest is never
    deleted) with their DeepSpeed shard folders, and the temp files of checkpoint writes that a killed process left
    behind (only rank 0 writes, and its own write is complete, so any such file is stale). The shard folders go here
    and not only at the start of the next save, which the last checkpoint of a run never has."""
    found = list_checkpoints(ckpt_dir)
    shards = Path(ckpt_dir) / SHARDS_DIR
    for _, p in found[:-max(1, keep_last)]:
        p.unlink(missing_ok=True)
        if shards.is_dir():
            for d in shards.glob(f"{p.stem}-*"):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
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


def trust_checkpoints() -> bool:
    """Whether MEDPOSE_TRUST_CHECKPOINTS asks for the full (code-running) unpickler."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _refusal_reason(err: Exception) -> str:
    """The weights-only unpickler's own reason (e.g. "Unsupported global: GLOBAL posix.system ...") without torch's
    advice to pass weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = next((line for line in lines if "GLOBAL" in line or "WeightsUnpickler error" in line), None)
    if found is None:
        return lines[0] if lines else type(err).__name__
    found = found.split("WeightsUnpickler error: ", 1)[-1]
    return found.split(". Please use", 1)[0].split(" was not an allowed global by default", 1)[0].rstrip(".")


def safe_torch_load(path: str | Path, what: str = "checkpoint", allow: tuple[type, ...] = (),
                    mmap: bool = False) -> Any:
    """torch.load(path) with the weights-only unpickler (tensors and plain containers; `allow`: a few more classes
    known to be inert, e.g. DeepSpeed's loss scaler). A file that needs more is refused with a CheckpointError
    naming it and the opt-out; a truncated or foreign file is a CheckpointError naming it. With
    MEDPOSE_TRUST_CHECKPOINTS=1 the full unpickler is used (a warning names the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    if trust_checkpoints():
        log.warning("%s: loaded with the full unpickler (%s=1): it can run code stored in the file", path, TRUST_ENV)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {_first_line(e)})") from None
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if mmap:
        kwargs["mmap"] = True
    try:
        with _allowing((*_ALWAYS_ALLOWED, *allow)):
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load this {what}: it holds Python objects other than tensors and plain containers "
            f"({_refusal_reason(e)}), and unpickling them could run code. If you trust where this file comes from "
            f"(e.g. it was written by an older MedPose), load it with the environment variable {TRUST_ENV}=1"
        ) from None
    except Exception as e:  # truncated / foreign file: say which file
        if mmap and "mmap" in str(e):  # an old (non-zip) torch file cannot be memory-mapped: read it whole
            return safe_torch_load(path, what, allow)
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {_first_line(e)}); "
                              f"truncated, or not a torch file") from None


# torch.__version__ (a str subclass) as older MedPose versions and `medpose pretrain` stored it in "versions"
_ALWAYS_ALLOWED: tuple[type, ...] = (torch.torch_version.TorchVersion,)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class _allowing:
    """Allow-list `classes` for the weights-only unpickler inside the block (torch >= 2.5: scoped; torch 2.4 has no
    scoped form, so they stay allowed for the process — only inert classes are ever passed)."""

    def __init__(self, classes: tuple[type, ...]):
        self.classes = list(classes)
        self.ctx = None

    def __enter__(self):
        if self.classes:
            scoped = getattr(torch.serialization, "safe_globals", None)
            if scoped is not None:
                self.ctx = scoped(self.classes)
                self.ctx.__enter__()
            else:
                torch.serialization.add_safe_globals(self.classes)
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict, read with the weights-only unpickler (`safe_torch_load`)."""
    path = Path(path)
    ckpt = safe_torch_load(path, "MedPose checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a MedPose checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def plain_state(obj: Any) -> Any:
    """`obj` with numpy arrays and scalars, paths and other leaves turned into what the weights-only unpickler reads:
    tensors, lists, tuples, dicts, str, int, float, bool, None. What the engine writes into checkpoints goes through
    it."""
    if obj is None or isinstance(obj, (bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, dict):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain_state(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [plain_state(v) for v in obj]
    for kind in (bool, int, float, str):  # subclasses (torch's TorchVersion, enums) as the plain type
        if isinstance(obj, kind):
            return obj if type(obj) is kind else kind(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return [plain_state(v) for v in sorted(obj, key=repr)]
    return obj  # anything else is kept as it is (and a weights-only load will name it)


# ------------------------------------------------------------------ RNG and versions

def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors, tuples and numbers (readable by the weights-only unpickler): python's
    random as its state tuple, numpy's legacy generator as (name, key as an int64 tensor, pos, has_gauss,
    cached_gaussian), torch's (and CUDA's) as ByteTensors."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(name), torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss),
                       float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what capture_rng captured (also the numpy arrays and lists of older checkpoints)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    name, key, pos, has_gauss, gauss = state["numpy"]
    key = key.numpy() if torch.is_tensor(key) else key
    np.random.set_state((str(name), np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": str(torch.__version__),
           "numpy": np.__version__, "cuda": str(torch.version.cuda)}
    for dist_name in ("torchvision", "torch-geometric", "numba", "triton", "timm", "deepspeed",
                      "nvidia-dali-cuda130"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    return out
