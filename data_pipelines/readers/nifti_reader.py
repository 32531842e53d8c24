"""NIfTI volumes with point-label volumes as a dataset (data.format = nifti): the disc-labelling data of the
stacked-hourglass system, and any point-label volume (vertebral levels, ...).

Per volume (data_pipelines/readers/nifti.py): reorient to RAS, average `slab` sagittal slices around the labels,
z-score; rows run superior -> inferior and columns anterior -> posterior. Each volume is decoded once, when read
(the only way to validate a NIfTI file), and its 2-D slab is kept in its Record (one small float image per volume).
The shared pipeline (data_pipelines/dataset.py) then letterboxes it (padded with 0 = the z-scored mean), augments
intensity on a [0, 1] copy that is z-scored again, and renders one heatmap per label.

Input channels: 1 by default; `channels: 3` replicates the grey slab for networks that want RGB. A sagittal view has
no left/right landmark pairs, so a flip (anterior <-> posterior) swaps nothing. Groups: a subject (the BIDS
`sub-<label>` entity of the file name, else the file itself) is never split.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.base import Reader, ReadResult
from data_pipelines.readers.nifti import OUT_OF_RANGE_MODES, SagittalSample, load_sagittal
from data_pipelines.records import DataInfo, ImageSource, Preprocess, Record
from data_pipelines.transforms import AugmentParams

log = logging.getLogger("medpose")

DEFAULTS: dict[str, Any] = {"image_glob": "**/*_T2w.nii.gz", "label_suffix": "_labels-disc", "slab": 6,
                            "first_label": 1, "num_keypoints": 11, "channels": 1, "out_of_range": "error"}
LAYOUT = "NIfTI volumes matching reader_args.image_glob, each with <stem><label_suffix>.nii.gz beside it"
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


def disc_names(first_label: int, num_keypoints: int) -> tuple[str, ...]:
    return tuple(f"disc{first_label + k}" for k in range(num_keypoints))


def nifti_info(opts: dict) -> DataInfo:
    return DataInfo(disc_names(opts["first_label"], opts["num_keypoints"]), None, (), int(opts["channels"]),
                    "per_image")


def nifti_preprocess(input_hw, channels: int = 1) -> Preprocess:
    return Preprocess(tuple(int(n) for n in input_hw), pad_value=PAD_VALUE, channels=channels, values="zscore")


def sagittal_record(s: SagittalSample, sid: str, where: str) -> Record:
    """A decoded slab as a Record (pixels held in memory; the volume's path named in errors)."""
    subject = (m.group(1) if (m := _SUBJECT.match(sid.rsplit("/", 1)[-1])) else sid)
    return Record(id=sid, where=where, image=ImageSource(pixels=s.image_HW[None].astype(np.float32), name=s.path),
                  hw=tuple(s.image_HW.shape), kpts_px_K2=s.kpts_px_K2.astype(np.float32),
                  kpts_visible_K=s.kpts_visible_K.copy(), spacing_mm=s.spacing_mm_2.astype(np.float64),
                  patient_id=subject,
                  extras={"volume": s.path, "labels": s.label_path, "lateral_mm_K": s.lateral_mm_K.copy(),
                          "slab_range": s.slab_range},
                  meta={"subject": subject, "volume": s.path})


def nifti_records(paths: Sequence[Path], opts: dict, skip_bad: bool, require_labels: bool = True
                  ) -> tuple[list[Record], list[tuple[str, str]]]:
    """Each distinct volume decoded once, in order; bad files raise or are listed (skip_bad)."""
    decoded, skipped = [], []
    for path in dict.fromkeys(map(Path, paths)):
        try:
            label = label_path_for(path, opts["label_suffix"])
            if not label.is_file():
                if require_labels:
                    raise DataError(label, f"label volume not found (expected beside {path.name})")
                label = None
            decoded.append((path, load_sagittal(path, label, slab=opts["slab"], first_label=opts["first_label"],
                                                num_keypoints=opts["num_keypoints"],
                                                out_of_range=opts["out_of_range"])))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path or str(path), exc.problem))
    if skipped:
        log.warning("nifti: skipped %d bad volume(s):\n%s", len(skipped),
                    "\n".join(f"  {p}: {problem}" for p, problem in skipped))
    stems = [_stem(p) for p, _ in decoded]
    if len(set(stems)) < len(stems):   # the same file name in two folders: ids from the paths instead
        stems = [str(p.with_name(s)) for (p, _), s in zip(decoded, stems)]
    return [sagittal_record(s, sid, str(p)) for (p, s), sid in zip(decoded, stems)], skipped


class SpineDataset(LandmarkDataset):
    """NIfTI volumes (+ point-label volumes beside them) as the engine's dataset (the first reader's constructor,
    kept for scripts): every volume is decoded up front; with skip_bad the bad ones are listed in `.skipped`.
    require_labels=False accepts volumes without a label file (no visible points)."""

    def __init__(self, image_paths: Sequence[str | Path], input_hw: tuple[int, int] = (256, 256),
                 augment: AugmentParams | None = None, sigma_px: float = 2.24, heatmap_peak: float = 1.0,
                 slab: int = 6, first_label: int = 1, num_keypoints: int = 11, channels: int = 1,
                 out_of_range: str = "error", label_suffix: str = "_labels-disc", skip_bad: bool = False,
                 seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = True,
                 require_labels: bool = True):
        if sigma_px <= 0 or channels not in (1, 3) or num_keypoints < 1 or slab < 1:
            raise ValueError(f"SpineDataset: need sigma_px > 0, channels 1 or 3, num_keypoints >= 1, slab >= 1; "
                             f"got {sigma_px}, {channels}, {num_keypoints}, {slab}")
        if out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(f"SpineDataset: out_of_range must be one of {OUT_OF_RANGE_MODES}, got {out_of_range!r}")
        opts = dict(slab=int(slab), first_label=int(first_label), num_keypoints=int(num_keypoints),
                    out_of_range=out_of_range, label_suffix=label_suffix, channels=int(channels))
        records, skipped = nifti_records(image_paths, opts, skip_bad, require_labels)
        if not records:
            paths = list(image_paths)
            raise DataError(Path(paths[0]).parent if paths else ".", f"no usable volumes ({len(skipped)} skipped)")
        super().__init__(records, nifti_info(opts), nifti_preprocess(input_hw, channels), augment, sigma_px=sigma_px,
                         heatmap_peak=heatmap_peak, heatmap_impl=heatmap_impl, seed=seed, skip_bad=skip_bad,
                         skipped=skipped)

    @property
    def image_paths(self) -> list[Path]:
        return [Path(r.extras["volume"]) for r in self.records]


# ------------------------------------------------------------------------------------------------------ reader
def check_options(opts: dict[str, Any], data_cfg=None) -> dict[str, Any]:
    """data.reader_args merged over DEFAULTS, with the values checked (OptionError names the option)."""
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


def read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    records, skipped = nifti_records(find_volumes(root, opts), opts, skip_bad)
    return ReadResult(records, nifti_info(opts), skipped, root)


def predict_record(path: Path, opts: dict, data_cfg) -> Record:
    """One volume (every nifti input is one): the slab, and the truth when the label volume lies beside it."""
    records, _ = nifti_records([path], opts, skip_bad=False, require_labels=False)
    return records[0]


READER = Reader(name="nifti", layout=LAYOUT, defaults=DEFAULTS, check_options=check_options,
                has_data=lambda root, opts: bool(find_volumes(root, opts)),
                describe=lambda root, opts, cfg: nifti_info(opts), read=read,
                preprocess=lambda opts, cfg, info: nifti_preprocess(cfg.input_hw, int(opts["channels"])),
                predict_record=predict_record, annotation_suffixes=(".nii", ".nii.gz"), dali=False,
                missing=lambda root, opts: f"no volumes matching {opts['image_glob']}")
