"""The one torch Dataset of MedPose: records of any reader -> the per-sample dicts `collate_samples` stacks.

Per sample (index i, epoch e):
  decode   the record's image (data_pipelines/images.py: "auto" keeps colour, grey stays one channel; "grey" luma) and
           mask (polygons rasterised with the pixel-centre rule, RLE, or a PNG of class ids), checked against the
           record's size - or take both from the in-memory cache (`cache_decoded`), which with `Preprocess.preresize`
           holds an area-downscaled working copy near the input scale (large images: decode and shrink once);
  values   uint8 -> [0, 1] (histogram-equalised first when `Preprocess.equalize`); z-scored MRI slabs stay float;
  augment  one numpy Generator seeded with (seed, e, i) draws the geometric augmentation (transforms.draw_affine) and
           then the intensity augmentation (transforms.augment_intensity, on the original before the warp so the
           padding keeps its exact value; z-scored slabs are augmented on a [0, 1] copy and z-scored again) - the same
           whichever worker loads the sample and however many workers there are;
  warp     one matrix M = augment o (letterbox | stretch) maps original pixels to input pixels (batch.py convention)
           and moves the image (bilinear, padded with `pad_value`), the mask (nearest) and the landmarks;
  targets  visibility = labelled and inside the input frame; a flip swaps the DataInfo's flip pairs; a point-order
           rule (data_pipelines/point_order.py) is re-imposed; Gaussian heatmaps at the warped points (numba, or none
           when the loss renders them on the device); spacing in mm per input pixel (NaN when unknown);
  network  grey replicated to 3 channels when the network takes 3, optionally ImageNet-normalised.

The DALI loader (data_pipelines/dali/source.py) runs the same draws and finish step around DALI's decode and warps.
`original(i)` gives the sample in its original frame for evaluation at original resolution and for figures.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_pipelines.errors import DataError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.images import (area_resize, decode_pixels, display_uint8, equalize_hist, grey_to_rgb,
                                   open_image, zscore)
from data_pipelines.masks import rasterize_polygons, rle_decode
from data_pipelines.point_order import POINT_ORDER_RULES
from data_pipelines.records import DataInfo, MaskSource, Preprocess, Record, check_record_points
from data_pipelines.transforms import (AffineDraw, AugmentParams, affine_from_draw, apply_flip_pairs,
                                       augment_intensity, draw_affine, letterbox_matrix, points_in_frame,
                                       sampling_grid, warp_image, warp_mask, warp_points)

log = logging.getLogger("medpose")

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------------- matrices
def stretch_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Plain resize, aspect not kept: x' = (x + 0.5) W'/W - 0.5, y' = (y + 0.5) H'/H - 0.5."""
    (h, w), (dh, dw) = src_hw, dst_hw
    sx, sy = dw / w, dh / h
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def input_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int], resize: str) -> np.ndarray:
    """Original -> input pixels before augmentation: letterbox (aspect kept, centred, padded) or stretch."""
    if resize == "stretch":
        return stretch_matrix(src_hw, dst_hw)
    if resize == "letterbox":
        return letterbox_matrix(src_hw, dst_hw)
    raise ValueError(f"data_pipelines/dataset.py: resize must be letterbox or stretch, got {resize!r}")


def input_spacing_mm(spacing_mm_2: np.ndarray | None, m: np.ndarray) -> np.ndarray:
    """mm per input pixel (x, y): the original-frame length, in mm, of one input-pixel step along each input axis
    (columns of the inverse linear part scaled by the original spacing; exact for stretch, letterbox and any
    similarity of isotropic spacing). NaN when the spacing is unknown."""
    if spacing_mm_2 is None:
        return np.full(2, np.nan)
    inv = np.linalg.inv(np.asarray(m, dtype=np.float64)[:2, :2])
    return np.hypot(inv[0] * spacing_mm_2[0], inv[1] * spacing_mm_2[1])


def network_input(image_CHW: torch.Tensor, channels: int, normalize: str) -> torch.Tensor:
    """(..., C, H, W) unit image -> the network input: grey replicated when the network takes 3 channels, then
    ImageNet mean/std when asked (on the image's device: the DALI loader calls this on its batch)."""
    out = image_CHW
    if channels == 3 and out.shape[-3] == 1:
        out = out.expand(*out.shape[:-3], 3, *out.shape[-2:])
    out = out.contiguous()
    if normalize == "imagenet":
        dev = out.device
        return (out - _IMAGENET_MEAN.to(dev)) / _IMAGENET_STD.to(dev)
    return out


def decode_mask(mask: MaskSource, hw: tuple[int, int], where: str) -> np.ndarray:
    """uint8 (H, W) class ids of a record's mask source (records.MaskSource)."""
    if mask.pixels is not None:
        out = np.asarray(mask.pixels, dtype=np.uint8)
    elif mask.path is not None:
        out = _read_mask_png(mask.path, mask.max_class)
    else:
        out = rasterize_polygons(list(mask.polygons), hw)
        for rle in mask.rles:
            out[rle_decode(rle)] = 1
    if out.shape != tuple(hw):
        raise DataError(mask.path or where, f"mask is {out.shape[1]}x{out.shape[0]} (W x H) but the image is "
                                            f"{hw[1]}x{hw[0]}")
    return out


def _read_mask_png(path: str, max_class: int) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(path, "mask not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im)
    except Exception as exc:       # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise DataError(path, f"mask does not decode ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 2:
        raise DataError(path, f"mask must be single-channel, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > max_class):
        raise DataError(path, f"mask values must lie in 0..{max_class}, found {np.unique(arr)[:8].tolist()}")
    return arr.astype(np.uint8, copy=False)


# The working copy keeps this much more resolution than the input scale: augmentation zooms in by up to
# scale_range[1] (1.1 by default) and a rotation samples along diagonals, so the warp still reads the working copy at
# or below its own pixel pitch (one size for every split, so train / val / test share one cache).
PRERESIZE_MARGIN = 1.25


def working_hw(orig_hw: tuple[int, int], pre: Preprocess) -> tuple[int, int]:
    """Size of the pre-resized working copy: PRERESIZE_MARGIN times the input scale, never upscaled."""
    h, w = orig_hw
    ih, iw = pre.input_hw
    s = max(ih / h, iw / w) if pre.resize == "stretch" else min(ih / h, iw / w)
    s = min(1.0, s * PRERESIZE_MARGIN)
    return max(2, int(round(h * s))), max(2, int(round(w * s)))


# ------------------------------------------------------------------------------------------------------ dataset
class LandmarkDataset(Dataset):
    """Records -> sample dicts (module docstring; the contract of data_pipelines/build.py and batch.py).

    records: the samples (repeats allowed, e.g. an oversampled training list; repeats share one decoded copy).
    info / pre: the dataset's DataInfo and Preprocess (data_pipelines/records.py). augment: geometric + intensity
    augmentation (None or disabled: none); its flip_pairs default to info.flip_pairs. heatmaps: render Gaussian
    targets in the loader (impl "none": the loss renders them on the device). skip_bad: the DALI loader drops a file
    that stops decoding during the run (counted in `skipped`); here files were validated by the reader up front.
    """

    epoch_in_index = True   # an index may be (i, epoch): a loader that spans epochs (data_pipelines/loaders.py)

    def __init__(self, records: Sequence[Record], info: DataInfo, pre: Preprocess,
                 augment: AugmentParams | None = None, sigma_px: float = 2.0, heatmap_peak: float = 255.0,
                 heatmap_impl: str = "numba", heatmaps: bool = True, seed: int = 0, cache_decoded: bool = False,
                 skip_bad: bool = False, skipped: Sequence[tuple[str, str]] = (), where: str = ""):
        if not records:
            raise DataError(where or ".", "no usable samples")
        if sigma_px <= 0:
            raise ValueError(f"LandmarkDataset: sigma_px must be > 0, got {sigma_px}")
        check_record_points(records, info.num_keypoints, "LandmarkDataset")
        self.records, self.info, self.pre = list(records), info, pre
        self.input_hw = tuple(int(n) for n in pre.input_hw)
        if augment is not None and augment.enabled and not augment.flip_pairs and info.flip_pairs:
            augment = AugmentParams(**{**vars(augment), "flip_pairs": info.flip_pairs})
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmap_impl = float(sigma_px), float(heatmap_peak), heatmap_impl
        self.heatmaps = bool(heatmaps)
        self.seed, self.epoch, self.skip_bad = int(seed), 0, bool(skip_bad)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.where = where
        self._order_rule = POINT_ORDER_RULES[info.point_order] if info.point_order else None
        self._cache: dict[str, tuple] | None = None
        if cache_decoded:
            self._cache = {}
            for rec in self.records:
                if rec.id not in self._cache:
                    self._cache[rec.id] = self._working(rec)
        if self.heatmaps:
            render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)  # compile pre-fork

    # ------------------------------------------------------------------------------------------- the contract
    kpt_names = property(lambda self: tuple(self.info.kpt_names))
    class_names = property(lambda self: None if self.info.class_names is None else tuple(self.info.class_names))
    flip_pairs = property(lambda self: tuple(self.info.flip_pairs))

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_id(self, i: int) -> str:
        return self.records[i].id

    def group_id(self, i: int) -> str:
        return self.records[i].patient_id or self.records[i].id

    def stratum(self, i: int):
        return self.records[i].stratum

    # ------------------------------------------------------------------------------------------------ decoding
    def decode(self, rec: Record) -> tuple[np.ndarray, np.ndarray | None]:
        """(image (C, H, W) uint8 or float32 z-scored, mask (H, W) uint8 or None) in the original frame."""
        src = rec.image
        if src.pixels is not None:
            image = src.pixels
        else:
            color = "grey" if self.pre.channels == 1 else self.pre.color
            try:
                image = decode_pixels(src.encoded(), color, self.pre.decoder, None, rec.where)
            except DataError as exc:
                if not rec.entry:                # one annotation file per image: the image is named
                    raise
                raise DataError(rec.where, f"{rec.entry}: image file {src.name} does not decode ({exc.problem})"
                                ) from exc
        if tuple(image.shape[-2:]) != tuple(rec.hw):
            raise DataError(src.name or rec.where, f"image is {image.shape[-1]}x{image.shape[-2]} now, "
                                                   f"{rec.hw[1]}x{rec.hw[0]} when validated")
        if self.pre.channels == 1 and image.shape[0] == 3:
            raise DataError(src.name or rec.where, "a colour image where the network takes 1 channel")
        mask = decode_mask(rec.mask, rec.hw, rec.where) if rec.mask is not None else None
        return image, mask

    def _working(self, rec: Record) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(image, mask, P): the decoded sample, area-downscaled to the working size when Preprocess.preresize, and
        P the original -> working matrix (identity without pre-resizing)."""
        image, mask = naming_file(rec.where, self.decode, rec)
        if not self.pre.preresize:
            return image, mask, np.eye(3)
        hw = working_hw(rec.hw, self.pre)
        if hw == tuple(rec.hw):
            return image, mask, np.eye(3)
        p = stretch_matrix(rec.hw, hw)
        small = area_resize(image, hw)
        if mask is not None:
            mask = warp_mask(mask, p, hw).numpy().astype(np.uint8)
        return small, mask, p

    def working(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        rec = self.records[i]
        if self._cache is not None:
            return self._cache[rec.id]
        return self._working(rec)

    def unit_image(self, image: np.ndarray, rec: Record) -> np.ndarray:
        """float32 (C, H, W): uint8 / 255 (equalised first when asked), or the z-scored slab as it is."""
        if self.pre.values == "zscore":
            return np.asarray(image, dtype=np.float32)
        if self.pre.equalize:
            image = np.stack([equalize_hist(c) for c in image])
        return image.astype(np.float32) * np.float32(1.0 / 255.0)

    def augment_values(self, image: np.ndarray, rng: np.random.Generator, rec: Record) -> np.ndarray:
        if self.pre.values == "zscore":            # augment a [0, 1] copy, z-score again (z-scored slabs vary)
            lo, hi = float(image.min()), float(image.max())
            unit = ((image - lo) / (hi - lo)).astype(np.float32)
            return zscore(augment_intensity(unit[0], rng, self.augment), rec.image.name or rec.where)[None]
        return augment_intensity(image, rng, self.augment)

    # ----------------------------------------------------------------------------------------------- original
    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original frame: image_HW3 (uint8 for figures), kpts_px_K2, kpts_visible_K, spacing_mm_2
        (mm per original pixel, NaN when unknown), id, patient_id, optional mask_HW, the record's extras and meta."""
        rec = self.records[i]
        if self._cache is not None and not self.pre.preresize:
            image, mask, _ = self._cache[rec.id]
        else:
            image, mask = naming_file(rec.where, self.decode, rec)
        if self.pre.values == "zscore":
            hw3 = np.repeat(display_uint8(image[0])[..., None], 3, axis=2)
        else:
            hw3 = grey_to_rgb(image[0]) if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
        spacing = rec.spacing_mm if rec.spacing_mm is not None else np.full(2, np.nan)
        out = {"image_HW3": hw3, "kpts_px_K2": rec.kpts_px_K2.copy(), "kpts_visible_K": rec.kpts_visible_K.copy(),
               "spacing_mm_2": np.asarray(spacing, dtype=np.float64).copy(), "id": rec.id,
               "patient_id": self.group_id(i), "image": rec.image.name, **rec.meta, **rec.extras}
        if mask is not None:
            out["mask_HW"] = mask
        return out

    # ------------------------------------------------------------------------------------------------- samples
    def draws(self, i: int, epoch: int, orig_hw: tuple[int, int] | None = None):
        """(pre-augmentation matrix, M = augment o pre, AffineDraw or None, the Generator positioned after the
        geometric draw or None): the (seed, epoch, index) draws both loaders share (the intensity draw comes next)."""
        pre = input_matrix(tuple(orig_hw or self.records[i].hw), self.input_hw, self.pre.resize)
        m, draw, rng = pre, None, None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            a = self.augment
            draw = draw_affine(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac, a.shear_deg,
                               a.flip_p)
            m = affine_from_draw(self.input_hw, draw) @ pre
        return pre, m, draw, rng

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        rec = self.records[i]
        return naming_file(rec.where, self._load, i, epoch, prefix=f"{rec.entry}: " if rec.entry else "")

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        rec = self.records[i]
        image, mask, p = self.working(i)
        _, m, draw, rng = self.draws(i, epoch)
        x = self.unit_image(image, rec)
        if rng is not None:
            x = self.augment_values(x, rng, rec)
        m_work = m @ np.linalg.inv(p)                     # working copy -> input (p = identity without preresize)
        grid = sampling_grid(m_work, tuple(x.shape[-2:]), self.input_hw)
        x_CHW = warp_image(x, m_work, self.input_hw, pad_value=self.pre.pad_value, grid=grid)
        out = {"image_CHW": network_input(x_CHW, self.pre.channels, self.pre.normalize),
               **self.finish_targets(i, m, draw, warp_points(rec.kpts_px_K2, m))}
        if mask is not None:
            out["mask_HW"] = warp_mask(mask, m_work, self.input_hw, grid=grid)
        return out

    def finish_targets(self, i: int, m: np.ndarray, draw: AffineDraw | None, kpts_K2: np.ndarray) -> dict[str, Any]:
        """Everything of the sample dict but image and mask, from the warped landmarks (K, 2) (both loaders)."""
        rec = self.records[i]
        kpts = np.asarray(kpts_K2, dtype=np.float64)
        visible = rec.kpts_visible_K & points_in_frame(kpts, self.input_hw)
        flipped = draw is not None and draw.flipped
        if flipped and self.augment.flip_pairs:
            kpts, visible = apply_flip_pairs(kpts, visible, self.augment.flip_pairs)
        if self._order_rule is not None:
            kpts, visible = self._order_rule(kpts, visible)
        kpts = kpts.astype(np.float32)          # out-of-frame points keep their coordinates; visible says False
        sample = {"kpts_px_K2": torch.from_numpy(kpts), "kpts_visible_K": torch.from_numpy(np.ascontiguousarray(visible)),
                  "spacing_mm_2": torch.from_numpy(input_spacing_mm(rec.spacing_mm, m).astype(np.float32)),
                  "meta": {"index": i, "id": rec.id, "patient_id": self.group_id(i), "image": rec.image.name,
                           "where": rec.where, "split": rec.split, "orig_hw": tuple(rec.hw),
                           "to_input_3x3": m.tolist(), "flipped": flipped, **rec.meta}}
        if self.heatmaps:
            sample.update(heatmap_item(render_heatmaps(kpts, visible, self.input_hw, self.sigma_px,
                                                       self.heatmap_peak, impl=self.heatmap_impl)))
        return sample

    def keypoints_original(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample's points in its original frame: (N, K, 2) float32 pixels, (N, K) visibility (no decode)."""
        return (np.stack([r.kpts_px_K2 for r in self.records]).astype(np.float32),
                np.stack([r.kpts_visible_K for r in self.records]))


def subset_by_ids(ds: LandmarkDataset, ids: Sequence[str], augment: AugmentParams | None, **overrides: Any
                  ) -> LandmarkDataset:
    """A dataset over the records with these ids (repeats allowed), sharing ds's settings and decoded cache."""
    by_id = {r.id: r for r in ds.records}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"subset_by_ids: no sample {unknown[0]!r}")
    kw = dict(sigma_px=ds.sigma_px, heatmap_peak=ds.heatmap_peak, heatmap_impl=ds.heatmap_impl, heatmaps=ds.heatmaps,
              seed=ds.seed, skip_bad=ds.skip_bad, where=ds.where)
    kw.update(overrides)
    out = LandmarkDataset([by_id[i] for i in ids], ds.info, ds.pre, augment, **kw)
    if ds._cache is not None and out._cache is None:
        out._cache = {i: ds._cache[i] for i in dict.fromkeys(ids)}
    return out
