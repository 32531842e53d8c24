"""The batch source behind data.loader: `torch` (a DataLoader over the dataset, the reference path) or `dali` (the
DALI pipeline, data_pipelines/dali/pipeline.py: decode, intensity augmentation and warps in DALI, on the GPU given a
device_id, heatmap targets rendered on the device by the loss). Both follow the same ShardedSampler, so sharding,
epochs and mid-epoch resume are the same. `auto` (resolve_loader) means dali on a CUDA device with DALI installed and
a reader that has a DALI source, else torch."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from torch.utils.data import DataLoader, Dataset

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.sampler import EpochSpan, ShardedSampler

LOADER_KINDS = ("torch", "dali")


def dali_supports(dataset: Dataset) -> bool:
    """DALI batches are made for the engine's LandmarkDataset of image files (data_pipelines/dali/source.py), not for
    other datasets nor for z-scored MRI slabs."""
    from data_pipelines.dataset import LandmarkDataset
    return isinstance(dataset, LandmarkDataset) and dataset.pre.values == "uint8"


def dali_installed() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def resolve_loader(kind: str, device: str, dataset: Dataset | None = None) -> str:
    """data.loader=auto -> dali when training on CUDA with DALI installed (and the reader has a DALI source), else
    torch; torch and dali are returned as they are."""
    if kind in LOADER_KINDS:
        return kind
    if kind != "auto":
        raise ValueError(f"data.loader: unknown loader '{kind}' (choose from auto, {', '.join(LOADER_KINDS)})")
    cuda = str(device).startswith("cuda")
    ok = cuda and dali_installed() and (dataset is None or dali_supports(dataset))
    return "dali" if ok else "torch"


def make_batches(dataset: Dataset, batch_size: int, sampler: ShardedSampler, kind: str = "torch",
                 num_workers: int = 0, pin_memory: bool = False,
                 worker_init_fn: Callable[[int], None] | None = None, device_id: int | None = None,
                 num_threads: int | None = None) -> Iterable[Batch]:
    """An iterable of Batch over this rank's shard. Training samplers drop the incomplete tail (drop_last), the
    evaluation sampler keeps it as a smaller last batch. device_id (dali): the CUDA device of this rank (its local
    rank) or None for a CPU-only DALI pipeline; num_threads (dali): DALI's CPU threads."""
    if kind == "torch":
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=collate_samples, drop_last=sampler.drop_last, pin_memory=pin_memory,
                          worker_init_fn=worker_init_fn, persistent_workers=False)
    if kind == "dali":
        if not dali_supports(dataset):
            raise ValueError(f"data.loader=dali: the {type(dataset).__name__} reader has no DALI path (every "
                             f"reader's dataset has, but NIfTI's z-scored slabs); use data.loader=torch")
        from data_pipelines.dali.pipeline import DaliBatches
        from data_pipelines.dali.source import RecordDaliSource
        # One DALI loader per dataset and setting, kept across epochs (the engine asks for a loader every epoch):
        # its pipeline, decode choice and annotation cache are built once; the sampler is this call's.
        kept = dataset.__dict__.setdefault("_dali_loaders", {})
        key = (int(batch_size), device_id, num_threads)
        if key not in kept:
            kept[key] = DaliBatches(RecordDaliSource(dataset), batch_size, sampler, device_id=device_id,
                                    num_threads=num_threads)
        loader = kept[key]
        loader.sampler = sampler
        return loader
    raise ValueError(f"data.loader: unknown loader '{kind}' (choose from {LOADER_KINDS})")


def training_batches(dataset: Dataset, batch_size: int, sampler: ShardedSampler, epoch: int, start: int,
                     kind: str = "torch", num_workers: int = 0, spanning: bool | None = None,
                     **loader_args) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) of this rank's training batches from `start` samples into `epoch` on, without end.

    With the torch loader over a dataset that reads the epoch from its index (`epoch_in_index`, LandmarkDataset), one
    DataLoader spans every epoch (EpochSpan): its workers start once and keep prefetching across epoch boundaries.
    Otherwise (DALI, other datasets, or spanning=False) a loader is made per epoch over the sampler set to it, as
    the engine did before: every worker restarts at each epoch. Both give the same batches in the same order (the
    augmentations are drawn from (seed, epoch, index)). `sampler` is left at the last epoch begun."""
    if spanning is None:
        spanning = kind == "torch" and bool(getattr(dataset, "epoch_in_index", False))
    if spanning:
        loader = make_batches(dataset, batch_size, EpochSpan(sampler, epoch, start), kind, num_workers, **loader_args)
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        left = sampler.batches_per_epoch()
        for batch in loader:
            while left == 0:            # the previous epoch is used up: this batch opens the next one
                epoch += 1
                sampler.set_epoch(epoch)
                sampler.set_start(0)
                left = sampler.batches_per_epoch()
            left -= 1
            yield epoch, batch
        return
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = make_batches(dataset, batch_size, sampler, kind, num_workers, **loader_args)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch, start = epoch + 1, 0
