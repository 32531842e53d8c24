"""The torch Dataset of the hip-ultrasound task: labelme files -> the per-sample dicts collate_samples stacks.

Per sample: decode (or take from the in-memory cache), build one matrix M = augment o letterbox (original pixels ->
input pixels, data_pipelines/batch.py convention), warp image (bilinear, pad 128/255), mask (nearest) and landmarks
with it, and render Gaussian heatmaps at the warped landmarks. Intensity augmentation is applied to the original
image before the warp, so the letterbox padding stays exactly 128/255 (the published input convention).

Reproducibility: the augmentation of sample `index` in epoch `epoch` comes from numpy's Generator seeded with
(seed, epoch, index) - the same whichever worker loads it and however many workers there are. Call `set_epoch` before
each epoch (DataLoader workers copy the dataset when an epoch's iterator starts; with persistent_workers=True, index
the dataset with (index, epoch) pairs instead).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipelines.errors import DataError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.readers.labelme import IMAGE_DECODERS, HIP_CLASS_NAMES, HIP_KPT_NAMES, HIP_LABELS, read_labelme, validate_labelme
from data_pipelines.transforms import (AffineDraw, AugmentParams, affine_from_draw, apply_flip_pairs,
                                       augment_intensity, draw_affine, letterbox_matrix, points_in_frame,
                                       sampling_grid, warp_image, warp_mask, warp_points)

log = logging.getLogger(__name__)

PAD_VALUE = 128.0 / 255.0
DEFAULT_SPACING_MM = (0.2, 0.2)
_PATIENT_VIEW = re.compile(r"^(?P<patient>.+)_(?P<view>\d+)$")
_LEADING_INT = re.compile(r"^(\d+)")


@dataclass
class Prepared:
    """A sample before the warp (HipDataset.prepare): original-frame image (C, H, W) float [0, 1] after intensity
    augmentation, mask, landmarks, the letterbox matrix, the full matrix M and the augmentation draw (None without
    augmentation); `scale` = input pixels per original pixel."""
    index: int
    orig_hw: tuple[int, int]
    image_CHW: np.ndarray
    mask_HW: np.ndarray
    kpts_px_K2: np.ndarray
    kpts_visible_K: np.ndarray
    letterbox: np.ndarray
    m: np.ndarray
    scale: float
    draw: AffineDraw | None


@dataclass
class _Decoded:
    image_CHW: np.ndarray      # uint8; 1 channel when the file is grey (warping one channel, not three)
    mask_HW: np.ndarray        # uint8
    kpts_px_K2: np.ndarray     # float32
    kpts_visible_K: np.ndarray  # bool


def _dataset_json(folder: Path, cache: dict[Path, dict]) -> dict:
    """dataset.json of a folder (written by synth_hip or by hand), {} when absent; its samples indexed by "json"."""
    if folder not in cache:
        path = folder / "dataset.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"unreadable dataset.json ({exc})")
        if not isinstance(meta, dict) or not isinstance(meta.get("samples", []), list):
            raise DataError(path, "dataset.json must be an object with a list 'samples'")
        meta["by_json"] = {row.get("json"): row for row in meta.get("samples", ())}
        cache[folder] = meta
    return cache[folder]


def _problem(exc: DataError, json_path: Path) -> str:
    """The problem as seen from the JSON file: the bare problem, or "<image>: <problem>" when the image is bad."""
    return exc.problem if exc.path == str(json_path) else str(exc)


def find_labelme_files(root: str | Path) -> list[Path]:
    """The labelme JSON files of a folder (recursively, sorted), leaving out dataset.json and split files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    return sorted(p for p in root.rglob("*.json") if p.name != "dataset.json" and not p.name.startswith("splits"))


def _hip_type_from_id(stem: str) -> str:
    """Published convention: image ids > 1000 are Graf type II."""
    found = _LEADING_INT.match(stem)
    if found is None:
        return "unknown"
    return "II" if int(found.group(1)) > 1000 else "I"


class HipDataset(Dataset):
    """labelme hip-ultrasound files -> sample dicts (see collate_samples in data_pipelines/batch.py).

    spacing_mm: mm per original pixel (x, y) for every file; None reads `spacing_mm` from dataset.json beside each
    file (falling back to 0.2 mm with a warning). Files are validated up front: with skip_bad=False the first bad file
    raises its DataError, with skip_bad=True bad files are dropped and listed in `.skipped` [(path, problem)].
    cache_decoded=True decodes every file once at construction (forked DataLoader workers share the memory).
    image_decoder: "pil" or "cv2" (OpenCV) for the torch path's decode (the DALI loader decodes with DALI).
    """

    class_names = HIP_CLASS_NAMES
    kpt_names = HIP_KPT_NAMES

    def __init__(self, json_paths: Sequence[str | Path], input_hw: tuple[int, int] = (128, 160),
                 augment: AugmentParams | None = None, sigma_px: float = 2.0, heatmap_peak: float = 255.0,
                 spacing_mm: tuple[float, float] | None = None, label_map: dict[str, Any] = HIP_LABELS,
                 skip_bad: bool = False, seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                 require_all: bool = True, strict_labels: bool = True, image_decoder: str = "pil"):
        if len(input_hw) != 2 or min(input_hw) < 2:
            raise ValueError(f"HipDataset: input_hw must be (H, W) with both >= 2, got {input_hw}")
        if sigma_px <= 0:
            raise ValueError(f"HipDataset: sigma_px must be > 0, got {sigma_px}")
        if image_decoder not in IMAGE_DECODERS:
            raise ValueError(f"HipDataset: unknown image_decoder '{image_decoder}' (choose from "
                             f"{', '.join(IMAGE_DECODERS)})")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmap_impl = float(sigma_px), float(heatmap_peak), heatmap_impl
        self.label_map, self.require_all, self.strict_labels = label_map, require_all, strict_labels
        self.seed, self.epoch, self.skip_bad = int(seed), 0, bool(skip_bad)
        self.image_decoder = image_decoder
        self.skipped: list[tuple[str, str]] = []
        self.json_paths: list[Path] = []
        self._image_paths: dict[Path, str] = {}
        bad: set[Path] = set()
        for path in map(Path, json_paths):
            if path in bad:
                continue
            try:
                if path not in self._image_paths:
                    checked = validate_labelme(path, label_map, require_all=require_all, strict_labels=strict_labels)
                    self._image_paths[path] = checked.image_path
                self.json_paths.append(path)
            except DataError as exc:
                if not skip_bad:
                    raise
                bad.add(path)
                self.skipped.append((str(path), _problem(exc, path)))
        self._cache: list[_Decoded] | None = self._decode_all(skip_bad) if cache_decoded else None
        if self.skipped:
            log.warning("HipDataset: skipped %d bad file(s):\n%s", len(self.skipped),
                        "\n".join(f"  {p}: {problem}" for p, problem in self.skipped))
        if not self.json_paths:
            raise DataError(Path(json_paths[0]).parent if len(json_paths) else ".",
                            f"no usable labelme files ({len(self.skipped)} skipped)")
        self._info = self._file_info(spacing_mm)
        render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)  # compile before fork

    # -------------------------------------------------------------------------------------------------------------
    def _decode(self, path: Path) -> _Decoded:
        rec = read_labelme(path, self.label_map, require_all=self.require_all, strict_labels=self.strict_labels,
                           decoder=self.image_decoder)
        img = rec.image_HW3
        grey = bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]))
        chw = img[None, :, :, 0] if grey else img.transpose(2, 0, 1)
        return _Decoded(np.ascontiguousarray(chw), rec.mask_HW, rec.kpts_px_K2, rec.kpts_visible_K)

    def _decode_all(self, skip_bad: bool) -> list[_Decoded]:
        """Decode each distinct file once (an oversampled list repeats paths; repeats share one decoded copy)."""
        decoded: dict[Path, _Decoded] = {}
        kept = []
        for path in self.json_paths:
            if path not in decoded:
                try:
                    decoded[path] = self._decode(path)
                except DataError as exc:      # passes verify() but fails to decode fully (e.g. bad deflate data)
                    if not skip_bad:
                        raise
                    self.skipped.append((str(path), _problem(exc, path)))
                    continue
            kept.append(path)
        self.json_paths = kept
        return [decoded[p] for p in kept]

    def _file_info(self, spacing_mm) -> list[dict[str, Any]]:
        folders: dict[Path, dict] = {}
        info, warned = [], False
        for path in self.json_paths:
            meta = _dataset_json(path.parent, folders)
            row = meta["by_json"].get(path.name, {})
            spacing = spacing_mm if spacing_mm is not None else meta.get("spacing_mm")
            if spacing is None:
                spacing, warned = DEFAULT_SPACING_MM, True
            found = _PATIENT_VIEW.match(path.stem)
            info.append({
                "id": row.get("id", path.stem),
                "patient_id": str(row.get("patient_id", found["patient"] if found else path.stem)),
                "hip_type": row.get("hip_type", _hip_type_from_id(path.stem)),
                "spacing_mm": np.asarray(spacing, dtype=np.float64).reshape(2),
            })
        if warned:
            log.warning("HipDataset: no spacing_mm given and no dataset.json beside some files; using %s mm/px",
                        DEFAULT_SPACING_MM)
        return info

    # -------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.json_paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def hip_type(self, i: int) -> str:
        return self._info[i]["hip_type"]

    def patient_id(self, i: int) -> str:
        return self._info[i]["patient_id"]

    def sample_id(self, i: int) -> str:
        return self._info[i]["id"]

    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original frame, for evaluation at original resolution: image_HW3 (uint8), mask_HW,
        kpts_px_K2, kpts_visible_K, spacing_mm_2 (mm per original pixel), id, json."""
        path = self.json_paths[i]
        dec = self._cache[i] if self._cache is not None else naming_file(path, self._decode, path)
        image = dec.image_CHW.transpose(1, 2, 0)
        return {"image_HW3": np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image, "mask_HW": dec.mask_HW,
                "kpts_px_K2": dec.kpts_px_K2, "kpts_visible_K": dec.kpts_visible_K,
                "spacing_mm_2": self._info[i]["spacing_mm"].copy(), "id": self._info[i]["id"], "json": str(path)}

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        return naming_file(self.json_paths[i], self._load, i, epoch)

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        prep = self.prepare(i, epoch)
        grid = sampling_grid(prep.m, prep.orig_hw, self.input_hw)
        image_CHW = warp_image(prep.image_CHW, prep.m, self.input_hw, pad_value=PAD_VALUE, grid=grid)
        mask_HW = warp_mask(prep.mask_HW, prep.m, self.input_hw, grid=grid)
        return self.finish(prep, image_CHW, mask_HW, warp_points(prep.kpts_px_K2, prep.m))

    def prepare(self, i: int, epoch: int) -> "Prepared":
        """Everything of sample i in epoch `epoch` before the warp: the decoded original (intensity-augmented, float
        [0, 1]), the matrix M = augment o letterbox and the draw it came from. The torch path warps with
        transforms.warp_*, the DALI path (data_pipelines/dali/hip.py) with fn.warp_affine; both then call finish()."""
        dec = self._cache[i] if self._cache is not None else self._decode(self.json_paths[i])
        orig_hw = dec.mask_HW.shape
        letterbox, m, scale, draw, rng = self.draws(i, epoch, orig_hw)
        image = dec.image_CHW.astype(np.float32) * np.float32(1.0 / 255.0)
        if rng is not None:
            image = augment_intensity(image, rng, self.augment)
        return Prepared(i, tuple(orig_hw), image, dec.mask_HW, dec.kpts_px_K2, dec.kpts_visible_K, letterbox, m,
                        float(scale), draw)

    def draws(self, i: int, epoch: int, orig_hw: tuple[int, int]):
        """(letterbox, M = augment o letterbox, input pixels per original pixel, AffineDraw or None, the Generator
        positioned after the geometric draw or None): the (seed, epoch, index) draws both loaders share."""
        letterbox = letterbox_matrix(orig_hw, self.input_hw)
        m, scale, draw, rng = letterbox, letterbox[0, 0], None, None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            a = self.augment
            draw = draw_affine(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac, a.shear_deg,
                               a.flip_p)
            m_aug = affine_from_draw(self.input_hw, draw)
            m = m_aug @ letterbox
            scale *= float(np.sqrt(abs(np.linalg.det(m_aug[:2, :2]))))
        return letterbox, m, float(scale), draw, rng

    def dali_source(self, decode: str = "auto"):
        """This dataset as a DALI loader source (data_pipelines/dali/hip.py)."""
        from data_pipelines.dali.hip import HipDaliSource
        return HipDaliSource(self, decode=decode)

    def finish(self, prep: "Prepared", image_CHW: torch.Tensor, mask_HW: torch.Tensor,
               kpts_K2: np.ndarray) -> dict[str, Any]:
        """The sample dict from the warped image (C, H', W') float, mask (H', W') int and landmarks (K, 2)."""
        if image_CHW.shape[0] == 1:
            image_CHW = image_CHW.expand(3, -1, -1).contiguous()     # grey replicated to RGB (SEEDS.md §1 input)
        return {"image_CHW": image_CHW, "mask_HW": torch.as_tensor(mask_HW).to(torch.int64),
                **self.finish_targets(prep, kpts_K2)}

    def finish_targets(self, prep: "Prepared", kpts_K2: np.ndarray) -> dict[str, Any]:
        """Everything of the sample dict but image and mask, from the warped landmarks (K, 2)."""
        i = prep.index
        kpts = np.asarray(kpts_K2, dtype=np.float64)
        visible = prep.kpts_visible_K & points_in_frame(kpts, self.input_hw)
        flipped = prep.draw is not None and prep.draw.flipped
        if flipped and self.augment.flip_pairs:
            kpts, visible = apply_flip_pairs(kpts, visible, self.augment.flip_pairs)
        kpts = kpts.astype(np.float32)      # out-of-frame points keep their coordinates; visible says False
        heatmap = render_heatmaps(kpts, visible, self.input_hw, self.sigma_px, self.heatmap_peak,
                                  impl=self.heatmap_impl)
        info = self._info[i]
        return {
            "kpts_px_K2": torch.from_numpy(kpts),
            "kpts_visible_K": torch.from_numpy(visible),
            **heatmap_item(heatmap),
            # mm per input pixel: exact for the letterbox and for a similarity augmentation of isotropic spacing
            "spacing_mm_2": torch.from_numpy((info["spacing_mm"] / prep.scale).astype(np.float32)),
            "meta": {"index": i, "id": info["id"], "json": str(self.json_paths[i]),
                     "image": self._image_paths[self.json_paths[i]], "patient_id": info["patient_id"],
                     "hip_type": info["hip_type"], "orig_hw": prep.orig_hw, "to_input_3x3": prep.m.tolist(),
                     "flipped": flipped},
        }
