"""Every reader on the DALI loader: one source for data_pipelines/dataset.LandmarkDataset (dali/pipeline.py).

Host work per sample is small: the image file's bytes (decode="dali": read, not decoded; the header is checked
against the record's size) or the dataset's own decoded pixels (decode="host"), the mask (decoded once per record,
then kept in this process: bit-packed when it is 0/1), and the (seed, epoch, index) draws of LandmarkDataset.draws
followed by transforms.draw_intensity - the torch path's own draws, so a sample is augmented alike by both loaders.
DALI decodes (on the GPU for JPEG with a device_id), applies the intensity draw, warps image (linear, the
Preprocess's pad value), mask (nearest) and landmarks with M = augment o (letterbox | stretch); `finish` makes the
network input (grey replicated, normalised) on the batch's device and LandmarkDataset.finish_targets makes
visibility, flip swaps, point-order rules, spacing and meta exactly as the torch path does.

decode="auto" lets DALI decode only when the host has nothing to do first - no histogram equalisation, no decoded
cache, no pre-resized working copy, no z-scored float slab - and every image is an 8-bit PNG, JPEG or BMP in a mode
DALI decodes like PIL (checked from the headers once); otherwise (16-bit, palette, alpha, embedded, MRI) the host
decodes with the torch path's decoder and DALI does the rest. Images are decoded grey (1 channel) when the network
takes one channel or every image is grey, else RGB (grey files replicated, as the torch path's "auto" colour rule
does before the network input).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from data_pipelines.batch import Batch, collate_samples
from data_pipelines.dali.pipeline import DaliItem, choose_decode, image_header
from data_pipelines.dataset import LandmarkDataset, decode_mask, network_input
from data_pipelines.errors import DataError, naming_file
from data_pipelines.images import equalize_hist
from data_pipelines.transforms import draw_intensity, warp_points

GREY_MODES = frozenset({"L"})
COLOUR_MODES = frozenset({"L", "RGB"})


def encoded_hw(data: np.ndarray) -> tuple[int, int] | None:
    """(H, W) from an encoded image's header (no decode), None when the header does not parse."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return int(img.size[1]), int(img.size[0])
    except (OSError, ValueError, SyntaxError):  # unreadable header: check() names the file when DALI fails on it
        return None


class RecordDaliSource:
    """LandmarkDataset -> DaliSource (see dali/pipeline.DaliSource)."""

    def __init__(self, dataset: LandmarkDataset, decode: str = "auto"):
        ds, pre = dataset, dataset.pre
        if pre.values != "uint8" and decode == "dali":
            raise ValueError("RecordDaliSource: decode='dali' cannot read z-scored float slabs; use 'host' or 'auto'")
        if pre.equalize and decode == "dali":
            raise ValueError("RecordDaliSource: decode='dali' cannot apply the histogram equalisation this dataset "
                             "uses (data.reader_args.equalize=true); use decode='host' or 'auto'")
        self.ds = ds
        self.input_hw = ds.input_hw
        self.pad_value = pre.pad_value
        self.has_mask = ds.info.class_names is not None and any(r.mask is not None for r in ds.records)
        self.intensity = ds.augment is not None and pre.values == "uint8"
        self.skip_bad, self.skipped = ds.skip_bad, ds.skipped
        self._masks: dict[str, tuple[np.ndarray, bool]] = {}
        sources = [r.image.encoded() for r in {r.id: r for r in ds.records}.values()]
        host_only = (ds._cache is not None or pre.equalize or pre.preresize or pre.values != "uint8"
                     or any(s is None for s in sources))
        modes = {image_header(s)[1] for s in sources} if not host_only and decode != "host" else set()
        grey = pre.channels == 1 or (bool(modes) and modes <= GREY_MODES)
        self.channels = 1 if grey else 3
        self.decode = choose_decode(decode, "RecordDaliSource", host_only, sources,
                                    GREY_MODES if self.channels == 1 else COLOUR_MODES)
        if self.decode == "host" and not modes:
            self.channels = 1 if pre.channels == 1 or self._host_grey() else 3

    def _host_grey(self) -> bool:
        """Whether every working image the host would hand over is grey (one channel)."""
        first = {r.id: i for i, r in enumerate(self.ds.records)}
        return all(self.ds.working(i)[0].shape[0] == 1 for i in list(first.values())[:16])

    def _mask(self, i: int, mask: np.ndarray | None = None) -> np.ndarray | None:
        rec = self.ds.records[i]
        if not self.has_mask:
            return None
        if mask is not None:
            return mask
        if rec.id not in self._masks:
            m = decode_mask(rec.mask, rec.hw, rec.where)
            binary = m.size == 0 or int(m.max()) <= 1
            self._masks[rec.id] = (np.packbits(m, axis=None) if binary else m, binary)
        data, binary = self._masks[rec.id]
        return np.unpackbits(data, count=rec.hw[0] * rec.hw[1]).reshape(rec.hw) if binary else data

    def item(self, i: int, epoch: int) -> DaliItem:
        return naming_file(self.ds.records[i].where, self._item, i, epoch)

    def _item(self, i: int, epoch: int) -> DaliItem:
        ds, rec = self.ds, self.ds.records[i]
        pre_m, m, draw, rng = ds.draws(i, epoch)
        p = np.eye(3)
        if self.decode == "dali":
            src = rec.image.encoded()
            data = np.fromfile(src, dtype=np.uint8) if isinstance(src, str) else np.frombuffer(src, dtype=np.uint8)
            hw = encoded_hw(data)
            if hw is not None and hw != tuple(rec.hw):
                raise DataError(rec.image.name or rec.where, f"image is {hw[1]}x{hw[0]} now, {rec.hw[1]}x"
                                                             f"{rec.hw[0]} when validated")
            mask = self._mask(i)
        else:
            image, mask_w, p = ds.working(i)
            if ds.pre.equalize:
                image = np.stack([equalize_hist(c) for c in image])
            if image.shape[0] != self.channels:
                image = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:1]
            data = np.ascontiguousarray(image.transpose(1, 2, 0))                    # uint8 (H, W, C): lossless
            mask = self._mask(i, mask_w) if self.has_mask else None
        inten = draw_intensity(rng, ds.augment) if rng is not None and self.intensity else None
        kpts = warp_points(rec.kpts_px_K2, p).astype(np.float32)       # into the working frame the pixels are in
        pre_work = pre_m @ np.linalg.inv(p)
        return DaliItem(i, rec.image.name or rec.where, data, mask, kpts, pre_work, draw, inten, (m, draw))

    def check(self, i: int) -> str | None:
        try:
            self.ds.decode(self.ds.records[i])
        except DataError as exc:
            return exc.problem
        return None

    def finish(self, items: Sequence[DaliItem], kpts_BK2: np.ndarray, image_BCHW: torch.Tensor,
               mask_BHW: torch.Tensor | None) -> Batch:
        parts = [dict(self.ds.finish_targets(it.index, it.ctx[0], it.ctx[1], kpts_BK2[k]), image_CHW=torch.zeros(0))
                 for k, it in enumerate(items)]
        batch = collate_samples(parts)
        batch.image_BCHW = network_input(image_BCHW, self.ds.pre.channels, self.ds.pre.normalize)
        batch.mask_BHW = mask_BHW
        return batch


def dali_batches(dataset: LandmarkDataset, batch_size: int, sampler, device_id: int | None = None,
                 num_threads: int | None = None, decode: str = "auto"):
    """Batches of any LandmarkDataset made by DALI (dali/pipeline.DaliBatches over this module's source)."""
    from data_pipelines.dali.pipeline import DaliBatches
    return DaliBatches(RecordDaliSource(dataset, decode), batch_size, sampler, device_id=device_id,
                       num_threads=num_threads)
