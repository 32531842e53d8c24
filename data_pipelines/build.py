"""A run's data, for every reader: (synthesise,) parse, split, and the train / val / test datasets.

The reader of `data.format` (data_pipelines/readers: READERS) parses and validates its files into Records and one
DataInfo; everything else is here and in data_pipelines/dataset.py, so a new format is only a parser.

    describe_data(data_cfg)  -> DataInfo without generating or decoding anything (the engine checks task, model and
                                data against it before any data is made or any step is run);
    build_data(data_cfg, run_dir, strategy, seed, split="runs")
                             -> {"train", "val", "test": LandmarkDataset, "splits", "info": DataInfo, "kpt_names",
                                 "class_names", "num_classes", "flip_pairs", "channels", "preprocess", "skipped"};
                                split="all" gives {"all": one dataset of every sample} instead (scoring a model on
                                another dataset as a whole).

Splits: when every record carries a split (split folders, a `split` column or COCO field, COCO files per split) the
data's own splits are used as given (a patient found in two of them is only warned about); otherwise a fixed test
hold-out (stratified where the reader gives strata) and k-fold on the rest, a patient (group) never straddling two
parts. run_dir/splits.json records them; a resumed run whose test split changed stops.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

from data_pipelines.dataset import LandmarkDataset, subset_by_ids
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers import READERS
from data_pipelines.records import SPLIT_NAMES, DataInfo, Record
from data_pipelines.size_balance import balance_by_size
from data_pipelines.synthetic import SYNTHESIZERS
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
    """How datasets render heatmap targets: "numba" on the CPU in the loader, or "none" when data.targets=device
    (the loss renders them on the model's device). An unresolved "auto" renders in the loader."""
    return "none" if getattr(data_cfg, "targets", "loader") == "device" else "numba"


def augment_params(data_cfg, flip_pairs: Sequence[tuple[int, int]] = (), **overrides: Any) -> AugmentParams:
    """The geometric augmentation fields of DataConfig as AugmentParams (intensity settings keep their defaults
    unless overridden)."""
    return AugmentParams(enabled=data_cfg.augment, rotation_deg=data_cfg.rotation_deg,
                         scale_range=tuple(data_cfg.scale_range), translate_frac=data_cfg.translate_frac,
                         flip_p=data_cfg.flip_p, flip_pairs=tuple(flip_pairs), **overrides)


# --------------------------------------------------------------------------------------------------------- splits
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
    n_groups = len({s[2] for s in sub})
    if n_groups < num_folds:
        raise OptionError(f"data.num_folds: {n_groups} patients remain after the test hold-out, too few for "
                          f"{num_folds} folds; lower data.num_folds (or give splits in the data)")
    folds = stratified_group_kfold([s[0] for s in sub], [s[1] for s in sub], [s[2] for s in sub], k=num_folds,
                                   seed=seed)
    train, val = folds[fold]
    stratum_of = dict(zip(ids, strata))
    train_os = oversample(list(train), [stratum_of[i] for i in train], oversample_factor or {})
    return {"test": sorted(test), "val": sorted(val), "train": sorted(train), "train_oversampled": train_os,
            "fold": fold, "num_folds": num_folds, "seed": seed}


def given_splits(records: Sequence[Record], seed: int, source: str, where: str) -> dict[str, Any] | None:
    """The data's own splits when every record carries one (None when none does); a mix is an error."""
    have = [r for r in records if r.split is not None]
    if not have:
        return None
    lacking = next((r for r in records if r.split is None), None)
    if lacking is not None:
        raise DataError(lacking.where, f"sample '{lacking.id}' has no split while others have one ({source})")
    ids = {name: sorted(r.id for r in records if r.split == name) for name in SPLIT_NAMES}
    for name in SPLIT_NAMES:
        if not ids[name]:
            raise DataError(where, f"split '{name}' is empty ({source})")
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(r.patient_id or r.id, set()).add(r.split)
    straddle = sorted(g for g, s in groups.items() if len(s) > 1)
    if straddle:
        log.warning("given splits: %d patient(s) in more than one split (first: %s); kept as given", len(straddle),
                    straddle[0])
    return {**ids, "train_oversampled": list(ids["train"]), "fold": None, "num_folds": None, "seed": seed,
            "source": source}


def make_splits(records: Sequence[Record], data_cfg, seed: int, split_source: str, where: str,
                oversample_factor: dict[Hashable, int] | None = None) -> dict[str, Any]:
    given = given_splits(records, seed, split_source, where)
    if given is not None:
        return given
    if len(records) < 3:
        raise OptionError(f"data.root: {data_cfg.root} holds {len(records)} usable samples; at least 3 are needed "
                          f"to split")
    return {**grouped_splits([r.id for r in records], [r.stratum for r in records],
                             [r.patient_id or r.id for r in records], data_cfg.test_frac, data_cfg.num_folds,
                             data_cfg.fold, seed, oversample_factor), "source": "grouped"}


def record_splits(run_dir: Path, strategy, splits: dict[str, Any], skipped: Sequence[tuple[str, str]]) -> None:
    """Rank 0 writes run_dir/splits.json; a resumed run whose data changed (different test split) stops."""
    if strategy.info.is_main:
        splits_file = Path(run_dir) / "splits.json"
        if splits_file.is_file() and read_splits(splits_file)["test"] != splits["test"]:
            raise RuntimeError(f"{splits_file}: the data changed since this run started (test split differs)")
        write_splits(splits_file, {**splits, "skipped": [list(s) for s in skipped]})
    for path, problem in skipped:
        log.warning("skipped %s: %s", path, problem)


def check_unique_ids(records: Sequence[Record]) -> None:
    seen: dict[str, Record] = {}
    for r in records:
        if r.id in seen:
            raise DataError(r.where, f"sample id '{r.id}' is also used by {seen[r.id].where}; ids must be unique "
                                     f"(two images with the same file name?)")
        seen[r.id] = r


# ------------------------------------------------------------------------------------------------------- the data
def reader_for(data_cfg):
    """(Reader, checked options) of data.format (data_pipelines/readers)."""
    fmt = data_cfg.format
    if fmt not in READERS:
        raise OptionError(f"data.format: unknown format '{fmt}' (choose from {', '.join(sorted(READERS))})")
    reader = READERS[fmt]
    opts = reader_options(getattr(data_cfg, "reader_args", None) or {}, reader.defaults, fmt)
    return reader, reader.check_options(opts, data_cfg)


def describe_data(data_cfg) -> DataInfo:
    """The data's DataInfo without generating or decoding anything: read from the annotations' headers, or - for a
    folder data.synthetic would fill - what the reader's generator writes."""
    reader, opts = reader_for(data_cfg)
    root = Path(data_cfg.root)
    synth = SYNTHESIZERS.get(data_cfg.format)
    if not reader.has_data(root, opts):
        if data_cfg.synthetic and synth is not None:
            return synth.info(opts, data_cfg)
        raise DataError(root, reader.missing_message(root, opts)
                        + ("" if synth is None or data_cfg.synthetic else " (and data.synthetic=false)"))
    return reader.describe(root, opts, data_cfg)


def ensure_data(data_cfg, strategy, reader, opts) -> Path:
    """data.root; with data.synthetic, rank 0 first fills a folder that holds no data with the reader's generator.
    Every rank meets the barrier whenever data.synthetic is set, whatever it found on disk."""
    root = Path(data_cfg.root)
    synth = SYNTHESIZERS.get(data_cfg.format)
    if data_cfg.synthetic and synth is not None:
        if strategy.info.is_main and not reader.has_data(root, opts):
            synth.write(root, opts, data_cfg)
        strategy.barrier()
    if not reader.has_data(root, opts):
        raise DataError(root, reader.missing_message(root, opts) + ("" if data_cfg.synthetic
                                                                    else " (and data.synthetic=false)"))
    return root


def build_data(data_cfg, run_dir: Path, strategy, seed: int, split: str = "runs",
               split_seed: int | None = None) -> dict[str, Any]:
    """The reader contract (module docstring). split: "runs" (train / val / test) or "all". seed: the augmentation
    draws, and the split unless split_seed is given (data.split_seed)."""
    reader, opts = reader_for(data_cfg)
    root = ensure_data(data_cfg, strategy, reader, opts)
    result = reader.read(root, opts, data_cfg, data_cfg.skip_bad)
    records, info, skipped = result.records, result.info, list(result.skipped)
    if not records:
        raise DataError(result.where, f"no usable samples ({len(skipped)} skipped)")
    check_unique_ids(records)
    pre = reader.preprocess(opts, data_cfg, info)
    common = dict(sigma_px=data_cfg.sigma_px, heatmap_peak=data_cfg.heatmap_peak,
                  heatmap_impl=loader_heatmap_impl(data_cfg), heatmaps=reader.heatmaps(opts), seed=seed,
                  skip_bad=data_cfg.skip_bad, where=str(result.where))
    full = LandmarkDataset(records, info, pre, None, cache_decoded=data_cfg.cache_decoded, skipped=skipped, **common)
    out: dict[str, Any] = {"info": info, "kpt_names": list(info.kpt_names), "flip_pairs": info.flip_pairs,
                           "class_names": None if info.class_names is None else list(info.class_names),
                           "num_classes": info.num_classes, "channels": pre.channels, "preprocess": pre,
                           "skipped": skipped, "reader": data_cfg.format}
    if split == "all":
        out["all"] = full
        out["splits"] = {"all": [r.id for r in records], "source": "all"}
        log.info("data (%s): %d samples, all scored, %d skipped", data_cfg.format, len(full), len(skipped))
        return out
    splits = make_splits(records, data_cfg, seed if split_seed is None else int(split_seed), result.split_source,
                         str(result.where),
                         reader.oversample(opts, data_cfg))
    power = float(getattr(data_cfg, "size_balance", 0.0) or 0.0)
    if power > 0:
        splits["train_oversampled"] = balance_by_size(splits["train_oversampled"], {r.id: r for r in records}, power,
                                                      int(getattr(data_cfg, "size_balance_max", 4)),
                                                      str(result.where))
    record_splits(run_dir, strategy, splits, skipped)
    augment = augment_params(data_cfg, flip_pairs=info.flip_pairs, **reader.augment_overrides)
    out.update(train=subset_by_ids(full, splits["train_oversampled"], augment),
               val=subset_by_ids(full, splits["val"], None), test=subset_by_ids(full, splits["test"], None),
               splits=splits)
    for name in ("train", "val", "test"):
        out[name].skipped = skipped
    log.info("data (%s): %d train (%d after oversampling), %d val, %d test, %d skipped (%s splits)", data_cfg.format,
             len(splits["train"]), len(out["train"]), len(out["val"]), len(out["test"]), len(skipped),
             splits.get("source", "grouped"))
    return out
