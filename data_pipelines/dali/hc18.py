"""The HC18 fetal-head reader on the DALI loader (data_pipelines/dali/pipeline.py).

Host work per sample: the image file's bytes (decode="dali", not decoded; its header is checked against
annotations.csv as read_image does) or its decoded grey pixels (decode="host"), the head mask (decoded and checked
once per file by read_mask, then kept bit-packed in this process: masks are 0/1, so 1 bit a pixel), and the
(seed, epoch, index) draws of HC18Dataset.draws - the torch path's own, followed by transforms.draw_intensity, the
draw HC18Dataset's augment_intensity makes - so a sample is augmented alike by both loaders. DALI decodes grey
(channels 1), applies the intensity draw, warps image (linear, pad 128/255), mask (nearest) and landmarks with
M = augment o letterbox; `finish` replicates grey to 3 channels (the torch path's expand) on the batch's device and
HC18Dataset.finish_targets makes flip swaps, the README axis order, visibility, heatmaps, spacing and meta.

decode="auto" lets DALI decode when nothing is cached and every image is an 8-bit grey PNG, JPEG or BMP (checked
from the headers once); otherwise (an RGB export, which the torch path converts with PIL's luma) the host decodes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.dali.pipeline import DaliItem, choose_decode
from data_pipelines.dali.xray import encoded_hw
from data_pipelines.errors import DataError, naming_file
from data_pipelines.hc18 import PAD_VALUE, HC18Dataset, read_image, read_mask
from data_pipelines.transforms import draw_intensity

GREY = frozenset({"L"})


class HC18DaliSource:
    """HC18Dataset -> DaliSource (see dali_pipeline.DaliSource)."""

    channels = 1
    has_mask = True
    pad_value = PAD_VALUE

    def __init__(self, dataset: HC18Dataset, decode: str = "auto"):
        self.ds = dataset
        self.input_hw = dataset.input_hw
        self.intensity = dataset.augment is not None
        self.skip_bad, self.skipped = dataset.skip_bad, dataset.skipped
        self._masks: dict[str, np.ndarray] = {}            # stem -> np.packbits of the 0/1 mask
        self.decode = choose_decode(decode, "HC18DaliSource", self.ds._cache is not None,
                                    dict.fromkeys(str(rec.image_path) for rec in self.ds.records), GREY)

    def _mask(self, i: int) -> np.ndarray:
        rec = self.ds.records[i]
        if self.ds._cache is not None:
            return self.ds._cache[rec.stem][1]
        if rec.stem not in self._masks:
            self._masks[rec.stem] = np.packbits(read_mask(rec), axis=None)
        n = rec.height * rec.width
        return np.unpackbits(self._masks[rec.stem], count=n).reshape(rec.height, rec.width)

    def item(self, i: int, epoch: int) -> DaliItem:
        return naming_file(self.ds.records[i].image_path, self._item, i, epoch)

    def _item(self, i: int, epoch: int) -> DaliItem:
        ds, rec = self.ds, self.ds.records[i]
        orig_hw = (rec.height, rec.width)
        if self.decode == "dali":
            data = np.fromfile(rec.image_path, dtype=np.uint8)
            hw = encoded_hw(data)
            if hw is not None and hw != orig_hw:
                raise DataError(rec.image_path, f"image is {hw[1]}x{hw[0]} (W x H) but annotations.csv row "
                                                f"{rec.row} says {rec.width}x{rec.height}")
        else:
            image = ds._cache[rec.stem][0] if ds._cache is not None else read_image(rec)
            data = image[..., None]                                  # uint8 (H, W, 1)
        mask = self._mask(i)
        letterbox, m, scale, draw, rng = ds.draws(i, epoch, orig_hw)
        inten = draw_intensity(rng, ds.augment) if rng is not None else None
        kpts = np.asarray(rec.kpts_px_42, dtype=np.float32)
        return DaliItem(i, str(rec.image_path), data, mask, kpts, letterbox, draw, inten, (orig_hw, m, scale, draw))

    def check(self, i: int) -> str | None:
        try:
            read_image(self.ds.records[i])
        except DataError as exc:
            return exc.problem
        return None

    def finish(self, items: Sequence[DaliItem], kpts_BK2: np.ndarray, image_BCHW: torch.Tensor,
               mask_BHW: torch.Tensor | None) -> Batch:
        parts = [dict(self.ds.finish_targets(it.index, *it.ctx, kpts_BK2[k]), image_CHW=torch.zeros(0))
                 for k, it in enumerate(items)]
        batch = collate_samples(parts)
        batch.image_BCHW = image_BCHW.expand(-1, 3, -1, -1).contiguous()
        batch.mask_BHW = mask_BHW
        return batch
