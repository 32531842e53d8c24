"""The disc-labelling task's data (SEEDS.md §3): NIfTI volumes + point-label volumes -> 2-D sagittal samples.

Per volume (data_pipelines/readers/nifti.py): reorient to RAS, average `slab` sagittal slices around the labels, z-score;
rows run superior -> inferior and columns anterior -> posterior. Per sample: one matrix M = augment o letterbox
(original 2-D pixels -> input pixels) warps the image (bilinear, padded with 0 = the z-scored mean) and the disc
points, and Gaussian heatmaps (one channel per disc, sigma_px in input pixels, peak `heatmap_peak`: 1.0 for this
task, "max-normalised to [0, 1]") are rendered at the warped points.

Input channels: 1 by default - the hourglass is built with in_channels=1 for this task; `channels: 3` replicates
the grey image for networks that want RGB. Augmentation: the published code only flips horizontally (anterior <->
posterior; a sagittal view has no left/right landmark pairs to swap); the rotation / scale / translation and the
intensity changes of AugmentParams are applied to a [0, 1] min-max copy, which is z-scored again afterwards.
The spacing of the input frame is the original spacing / the letterbox scale (exact for the letterbox and for a
similarity augmentation, per axis).

Groups: a subject (the BIDS `sub-<label>` entity of the file name, else the file itself) is never split.
Reproducibility: the augmentation of sample `index` in epoch `epoch` comes from numpy's Generator seeded with
(seed, epoch, index).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipelines.errors import DataError, OptionError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.readers.nifti import OUT_OF_RANGE_MODES, SagittalSample, display_uint8, load_sagittal, zscore
from data_pipelines.synthetic.spine import generate_spine_dataset
from data_pipelines.task_data import augment_params, loader_heatmap_impl, reader_options, record_splits, splits_of
from data_pipelines.transforms import (AugmentParams, augment_intensity, letterbox_matrix, points_in_frame, random_affine_matrix,
                         sampling_grid, warp_image, warp_points)

log = logging.getLogger("medpose")

DEFAULTS: dict[str, Any] = {"image_glob": "**/*_T2w.nii.gz", "label_suffix": "_labels-disc", "slab": 6,
                            "first_label": 1, "num_keypoints": 11, "channels": 1, "out_of_range": "error"}
PAD_VALUE = 0.0                      # the mean of a z-scored image
SYNTH_SLICES = 16                    # left-right slices of a generated phantom
_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)")
_NII = re.compile(r"\.nii(\.gz)?$")


def label_path_for(image_path: str | Path, label_suffix: str) -> Path:
    """<stem><label_suffix>.nii.gz beside the image (same extension as the image)."""
    image_path = Path(image_path)
    ext = _NII.search(image_path.name)
    stem, suffix = (image_path.name[:ext.start()], ext.group(0)) if ext else (image_path.stem, ".nii.gz")
    return image_path.with_name(f"{stem}{label_suffix}{suffix}")


def _stem(path: Path) -> str:
    return _NII.sub("", path.name)


class SpineDataset(Dataset):
    """NIfTI volumes (+ point-label volumes beside them) -> sample dicts for collate_samples.

    Every volume is decoded once up front (the only way to validate a NIfTI file): with skip_bad=False the first
    bad file raises its DataError, with skip_bad=True bad files are listed in `.skipped` [(path, problem)].
    cache_decoded keeps the decoded 2-D slabs (small: one image per volume) for later samples; otherwise each
    sample reads its volume again. require_labels=False accepts volumes without a label file (no visible points).
    """

    class_names = None

    def __init__(self, image_paths: Sequence[str | Path], input_hw: tuple[int, int] = (256, 256),
                 augment: AugmentParams | None = None, sigma_px: float = 2.24, heatmap_peak: float = 1.0,
                 slab: int = 6, first_label: int = 1, num_keypoints: int = 11, channels: int = 1,
                 out_of_range: str = "error", label_suffix: str = "_labels-disc", skip_bad: bool = False,
                 seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = True,
                 require_labels: bool = True, _shared: dict | None = None):
        if len(input_hw) != 2 or min(input_hw) < 2:
            raise ValueError(f"SpineDataset: input_hw must be (H, W) with both >= 2, got {input_hw}")
        if sigma_px <= 0 or channels not in (1, 3) or num_keypoints < 1 or slab < 1:
            raise ValueError(f"SpineDataset: need sigma_px > 0, channels 1 or 3, num_keypoints >= 1, slab >= 1; "
                             f"got {sigma_px}, {channels}, {num_keypoints}, {slab}")
        if out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(f"SpineDataset: out_of_range must be one of {OUT_OF_RANGE_MODES}, got {out_of_range!r}")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmap_impl = float(sigma_px), float(heatmap_peak), heatmap_impl
        self.read_args = dict(slab=int(slab), first_label=int(first_label), num_keypoints=int(num_keypoints),
                              out_of_range=out_of_range)
        self.channels, self.label_suffix, self.require_labels = int(channels), label_suffix, require_labels
        self.cache_decoded = bool(cache_decoded)
        self.seed, self.epoch = int(seed), 0
        self.kpt_names = [f"disc{first_label + k}" for k in range(num_keypoints)]
        self.skipped: list[tuple[str, str]] = []
        if _shared is not None:          # a split of an already validated dataset (see subset)
            self.image_paths, self._cache, self._info = _shared["paths"], _shared["cache"], _shared["info"]
        else:
            self._validate([Path(p) for p in image_paths], skip_bad)
        render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)  # compile before fork

    # -------------------------------------------------------------------------------------------------------------
    def _label_path(self, image_path: Path) -> Path | None:
        label = label_path_for(image_path, self.label_suffix)
        if label.is_file():
            return label
        if self.require_labels:
            raise DataError(label, f"label volume not found (expected beside {image_path.name})")
        return None

    def _decode(self, image_path: Path) -> SagittalSample:
        return load_sagittal(image_path, self._label_path(image_path), **self.read_args)

    def _validate(self, paths: list[Path], skip_bad: bool) -> None:
        self.image_paths: list[Path] = []
        self._cache: dict[Path, SagittalSample] = {}
        for path in dict.fromkeys(paths):            # each distinct file once, in order
            try:
                sample = self._decode(path)
            except DataError as exc:
                if not skip_bad:
                    raise
                self.skipped.append((exc.path or str(path), exc.problem))
                continue
            self.image_paths.append(path)
            if self.cache_decoded:
                self._cache[path] = sample
        if self.skipped:
            log.warning("SpineDataset: skipped %d bad volume(s):\n%s", len(self.skipped),
                        "\n".join(f"  {p}: {problem}" for p, problem in self.skipped))
        if not self.image_paths:
            raise DataError(paths[0].parent if paths else ".", f"no usable volumes ({len(self.skipped)} skipped)")
        stems = [_stem(p) for p in self.image_paths]
        if len(set(stems)) < len(stems):   # the same file name in two folders: ids from the paths instead
            stems = [str(p.with_name(s)) for p, s in zip(self.image_paths, stems)]
        self._info = [{"id": s, "subject": (m.group(1) if (m := _SUBJECT.match(s.rsplit("/", 1)[-1])) else s)}
                      for s in stems]

    def subset(self, ids: Sequence[str], augment: AugmentParams | None) -> "SpineDataset":
        """A dataset over the samples with these ids (repeats allowed), sharing this one's validation and cache."""
        index = {info["id"]: i for i, info in enumerate(self._info)}
        rows = [index[i] for i in ids]
        shared = {"paths": [self.image_paths[r] for r in rows], "cache": self._cache,
                  "info": [self._info[r] for r in rows]}
        return SpineDataset((), self.input_hw, augment, self.sigma_px, self.heatmap_peak, channels=self.channels,
                            label_suffix=self.label_suffix, seed=self.seed, heatmap_impl=self.heatmap_impl,
                            cache_decoded=self.cache_decoded, require_labels=self.require_labels, _shared=shared,
                            **self.read_args)

    def _sample(self, i: int) -> SagittalSample:
        path = self.image_paths[i]
        if path in self._cache:
            return self._cache[path]
        return self._decode(path)

    # -------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_id(self, i: int) -> str:
        return self._info[i]["id"]

    def group_id(self, i: int) -> str:
        return self._info[i]["subject"]

    def stratum(self, i: int) -> None:
        return None

    def keypoints_original(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample's disc points in its original 2-D frame: (N, K, 2) float32 pixels, (N, K) visibility."""
        samples = [self._sample(i) for i in range(len(self))]
        return (np.stack([s.kpts_px_K2 for s in samples]).astype(np.float32),
                np.stack([s.kpts_visible_K for s in samples]))

    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original 2-D frame: image_HW3 (uint8 display of the slab), kpts_px_K2, kpts_visible_K,
        spacing_mm_2 (mm per pixel: x = A-P, y = S-I), id, volume (path), labels (path or None), lateral_mm_K."""
        s = self._sample(i)
        return {"image_HW3": np.repeat(display_uint8(s.image_HW)[..., None], 3, axis=2),
                "kpts_px_K2": s.kpts_px_K2.copy(), "kpts_visible_K": s.kpts_visible_K.copy(),
                "spacing_mm_2": s.spacing_mm_2.astype(np.float64), "id": self._info[i]["id"], "volume": s.path,
                "labels": s.label_path, "lateral_mm_K": s.lateral_mm_K.copy(), "slab_range": s.slab_range}

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        return naming_file(self.image_paths[i], self._load, i, epoch)

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        s = self._sample(i)
        image, m, flipped = self._augmented(s, i, epoch)
        image_CHW, kpts, visible = warp_input(image, s.kpts_px_K2, s.kpts_visible_K, m, self.input_hw, self.channels)
        heatmap = render_heatmaps(kpts, visible, self.input_hw, self.sigma_px, self.heatmap_peak,
                                  impl=self.heatmap_impl)
        scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        return {
            "image_CHW": image_CHW,
            "kpts_px_K2": torch.from_numpy(kpts),
            "kpts_visible_K": torch.from_numpy(visible),
            **heatmap_item(heatmap),
            "spacing_mm_2": torch.from_numpy((s.spacing_mm_2 / scale).astype(np.float32)),
            "meta": {"index": i, "id": self._info[i]["id"], "subject": self._info[i]["subject"], "volume": s.path,
                     "orig_hw": tuple(s.image_HW.shape), "to_input_3x3": m.tolist(), "flipped": flipped},
        }

    def _augmented(self, s: SagittalSample, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(image, original -> input matrix, flipped): the letterbox, composed with the sample's random affine."""
        m = letterbox_matrix(s.image_HW.shape, self.input_hw)
        if self.augment is None:
            return s.image_HW, m, False
        rng = np.random.default_rng([self.seed, epoch, i])
        a = self.augment
        m_aug, flipped = random_affine_matrix(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac,
                                              a.shear_deg, a.flip_p)
        lo, hi = float(s.image_HW.min()), float(s.image_HW.max())
        unit = (s.image_HW - lo) / (hi - lo)                   # z-scored images are never constant (nifti.zscore)
        image = zscore(augment_intensity(unit.astype(np.float32), rng, a), s.path)
        return image, m_aug @ m, flipped


def warp_input(image_HW: np.ndarray, kpts_K2: np.ndarray, visible_K: np.ndarray, m: np.ndarray,
               input_hw: tuple[int, int], channels: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The network input (channels x H x W, padded with PAD_VALUE) and the points in its frame; points that leave
    the frame keep their coordinates and become invisible."""
    grid = sampling_grid(m, image_HW.shape, input_hw)
    image_CHW = warp_image(image_HW[None], m, input_hw, pad_value=PAD_VALUE, grid=grid)
    if channels == 3:
        image_CHW = image_CHW.expand(3, -1, -1).contiguous()
    kpts = warp_points(kpts_K2, m)
    visible = np.asarray(visible_K, dtype=bool) & points_in_frame(kpts, input_hw)
    return image_CHW, kpts.astype(np.float32), visible


# ------------------------------------------------------------------------------------------------------ builder
def nifti_options(data_cfg) -> dict[str, Any]:
    """data.reader_args merged over DEFAULTS, with the values checked (OptionError names the option)."""
    opts = reader_options(getattr(data_cfg, "reader_args", None) or {}, DEFAULTS, "nifti")
    checks = {"slab": opts["slab"] >= 1, "num_keypoints": opts["num_keypoints"] >= 1,
              "channels": opts["channels"] in (1, 3), "out_of_range": opts["out_of_range"] in OUT_OF_RANGE_MODES,
              "image_glob": bool(opts["image_glob"]), "label_suffix": bool(opts["label_suffix"])}
    for name, ok in checks.items():
        if not ok:
            raise OptionError(f"data.reader_args.{name}: bad value {opts[name]!r} for data.format=nifti "
                              f"(slab, num_keypoints >= 1; channels 1 or 3; out_of_range one of {OUT_OF_RANGE_MODES})")
    return opts


def find_volumes(root: str | Path, opts: dict[str, Any]) -> list[Path]:
    """Image volumes under root matching image_glob (sorted), leaving out label volumes."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(opts["image_glob"]) if p.is_file() and opts["label_suffix"] not in p.name)


def ensure_volumes(data_cfg, strategy, opts: dict[str, Any]) -> list[Path]:
    """The volumes under data.root; rank 0 generates the phantom first when asked and none are there."""
    root = Path(data_cfg.root)
    files = find_volumes(root, opts)
    if not files:
        if not data_cfg.synthetic:
            raise DataError(root, f"no volumes matching {opts['image_glob']} (and data.synthetic=false)")
        if strategy.info.is_main:
            log.info("generating %d phantom spine volumes into %s", data_cfg.synth_n, root)
            generate_spine_dataset(root, data_cfg.synth_n, seed=data_cfg.synth_seed,
                                   shape=(SYNTH_SLICES, *data_cfg.synth_image_hw), num_discs=opts["num_keypoints"],
                                   first_value=opts["first_label"], progress=True)
        strategy.barrier()
        files = find_volumes(root, opts)
        if not files:
            raise DataError(root, f"the generated volumes do not match image_glob {opts['image_glob']}")
    return files


def build_nifti_data(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
    """The reader contract of data_pipelines/task_data.py for NIfTI volumes with point-label volumes."""
    opts = nifti_options(data_cfg)
    files = ensure_volumes(data_cfg, strategy, opts)
    probe = SpineDataset(files, input_hw=tuple(data_cfg.input_hw), sigma_px=data_cfg.sigma_px,
                         heatmap_peak=data_cfg.heatmap_peak, slab=opts["slab"], first_label=opts["first_label"],
                         num_keypoints=opts["num_keypoints"], channels=opts["channels"],
                         out_of_range=opts["out_of_range"], label_suffix=opts["label_suffix"],
                         skip_bad=data_cfg.skip_bad, seed=seed, cache_decoded=data_cfg.cache_decoded,
                         heatmap_impl=loader_heatmap_impl(data_cfg))
    splits = splits_of(probe, data_cfg, seed)
    record_splits(run_dir, strategy, splits, probe.skipped)
    augment = augment_params(data_cfg, flip_pairs=())     # a sagittal view has no left/right landmark pairs
    out = {"train": probe.subset(splits["train_oversampled"], augment), "val": probe.subset(splits["val"], None),
           "test": probe.subset(splits["test"], None), "splits": splits, "num_classes": 0, "class_names": None,
           "kpt_names": list(probe.kpt_names), "skipped": list(probe.skipped)}
    log.info("data: %d train, %d val, %d test volumes, %d skipped", len(out["train"]), len(out["val"]),
             len(out["test"]), len(probe.skipped))
    return out


def load_for_predict(path: str | Path, data_cfg) -> dict[str, Any]:
    """One volume for `medpose predict`: the display image, the network input (as for evaluation samples), the
    matrix, spacing and - when the label volume exists beside it - the truth."""
    opts = nifti_options(data_cfg)
    path = Path(path)
    label = label_path_for(path, opts["label_suffix"])
    s = load_sagittal(path, label if label.is_file() else None, slab=opts["slab"], first_label=opts["first_label"],
                      num_keypoints=opts["num_keypoints"], out_of_range=opts["out_of_range"])
    input_hw = tuple(int(n) for n in data_cfg.input_hw)
    m = letterbox_matrix(s.image_HW.shape, input_hw)
    image_CHW, _, _ = warp_input(s.image_HW, s.kpts_px_K2, s.kpts_visible_K, m, input_hw, opts["channels"])
    truth = ({"kpts_px_K2": s.kpts_px_K2.copy(), "kpts_visible_K": s.kpts_visible_K.copy()}
             if label.is_file() else None)
    return {"image_HW3": np.repeat(display_uint8(s.image_HW)[..., None], 3, axis=2), "input_CHW": image_CHW,
            "to_input_3x3": m, "spacing_mm_2": s.spacing_mm_2.astype(np.float64), "truth": truth,
            "kpt_names": [f"disc{opts['first_label'] + k}" for k in range(opts["num_keypoints"])],
            "id": _stem(path)}
