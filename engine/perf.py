"""The training step's speed levers (config section `perf`, engine/config.py PerfConfig): channels-last memory format,
torch.compile of the model and/or the criterion, the optimizer implementation, deferred host reads and glibc's
allocator behaviour. Each is checked against the run before any data is built (check_perf) and applied by the
Trainer; benchmarks/train_levers.py measures each alone and all together against a plain PyTorch loop.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError
from .logger import LOG

FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")
DEFERRED_OPTIMIZERS = ("adam", "adamw")   # their fused kernels skip a step on the device (found_inf), moments intact

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = {_M_MMAP_THRESHOLD: 1 << 32, _M_TRIM_THRESHOLD: 1 << 36, _M_TOP_PAD: 1 << 28}
_malloc_applied: str | None = None


def check_perf(cfg: Config, strategy: str, precision: str) -> None:
    """ConfigError for lever combinations that cannot work, before any data is built."""
    pc = cfg.perf
    if pc.optimizer_impl == "fused" and cfg.optim.name not in FUSED_OPTIMIZERS:
        raise ConfigError(f"perf.optimizer_impl=fused: torch has no fused {cfg.optim.name} (fused: "
                          f"{', '.join(FUSED_OPTIMIZERS)}); use foreach or auto")
    if pc.host_sync == "log":
        why = None
        if cfg.optim.name not in DEFERRED_OPTIMIZERS:
            why = (f"optim.name={cfg.optim.name}: only adam/adamw skip a non-finite step on the device (fused "
                   f"kernels with found_inf)")
        elif pc.optimizer_impl in ("for", "foreach"):
            why = f"perf.optimizer_impl={pc.optimizer_impl}: the device-side skip needs the fused optimizer (auto or fused)"
        elif precision == "fp16":
            why = "train.precision=fp16: the loss scaler reads its overflow flag every step; use bf16"
        elif strategy == "deepspeed":
            why = "dist.strategy=deepspeed: DeepSpeed's engine reads its own overflow flags every step"
        if why:
            raise ConfigError(f"perf.host_sync=log: {why}; or set perf.host_sync=step")


def optimizer_kwargs(cfg: Config) -> dict[str, Any]:
    """The implementation switch of torch.optim's constructors (host_sync=log implies fused)."""
    impl = cfg.perf.optimizer_impl
    if impl == "auto" and cfg.perf.host_sync == "log":
        impl = "fused"
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "for":
        return {"foreach": False}
    return {}


def apply_cpu_malloc(mode: str, device: torch.device) -> str:
    """perf.cpu_malloc: 'keep' makes glibc reuse freed memory instead of returning every large block to the OS (a
    training step frees and re-allocates the same large activations each step; without this each one is page-faulted
    in again). Process-wide, so applied once; returns what is in effect ('keep', 'system' or 'unavailable')."""
    global _malloc_applied
    want = "keep" if mode == "keep" or (mode == "auto" and device.type == "cpu") else "system"
    if want == "system" or _malloc_applied == "keep":
        return _malloc_applied or "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        if mode == "keep":
            LOG.warning("perf.cpu_malloc=keep: needs glibc (this is %s %s); left as is", platform.system(),
                        platform.libc_ver()[0] or "without glibc")
        _malloc_applied = "unavailable"
        return _malloc_applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(min(v, 2**31 - 1))) == 1 for k, v in _KEEP.items())
    _malloc_applied = "keep" if ok else "unavailable"
    if not ok:
        LOG.warning("perf.cpu_malloc=keep: glibc refused mallopt; steps may page-fault their activations afresh")
    return _malloc_applied


def prepare_model(cfg: Config, model: nn.Module) -> nn.Module:
    """channels_last (before the strategy wraps the model and the optimizer sees its parameters)."""
    if cfg.perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_modules(cfg: Config, model: nn.Module, criterion: nn.Module) -> None:
    """torch.compile in place (nn.Module.compile): the modules keep their identity and state_dict keys, so
    checkpoints, export and evaluation see the same model."""
    what, mode = cfg.perf.compile, cfg.perf.compile_mode
    if what in ("model", "both"):
        model.compile(mode=mode)
    if what in ("loss", "both"):
        criterion.compile(mode=mode)


def to_memory_format(cfg: Config, image_BCHW: torch.Tensor) -> torch.Tensor:
    if cfg.perf.channels_last and image_BCHW.dim() == 4:
        return image_BCHW.contiguous(memory_format=torch.channels_last)
    return image_BCHW
