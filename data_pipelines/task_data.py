"""What every reader's data builder shares: reader options, grouped splits, the splits file, augmentation settings.

The reader contract (every `build_<format>_data(data_cfg, run_dir, strategy, seed)` in `data_pipelines.READERS`):

returns {"train", "val", "test": torch Datasets, "splits": dict, "num_classes": int (0 without segmentation),
         "class_names": list[str] | None, "kpt_names": list[str], "skipped": [(path, problem)]}

and every Dataset it returns provides
    __len__, __getitem__(i | (i, epoch)) -> sample dict for `collate_samples` (data_pipelines/batch.py):
        image_CHW float32, kpts_px_K2 float32 (input frame), kpts_visible_K bool, spacing_mm_2 (mm per input px),
        optional mask_HW int64, optional heatmap_KHW float32,
        meta {"index": i, "id": str, "to_input_3x3": 3x3 list (original px -> input px), "orig_hw": (H, W), ...}
    original(i) -> {"image_HW3": uint8 (for figures), "kpts_px_K2", "kpts_visible_K" (original frame),
                    "spacing_mm_2" (mm per original px, float64), "id", optional "mask_HW", task extras}
    set_epoch(epoch), sample_id(i), group_id(i) (patient / exam: never split), stratum(i) (hashable or None),
    skipped [(path, problem)], kpt_names, class_names (None without segmentation).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

from data_pipelines.errors import OptionError
from data_pipelines.splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits
from data_pipelines.transforms import AugmentParams

log = logging.getLogger("medpose")


def reader_options(given: Mapping[str, Any], defaults: Mapping[str, Any], reader: str) -> dict[str, Any]:
    """`data.reader_args` merged over the reader's defaults; an unknown option is an error naming it."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise OptionError(f"data.reader_args: unknown option '{unknown[0]}' for data.format={reader} "
                          f"(valid: {', '.join(sorted(defaults)) or 'none'})")
    return {**defaults, **given}


def loader_heatmap_impl(data_cfg) -> str:
    """How a reader's datasets render heatmap targets: "numba" on the CPU in the loader, or "none" when
    data.targets=device (the loss renders them on the model's device with kernels/heatmap_render.py). An unresolved
    "auto" (a reader called outside engine.run.train) renders in the loader."""
    return "none" if getattr(data_cfg, "targets", "loader") == "device" else "numba"


def augment_params(data_cfg, flip_pairs: Sequence[tuple[int, int]] = (), **overrides: Any) -> AugmentParams:
    """The geometric augmentation fields of DataConfig as AugmentParams (intensity settings keep their defaults
    unless overridden)."""
    return AugmentParams(enabled=data_cfg.augment, rotation_deg=data_cfg.rotation_deg,
                         scale_range=tuple(data_cfg.scale_range), translate_frac=data_cfg.translate_frac,
                         flip_p=data_cfg.flip_p, flip_pairs=tuple(flip_pairs), **overrides)


def grouped_splits(ids: Sequence[str], strata: Sequence[Hashable | None], groups: Sequence[Hashable],
                   test_frac: float, num_folds: int, fold: int, seed: int,
                   oversample_factor: dict[Hashable, int] | None = None) -> dict[str, Any]:
    """Fixed test hold-out (stratified where strata are given), then k-fold on the rest; a group (patient, exam)
    never straddles two parts. `train_oversampled` repeats ids of the strata named in oversample_factor."""
    strata = ["all" if s is None else s for s in strata]
    rest, test = holdout_split(ids, strata, groups, test_frac=test_frac, seed=seed)
    keep = set(rest)
    sub = [(i, s, g) for i, s, g in zip(ids, strata, groups) if i in keep]
    if num_folds < 2:
        raise OptionError(f"data.num_folds: need at least 2 folds, got {num_folds}")
    folds = stratified_group_kfold([s[0] for s in sub], [s[1] for s in sub], [s[2] for s in sub], k=num_folds,
                                   seed=seed)
    train, val = folds[fold]
    stratum_of = dict(zip(ids, strata))
    train_os = oversample(list(train), [stratum_of[i] for i in train], oversample_factor or {})
    return {"test": sorted(test), "val": sorted(val), "train": sorted(train), "train_oversampled": train_os,
            "fold": fold, "num_folds": num_folds, "seed": seed}


def splits_of(probe, data_cfg, seed: int, oversample_factor: dict[Hashable, int] | None = None) -> dict[str, Any]:
    """grouped_splits over a probe dataset (sample_id / stratum / group_id per index)."""
    n = len(probe)
    if n < 3:
        raise OptionError(f"data.root: {data_cfg.root} holds {n} usable samples; at least 3 are needed to split")
    return grouped_splits([probe.sample_id(i) for i in range(n)], [probe.stratum(i) for i in range(n)],
                          [probe.group_id(i) for i in range(n)], data_cfg.test_frac, data_cfg.num_folds,
                          data_cfg.fold, seed, oversample_factor)


def record_splits(run_dir: Path, strategy, splits: dict[str, Any], skipped: Sequence[tuple[str, str]]) -> None:
    """Rank 0 writes run_dir/splits.json; a resumed run whose data changed (different test split) stops."""
    if strategy.info.is_main:
        splits_file = Path(run_dir) / "splits.json"
        if splits_file.is_file() and read_splits(splits_file)["test"] != splits["test"]:
            raise RuntimeError(f"{splits_file}: the data changed since this run started (test split differs)")
        write_splits(splits_file, {**splits, "skipped": [list(s) for s in skipped]})
    for path, problem in skipped:
        log.warning("skipped %s: %s", path, problem)
