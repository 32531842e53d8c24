"""Batches of the hip-ultrasound dataset with the geometric warps done by DALI (issue 5, first stage).

Per batch: the dataset prepares each sample exactly as its torch path does (HipDataset.prepare: decode, the
(seed, epoch, index) draws, intensity augmentation on the original), DALI builds each sample's matrix from the draw
with fn.transforms.* and warps image (linear), mask (nearest) and landmarks (fn.coord_transform) in one pipeline
(data_pipelines/dali_affine.py), and HipDataset.finish makes the same sample dicts, collated into the same Batch. No
heatmaps are rendered here: the DALI path is meant for data.targets=device (the loss renders them on the GPU).

Sharding is the torch path's: a ShardedSampler over global ranks (shard_id = rank, num_shards = world_size), so
training drops the same incomplete tail on every rank and evaluation (drop_last=False) sees every sample exactly
once; the last evaluation batch may be smaller (DALI's external source takes a batch up to the pipeline's size).

Not yet in DALI (issue 5's later stages): decoding (the labelme reader decodes), intensity augmentation (numpy, on
the original image, as the torch path), the GPU (`device_id` is passed through, the graph is device-agnostic but has
only run on the CPU so far).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .batch import Batch, collate_samples
from .dali_affine import DaliWarper
from .errors import naming_file
from .hip_dataset import PAD_VALUE, HipDataset
from .sampler import ShardedSampler
from .transforms import AffineDraw

IDENTITY_DRAW = AffineDraw(False, 0.0, 1.0, 0.0, 0.0, 0.0)


class DaliHipBatches:
    """Iterable of Batch for one rank: `sampler` chooses and shards the indices, DALI warps each batch."""

    def __init__(self, dataset: HipDataset, batch_size: int, sampler: ShardedSampler, device_id: int | None = None,
                 num_threads: int = 1):
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler
        self.epoch = 0
        self.warper = DaliWarper(dataset.input_hw, self.batch_size, pad_value=PAD_VALUE, from_draws=True,
                                 device_id=device_id, num_threads=num_threads, seed=sampler.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def __iter__(self) -> Iterator[Batch]:
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            if len(chunk) < self.batch_size and self.sampler.drop_last:
                return
            yield self._batch(chunk)

    def _batch(self, chunk: list[int]) -> Batch:
        ds = self.dataset
        preps = [naming_file(ds.json_paths[i], ds.prepare, i, self.epoch) for i in chunk]
        images, masks, points, _ = self.warper.run(
            [p.image_CHW.transpose(1, 2, 0) for p in preps], [p.mask_HW for p in preps],
            [p.kpts_px_K2 for p in preps], [p.letterbox for p in preps],
            draws=[p.draw or IDENTITY_DRAW for p in preps], frame_hw=ds.input_hw)
        samples = [ds.finish(p, torch.from_numpy(np.ascontiguousarray(images[k].transpose(2, 0, 1))),
                             torch.from_numpy(masks[k]), points[k].astype(np.float64))
                   for k, p in enumerate(preps)]
        return collate_samples(samples)
