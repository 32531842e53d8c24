"""The hip X-ray (CSV) reader on the DALI loader (data_pipelines/dali/pipeline.py).

Host work per sample: the image file's bytes (decode="dali") or its grey pixels, histogram-equalised when the
dataset equalises (decode="host"), and the (seed, epoch, index) draws of XrayDataset.draws - the torch path's own,
so a sample is augmented alike by both loaders. DALI decodes grey (channels 1), applies the intensity draw
(transforms.draw_intensity, the draw XrayDataset's augment_intensity makes), warps image and landmarks with
M = augment o resize (stretch or letterbox, pad 0 = black) and returns (B, 1, H, W); `finish` replicates grey to
3 channels and applies the dataset's normalisation (network_input) on the batch's device, and
XrayDataset.finish_targets makes visibility, flip swaps, spacing and meta as the torch path does. No masks.

Equalisation (published: on) is OpenCV's equalizeHist on the 8-bit original, which DALI has no exact equivalent of:
the host then decodes (the torch path's read_grey) and equalises; the result is uint8, so handing it to DALI as
uint8 pixels is lossless. decode="auto" lets DALI decode only when equalisation is off, nothing is cached, and every
image is an 8-bit grey PNG, JPEG or BMP (checked from the headers once); 16-bit and colour images are decoded by
the host (read_grey's 16-bit scaling and luma conversion are the reference).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.dali.pipeline import DaliItem, choose_decode
from data_pipelines.errors import DataError, naming_file
from data_pipelines.transforms import draw_intensity
from data_pipelines.readers.xray_csv import equalize_hist
from data_pipelines.xray_dataset import PAD_VALUE, XrayDataset, network_input

GREY = frozenset({"L"})


def encoded_hw(data: np.ndarray) -> tuple[int, int] | None:
    """(H, W) from an encoded image's header (no decode), None when the header does not parse."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return int(img.size[1]), int(img.size[0])
    except (OSError, ValueError, SyntaxError):  # unreadable header: check() names the file when DALI fails on it
        return None


class XrayDaliSource:
    """XrayDataset -> DaliSource (see dali_pipeline.DaliSource)."""

    channels = 1
    has_mask = False
    pad_value = PAD_VALUE

    def __init__(self, dataset: XrayDataset, decode: str = "auto"):
        if decode == "dali" and dataset.equalize:
            raise ValueError("XrayDaliSource: decode='dali' cannot apply the histogram equalisation this dataset "
                             "uses (data.reader_args.equalize=true); use decode='host' or 'auto'")
        self.ds = dataset
        self.input_hw = dataset.input_hw
        self.intensity = dataset.augment is not None
        self.skip_bad, self.skipped = dataset.skip_bad, dataset.skipped
        self.decode = choose_decode(decode, "XrayDaliSource", self.ds.equalize or self.ds._cache is not None,
                                    dict.fromkeys(str(rec.image_path) for rec in self.ds.records), GREY)

    def item(self, i: int, epoch: int) -> DaliItem:
        return naming_file(self.ds.records[i].csv_path, self._item, i, epoch)

    def _item(self, i: int, epoch: int) -> DaliItem:
        ds, rec = self.ds, self.ds.records[i]
        if self.decode == "dali":
            data = np.fromfile(rec.image_path, dtype=np.uint8)
            hw = encoded_hw(data)
            if hw is not None and hw != tuple(rec.hw):
                raise DataError(rec.image_path, f"image is {hw[1]}x{hw[0]} now, {rec.hw[1]}x{rec.hw[0]} when "
                                                f"validated")
        else:
            grey = ds._grey(i)
            data = (equalize_hist(grey) if ds.equalize else grey)[..., None]     # uint8 (H, W, 1): lossless
        pre, m, draw, rng = ds.draws(i, epoch)
        inten = draw_intensity(rng, ds.augment) if rng is not None else None
        kpts = np.asarray(rec.kpts_px_K2, dtype=np.float32)
        return DaliItem(i, str(rec.image_path), data, None, kpts, pre, draw, inten, (m, draw))

    def check(self, i: int) -> str | None:
        try:
            self.ds._decode(self.ds.records[i])
        except DataError as exc:
            return exc.problem
        return None

    def finish(self, items: Sequence[DaliItem], kpts_BK2: np.ndarray, image_BCHW: torch.Tensor,
               mask_BHW: torch.Tensor | None) -> Batch:
        parts = [dict(self.ds.finish_targets(it.index, it.ctx[0], it.ctx[1], kpts_BK2[k]), image_CHW=torch.zeros(0))
                 for k, it in enumerate(items)]
        batch = collate_samples(parts)
        batch.image_BCHW = network_input(image_BCHW, self.ds.normalize)
        return batch
