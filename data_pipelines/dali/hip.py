"""The hip-ultrasound (labelme) reader on the DALI loader (data_pipelines/dali/pipeline.py).

Host work per sample is small: the image file's bytes (read, not decoded), the annotation (JSON parsed and the
polygons rasterised once per file, then cached in this process: one uint8 mask per file), and the (seed, epoch,
index) draws of HipDataset.draws - the torch path's own, so a sample is augmented alike by both loaders. DALI decodes
(on the GPU for JPEG with device_id set), applies the intensity draw, warps image / mask / landmarks and returns CHW;
HipDataset.finish_targets makes visibility, flip swaps, spacing and meta as the torch path does.

decode="auto" lets DALI decode when every image is PNG, JPEG or BMP in 8-bit grey or RGB (checked from the headers
once); otherwise (16-bit, palette, alpha, embedded formats DALI may read differently) or with cache_decoded=True the
host decodes (the torch path's decoder) and DALI does the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.dali.pipeline import DaliBatches, DaliItem, choose_decode
from data_pipelines.errors import DataError, naming_file
from data_pipelines.hip_dataset import PAD_VALUE, HipDataset, Prepared
from data_pipelines.readers.labelme import _load_json, _parse_shapes, rasterize_polygons, read_labelme
from data_pipelines.sampler import ShardedSampler
from data_pipelines.transforms import draw_intensity


DALI_MODES = frozenset({"L", "RGB"})


class HipDaliSource:
    """HipDataset -> DaliSource (see dali_pipeline.DaliSource)."""

    channels = 3
    has_mask = True
    pad_value = PAD_VALUE

    def __init__(self, dataset: HipDataset, decode: str = "auto"):
        self.ds = dataset
        self.input_hw = dataset.input_hw
        self.intensity = dataset.augment is not None
        self.skip_bad, self.skipped = dataset.skip_bad, dataset.skipped
        self._ann: dict[Path, tuple] = {}
        self.decode = choose_decode(decode, "HipDaliSource", dataset._cache is not None,
                                    (self._annotation(p)[3] for p in dict.fromkeys(dataset.json_paths)), DALI_MODES)

    def _annotation(self, path: Path) -> tuple:
        """(mask uint8, landmarks, visibility, image source) of one labelme file, parsed once."""
        if path not in self._ann:
            ds = self.ds
            parsed = _parse_shapes(_load_json(path), path, ds.label_map, ds.require_all, ds.strict_labels)
            mask = rasterize_polygons(parsed.polygons, parsed.hw)
            self._ann[path] = (mask, parsed.kpts_px_K2, parsed.kpts_visible_K, parsed.image_source)
        return self._ann[path]

    def _name(self, i: int) -> str:
        return self.ds._image_paths[self.ds.json_paths[i]]

    def item(self, i: int, epoch: int) -> DaliItem:
        return naming_file(self.ds.json_paths[i], self._item, i, epoch)

    def _item(self, i: int, epoch: int) -> DaliItem:
        ds, path = self.ds, self.ds.json_paths[i]
        if self.decode == "dali":
            mask, kpts, vis, source = self._annotation(path)
            data = (np.fromfile(source, dtype=np.uint8) if isinstance(source, str)
                    else np.frombuffer(source, dtype=np.uint8))
        else:
            dec = ds._cache[i] if ds._cache is not None else ds._decode(path)
            mask, kpts, vis = dec.mask_HW, dec.kpts_px_K2, dec.kpts_visible_K
            chw = dec.image_CHW if dec.image_CHW.shape[0] == 3 else np.repeat(dec.image_CHW, 3, axis=0)
            data = np.ascontiguousarray(chw.transpose(1, 2, 0))
        orig_hw = tuple(mask.shape)
        letterbox, m, scale, draw, rng = ds.draws(i, epoch, orig_hw)
        inten = draw_intensity(rng, ds.augment) if rng is not None else None
        prep = Prepared(i, orig_hw, None, mask, kpts, vis, letterbox, m, scale, draw)
        return DaliItem(i, f"{self._name(i)} (annotation {path})", data, mask, kpts, letterbox, draw, inten, prep)

    def check(self, i: int) -> str | None:
        ds = self.ds
        try:
            read_labelme(ds.json_paths[i], ds.label_map, require_all=ds.require_all, strict_labels=ds.strict_labels)
        except DataError as exc:
            return exc.problem
        return None

    def finish(self, items: Sequence[DaliItem], kpts_BK2: np.ndarray, image_BCHW: torch.Tensor,
               mask_BHW: torch.Tensor | None) -> Batch:
        parts = [dict(self.ds.finish_targets(it.ctx, kpts_BK2[k]), image_CHW=torch.zeros(0))
                 for k, it in enumerate(items)]
        batch = collate_samples(parts)
        batch.image_BCHW, batch.mask_BHW = image_BCHW, mask_BHW
        return batch


def DaliHipBatches(dataset: HipDataset, batch_size: int, sampler: ShardedSampler, device_id: int | None = None,
                   num_threads: int | None = None, decode: str = "auto") -> DaliBatches:
    """Batches of a HipDataset made by DALI (kept name of the first stage's class)."""
    return DaliBatches(HipDaliSource(dataset, decode), batch_size, sampler, device_id=device_id,
                       num_threads=num_threads)
