"""DeepSpeed behind the strategy interface of engine/strategies.py (the trainer is unchanged).

* The DeepSpeed JSON is generated from the engine config (`deepspeed_json`): micro batch = train.batch_size,
  gradient_accumulation_steps = train.grad_accum, gradient_clipping = optim.grad_clip, bf16/fp16 from the precision,
  zero_optimization from dist.deepspeed, then dist.deepspeed.extra deep-merged last. The engine's torch optimizer and
  LR scheduler are handed to `deepspeed.initialize`.
* Gradient accumulation: DeepSpeed divides the loss by gradient_accumulation_steps inside `engine.backward`, so
  `backward` passes the raw loss (SingleStrategy divides by grad_accum itself; here nothing else does — the loss is
  divided exactly once). DeepSpeed counts micro-batches through `engine.step()`, so off the boundary `backward` also
  calls `engine.step()` (it only advances the counter); the boundary's `step()` reduces, clips, steps the optimizer
  and the scheduler and zeroes the gradients.
* Checkpoints are collective. Every rank writes its shards with `engine.save_checkpoint` into
  `<ckpt dir>/deepspeed/<tag>/` (a fresh tag per save, so nothing complete is ever overwritten); after a barrier
  rank 0 writes the engine's usual checkpoint file (`ckpt_stepN.pt`, `best.pt`) atomically: client state, a pointer
  to the shards and — with dist.deepspeed.consolidate_on_save (default) — the consolidated fp32 weights under
  `model`, so `medpose eval`, `predict`, export and `--resume-weights-only` read it like any other checkpoint.
  `latest` is re-pointed by the trainer only after that file is complete; shard folders no checkpoint file points to
  any more are removed on the next save. For a file saved without the weights, every reader (the final report, eval,
  predict) merges them from the shards on demand (`engine.consolidate.checkpoint_weights`), and `python -m
  engine.consolidate FILE` writes a self-contained fp32 copy. DeepSpeed reads shard files with the full unpickler:
  `load` first reads them with the weights-only one (`engine.consolidate.check_shard_folder`).
* On CPU, DeepSpeed's shared-memory all-reduce op would be JIT-compiled on first use (about 30 s); the strategy
  marks it incompatible so the gloo process group is used, as for DDP.

A step the trainer abandons (non-finite loss, train.nan_policy=skip) is dropped by `zero_grad`, which also clears
ZeRO-1/2's partition buffers of the micro-batches already reduced and re-aligns DeepSpeed's micro-step counter.

Known limits: a non-finite gradient *norm* is reported after DeepSpeed's step was applied (DeepSpeed checks overflow
only for fp16), so with bf16/fp32 nan_policy=skip cleanly skips non-finite losses, not non-finite gradients;
abandoning a half-accumulated step under ZeRO-1/2 with offload_optimizer raises; weights loaded into
`unwrap(model)` (trainer.resume_weights_only, used before the final report) reach the forward pass but not
ZeRO-1/2's fp32 master partitions, so training must not continue after it; ZeRO-3 keeps a plain fp32 copy of the
model on rank 0 (CPU) for the report's rank-0-only figures (Zero3Weights); resuming needs the same world size.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import SHARDS_DIR, atomic_torch_save, load_checkpoint_file, plain_state, safe_torch_load
from .faults import save_fault_hook
from .config import DEEPSPEED_OWNED_KEYS, ConfigError, DeepSpeedConfig
from .dist import DistInfo
from .strategies import DDPStrategy, LossScaleSkip

FORMAT = "medpose-deepspeed-1"

# Top-level DeepSpeed sections that have no constant in deepspeed.runtime.constants (checked for typos in `extra`).
_SECTIONS = {
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "aio", "compression_training", "data_efficiency", "elasticity", "autotuning", "pipeline",
    "amp", "compile", "sparse_gradients", "eigenvalue", "progressive_layer_drop", "curriculum_learning", "timers",
    "nebula", "hybrid_engine", "weight_quantization", "quantize_training", "sparse_attention", "graph_harvesting",
    "zero_force_ds_cpu_optimizer", "monitor_config", "tensor_parallel", "sequence_parallel_size",
}


# DeepSpeed's defaults (elements) for the buckets DeepSpeedStrategy caps at the model's size
BUCKET_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                   "stage3_prefetch_bucket_size": int(5e7)}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def known_top_level_keys() -> set[str]:
    """Top-level keys DeepSpeed reads: its string constants plus the section names above (imports deepspeed)."""
    import deepspeed.runtime.constants as constants
    keys = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.islower()}
    return keys | _SECTIONS


def deepspeed_options(ds: DeepSpeedConfig | dict | None) -> DeepSpeedConfig:
    """dist.deepspeed as a checked DeepSpeedConfig (a plain mapping is validated like the config file's)."""
    if isinstance(ds, DeepSpeedConfig):
        return ds
    from .config import _build
    return _build(DeepSpeedConfig, dict(ds or {}), "dist.deepspeed.", "strategy arguments")


def deepspeed_json(ds: DeepSpeedConfig | dict | None, *, batch_size: int, grad_accum: int, grad_clip: float,
                   precision: str, world_size: int, on_cuda: bool = False,
                   known_keys: set[str] | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for these engine settings. `known_keys`: when given, every top-level key of
    ds.extra must be in it (a typo is an error naming the key instead of an option DeepSpeed silently ignores)."""
    ds = deepspeed_options(ds)
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"dist.deepspeed.zero_stage: must be one of [0, 1, 2, 3], got {ds.zero_stage!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: the deepspeed strategy needs a resolved precision "
                          f"(fp32/bf16/fp16), got {precision!r}")
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": on_cuda}
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": on_cuda}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "gradient_clipping": float(grad_clip),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        # the engine's torch optimizers (Adam, AdamW, SGD, RMSprop) are not on ZeRO's tested list; with offload,
        # DeepSpeed would otherwise insist on its compiled CPU Adam
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the engine logs; keep DeepSpeed's own step lines out of the console
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        # DeepSpeed 0.19 casts only the parameters and keeps buffers in fp32; BatchNorm then meets half-precision
        # weights beside fp32 running statistics and fails on the CPU ("expected scalar type BFloat16 but found
        # Float"). Cast the buffers too, as DeepSpeed's module.half()/bfloat16() did before (older versions ignore
        # the key).
        out["data_types"] = {"buffer_dtype": precision}
    for key in ds.extra:
        if key in DEEPSPEED_OWNED_KEYS:
            raise ConfigError(f"dist.deepspeed.extra.{key}: set by {DEEPSPEED_OWNED_KEYS[key]}, not through extra")
        if known_keys is not None and key not in known_keys:
            raise ConfigError(f"dist.deepspeed.extra.{key}: not a DeepSpeed config key")
    if isinstance(ds.extra.get("zero_optimization"), dict) and "stage" in ds.extra["zero_optimization"]:
        raise ConfigError("dist.deepspeed.extra.zero_optimization.stage: set by dist.deepspeed.zero_stage")
    return _merge(out, ds.extra)


def disable_shm_comm() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op incompatible so it is never JIT-compiled (gloo is used)."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _quiet():
    """DeepSpeed's checkpoint utilities print per-file lines; keep them off the console."""
    return contextlib.redirect_stdout(io.StringIO())


def clean_shards(root: str | Path, keep: str | None, stem: str | None) -> None:
    """Rank 0: remove shard folders under `root` that no checkpoint file can point to any more — those whose
    checkpoint file `<owner>.pt` beside `root` is gone (pruned, or never completed), and, after `stem`.pt was
    republished pointing to `keep`, the older folders of `stem`. Folders are named `<owner>-<nonce>`."""
    root = Path(root)
    if not root.is_dir():
        return
    for d in root.iterdir():
        if not d.is_dir() or d.name == keep:
            continue
        owner = d.name.rsplit("-", 1)[0]
        if not (root.parent / f"{owner}.pt").is_file() or owner == stem:
            shutil.rmtree(d, ignore_errors=True)


class Zero3Weights(nn.Module):
    """What `unwrap()` returns under ZeRO-3, where the engine's module holds only this rank's parameter shards.

    engine/run.py uses the unwrapped model twice after training: `load_state_dict(best weights)` on every rank
    (trainer.resume_weights_only) and, on rank 0 alone, forward passes for the report's figures. Here
    `load_state_dict` is collective: it writes the full weights into the partitioned engine (DeepSpeed's
    GatheredParameters, rank 0 modifies) and into a plain fp32 copy kept on rank 0, which also receives the
    consolidated weights at every save. Rank 0's forward runs that plain copy (no collective: the other ranks
    are not in it); the other ranks forward through the engine."""

    def __init__(self, strategy: "DeepSpeedStrategy", plain: nn.Module | None):
        super().__init__()
        object.__setattr__(self, "_strategy", strategy)  # not a submodule
        self.plain = plain

    def forward(self, *args, **kwargs):
        if self.plain is not None:
            self.plain.to(self._strategy.device)
            return self.plain(*args, **kwargs)
        return self._strategy.engine(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        if self.plain is None:
            raise RuntimeError("deepspeed: under ZeRO-3 only rank 0 holds whole weights (after a save)")
        return self.plain.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Collective: every rank calls it (rank 0's `state_dict` is the one written)."""
        import deepspeed
        module = self._strategy.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if self._strategy.info.is_main:
                module.load_state_dict(state_dict, strict=strict)
        # the gather above is outside ZeRO-3's recorded parameter-fetch trace: let the next forward record anew
        coordinator = self._strategy.engine.optimizer.parameter_offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        if self.plain is not None:
            return self.plain.load_state_dict(state_dict, strict=strict)
        return None


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO 0-3 (optional CPU offload, bf16), process group as for DDP (gloo on CPU, nccl on CUDA)."""

    name = "deepspeed"

    def __init__(self, info: DistInfo, grad_accum: int = 1, grad_clip: float = 0.0, precision: str = "fp32",
                 batch_size: int = 1, deepspeed: DeepSpeedConfig | dict | None = None, **kwargs: Any):
        # DeepSpeed reads these itself; srun without torchrun, or one process without a launcher, may not set them
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        if not info.distributed:  # one process without a launcher: a local rendezvous for the process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                with socket.socket() as sock:  # a free port: two single-process runs on one host do not collide
                    sock.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        super().__init__(info, grad_accum=grad_accum, grad_clip=grad_clip, precision=precision, **kwargs)
        import deepspeed as ds_module  # only when this strategy is chosen
        self._ds = ds_module
        if self.device.type == "cpu":
            disable_shm_comm()
        self.ds_options = deepspeed_options(deepspeed)
        self.ds_config = deepspeed_json(self.ds_options, batch_size=batch_size, grad_accum=grad_accum,
                                        grad_clip=grad_clip, precision=precision, world_size=info.world_size,
                                        on_cuda=self.device.type == "cuda", known_keys=known_top_level_keys())
        self.zero_stage = self.ds_options.zero_stage
        self.engine = None
        self._zero3_view: Zero3Weights | None = None
        self._boundary = True
        self._micro = 0  # micro-batches backpropagated in the current optimizer step

    # -- lifecycle
    def setup(self, model: nn.Module, optimizer, scheduler=None):
        model = model.to(self.device)
        if self.zero_stage == 3:  # rank 0's plain copy for Zero3Weights, before DeepSpeed partitions the module
            self._zero3_view = Zero3Weights(self, copy.deepcopy(model).cpu() if self.info.is_main else None)
        self._cap_buckets(sum(p.numel() for p in model.parameters()))
        engine, _, _, _ = self._ds.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                              config=self.ds_config, dist_init_required=False)
        self.engine = self.model = engine
        # the trainer reads the LR from the torch optimizer's param groups, which DeepSpeed's wrapper shares
        self.optimizer, self.scheduler = optimizer, scheduler
        return engine, optimizer, scheduler

    def _cap_buckets(self, num_params: int) -> None:
        """Communication buckets no larger than the model. DeepSpeed sizes them for large language models
        (reduce / all-gather 5e8 elements, ZeRO-3 prefetch 5e7) and ZeRO-3 allocates its reduce bucket whole: 1 GB
        per rank in bf16 even for a 7 M-parameter network (measured, benchmarks/results/zero_memory_*). Sizes set
        in dist.deepspeed.extra.zero_optimization are kept."""
        if self.zero_stage == 0:
            return
        zero = self.ds_config["zero_optimization"]
        user = self.ds_options.extra.get("zero_optimization") or {}
        for key, default in BUCKET_DEFAULTS.items():
            if key in user or (key.startswith("stage3_") and self.zero_stage != 3):
                continue
            # a multiple of 64 elements: ZeRO-1/2 require the all-gather bucket to be aligned (2 for 16-bit)
            zero[key] = int(min(default, -(-max(num_params, 1) // 64) * 64))

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        """The plain module (ZeRO-3: a Zero3Weights view, since the module itself holds only shards)."""
        model = model if model is not None else self.model
        if self.zero_stage == 3 and model is self.engine:
            return self._zero3_view
        return model.module if hasattr(model, "module") else model

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        super().close()

    # -- one optimizer step over grad_accum micro-batches
    def accumulate(self, is_boundary: bool):
        """DeepSpeed skips the gradient reduction off the boundary itself; only remember where we are."""
        self._boundary = is_boundary
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine.is_gradient_accumulation_boundary() != self._boundary:
            raise RuntimeError(f"deepspeed: micro-batch counter out of step with the trainer (DeepSpeed boundary="
                               f"{self.engine.is_gradient_accumulation_boundary()}, trainer boundary="
                               f"{self._boundary}, grad_accum={self.grad_accum})")
        self.engine.backward(loss)  # divides by gradient_accumulation_steps: the raw loss goes in
        self._micro += 1
        if not self._boundary:
            self.engine.step()  # off the boundary: advances DeepSpeed's micro-step counter, no update

    def _local_grad_norm(self) -> float | None:
        """Stage 0 without clipping: DeepSpeed computes no norm; the gradients are whole and reduced here."""
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def step(self) -> float | LossScaleSkip | None:
        before = self._local_grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        self._micro = 0
        if self.precision == "fp16" and not self.engine.was_step_applied():
            # DeepSpeed's dynamic loss scaler met an overflow and halved its scale: a skipped step, not a divergence
            scaler = getattr(self.engine.optimizer, "loss_scaler", None)
            return LossScaleSkip(float(getattr(scaler, "cur_scale", getattr(scaler, "loss_scale", math.nan))))
        norm = self.engine.get_global_grad_norm()
        norm = before if norm is None else float(norm)
        if norm is None:
            return 0.0  # no gradients at all
        return norm if math.isfinite(norm) else None

    def zero_grad(self) -> None:
        """After an abandoned step (non-finite loss): drop the gradients and move DeepSpeed's micro-step counter to
        the next boundary, so the next step starts aligned with the trainer."""
        partial = self._micro > 0
        self.engine.micro_steps += self.grad_accum - self._micro
        self._micro = 0
        if self.zero_stage == 0:
            self.engine.zero_grad()
            return
        opt = self.engine.optimizer
        opt.zero_grad(set_to_none=True)
        if partial and self.zero_stage in (1, 2):
            # ZeRO-1/2 keep the already reduced micro-batches in their own partition buffers: drop them the way
            # DeepSpeed drops an fp16-overflow step (tests/test_deepspeed.py checks nothing leaks into the next step)
            if self.ds_options.offload_optimizer != "none":
                raise RuntimeError("deepspeed: abandoning a half-accumulated step (non-finite loss with "
                                   "train.grad_accum > 1) is not supported with offload_optimizer under ZeRO-1/2; "
                                   "use train.nan_policy=stop or grad_accum=1")
            opt._release_preflattened_grad_buffers()
            for group in list(opt.averaged_gradients):
                opt.averaged_gradients[group] = None
            for group in list(getattr(opt, "all_grad_tensors", None) or {}):
                opt.all_grad_tensors[group] = None
            opt.micro_step_id = -1  # DeepSpeed's INITIAL_MICRO_STEP_ID

    # -- checkpoints
    def _shards_root(self, path: Path) -> Path:
        return path.parent / SHARDS_DIR

    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its DeepSpeed shards, then rank 0 publishes `path` atomically."""
        path = Path(path)
        root = self._shards_root(path)
        if self.info.is_main:
            clean_shards(root, keep=None, stem=None)
            root.mkdir(parents=True, exist_ok=True)
        tag = self.all_gather_object(f"{path.stem}-{uuid.uuid4().hex[:8]}")[0]  # rank 0's choice, fresh per save
        self.barrier()
        client_state = plain_state(client_state)  # the files load with the weights-only unpickler
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"medpose": client_state}, save_latest=False)
        save_fault_hook(path, client_state, self.info.rank)()  # test hook: this rank's shards written, not published
        self.barrier()  # every rank's shards are on disk
        if self.info.is_main:
            model = consolidated_state_dict(root, tag, self.zero_stage, self.engine.module) \
                if self.ds_options.consolidate_on_save or self.zero_stage == 3 else None
            if self._zero3_view is not None and self._zero3_view.plain is not None:
                self._zero3_view.plain.load_state_dict(model)
            if not self.ds_options.consolidate_on_save:
                model = None
            atomic_torch_save({"model": model, "client": client_state, "format": FORMAT,
                               "deepspeed": {"dir": SHARDS_DIR, "tag": tag, "zero_stage": self.zero_stage,
                                             "world_size": self.info.world_size,
                                             "config": plain_state(self.ds_config)}}, path)
            clean_shards(root, keep=tag, stem=path.stem)
        self.barrier()

    def load(self, path: str | Path) -> dict[str, Any]:
        """Collective: every rank restores its shards (model, optimizer, scheduler) from the folder `path` points
        to; returns the engine's client state. A file without shards (single/DDP, consolidated) or written by another
        number of processes is a CheckpointError that offers --resume-weights-only (strategies.check_resumable);
        the shard files are read with the weights-only unpickler before DeepSpeed loads them (check_shard_folder)."""
        from .consolidate import check_shard_folder
        from .strategies import check_resumable
        path = Path(path)
        ckpt = load_checkpoint_file(path)
        check_resumable(path, ckpt, self.name, self.info.world_size)
        ds = ckpt["deepspeed"]
        shards = path.parent / ds["dir"]
        if not (shards / ds["tag"]).is_dir():
            raise FileNotFoundError(f"{path}: its DeepSpeed shard folder {shards / ds['tag']} is missing")
        check_shard_folder(shards / ds["tag"])
        with _quiet():
            loaded, client = self.engine.load_checkpoint(str(shards), tag=ds["tag"], load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load {shards / ds['tag']}")
        self._micro, self._boundary = 0, True
        return (client or {}).get("medpose") or ckpt.get("client", {})


def consolidated_state_dict(root: str | Path, tag: str, zero_stage: int,
                            module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights (and buffers) of a DeepSpeed checkpoint folder `root/tag`, merged over all ranks' shards.
    Stage 0 in fp32 keeps whole fp32 weights in the module's own state file (or `module`, when given)."""
    root = Path(root)
    if zero_stage == 0 and module is not None and all(p.dtype == torch.float32 for p in module.parameters()):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if zero_stage == 0 and not any(root.joinpath(tag).glob("*optim_states.pt")):
        # fp32 without ZeRO: the model state file holds the whole fp32 weights
        states = root / tag / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise FileNotFoundError(f"{states}: DeepSpeed model state file not found")
        from .consolidate import deepspeed_safe_classes
        return safe_torch_load(states, "DeepSpeed model state file", allow=deepspeed_safe_classes())["module"]
    with _quiet():
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
