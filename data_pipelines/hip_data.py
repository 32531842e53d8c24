"""The hip task's data for a run: (generate the phantom,) split, and build the train / val / test datasets.

Takes the engine's DataConfig (duck-typed: anything with the same attributes) and a strategy for the rank-0-then-
barrier steps; returns plain datasets the engine wraps in its sampler and DataLoader.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .hip_dataset import HipDataset, find_labelme_files
from .labelme import HIP_CLASS_NAMES
from .splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits
from .synth_hip import generate_hip_dataset
from .transforms import AugmentParams

log = logging.getLogger("medpose")


def ensure_dataset(data_cfg, strategy) -> list[Path]:
    """The labelme files under data.root; rank 0 generates the phantom first when asked and the folder is empty."""
    root = Path(data_cfg.root)
    has_files = root.is_dir() and any(p.name != "dataset.json" for p in root.glob("*.json"))
    if not has_files:
        if not data_cfg.synthetic:
            raise FileNotFoundError(f"data.root: {root} holds no labelme JSON files (and data.synthetic=false)")
        if strategy.info.is_main:
            log.info("generating %d phantom images into %s", data_cfg.synth_n, root)
            generate_hip_dataset(root, data_cfg.synth_n, seed=data_cfg.synth_seed,
                                 type2_ratio=data_cfg.synth_type2_ratio, image_hw=tuple(data_cfg.synth_image_hw),
                                 progress=True)
        strategy.barrier()
    return find_labelme_files(root)


def make_splits(probe: HipDataset, data_cfg, seed: int) -> dict[str, Any]:
    """Fixed stratified, patient-grouped test hold-out; stratified patient-grouped k-fold on the rest."""
    ids = [probe.sample_id(i) for i in range(len(probe))]
    labels = [probe.hip_type(i) for i in range(len(probe))]
    groups = [probe.patient_id(i) for i in range(len(probe))]
    rest, test = holdout_split(ids, labels, groups, test_frac=data_cfg.test_frac, seed=seed)
    keep = set(rest)
    sub = [(i, lab, g) for i, lab, g in zip(ids, labels, groups) if i in keep]
    folds = stratified_group_kfold([s[0] for s in sub], [s[1] for s in sub], [s[2] for s in sub],
                                   k=data_cfg.num_folds, seed=seed)
    train, val = folds[data_cfg.fold]
    label_of = dict(zip(ids, labels))
    factor = {"II": data_cfg.oversample_type2} if data_cfg.oversample_type2 > 1 else None
    train_os = oversample(list(train), [label_of[i] for i in train], factor)
    return {"test": sorted(test), "val": sorted(val), "train": sorted(train), "train_oversampled": train_os,
            "fold": data_cfg.fold, "num_folds": data_cfg.num_folds, "seed": seed}


def build_hip_data(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
    files = ensure_dataset(data_cfg, strategy)
    common = dict(input_hw=tuple(data_cfg.input_hw), sigma_px=data_cfg.sigma_px, heatmap_peak=data_cfg.heatmap_peak,
                  spacing_mm=data_cfg.spacing_mm, skip_bad=data_cfg.skip_bad, seed=seed)
    # One validation pass over all files (bad files raise or are skipped here, never inside a worker).
    probe = HipDataset(files, augment=None, cache_decoded=False, **common)
    splits = make_splits(probe, data_cfg, seed)
    if strategy.info.is_main:
        splits_file = Path(run_dir) / "splits.json"
        if splits_file.is_file() and read_splits(splits_file)["test"] != splits["test"]:
            raise RuntimeError(f"{splits_file}: the data changed since this run started (test split differs)")
        write_splits(splits_file, {**splits, "skipped": probe.skipped})
    path_of = {probe.sample_id(i): probe.json_paths[i] for i in range(len(probe))}
    augment = AugmentParams(enabled=data_cfg.augment, rotation_deg=data_cfg.rotation_deg,
                            scale_range=tuple(data_cfg.scale_range), translate_frac=data_cfg.translate_frac,
                            flip_p=data_cfg.flip_p)
    checked = {**common, "skip_bad": False}  # already validated by the probe

    def subset(ids, aug):
        return HipDataset([path_of[i] for i in ids], augment=aug, cache_decoded=data_cfg.cache_decoded, **checked)

    out = {"train": subset(splits["train_oversampled"], augment), "val": subset(splits["val"], None),
           "test": subset(splits["test"], None), "num_classes": len(HIP_CLASS_NAMES),
           "class_names": list(HIP_CLASS_NAMES), "splits": splits}
    log.info("data: %d train (%d after oversampling type II), %d val, %d test, %d skipped", len(splits["train"]),
             len(out["train"]), len(out["val"]), len(out["test"]), len(probe.skipped))
    return out
