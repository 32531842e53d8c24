"""`medpose predict` inputs: any file the run's reader understands, preprocessed exactly like an evaluation sample.

An input is either an annotation of the run's format (a labelme JSON, an X-ray CSV, a NIfTI volume: the reader
parses it, so the truth is drawn too), an image listed in the run's own annotations (COCO, table, HC18: truth and
spacing from there), or any other image file (no truth; spacing from data.spacing_mm, else a dataset.json
with "spacing_mm" in its folder or up to three above, else unknown). Either way it
becomes one Record and goes through data_pipelines/dataset.py without augmentation, with the checkpoint's DataInfo
and Preprocess when given, so a deployment reproduces evaluation.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipelines.build import reader_for
from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError
from data_pipelines.images import IMAGE_SUFFIXES, verify_image
from data_pipelines.readers.base import dataset_spacing
from data_pipelines.synthetic import SYNTHESIZERS
from data_pipelines.records import DataInfo, ImageSource, Preprocess, Record


def _plain_image(path: Path, k: int, data_cfg) -> Record:
    if not path.is_file():
        raise DataError(path, "input image not found")
    hw, _, _ = verify_image(str(path))
    spacing = getattr(data_cfg, "spacing_mm", None)
    if spacing is None:
        spacing = dataset_spacing(path)
    return Record(id=path.stem, where=str(path), image=ImageSource(path=str(path), name=str(path)), hw=hw,
                  kpts_px_K2=np.zeros((k, 2), np.float32), kpts_visible_K=np.zeros(k, bool),
                  spacing_mm=None if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(2))


def _info_for(data_cfg, reader, opts) -> DataInfo:
    root = Path(data_cfg.root)
    if reader.has_data(root, opts):
        return reader.describe(root, opts, data_cfg)
    if data_cfg.format in SYNTHESIZERS:
        return SYNTHESIZERS[data_cfg.format].info(opts, data_cfg)
    raise DataError(root, f"cannot tell the landmark names without the run's data ({reader.layout})")


def input_record(path: str | Path, data_cfg, info: DataInfo) -> tuple[Record, bool]:
    """(record, has truth) of one input file (module docstring)."""
    reader, opts = reader_for(data_cfg)
    path = Path(path)
    if not path.exists():
        raise DataError(path, "input image not found" if path.suffix.lower() in IMAGE_SUFFIXES
                        else "input file not found")
    rec = reader.predict_record(path, opts, data_cfg)
    if rec is not None:
        return rec, True
    return _plain_image(path, info.num_keypoints, data_cfg), False


def load_for_predict(path: str | Path, data_cfg, info: DataInfo | None = None, pre: Preprocess | None = None
                     ) -> dict[str, Any]:
    """One input as {"image_HW3" (uint8, original frame), "input_CHW" (the network input), "to_input_3x3",
    "spacing_mm_2" (mm per original pixel, NaN when unknown), "truth" (None, or the original-frame truth and the
    reader's extras), "kpt_names", "id"}."""
    reader, opts = reader_for(data_cfg)
    info = info or _info_for(data_cfg, reader, opts)
    pre = pre or reader.preprocess(opts, data_cfg, info)
    rec, has_truth = input_record(path, data_cfg, info)
    if rec.mask is not None and info.class_names is None:
        rec.mask = None
    ds = LandmarkDataset([rec], info, pre, None, heatmaps=False, where=str(path))
    sample, orig = ds[0], ds.original(0)
    truth = None
    if has_truth:
        truth = {k: v for k, v in orig.items() if k not in ("image_HW3", "spacing_mm_2")}
        truth["kpt_names"] = list(info.kpt_names)
    return {"image_HW3": orig["image_HW3"], "input_CHW": sample["image_CHW"],
            "to_input_3x3": np.asarray(sample["meta"]["to_input_3x3"]), "spacing_mm_2": orig["spacing_mm_2"],
            "truth": truth, "kpt_names": list(info.kpt_names), "id": rec.id}


def expand_inputs(inputs: Sequence[str | Path], suffixes: Iterable[str] = ()) -> list[Path]:
    """Files, folders (their images and annotation files of `suffixes`, sorted, not recursing into hidden folders;
    an image whose annotation file lies beside it is read through the annotation, which brings the truth) and glob
    patterns -> input files, in order, each once. Nothing found for an argument is an error naming it."""
    wanted = tuple(s.lower() for s in (*IMAGE_SUFFIXES, *suffixes))
    out: list[Path] = []
    for arg in map(str, inputs):
        if any(ch in arg for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        elif Path(arg).is_dir():
            found = sorted(p for p in Path(arg).rglob("*") if p.is_file() and p.name.lower().endswith(wanted)
                           and not any(part.startswith(".") for part in p.relative_to(arg).parts)
                           and p.name != "dataset.json")
            annotated = {(p.parent, p.name[:-len(s)]) for p in found for s in suffixes if p.name.lower().endswith(s)}
            found = [p for p in found if not (p.suffix.lower() in IMAGE_SUFFIXES and (p.parent, p.stem) in annotated)]
        else:
            found = [Path(arg)]
        if not found:
            raise DataError(arg, "no input files here (folders are searched for "
                                 f"{', '.join(wanted)}; quote glob patterns)")
        out.extend(found)
    return list(dict.fromkeys(out))
