"""The batch source behind data.loader: `torch` (a DataLoader over the dataset, the reference path) or `dali` (DALI
warps, data_pipelines/dali_hip.py; the labelme hip reader so far, CPU-only pipelines so far, targets rendered on the
device). Both follow the same ShardedSampler, so sharding, epochs and mid-epoch resume are the same."""
from __future__ import annotations

from typing import Callable, Iterable

from torch.utils.data import DataLoader, Dataset

from .batch import Batch, collate_samples
from .sampler import ShardedSampler

LOADER_KINDS = ("torch", "dali")


def dali_supports(dataset: Dataset) -> bool:
    """DALI batches need the dataset's prepare / finish stages (HipDataset has them)."""
    return callable(getattr(dataset, "prepare", None)) and callable(getattr(dataset, "finish", None))


def make_batches(dataset: Dataset, batch_size: int, sampler: ShardedSampler, kind: str = "torch",
                 num_workers: int = 0, pin_memory: bool = False,
                 worker_init_fn: Callable[[int], None] | None = None) -> Iterable[Batch]:
    """An iterable of Batch over this rank's shard. Training samplers drop the incomplete tail (drop_last), the
    evaluation sampler keeps it as a smaller last batch."""
    if kind == "torch":
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=collate_samples, drop_last=sampler.drop_last, pin_memory=pin_memory,
                          worker_init_fn=worker_init_fn, persistent_workers=False)
    if kind == "dali":
        if not dali_supports(dataset):
            raise ValueError(f"data.loader=dali: the {type(dataset).__name__} reader has no DALI path yet (the "
                             f"labelme hip reader has); use data.loader=torch")
        from .dali_hip import DaliHipBatches
        return DaliHipBatches(dataset, batch_size, sampler)
    raise ValueError(f"data.loader: unknown loader '{kind}' (choose from {LOADER_KINDS})")
