"""The training loop: strategy-agnostic, model-agnostic (forward → dict of outputs, criterion → dict of losses).

One optimizer step = `grad_accum` micro-batches. The data position (epoch, samples of its permutation consumed by all
ranks together), every rank's RNG state and metrics window, the optimizer/scheduler/scaler and the criterion's state go
into each checkpoint, so a run of 2N steps equals a run of N steps + resume + N steps (weights and metrics.jsonl). A
resume with another world size re-shards the rest of the epoch over the new ranks (every sample still used once), and
ranks without a saved RNG stream are seeded from (train.seed, rank, step). A checkpoint is written before every evaluation (and every
train.ckpt_every steps), never after one: an evaluation that fails loses no training.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from data_pipelines.batch import Batch
from data_pipelines.loaders import training_batches
from data_pipelines.sampler import ShardedSampler

from .checkpoint import (capture_rng, checkpoint_path, find_latest, prune_checkpoints, restore_rng,
                         seed_everything, update_latest, versions)
from .config import Config
from .faults import FAULT_RANK_ENV, FAULT_STEP_ENV, inject_fault, trace_samples  # noqa: F401 (re-exported)
from .logger import LOG, RunLogger
from .perf import apply_cpu_malloc, compile_modules, optimizer_kwargs, prepare_model, to_memory_format
from .strategies import LossScaleSkip


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradient norm is not finite and nan_policy says stop."""


MAX_LOSS_SCALE_SKIPS = 100
"""fp16: this many loss-scale back-offs in a row (the scale divided by 2**100) is a divergence, not a warm-up."""


@dataclass
class DataPosition:
    epoch: int = 0
    start: int = 0     # samples of the epoch's permutation consumed (all ranks) when this pass over it began
    consumed: int = 0  # micro-batches this rank has taken since `start`


def saved_data_position(client: dict[str, Any]) -> tuple[int, int]:
    """(epoch, samples of its permutation consumed by all ranks) from a checkpoint's client state; checkpoints written
    before the position was global hold micro-batches per rank, converted with their world size and batch size."""
    pos = client.get("data_pos")
    if not isinstance(pos, dict) or "epoch" not in pos:
        raise KeyError("data_pos")
    if "samples" in pos:
        return int(pos["epoch"]), int(pos["samples"])
    batch = int(((client.get("config") or {}).get("train") or {}).get("batch_size", 1))
    return int(pos["epoch"]), int(pos["consumed"]) * batch * int(client.get("world_size") or 1)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of a rank that resumes without a saved stream (a resume onto more ranks than were saved)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def _seed_worker(worker_id: int) -> None:
    # Augmentation randomness comes from per-sample generators seeded by (seed, epoch, index) in the dataset;
    # this only keeps any library-level RNG in workers distinct and reproducible.
    import random

    import numpy as np
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    def __init__(self, cfg: Config, strategy, model: nn.Module, criterion: nn.Module, train_set: Dataset,
                 evaluate_fn: Callable[[nn.Module, int], dict[str, float]] | None, run_dir: Path,
                 extra_state: Callable[[], dict[str, Any]] | None = None, shown: tuple[str, ...] = ("loss",)):
        """extra_state: more client state for every checkpoint (e.g. the task's learned state); shown: validation
        figures printed on the console line."""
        self.cfg = cfg
        self.strategy = strategy
        self.info = strategy.info
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.malloc = apply_cpu_malloc(cfg.perf.cpu_malloc, self.info.device)
        model = prepare_model(cfg, model)
        self.criterion = criterion.to(self.info.device)
        compile_modules(cfg, model, self.criterion)
        self.deferred = cfg.perf.host_sync == "log"
        self._pending: list[tuple[int, dict[str, torch.Tensor], float]] = []  # host_sync=log: steps not yet read
        self.train_set = train_set
        self.evaluate_fn = evaluate_fn
        self.extra_state = extra_state
        self.shown = tuple(shown)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        self.model, self.optimizer, self.scheduler = strategy.setup(model, optimizer, scheduler)
        self.step = 0
        self.pos = DataPosition()
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.scale_skips_in_a_row = 0
        self.scale_skips_total = 0        # fp16 loss-scale back-offs: the step was not applied, nothing diverged
        self.window: dict[str, float] = {}  # this rank's sums since the last train log line (kept in checkpoints)
        self.n_window = 0
        self.sampler = ShardedSampler(len(train_set), self.info.rank, self.info.world_size, shuffle=True,
                                      seed=cfg.train.seed, drop_last=True, batch_size=cfg.train.batch_size)

    # ------------------------------------------------------------------ data
    def _micro_batches(self) -> Iterator[Batch]:
        tc, dc = self.cfg.train, self.cfg.data
        # One loader across epochs where the dataset allows it (data_pipelines/loaders.training_batches): its workers
        # start once instead of at every epoch, which on a small dataset with many workers was most of the time.
        batches = training_batches(self.train_set, tc.batch_size, self.sampler, self.pos.epoch, self.pos.start,
                                   dc.loader, dc.num_workers, pin_memory=self.info.device.type == "cuda",
                                   worker_init_fn=_seed_worker,
                                   device_id=self.info.device.index if self.info.device.type == "cuda" else None,
                                   num_threads=dc.dali_threads or None)
        try:
            for epoch, batch in batches:
                if epoch != self.pos.epoch:
                    self.pos = DataPosition(epoch, 0, 0)
                self.pos.consumed += 1
                trace_samples(self.run_dir, self.info.rank, self.step, self.pos.epoch, batch.meta)
                yield batch
        finally:
            batches.close()     # ends the loader's workers now, not when the generator is collected

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict[str, Any]:
        # Every rank's RNG goes into the file (rank 0 writes it), so each rank resumes its own stream.
        rng_all = self.strategy.all_gather_object(capture_rng())
        windows = self.strategy.all_gather_object({"sums": dict(self.window), "n": self.n_window})
        samples = self.pos.start + self.pos.consumed * self.cfg.train.batch_size * self.info.world_size
        return {"step": self.step, "epoch": self.pos.epoch,
                "data_pos": {"epoch": self.pos.epoch, "samples": samples, "perm_seed": self.cfg.train.seed},
                "rng_per_rank": rng_all, "world_size": self.info.world_size, "window_per_rank": windows,
                "counters": {"skipped_total": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row,
                             "scale_skips_total": self.scale_skips_total,
                             "scale_skips_in_a_row": self.scale_skips_in_a_row},
                "criterion": self.criterion.state_dict(), "best_value": self.best_value,
                "best_step": self.best_step, "config": self.cfg.to_dict(), "versions": versions(),
                **(self.extra_state() if self.extra_state is not None else {})}

    def save(self, path: Path | None = None, make_latest: bool = True) -> Path:
        path = path or checkpoint_path(self.ckpt_dir, self.step)
        self.strategy.save(path, self.client_state())
        if self.info.is_main and make_latest:
            update_latest(self.ckpt_dir, path)
            prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        self.strategy.barrier()
        return path

    def resume(self, path: Path) -> None:
        client = self.strategy.load(path)
        missing = [k for k in ("step", "data_pos", "criterion") if k not in client]
        if missing:
            raise KeyError(f"{path}: no training state in this checkpoint (missing {', '.join(missing)}); it holds "
                           f"weights only: start from it with --resume-weights-only")
        self.step = int(client["step"])
        epoch, samples = saved_data_position(client)
        self.pos = DataPosition(epoch, samples, 0)
        self.criterion.load_state_dict(client["criterion"])
        self.best_value, self.best_step = client.get("best_value"), client.get("best_step")
        counters = client.get("counters") or {}
        self.skipped_total = int(counters.get("skipped_total", 0))
        self.skipped_in_a_row = int(counters.get("skipped_in_a_row", 0))
        self.scale_skips_total = int(counters.get("scale_skips_total", 0))
        self.scale_skips_in_a_row = int(counters.get("scale_skips_in_a_row", 0))
        saved_world = int(client.get("world_size") or 1)
        rank, world = self.info.rank, self.info.world_size
        # the metrics window: this rank takes the saved ranks j with j % world == rank, so the all-reduced sums of
        # the next train log line equal those of the uninterrupted run at any world size
        self.window, self.n_window = {}, 0
        for j, w in enumerate(client.get("window_per_rank") or []):
            if j % world == rank:
                for k, v in w["sums"].items():
                    self.window[k] = self.window.get(k, 0.0) + v
                self.n_window += int(w["n"])
        rngs = client.get("rng_per_rank") or []
        if rank < len(rngs):
            restore_rng(rngs[rank])
        else:
            seed_everything(rank_seed(self.cfg.train.seed, rank, self.step))
        if saved_world != world:
            LOG.warning("%s: saved with world size %d, resuming with %d: the rest of epoch %d (from sample %d of "
                        "%d) is re-sharded over %d ranks; %s", path, saved_world, world, epoch, samples,
                        len(self.train_set), world,
                        f"ranks {len(rngs)}..{world - 1} have no saved RNG stream and are seeded from "
                        f"(train.seed, rank, step)" if world > len(rngs) else
                        f"the RNG streams of ranks {world}..{saved_world - 1} are dropped")
        LOG.info("resumed from %s at step %d (epoch %d, sample %d of the epoch)", path, self.step, epoch, samples)

    def resume_weights_only(self, path: Path) -> None:
        """The model weights of checkpoint `path` (read with the weights-only unpickler; a deepspeed checkpoint saved
        with consolidate_on_save=false is merged from its shards on every rank) into the running model. Under ZeRO-1/2
        they do not reach DeepSpeed's fp32 master partitions: for the final report, not to train on (engine/run.py
        loads --resume-weights-only files into the model before the strategy wraps it)."""
        from .consolidate import checkpoint_weights
        self.strategy.unwrap(self.model).load_state_dict(checkpoint_weights(path))

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, batch: Batch, is_boundary: bool) -> dict[str, float] | None:
        batch = batch.to(self.info.device, non_blocking=True)
        with self.strategy.accumulate(is_boundary):
            with self.strategy.autocast():
                outputs = self.model(to_memory_format(self.cfg, batch.image_BCHW))
            outputs = {k: v.float() if torch.is_tensor(v) else [t.float() for t in v] for k, v in outputs.items()}
            losses = self.criterion(outputs, batch.targets())
            loss = losses["loss"]
            if self.deferred:  # nothing read back: the parts stay on the device until the next flush
                self.strategy.backward(loss)
                return {k: v.detach().to(torch.float64) for k, v in losses.items()}
            bad = torch.tensor(0.0 if torch.isfinite(loss).item() else 1.0)
            if self.strategy.all_reduce_max(bad).item() > 0:  # every rank must take the same branch
                return None
            self.strategy.backward(loss)
        return {k: float(v.detach()) for k, v in losses.items()}

    def _handle_bad(self, what: str, detail: str, step: int | None = None) -> None:
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        msg = (f"step {self.step if step is None else step}: {what} is not finite ({detail}); last good checkpoint: "
               f"{find_latest(self.ckpt_dir) or 'none yet'}")
        if self.cfg.train.nan_policy == "stop":
            raise TrainingDiverged(msg + ". Lower optim.lr, set optim.grad_clip, or set train.nan_policy=skip.")
        if self.skipped_in_a_row > self.cfg.train.max_skipped_steps:
            raise TrainingDiverged(msg + f"; {self.skipped_in_a_row} steps skipped in a row, giving up.")
        LOG.warning(msg + "; step skipped (train.nan_policy=skip)")

    def _loss_scale_skip(self, skip: LossScaleSkip) -> None:
        """fp16's scaler met inf/NaN gradients and lowered its scale: the step is not applied. Normal early in fp16
        training (counted as loss_scale_skips in metrics.jsonl); only a long run of them in a row is a divergence."""
        self.scale_skips_total += 1
        self.scale_skips_in_a_row += 1
        if self.scale_skips_in_a_row > MAX_LOSS_SCALE_SKIPS:
            raise TrainingDiverged(
                f"step {self.step}: fp16 gradients overflowed {self.scale_skips_in_a_row} steps in a row (loss scale "
                f"now {skip.scale:g}); last good checkpoint: {find_latest(self.ckpt_dir) or 'none yet'}. Use "
                f"train.precision=bf16 or fp32, or lower optim.lr.")
        LOG.info("step %d: fp16 gradients overflowed; the loss scale backs off to %g and the step is skipped "
                 "(%d so far)", self.step, skip.scale, self.scale_skips_total)

    def train_step(self, batches: Iterator[Batch]) -> dict[str, float] | None:
        self.model.train()
        self.criterion.train()
        accum = self.cfg.train.grad_accum
        if self.deferred:
            self._train_step_deferred(batches, accum)
            return None
        parts: dict[str, float] = {}
        for i in range(accum):
            out = self._forward_backward(next(batches), is_boundary=(i == accum - 1))
            if out is None:
                # drain the remaining micro-batches so the data position stays aligned across ranks
                for _ in range(accum - 1 - i):
                    next(batches)
                self.strategy.zero_grad()
                self._handle_bad("loss", "NaN/Inf in the forward pass")
                return None
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + v / accum
        grad_norm = self.strategy.step()
        if isinstance(grad_norm, LossScaleSkip):
            self._loss_scale_skip(grad_norm)
            return None
        if grad_norm is None:
            self._handle_bad("gradient norm", "NaN/Inf gradients")
            return None
        self.skipped_in_a_row = 0
        self.scale_skips_in_a_row = 0
        parts["grad_norm"] = grad_norm
        parts["lr"] = self.optimizer.param_groups[0]["lr"]
        return parts

    def _train_step_deferred(self, batches: Iterator[Batch], accum: int) -> None:
        """perf.host_sync=log: forward/backward/step with no read of the device. A non-finite loss (on any rank) or
        gradient norm makes the fused optimizer skip the step on the device; flush() reads the outcome later."""
        parts: dict[str, torch.Tensor] = {}
        for i in range(accum):
            out = self._forward_backward(next(batches), is_boundary=(i == accum - 1))
            for k, v in out.items():
                parts[k] = parts[k] + v / accum if k in parts else v / accum
        bad = (~torch.isfinite(parts["loss"])).to(torch.float64)
        bad = self.strategy.all_reduce_max(bad)   # on the device: every rank skips the same steps
        grad_norm, found = self.strategy.step_deferred(bad)
        parts["grad_norm"] = grad_norm.detach().to(torch.float64)
        parts["_found"] = found.to(torch.float64)
        self._pending.append((self.step, parts, float(self.optimizer.param_groups[0]["lr"])))

    def flush(self) -> float | None:
        """perf.host_sync=log: read every pending step's figures in one transfer, then count skipped steps (and
        apply train.nan_policy) and add the good ones to the metrics window exactly as host_sync=step does. Returns the
        last good step's loss (None when nothing was pending or it was skipped)."""
        if not self._pending:
            return None
        keys = sorted(self._pending[0][1])
        rows = torch.stack([torch.stack([parts[k].reshape(()) for k in keys]) for _, parts, _ in self._pending])
        pending, self._pending = self._pending, []
        last = None
        for (step, _, lr), values in zip(pending, rows.cpu().tolist()):
            row = dict(zip(keys, values))
            if row.pop("_found") > 0:
                last = None
                self._handle_bad("loss or gradient norm", "NaN/Inf; the step was not applied", step=step)
                continue
            self.skipped_in_a_row = 0
            row["lr"] = lr
            for k, v in row.items():
                self.window[k] = self.window.get(k, 0.0) + v
            self.n_window += 1
            last = row["loss"]
        return last

    # ------------------------------------------------------------------ the loop
    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.cfg.train.best_mode == "max" else value < self.best_value

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        inject_fault(self.step, self.info.rank, self.run_dir, "eval")
        metrics = self.evaluate_fn(self.model, self.step)
        logger.log(self.step, "val", metrics)
        # engine/run.py resolves "auto" from the task; a Trainer used on its own falls back to the validation loss
        key = "loss" if self.cfg.train.best_metric == "auto" else self.cfg.train.best_metric
        if key not in metrics:
            raise KeyError(f"train.best_metric: '{key}' is not among the validation figures "
                           f"({', '.join(sorted(metrics))})")
        if self._is_better(metrics[key]):
            self.best_value, self.best_step = float(metrics[key]), self.step
            self.save(self.ckpt_dir / "best.pt", make_latest=False)
        shown = dict.fromkeys((*self.shown, key))  # ordered, no repeats
        logger.write(f"[val @ step {self.step}] " + ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
                     + (f" (best {key}={self.best_value:.4g} @ {self.best_step})" if self.best_value is not None
                        else f" (no finite {key} yet)"))
        return metrics

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return self.evaluate_fn is not None and bool(every) and step % every == 0

    def _ckpt_due(self, step: int) -> bool:
        every = self.cfg.train.ckpt_every
        return bool(every) and step % every == 0

    def fit(self, resume_from: Path | None = None) -> dict[str, Any]:
        tc = self.cfg.train
        if resume_from is not None:
            self.resume(resume_from)
        logger = RunLogger(self.run_dir, self.info.is_main, self.cfg.log.tensorboard, self.cfg.log.progress,
                           total_steps=tc.max_steps, initial_step=self.step)
        batches = self._micro_batches()
        t0, last_val = time.perf_counter(), {}
        if resume_from is not None and self._eval_due(self.step):
            # the checkpoint was written before this step's evaluation; a run killed during it has no figures
            # for the step: evaluate again (every rank follows rank 0's metrics.jsonl)
            missing = torch.tensor(0.0 if logger.has_row(self.step, "val") else 1.0)
            if not self.info.is_main:
                missing.zero_()
            if float(self.strategy.all_reduce_max(missing)) > 0:
                LOG.info("step %d: its evaluation did not finish before the run stopped; evaluating now", self.step)
                last_val = self._evaluate(logger)
        samples_per_step = tc.batch_size * tc.grad_accum * self.info.world_size
        end = min(tc.max_steps, tc.stop_at_step) if tc.stop_at_step > 0 else tc.max_steps
        try:
            while self.step < end:
                parts = self.train_step(batches)
                self.step += 1
                if self.deferred:
                    logger.progress(1)
                elif parts is not None:
                    for k, v in parts.items():
                        self.window[k] = self.window.get(k, 0.0) + v
                    self.n_window += 1
                    logger.progress(1, loss=parts["loss"], lr=parts["lr"])
                else:
                    logger.progress(1, skipped=self.skipped_total + self.scale_skips_total)
                if self.step % tc.log_every == 0 or self.step == end:
                    last_loss = self.flush()
                    if last_loss is not None:
                        logger.progress(0, loss=last_loss, lr=self.optimizer.param_groups[0]["lr"])
                    n = torch.tensor(float(self.n_window))
                    sums = {k: self.strategy.all_reduce_sum(torch.tensor(v, dtype=torch.float64))
                            for k, v in sorted(self.window.items())}
                    n_all = float(self.strategy.all_reduce_sum(n))
                    if n_all > 0:
                        dt = time.perf_counter() - t0
                        record = {k: float(v) / n_all for k, v in sums.items()}
                        record["samples_per_s"] = samples_per_step * (n_all / self.info.world_size) / max(dt, 1e-9)
                        record["epoch"] = self.pos.epoch
                        record["skipped_steps"] = self.skipped_total
                        record["loss_scale_skips"] = self.scale_skips_total
                        logger.log(self.step, "train", record)
                    self.window, self.n_window, t0 = {}, 0, time.perf_counter()
                eval_due = self._eval_due(self.step)
                if eval_due or self._ckpt_due(self.step):
                    self.flush()                # host_sync=log: skipped steps counted (or the run stopped) first
                    self.save()                 # before evaluating: a failure there loses no training
                if eval_due:
                    last_val = self._evaluate(logger)
                inject_fault(self.step, self.info.rank, self.run_dir)
            batches.close()                     # the training loader's workers end before the last evaluation
            if not (self._eval_due(self.step) or self._ckpt_due(self.step)):
                self.flush()
                self.save()
            if self.evaluate_fn is not None and not self._eval_due(self.step):
                last_val = self._evaluate(logger)
        finally:
            batches.close()
            logger.close()
        return {"step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "last_val": last_val, "skipped_steps": self.skipped_total, "loss_scale_skips": self.scale_skips_total}


# ---------------------------------------------------------------------- fault injection (tests)

# ---------------------------------------------------------------------- optimizer and schedule

def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    oc = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    impl = optimizer_kwargs(cfg)  # perf.optimizer_impl: foreach / fused / one tensor at a time
    if oc.name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, weight_decay=oc.weight_decay, **impl)
    if oc.name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, **impl)
    if oc.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=oc.lr, weight_decay=oc.weight_decay, **impl)
    return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay, **impl)


def lr_factor(step: int, cfg: Config) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then cosine / constant / step / poly decay
    (poly: (1 - t/T)^power over the steps after warmup, reaching 0 at max_steps)."""
    oc, total = cfg.optim, cfg.train.max_steps
    if oc.warmup_steps and step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.scheduler == "constant":
        return 1.0
    if oc.scheduler == "step":
        return oc.step_gamma ** sum(step >= m for m in oc.step_milestones)
    t = (step - oc.warmup_steps) / max(total - oc.warmup_steps, 1)
    if oc.scheduler == "poly":
        return max(1.0 - t, 0.0) ** oc.poly_power
    return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
