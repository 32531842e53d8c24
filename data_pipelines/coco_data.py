"""COCO run-level data: reader options, the synthetic phantom as COCO, train / val / test splits and the
prediction input (reader contract: data_pipelines/task_data.py).

The files are read by data_pipelines/readers/coco.py (read_coco, CocoDataset); the phantom is written with
data_pipelines/readers/coco_export.py (dataset_to_coco).
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from data_pipelines import task_data
from data_pipelines.readers.coco import (SPLIT_NAMES, CocoDataset, CocoIndex, CocoSample, _is_int, _is_num, _to_input,
                                 decode_image_CHW, read_coco, resolve_flip_pairs, sample_mask)
from data_pipelines.readers.coco_export import dataset_to_coco
from data_pipelines.errors import DataError, OptionError
from data_pipelines.transforms import letterbox_matrix, sampling_grid

log = logging.getLogger("medpose")

DEFAULTS: dict[str, Any] = {"annotations": "annotations.json", "images": "", "category": None, "pixel_offset": 0.5,
                            "masks": False, "flip_pairs": None, "splits_from": None, "one_per_image": True}


def coco_options(data_cfg) -> dict[str, Any]:
    """data.reader_args over DEFAULTS, each value checked (OptionError naming the option)."""
    opts = task_data.reader_options(getattr(data_cfg, "reader_args", None) or {}, DEFAULTS, "coco")
    checks = {
        "annotations": isinstance(opts["annotations"], str) and bool(opts["annotations"]),
        "images": isinstance(opts["images"], str),
        "category": opts["category"] is None or isinstance(opts["category"], str) or _is_int(opts["category"]),
        "pixel_offset": _is_num(opts["pixel_offset"]) and math.isfinite(opts["pixel_offset"]),
        "masks": isinstance(opts["masks"], bool),
        "one_per_image": isinstance(opts["one_per_image"], bool),
        "flip_pairs": opts["flip_pairs"] is None or isinstance(opts["flip_pairs"], (list, tuple)),
        "splits_from": opts["splits_from"] is None or (
            isinstance(opts["splits_from"], Mapping) and sorted(opts["splits_from"]) == sorted(SPLIT_NAMES)
            and all(isinstance(v, str) and v for v in opts["splits_from"].values())),
    }
    for key, ok in checks.items():
        if not ok:
            raise OptionError(f"data.reader_args.{key}: bad value {opts[key]!r} (see data_pipelines/readers/coco.py: "
                              f"annotations str, images str, category name|id, pixel_offset number, masks and "
                              f"one_per_image bool, flip_pairs list of pairs, splits_from {{train, val, test: file}})")
    return opts


def _read(json_path: Path, root: Path, opts: dict, skip_bad: bool, only: set[Path] | None = None) -> CocoIndex:
    return read_coco(json_path, root / opts["images"], opts["category"], opts["pixel_offset"], opts["masks"],
                     opts["one_per_image"], skip_bad, only)


def ensure_coco(data_cfg, opts: dict, strategy) -> Path:
    """The annotations file under data.root; with data.synthetic, rank 0 first fills an empty root with the hip
    phantom converted to COCO (every rank passes the same barrier, whatever it finds on disk)."""
    root = Path(data_cfg.root)
    ann = root / opts["annotations"]
    if data_cfg.synthetic:
        if strategy.info.is_main and not ann.is_file():
            if root.is_dir() and any(root.iterdir()):
                raise DataError(ann, "annotations file not found; data.synthetic=true only fills an empty folder")
            write_synthetic_coco(data_cfg, ann, root / opts["images"])
        strategy.barrier()
    if not ann.is_file():
        raise DataError(ann, "annotations file not found" + ("" if data_cfg.synthetic else " (data.synthetic=false)"))
    return ann


def write_synthetic_coco(data_cfg, out_json: Path, image_root: Path) -> Path:
    """The hip phantom (data_pipelines/synthetic/hip.py) as a COCO file: 6 landmarks, masks = any structure."""
    from data_pipelines.hip_dataset import HipDataset          # only here: the phantom is labelme on disk first
    from data_pipelines.synthetic.hip import generate_hip_dataset

    log.info("generating %d phantom images as COCO into %s", data_cfg.synth_n, out_json.parent)
    with tempfile.TemporaryDirectory(prefix="medpose_synth_") as tmp:
        files = generate_hip_dataset(tmp, data_cfg.synth_n, seed=data_cfg.synth_seed,
                                     type2_ratio=getattr(data_cfg, "synth_type2_ratio", 0.35),
                                     image_hw=tuple(data_cfg.synth_image_hw))
        return dataset_to_coco(HipDataset(files), out_json, image_root, category_name="hip")


def _given_splits(index: CocoIndex) -> dict[str, list[str]] | None:
    """The images' own "split" fields (all or none of the used images must have one)."""
    have = [s for s in index.samples if s.split is not None]
    if not have:
        return None
    lacking = next((s for s in index.samples if s.split is None), None)
    if lacking is not None:
        raise DataError(index.json_path, f"{lacking.entry}: no 'split' while other images have one")
    return {name: sorted(s.id for s in index.samples if s.split == name) for name in SPLIT_NAMES}


def _split_record(ids: dict[str, list[str]], source: str, seed: int, where: Path) -> dict[str, Any]:
    for name in SPLIT_NAMES:
        if not ids[name]:
            raise DataError(where, f"split '{name}' is empty ({source})")
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for i in ids[name]:
            if i in seen:
                raise DataError(where, f"sample '{i}' is in both '{seen[i]}' and '{name}' ({source})")
            seen[i] = name
    return {**ids, "train_oversampled": list(ids["train"]), "fold": None, "num_folds": None, "seed": seed,
            "source": source}


def _warn_shared_groups(datasets: dict[str, CocoDataset]) -> None:
    groups = {name: {ds.group_id(i) for i in range(len(ds))} for name, ds in datasets.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(groups[a] & groups[b])
        if shared:
            log.warning("given splits: %d patient(s) in both %s and %s (first: %s)", len(shared), a, b, shared[0])


def build_coco_data(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
    """train / val / test CocoDatasets: splits from splits_from files, else the images' "split" fields, else
    patient-grouped splits (task_data.splits_of)."""
    opts = coco_options(data_cfg)
    root = Path(data_cfg.root)
    common = dict(input_hw=tuple(data_cfg.input_hw), sigma_px=data_cfg.sigma_px, heatmap_peak=data_cfg.heatmap_peak,
                  spacing_mm=data_cfg.spacing_mm, seed=seed, heatmap_impl=task_data.loader_heatmap_impl(data_cfg))
    if opts["splits_from"]:
        indices = {name: _read(root / opts["splits_from"][name], root, opts, data_cfg.skip_bad) for name in SPLIT_NAMES}
        where, source = root, "reader_args.splits_from"
    else:
        index = _read(ensure_coco(data_cfg, opts, strategy), root, opts, data_cfg.skip_bad)
        indices = {name: index for name in SPLIT_NAMES}
        where, source = index.json_path, f"'split' fields of {index.json_path.name}"
    names = {indices[n].category.kpt_names for n in SPLIT_NAMES}
    if len(names) > 1:
        raise DataError(where, f"the split files' categories list different keypoints: {sorted(names)}")
    kpt_names = indices["train"].category.kpt_names
    # one validation pass per file (bad entries raise or are skipped here, never inside a worker)
    probes = {name: CocoDataset(indices[name], **common) for name in SPLIT_NAMES
              if name == "train" or indices[name] is not indices["train"]}
    skipped = [rec for probe in probes.values() for rec in probe.skipped]
    if opts["splits_from"]:
        splits = _split_record({n: sorted(probes[n].sample_id(i) for i in range(len(probes[n])))
                                for n in SPLIT_NAMES}, source, seed, where)
    else:
        given = _given_splits(indices["train"])
        splits = (_split_record(given, source, seed, where) if given is not None
                  else task_data.splits_of(probes["train"], data_cfg, seed))
    task_data.record_splits(run_dir, strategy, splits, skipped)
    augment = task_data.augment_params(data_cfg, flip_pairs=resolve_flip_pairs(opts["flip_pairs"], kpt_names))

    def subset(name: str, ids: list[str], aug):
        return CocoDataset(indices[name], augment=aug, cache_decoded=data_cfg.cache_decoded, ids=ids, **common)

    out = {"train": subset("train", splits["train_oversampled"], augment), "val": subset("val", splits["val"], None),
           "test": subset("test", splits["test"], None), "splits": splits,
           "num_classes": 2 if opts["masks"] else 0, "kpt_names": list(kpt_names), "skipped": skipped,
           "class_names": ["background", indices["train"].category.name] if opts["masks"] else None}
    if "source" in splits:                          # given splits: say where a patient straddles two parts
        _warn_shared_groups({n: out[n] for n in SPLIT_NAMES})
    log.info("data (coco): %d train, %d val, %d test, %d skipped", len(out["train"]), len(out["val"]),
             len(out["test"]), len(skipped))
    return out


def _truth_for(path: Path, data_cfg, opts: dict) -> tuple[CocoSample | None, CocoIndex | None]:
    """The image's sample in the run's annotation file(s), if listed there (problems elsewhere in them ignored)."""
    root = Path(data_cfg.root)
    files = list(opts["splits_from"].values()) if opts["splits_from"] else [opts["annotations"]]
    first = None
    for name in files:
        if not (root / name).is_file():
            continue
        try:
            index = _read(root / name, root, opts, skip_bad=True, only={path.resolve()})
        except DataError as exc:
            log.warning("no ground truth for %s: %s", path, exc)
            continue
        first = first or index
        if index.samples:
            return index.samples[0], index
    return None, first


def load_for_predict(path: str | Path, data_cfg) -> dict[str, Any]:
    """One image file as the network input (preprocessed exactly like evaluation samples); truth, spacing and
    keypoint names from the run's COCO file when it lists the image (else truth None, spacing data.spacing_mm or
    1.0, and kpt_names from the file's category, or [] without a readable file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "input file not found")
    opts = coco_options(data_cfg)
    sample, index = _truth_for(path, data_cfg, opts)
    try:
        image = decode_image_CHW(path)
    except Exception as exc:
        raise DataError(path, f"image does not decode ({type(exc).__name__}: {exc})") from exc
    hw = tuple(image.shape[1:])
    input_hw = (int(data_cfg.input_hw[0]), int(data_cfg.input_hw[1]))
    m = letterbox_matrix(hw, input_hw)
    grid = sampling_grid(m, hw, input_hw)
    input_CHW = _to_input(image.astype(np.float32) * np.float32(1.0 / 255.0), m, input_hw, grid)
    spacing = (sample.spacing_mm if sample is not None and sample.spacing_mm is not None
               else data_cfg.spacing_mm if data_cfg.spacing_mm is not None else (1.0, 1.0))
    truth = None
    if sample is not None:
        truth = {"kpts_px_K2": sample.kpts_px_K2.copy(), "kpts_visible_K": sample.kpts_visible_K.copy()}
        if opts["masks"]:
            truth["mask_HW"] = sample_mask(sample.segments, sample.hw)
    hw3 = image.transpose(1, 2, 0)
    return {"image_HW3": np.repeat(hw3, 3, axis=2) if hw3.shape[2] == 1 else hw3, "input_CHW": input_CHW,
            "to_input_3x3": m, "spacing_mm_2": np.asarray(spacing, dtype=np.float64).reshape(2), "truth": truth,
            "kpt_names": list(index.category.kpt_names) if index is not None else []}
