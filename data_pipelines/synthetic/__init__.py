"""Synthetic data for every reader: what data.synthetic=true writes into a data.root that holds no data yet, and the
DataInfo it will have (so task, model and data are checked before anything is generated).

SYNTHESIZERS: data.format -> Synthesizer(write(root, opts, data_cfg), info(opts, data_cfg)); opts are the reader's
checked data.reader_args. The generators (hip, xray, spine, hc18, ceph) and the layout writers live beside this.
Readers never import this package (data_pipelines/build.py does), so there is no import circle.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_pipelines.errors import DataError
from data_pipelines.readers.base import resolve_flip_pairs
from data_pipelines.readers.hc18 import HC18_INFO
from data_pipelines.readers.labelme import HIP_KPT_NAMES
from data_pipelines.readers.labelme_reader import HIP_SET, label_set_info
from data_pipelines.readers.nifti_reader import SYNTH_SLICES, find_volumes, nifti_info
from data_pipelines.readers.xray_csv import XRAY_INFO
from data_pipelines.records import DataInfo

log = logging.getLogger("medpose")


@dataclass(frozen=True)
class Synthesizer:
    write: Callable[[Path, dict, Any], None]
    info: Callable[[dict, Any], DataInfo]


def _hip(root: Path, opts: dict, cfg) -> None:
    from data_pipelines.synthetic.hip import generate_hip_dataset
    log.info("generating %d phantom images into %s", cfg.synth_n, root)
    generate_hip_dataset(root, cfg.synth_n, seed=cfg.synth_seed, type2_ratio=cfg.synth_type2_ratio,
                         image_hw=tuple(cfg.synth_image_hw), progress=True)


def _hip_coco(root: Path, opts: dict, cfg) -> None:
    """The hip phantom as a COCO file: 6 landmarks, masks = any structure (an empty folder only)."""
    from data_pipelines.readers.coco_export import dataset_to_coco
    from data_pipelines.readers.labelme_reader import HipDataset
    from data_pipelines.synthetic.hip import generate_hip_dataset
    ann = root / opts["annotations"]
    if root.is_dir() and any(root.iterdir()):
        raise DataError(ann, "annotations file not found; data.synthetic=true only fills an empty folder")
    log.info("generating %d phantom images as COCO into %s", cfg.synth_n, root)
    with tempfile.TemporaryDirectory(prefix="medpose_synth_") as tmp:
        files = generate_hip_dataset(tmp, cfg.synth_n, seed=cfg.synth_seed,
                                     type2_ratio=getattr(cfg, "synth_type2_ratio", 0.35),
                                     image_hw=tuple(cfg.synth_image_hw))
        image_root = root / ("images" if opts["images"] == "auto" else opts["images"])
        dataset_to_coco(HipDataset(files), ann, image_root, category_name="hip")


def _hip_coco_info(opts: dict, cfg) -> DataInfo:
    channels = 1 if opts["channels"] == "auto" else int(opts["channels"])     # the phantom is grey
    return DataInfo(tuple(HIP_KPT_NAMES), ("background", "hip") if opts["masks"] else None,
                    resolve_flip_pairs(opts["flip_pairs"], HIP_KPT_NAMES), channels, "per_image")


def _hc18(root: Path, opts: dict, cfg) -> None:
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    log.info("generating %d synthetic HC18 images into %s", cfg.synth_n, root)
    generate_hc18_dataset(root, cfg.synth_n, seed=cfg.synth_seed, image_hw=tuple(cfg.synth_image_hw), progress=True)


def _xray(root: Path, opts: dict, cfg) -> None:
    from data_pipelines.synthetic.xray import generate_xray_dataset
    log.info("generating %d phantom X-rays into %s", cfg.synth_n, root)
    generate_xray_dataset(root, cfg.synth_n, seed=cfg.synth_seed, image_hw=tuple(cfg.synth_image_hw), progress=True)


def _spine(root: Path, opts: dict, cfg) -> None:
    from data_pipelines.synthetic.spine import generate_spine_dataset
    log.info("generating %d phantom spine volumes into %s", cfg.synth_n, root)
    generate_spine_dataset(root, cfg.synth_n, seed=cfg.synth_seed, shape=(SYNTH_SLICES, *cfg.synth_image_hw),
                           num_discs=opts["num_keypoints"], first_value=opts["first_label"], progress=True)
    if not find_volumes(root, opts):
        raise DataError(root, f"the generated volumes do not match image_glob {opts['image_glob']}")


# data.format -> what data.synthetic writes (the table reader has no generator: give it data)
SYNTHESIZERS: dict[str, Synthesizer] = {
    "labelme": Synthesizer(_hip, lambda opts, cfg: label_set_info(HIP_SET, opts, [])),
    "coco": Synthesizer(_hip_coco, _hip_coco_info),
    "hc18": Synthesizer(_hc18, lambda opts, cfg: HC18_INFO),
    "xray_csv": Synthesizer(_xray, lambda opts, cfg: XRAY_INFO),
    "nifti": Synthesizer(_spine, lambda opts, cfg: nifti_info(opts)),
}

__all__ = ["SYNTHESIZERS", "Synthesizer"]
