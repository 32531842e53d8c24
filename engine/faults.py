"""Fault-injection hooks for the fault-tolerance tests (issue 6). Without their environment variables they do
nothing; with them, one rank SIGKILLs itself at a chosen point, once per run directory:

  MEDPOSE_FAULT_KILL_AT_STEP=N   right after optimizer step N (after that step's checkpoint, if one was due);
  MEDPOSE_FAULT_KILL_IN_SAVE=N   inside the save of step N's checkpoint, when the rank's share of it is on disk
                                 (its temp file, or its DeepSpeed shards) but the checkpoint is not yet published
                                 (no rename, no `latest` update);
  MEDPOSE_FAULT_KILL_IN_EVAL=N   inside the evaluation of step N (its checkpoint is written, its figures are not);
  MEDPOSE_FAULT_RANK=r           the rank that dies (default 0).

MEDPOSE_TRACE_SAMPLES=1 makes every rank append the dataset indices of each micro-batch it takes to
`samples_rank<r>.jsonl` in the run directory (the resume tests check that every sample of an epoch is used once).

A marker file `.fault_injected_<phase><N>_rank<r>` is written in the run directory first, so the worker group that
`torchrun --max-restarts` starts again (same environment) resumes and runs past the fault point.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from .logger import LOG

FAULT_STEP_ENV, FAULT_SAVE_ENV, FAULT_RANK_ENV = ("MEDPOSE_FAULT_KILL_AT_STEP", "MEDPOSE_FAULT_KILL_IN_SAVE",
                                                  "MEDPOSE_FAULT_RANK")
FAULT_EVAL_ENV, TRACE_ENV = "MEDPOSE_FAULT_KILL_IN_EVAL", "MEDPOSE_TRACE_SAMPLES"
PHASES = {"step": (FAULT_STEP_ENV, "after step"), "save": (FAULT_SAVE_ENV, "while saving the checkpoint of step"),
          "eval": (FAULT_EVAL_ENV, "while evaluating step")}


def inject_fault(step: int, rank: int, run_dir: str | Path, phase: str = "step") -> None:
    """SIGKILL this process when the phase's variable names `step` and MEDPOSE_FAULT_RANK names `rank`."""
    env, words = PHASES[phase]
    at = os.environ.get(env)
    if not at:
        return
    try:
        at_step, at_rank = int(at), int(os.environ.get(FAULT_RANK_ENV, "0"))
    except ValueError:
        raise ValueError(f"environment: {env}={at!r} / {FAULT_RANK_ENV}="
                         f"{os.environ.get(FAULT_RANK_ENV)!r} must be integers") from None
    if at_step != step or at_rank != rank:
        return
    marker = Path(run_dir) / f".fault_injected_{phase}{step}_rank{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"SIGKILL {words} {step} on rank {rank} (pid {os.getpid()})\n")
    LOG.warning("%s=%s: rank %d kills itself %s %d", env, at, rank, words, step)
    for h in LOG.handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save_fault_hook(path: str | Path, client_state: dict, rank: int):
    """The in-save hook of a checkpoint written to `path` (run_dir/checkpoints/NAME): a no-argument callable."""
    run_dir = Path(path).parent.parent
    step = int(client_state.get("step", -1))
    return lambda: inject_fault(step, rank, run_dir, "save")


def trace_samples(run_dir: str | Path, rank: int, step: int, epoch: int, meta: list[dict]) -> None:
    """With MEDPOSE_TRACE_SAMPLES set: one line {step, epoch, index} per micro-batch in samples_rank<r>.jsonl;
    `step` is the optimizer step the micro-batch belongs to (1-based)."""
    if not os.environ.get(TRACE_ENV):
        return
    with open(Path(run_dir) / f"samples_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step + 1, "epoch": epoch, "index": [m.get("index") for m in meta]}) + "\n")
