"""Deterministic sharded sampling with a resumable position.

The permutation of an epoch is a pure function of (seed, epoch); rank r of W takes every W-th index of it (shards use
the **global** rank). Training drops the tail that does not divide evenly (every rank sees the same number of batches,
so DDP's collectives line up); evaluation keeps every sample exactly once (ranks may differ by one sample; metrics are
reduced from sums and counts, so that is harmless).

The position inside an epoch is global: `start` = samples of the permutation already consumed by all ranks together.
After c batches of b on each of W ranks the consumed samples are exactly the permutation's first c*b*W (rank r took
positions r, r+W, ...), so a run resumed with another world size W' shards the rest, `order[start:]`, over its W'
ranks and every sample of the epoch is still used once (`global_offset`).
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
        """Skip the first `start` samples of this epoch's permutation, consumed by all ranks together (resume
        mid-epoch, possibly with another world size, without loading them). 0 = the epoch's beginning."""
        if start < 0:
            raise ValueError(f"ShardedSampler: start {start} < 0")
        self.start = int(start)

    def _remaining(self) -> int:
        return max(self.num_samples - self.start, 0)

    def shard_size(self) -> int:
        """This rank's number of samples from `start` to the end of the epoch."""
        n = self._remaining()
        if self.drop_last:
            per_rank = n // self.world_size
            return per_rank - per_rank % self.batch_size
        return len(range(self.rank, n, self.world_size))

    def batches_per_epoch(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> list[int]:
        """The epoch's whole permutation (every rank, from its beginning)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(self.num_samples, generator=g).tolist()
        return list(range(self.num_samples))

    def shard(self) -> list[int]:
        """This rank's indices from `start` on: every W-th of the permutation's rest, whole batches when training."""
        rest = self.order()[self.start:]
        if self.drop_last:
            rest = rest[: self.shard_size() * self.world_size]
        return rest[self.rank::self.world_size]

    def global_offset(self, batches_taken: int) -> int:
        """The epoch position (samples of the permutation consumed by all ranks) after every rank took
        `batches_taken` batches since `start`."""
        return self.start + batches_taken * self.batch_size * self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard())

    def __len__(self) -> int:
        return self.shard_size()


class EpochSpan(Sampler[tuple[int, int]]):
    """`(index, epoch)` pairs of consecutive training epochs, from `start` of `epoch` on, without end: each epoch is
    the ShardedSampler's shard for that epoch (whole batches), so one DataLoader runs across epoch boundaries and
    keeps its workers and their prefetched batches (a new loader per epoch restarts every worker; with a small
    dataset and many workers that start-up dominated training). The dataset reads the epoch from the pair
    (LandmarkDataset: index_and_epoch), so workers made once draw each epoch's augmentations."""

    def __init__(self, base: ShardedSampler, epoch: int, start: int = 0):
        if not base.drop_last:
            raise ValueError("EpochSpan: epochs follow one another only in whole batches (a drop_last sampler)")
        self.base, self.epoch, self.start = base, int(epoch), int(start)
        self.drop_last = True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.base
        s = ShardedSampler(b.num_samples, b.rank, b.world_size, b.shuffle, b.seed, True, b.batch_size)
        epoch, start = self.epoch, self.start
        while True:
            s.set_epoch(epoch)
            s.set_start(start)
            for i in s.shard():
                yield i, epoch
            epoch, start = epoch + 1, 0
