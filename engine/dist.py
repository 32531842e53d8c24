"""Who am I in the job: read once from the environment (torchrun, the deepspeed launcher, SLURM)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    source: str = "none"
    """Which launcher's variables were found: torchrun | slurm | none."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment: {key}={env[key]!r} is not an integer") from None


def read_dist_info(env: Mapping[str, str] | None = None, use_cuda: bool | None = None) -> DistInfo:
    """torchrun / deepspeed set RANK, LOCAL_RANK, WORLD_SIZE; under `srun` without torchrun SLURM_PROCID,
    SLURM_LOCALID and SLURM_NTASKS say the same. torchrun's variables win when both are present
    (srun + torchrun: SLURM describes the node task, torchrun the worker)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        source = "slurm"
    else:
        rank, world, local, source = 0, 1, 0, "none"
    if not (0 <= rank < world):
        raise ValueError(f"environment: rank {rank} outside world size {world} ({source})")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device, source=source)
