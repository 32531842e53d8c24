"""The hip task's data for a run: (generate the phantom,) split, and build the train / val / test datasets.

Takes the engine's DataConfig (duck-typed: anything with the same attributes) and a strategy for the rank-0-then-
barrier steps; returns plain datasets the engine wraps in its sampler and DataLoader.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_pipelines import task_data
from data_pipelines.hip_dataset import HipDataset, find_labelme_files
from data_pipelines.readers.labelme import HIP_CLASS_NAMES, HIP_KPT_NAMES
from data_pipelines.splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

log = logging.getLogger("medpose")


def ensure_dataset(data_cfg, strategy) -> list[Path]:
    """The labelme files under data.root; rank 0 generates the phantom first when asked and the folder is empty."""
    root = Path(data_cfg.root)
    has_files = root.is_dir() and any(p.name != "dataset.json" for p in root.glob("*.json"))
    if not has_files and not data_cfg.synthetic:
        raise FileNotFoundError(f"data.root: {root} holds no labelme JSON files (and data.synthetic=false)")
    if not has_files and strategy.info.is_main:
        log.info("generating %d phantom images into %s", data_cfg.synth_n, root)
        generate_hip_dataset(root, data_cfg.synth_n, seed=data_cfg.synth_seed,
                             type2_ratio=data_cfg.synth_type2_ratio, image_hw=tuple(data_cfg.synth_image_hw),
                             progress=True)
    if data_cfg.synthetic:
        # every rank meets here whatever it saw: rank 0 may have written the files before another rank looked
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
                  spacing_mm=data_cfg.spacing_mm, skip_bad=data_cfg.skip_bad, seed=seed,
                  heatmap_impl=task_data.loader_heatmap_impl(data_cfg))
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
           "class_names": list(HIP_CLASS_NAMES), "kpt_names": list(HIP_KPT_NAMES), "splits": splits,
           "skipped": list(probe.skipped)}
    log.info("data: %d train (%d after oversampling type II), %d val, %d test, %d skipped", len(splits["train"]),
             len(out["train"]), len(out["val"]), len(out["test"]), len(probe.skipped))
    return out


def load_for_predict(path: str | Path, data_cfg) -> dict[str, Any]:
    """One input of `medpose predict`: a labelme JSON (truth drawn too) or any image file, preprocessed like an
    evaluation sample (letterbox into data.input_hw, /255, pad 128/255, grey replicated to RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from data_pipelines.errors import DataError
    from data_pipelines.hip_dataset import PAD_VALUE
    from data_pipelines.readers.labelme import read_labelme
    from data_pipelines.transforms import letterbox_matrix, warp_image

    path = Path(path)
    truth = None
    if path.suffix.lower() == ".json":
        rec = read_labelme(path)
        image_HW3 = rec.image_HW3
        truth = {"mask_HW": rec.mask_HW, "kpts_px_K2": rec.kpts_px_K2, "kpts_visible_K": rec.kpts_visible_K}
    else:
        if not path.is_file():
            raise DataError(path, "input file not found")
        try:
            with Image.open(path) as im:
                image_HW3 = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(path, f"image does not decode ({e})") from None
    input_hw = tuple(data_cfg.input_hw)
    m = letterbox_matrix(image_HW3.shape[:2], input_hw)
    x = warp_image(image_HW3.transpose(2, 0, 1).astype(np.float32) / 255.0, m, input_hw, pad_value=PAD_VALUE)
    spacing = np.asarray(data_cfg.spacing_mm or (float("nan"), float("nan")), dtype=np.float64)
    return {"image_HW3": image_HW3, "input_CHW": x, "to_input_3x3": m, "spacing_mm_2": spacing, "truth": truth,
            "kpt_names": [f"P{k + 1}" for k in range(len(HIP_KPT_NAMES))]}
