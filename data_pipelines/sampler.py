"""Deterministic sharded sampling with a resumable position.

The permutation of an epoch is a pure function of (seed, epoch); rank r of W takes every W-th index of it (shards use
the **global** rank). Training drops the tail that does not divide evenly (every rank sees the same number of batches,
so DDP's collectives line up); evaluation keeps every sample exactly once (ranks may differ by one sample; metrics are
reduced from sums and counts, so that is harmless).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, batch_size: int = 1):
        if num_samples <= 0:
            raise ValueError("ShardedSampler: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} outside world size {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last, self.batch_size = shuffle, seed, drop_last, batch_size
        self.epoch = 0
        self.start = 0
        if drop_last and self.shard_size() < batch_size:
            raise ValueError(f"ShardedSampler: {num_samples} samples over {world_size} ranks give fewer than one "
                             f"batch of {batch_size} per rank")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first `start` indices of this rank's shard (resume mid-epoch without loading them)."""
        self.start = start

    def shard_size(self) -> int:
        if self.drop_last:
            per_rank = self.num_samples // self.world_size
            return per_rank - per_rank % self.batch_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def batches_per_epoch(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            order = order[: self.shard_size() * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return max(self.shard_size() - self.start, 0)
