"""Per-format entry points for scripts and tests: build_<format>_data(data_cfg, run_dir, strategy, seed) and
load_<format>_for_predict(path, data_cfg) - data_pipelines/build.py and predict_input.py with data.format set."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from data_pipelines.build import build_data
from data_pipelines.predict_input import load_for_predict


def _builder(fmt: str) -> Callable[..., dict[str, Any]]:
    def build(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
        return build_data(dataclasses.replace(data_cfg, format=fmt), run_dir, strategy, seed)
    build.__doc__ = f"The run's data read as data.format={fmt} (data_pipelines/build.py)."
    return build


def _loader(fmt: str) -> Callable[..., dict[str, Any]]:
    def load(path: str | Path, data_cfg) -> dict[str, Any]:
        return load_for_predict(path, dataclasses.replace(data_cfg, format=fmt))
    load.__doc__ = f"One `medpose predict` input read as data.format={fmt} (data_pipelines/predict_input.py)."
    return load


build_coco_data, load_coco_for_predict = _builder("coco"), _loader("coco")
build_table_data, load_table_for_predict = _builder("table"), _loader("table")
build_hip_data, load_labelme_for_predict = _builder("labelme"), _loader("labelme")
build_hc18_data, load_hc18_for_predict = _builder("hc18"), _loader("hc18")
build_xray_csv_data, load_xray_for_predict = _builder("xray_csv"), _loader("xray_csv")
build_nifti_data, load_nifti_for_predict = _builder("nifti"), _loader("nifti")
