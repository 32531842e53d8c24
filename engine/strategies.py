"""Training strategies behind one small interface: single process, DDP, DeepSpeed (engine/strategy_deepspeed.py).

The trainer only ever calls: setup, accumulate, backward, step, all_reduce_sum/all_reduce_mean, all_gather_object,
barrier, save, load, unwrap, close. Loss scaling for gradient accumulation lives in `backward` (so an engine that
already divides by the accumulation count — DeepSpeed — does not divide twice).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file, plain_state
from .faults import save_fault_hook
from .dist import DistInfo


@dataclass(frozen=True)
class LossScaleSkip:
    """`step()`'s answer when fp16's loss scaler met inf/NaN gradients: the optimizer step was not applied and the
    scale was lowered to `scale`. A normal event in fp16 training (the trainer counts it), not a divergence."""
    scale: float


class SingleStrategy:
    """One process, one device."""

    name = "single"

    def __init__(self, info: DistInfo, grad_accum: int = 1, grad_clip: float = 0.0, precision: str = "fp32",
                 **_: Any):
        self.info = info
        self.device = info.device
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.precision = precision
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        # A GradScaler is only needed for fp16 (bf16 has fp32's exponent range).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(precision == "fp16"))

    # -- lifecycle
    def setup(self, model: nn.Module, optimizer, scheduler=None):
        self.model = model.to(self.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        return self.model, optimizer, scheduler

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        model = model if model is not None else self.model
        return model.module if hasattr(model, "module") else model

    def close(self) -> None:
        """One process holds no process group: nothing to release."""

    # -- one optimizer step over grad_accum micro-batches
    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def accumulate(self, is_boundary: bool):
        """Context for one micro-batch's forward+backward; no gradient sync off the boundary."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self) -> float | LossScaleSkip | None:
        """Clip, step, zero. Returns the global grad norm (before clipping); LossScaleSkip when fp16's scaler found
        inf/NaN gradients and backed off (step not applied); None when the norm is not finite without a scaler
        (the caller decides whether that stops the run)."""
        self.scaler.unscale_(self.optimizer)
        norm = self._clip_grads()
        norm_value = float(norm)
        if not math.isfinite(norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()  # fp16 backs off its scale and goes on: a skipped step, not a divergence
                return LossScaleSkip(float(self.scaler.get_scale()))
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return norm_value

    def step_deferred(self, bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """perf.host_sync=log: clip and step without reading the device. The step is skipped on the device when the
        gradient norm is not finite or `bad_loss` (a 0-d tensor, > 0 when some rank's loss was not finite) is set:
        the fused Adam/AdamW kernel leaves weights, moments and its step count unchanged under found_inf. The LR
        schedule advances either way. Returns (grad norm before clipping, found: 1.0 when skipped) on the device."""
        norm = self._clip_grads()
        found = ((~torch.isfinite(norm)) | (bad_loss.to(norm.device) > 0)).to(torch.float32)
        self.optimizer.grad_scale, self.optimizer.found_inf = None, found
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return norm, found

    def _clip_grads(self) -> torch.Tensor:
        """The global gradient norm before clipping (a device tensor), clipping to grad_clip when it is set."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- collectives (no-ops on one process)
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.unwrap().state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it. Rank 0 writes model/optimizer/scheduler/scaler + client state
        atomically; per-rank entries of client_state (e.g. RNG) must already be gathered by the caller."""
        state = self.state_dict() if self.info.is_main else None
        fault = save_fault_hook(path, client_state, self.info.rank)
        if self.info.is_main:  # plain containers only: the file loads with the weights-only unpickler
            atomic_torch_save({**state, "client": plain_state(client_state)}, path, before_publish=fault)
        else:
            fault()
        self.barrier()

    def load(self, path: str | Path) -> dict[str, Any]:
        """Collective: every rank reads the file (weights-only unpickler) and restores model, optimizer, scheduler
        and scaler; returns the client state. A file that cannot restore all of them (weights only, consolidated,
        DeepSpeed) is a CheckpointError naming what is missing (check_resumable)."""
        path = Path(path)
        ckpt = load_checkpoint_file(path)
        check_resumable(path, ckpt, self.name, self.info.world_size)
        self.unwrap().load_state_dict(ckpt["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return ckpt.get("client", {})


class DDPStrategy(SingleStrategy):
    """torch DistributedDataParallel; gloo on CPU, nccl on CUDA."""

    name = "ddp"

    def __init__(self, info: DistInfo, backend: str = "auto", timeout_s: int = 600,
                 find_unused_parameters: bool = False, **kwargs: Any):
        super().__init__(info, **kwargs)
        self.find_unused_parameters = find_unused_parameters
        if backend == "auto":
            backend = "nccl" if info.device.type == "cuda" else "gloo"
        self.backend = backend
        self._owns_group = False
        if not torch_dist.is_initialized():
            if info.device.type == "cuda":
                torch.cuda.set_device(info.device)
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in os.environ:
                    raise RuntimeError(f"DDP: environment variable {key} is not set; launch with torchrun "
                                       f"(or set it in the SLURM script)")
            torch_dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                          timeout=timedelta(seconds=timeout_s))
            self._owns_group = True

    def setup(self, model: nn.Module, optimizer, scheduler=None):
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
        self.optimizer, self.scheduler = optimizer, scheduler
        return self.model, optimizer, scheduler

    def accumulate(self, is_boundary: bool):
        return contextlib.nullcontext() if is_boundary else self.model.no_sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, torch_dist.ReduceOp.SUM)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, torch_dist.ReduceOp.SUM) / self.info.world_size

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, torch_dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        # gloo reduces CPU tensors, nccl CUDA tensors: move, reduce, move back.
        comm_device = self.device if self.backend == "nccl" else torch.device("cpu")
        t = tensor.detach().to(comm_device).clone()
        torch_dist.all_reduce(t, op=op)
        return t.to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.info.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.backend == "nccl":
            torch_dist.barrier(device_ids=[self.device.index])
        else:
            torch_dist.barrier()

    def close(self) -> None:
        if self._owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


WEIGHTS_ONLY_HINT = ("start a new run from its weights with --resume-weights-only (step 0, fresh optimizer and LR "
                     "schedule)")


def check_resumable(path: str | Path, ckpt: dict[str, Any], strategy: str, world_size: int) -> None:
    """Whether checkpoint `ckpt` (read from `path`) can resume a run of `strategy` exactly: a CheckpointError that
    names what is missing and the way out otherwise. single/ddp need the model, optimizer and scheduler states and
    the training state (client); deepspeed needs a shard pointer written with the same number of processes."""
    client = ckpt.get("client")
    if not isinstance(client, dict) or "step" not in client or "data_pos" not in client:
        raise CheckpointError(f"{path}: no training state (client) in this checkpoint — it is a weights-only/"
                              f"consolidated file; use --resume-weights-only")
    ds = ckpt.get("deepspeed")
    if strategy == "deepspeed":
        if not isinstance(ds, dict):
            what = ("a consolidated file (merged weights, no optimizer state)" if ckpt.get("consolidated_from")
                    else f"written by the {_writer(ckpt)} strategy")
            raise CheckpointError(
                f"{path}: {what}, it has no DeepSpeed shards (ZeRO-partitioned optimizer state) to resume a "
                f"dist.strategy=deepspeed run from; resume it with the strategy that wrote it, or {WEIGHTS_ONLY_HINT}")
        if ds.get("world_size") != world_size:
            raise CheckpointError(
                f"{path}: its DeepSpeed shards were written by {ds.get('world_size')} processes, this run has "
                f"{world_size}; resume with {ds.get('world_size')} processes, or {WEIGHTS_ONLY_HINT}")
        return
    missing = [key for key in ("model", "optimizer", "scheduler") if not isinstance(ckpt.get(key), dict)]
    if not missing:
        return
    what = ", ".join(missing)
    if isinstance(ds, dict):
        raise CheckpointError(
            f"{path}: a DeepSpeed checkpoint (ZeRO-{ds.get('zero_stage')}, {ds.get('world_size')} processes): its "
            f"optimizer and scheduler live in DeepSpeed's shards, which a dist.strategy={strategy} run cannot "
            f"restore (missing here: {what}). Resume it with dist.strategy=deepspeed on {ds.get('world_size')} "
            f"processes, or {WEIGHTS_ONLY_HINT}")
    kind = "a consolidated file" if ckpt.get("consolidated_from") else "this checkpoint"
    raise CheckpointError(f"{path}: {kind} holds no {what} state to resume from (the LR schedule and the optimizer's "
                          f"moments would restart while the step count goes on); {WEIGHTS_ONLY_HINT}")


def _writer(ckpt: dict[str, Any]) -> str:
    config = (ckpt.get("client") or {}).get("config") or {}
    name = (config.get("dist") or {}).get("strategy")
    return name if name in ("single", "ddp") else "single/ddp"


def _deepspeed_strategy(info: DistInfo, **kwargs: Any) -> SingleStrategy:
    """engine/strategy_deepspeed.py, imported (and DeepSpeed with it) only when this strategy is chosen."""
    if "batch_size" not in kwargs:
        raise ValueError("dist.strategy=deepspeed: build_strategy needs batch_size=train.batch_size (and "
                         "deepspeed=dist.deepspeed) to generate the DeepSpeed config")
    from .strategy_deepspeed import DeepSpeedStrategy
    return DeepSpeedStrategy(info, **kwargs)


STRATEGIES: dict[str, Callable[..., SingleStrategy]] = {
    "single": SingleStrategy,
    "ddp": DDPStrategy,
    "deepspeed": _deepspeed_strategy,
}


def build_strategy(name: str, info: DistInfo, **kwargs: Any) -> SingleStrategy:
    if name == "auto":
        name = "ddp" if info.world_size > 1 else "single"
    if name not in STRATEGIES:
        raise ValueError(f"dist.strategy: unknown strategy '{name}' (choose from {sorted(STRATEGIES)})")
    if name == "single" and info.world_size > 1:
        raise ValueError(f"dist.strategy=single but the launcher started {info.world_size} processes")
    return STRATEGIES[name](info, **kwargs)
