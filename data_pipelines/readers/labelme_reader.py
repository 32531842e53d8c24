"""labelme folders as a dataset (data.format = labelme): any label set, the published hip set among them.

A labelme folder holds one JSON per image (the image beside it, or embedded), optionally a `dataset.json`
({"spacing_mm": [sx, sy], "samples": [{"json", "id", "patient_id", ...}]}) with the pixel spacing and per-file
metadata. Point shapes are landmarks, polygons are mask classes, rectangles and other shape types are ignored.

Which labels (reader_args.labels):
  auto (default)  discovered from the files: point labels become the landmarks in the order they first appear
                  (files sorted by path, shapes in file order), polygon labels the mask classes likewise; a landmark
                  absent from a file is "not labelled" there. A folder whose labels are exactly the published hip
                  set (docs/systems/hip_us_multihipposenet.md: 6 points, 7 structures, Chinese or English names) reads
                  as the hip set, in its order, with every point and structure required. What was found is logged
                  (`medpose data inspect` shows it too);
  hip             the published hip label map (data_pipelines/readers/labelme.py: HIP_LABELS);
  {points: [..], classes: [..], ignore: [..]}
                  exactly these names (case-insensitive), in this order; any other label is an error naming the
                  file, unless listed under ignore. require_all: every listed label in every file.

Hip files carry their clinical metadata: the Graf type (stratum of the splits; ids > 1000 are type II when
dataset.json does not say), the patient (`<patient>_<view>` stems), 0.2 mm/px when nothing gives a spacing.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.base import (GENERIC_OPTIONS, PAD_VALUE, Reader, ReadResult, channels_of,
                                         check_generic_options, generic_preprocess, resolve_flip_pairs, spacing_pair)
from data_pipelines.readers.labelme import (HIP_CLASS_NAMES, HIP_KPT_NAMES, HIP_LABELS, _load_json, _norm_label,
                                            _parse_shapes, load_json_object, validate_labelme)
from data_pipelines.records import DataInfo, ImageSource, MaskSource, Preprocess, Record
from data_pipelines.transforms import AugmentParams

log = logging.getLogger("medpose")

HIP_DEFAULT_SPACING_MM = (0.2, 0.2)
DEFAULTS: dict[str, Any] = {"labels": "auto", "require_all": None, "spacing_mm": None, **GENERIC_OPTIONS}
LAYOUT = "labelme JSON files (one per image, the image beside it or embedded) under data.root"
_PATIENT_VIEW = re.compile(r"^(?P<patient>.+)_(?P<view>\d+)$")
_LEADING_INT = re.compile(r"^(\d+)")
_POINT_TYPES = ("point",)
_POLYGON_TYPES = ("polygon",)


# ----------------------------------------------------------------------------------------------------- the files
def find_labelme_files(root: str | Path) -> list[Path]:
    """The labelme JSON files of a folder (recursively, sorted), leaving out dataset.json and split files."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    return sorted(p for p in root.rglob("*.json") if p.name != "dataset.json" and not p.name.startswith("splits"))


def has_data(root: Path, opts: dict) -> bool:
    return root.is_dir() and any(p.name != "dataset.json" for p in root.rglob("*.json"))


def _dataset_json(folder: Path, cache: dict[Path, dict]) -> dict:
    """dataset.json of a folder (written by the generators or by hand), {} when absent; samples indexed by "json"."""
    if folder not in cache:
        path = folder / "dataset.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"unreadable dataset.json ({exc})")
        if not isinstance(meta, dict) or not isinstance(meta.get("samples", []), list):
            raise DataError(path, "dataset.json must be an object with a list 'samples'")
        meta["by_json"] = {row.get("json"): row for row in meta.get("samples", ()) if isinstance(row, dict)}
        cache[folder] = meta
    return cache[folder]


# ------------------------------------------------------------------------------------------------------ labels
@dataclass
class LabelReport:
    """What a folder's files label: names in first-appearance order with the number of files using each."""
    files: int = 0
    points: Counter = field(default_factory=Counter)
    polygons: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)          # "label (shape_type)" -> count
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.files} labelme files"]
        out.append(f"{len(self.points)} point labels: " + ", ".join(f"{n} ({c})" for n, c in self.points.items()))
        if self.polygons:
            out.append(f"{len(self.polygons)} polygon labels: "
                       + ", ".join(f"{n} ({c})" for n, c in self.polygons.items()))
        if self.ignored:
            out.append("ignored shapes: " + ", ".join(f"{n} ({c})" for n, c in self.ignored.items()))
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable files, first: {self.unreadable[0][0]}: "
                       f"{self.unreadable[0][1]}")
        return out


def discover_labels(files: Sequence[Path]) -> LabelReport:
    """Scan the files' shapes (JSON only, no image): point and polygon labels in first-appearance order."""
    report = LabelReport()
    for path in files:
        try:
            doc = _load_json(path)
        except DataError as exc:
            report.unreadable.append((exc.path, exc.problem))
            continue
        report.files += 1
        seen: set[tuple[str, str]] = set()
        for shape in doc.get("shapes") or []:
            if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
                continue
            label, kind = shape["label"].strip(), shape.get("shape_type") or "polygon"
            key = "points" if kind in _POINT_TYPES else "polygons" if kind in _POLYGON_TYPES else "ignored"
            name = label if key != "ignored" else f"{label} ({kind})"
            if (key, name) not in seen:
                getattr(report, key)[name] += 1
                seen.add((key, name))
    return report


def _is_hip_set(report: LabelReport) -> bool:
    points = {_norm_label(n) for n in report.points}
    polys = {_norm_label(n) for n in report.polygons}
    hip_p = {_norm_label(k): v for k, v in HIP_LABELS["points"].items()}
    hip_c = {_norm_label(k): v for k, v in HIP_LABELS["classes"].items()}
    return (bool(points) and points <= set(hip_p) and polys <= set(hip_c)
            and {hip_p[p] for p in points} == set(range(len(HIP_KPT_NAMES)))
            and {hip_c[c] for c in polys} == set(range(1, len(HIP_CLASS_NAMES))))


@dataclass(frozen=True)
class LabelSet:
    """The label map _parse_shapes reads with, and the names it gives."""
    label_map: dict
    kpt_names: tuple[str, ...]
    class_names: tuple[str, ...] | None
    require_all: bool
    strict: bool
    hip: bool


HIP_SET = LabelSet(HIP_LABELS, tuple(HIP_KPT_NAMES), tuple(HIP_CLASS_NAMES), True, True, True)


def _explicit(points: Sequence[str], classes: Sequence[str], ignore: Sequence[str], require_all: bool,
              strict: bool) -> LabelSet:
    if not points:
        raise OptionError("data.reader_args.labels: no point labels (landmarks) to read")
    names = [_norm_label(n) for n in list(points) + list(classes)]
    if len(set(names)) != len(names):
        raise OptionError(f"data.reader_args.labels: a label is listed twice in {list(points) + list(classes)}")
    label_map = {"points": {n: i for i, n in enumerate(points)}, "classes": {n: c + 1 for c, n in enumerate(classes)},
                 "ignore": list(ignore)}
    class_names = ("background", *classes) if classes else None
    return LabelSet(label_map, tuple(points), class_names, require_all, strict, False)


def resolve_labels(opts: dict, files: Sequence[Path]) -> tuple[LabelSet, LabelReport | None]:
    """The LabelSet of reader_args.labels (module docstring) and, for auto, the discovery report."""
    spec = opts["labels"]
    if spec == "hip":
        return HIP_SET, None
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"points", "classes", "ignore"})
        if unknown or not isinstance(spec.get("points"), list):
            raise OptionError(f"data.reader_args.labels: expected {{points: [names], classes: [names], ignore: "
                              f"[names]}} (classes and ignore optional), got {spec!r}")
        return _explicit(spec["points"], spec.get("classes") or [], spec.get("ignore") or [],
                         bool(opts["require_all"]), True), None
    if spec != "auto":
        raise OptionError(f"data.reader_args.labels: auto, hip or {{points: [...], classes: [...]}}, got {spec!r}")
    report = discover_labels(files)
    if _is_hip_set(report):
        return HIP_SET, report
    if not report.points:
        where = files[0].parent if files else "data.root"
        raise DataError(where, "no point shapes (landmarks) in the labelme files: " + "; ".join(report.lines()))
    ignore = [n.rsplit(" (", 1)[0] for n in report.ignored]
    return _explicit(list(report.points), list(report.polygons), ignore, bool(opts["require_all"]), False), report


# ----------------------------------------------------------------------------------------------------- records
def _file_meta(path: Path, folders: dict, labels: LabelSet, spacing_mm) -> dict[str, Any]:
    meta = _dataset_json(path.parent, folders)
    row = meta["by_json"].get(path.name, {})
    spacing = spacing_mm if spacing_mm is not None else meta.get("spacing_mm")
    found = _PATIENT_VIEW.match(path.stem)
    patient = row.get("patient_id", found["patient"] if found and labels.hip else path.stem)
    out = {"id": str(row.get("id", path.stem)), "patient_id": str(patient),
           "spacing": None if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(2)}
    if labels.hip:
        lead = _LEADING_INT.match(path.stem)
        out["hip_type"] = row.get("hip_type", "unknown" if lead is None else "II" if int(lead[1]) > 1000 else "I")
    return out


def labelme_record(path: Path, labels: LabelSet, meta: dict[str, Any]) -> Record:
    """One validated file (JSON, shapes, image header + verify()) as a Record."""
    info = validate_labelme(path, labels.label_map, require_all=labels.require_all, strict_labels=labels.strict)
    parsed = _parse_shapes(_load_json(path), path, labels.label_map, labels.require_all, labels.strict)
    src = parsed.image_source
    image = ImageSource(path=src, name=src) if isinstance(src, str) else ImageSource(data=src, name=info.image_path)
    mask = MaskSource(polygons=list(parsed.polygons), max_class=255) if labels.class_names else None
    extra = {"json": str(path)}
    if labels.hip:
        extra["hip_type"] = meta["hip_type"]
    return Record(id=meta["id"], where=str(path), image=image, hw=tuple(parsed.hw), kpts_px_K2=parsed.kpts_px_K2,
                  kpts_visible_K=parsed.kpts_visible_K, mask=mask, spacing_mm=meta["spacing"],
                  patient_id=meta["patient_id"], stratum=meta.get("hip_type"), meta=extra)


def labelme_records(files: Sequence[Path], labels: LabelSet, spacing_mm=None, skip_bad: bool = False
                    ) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records of the files (repeats allowed: a repeated file is validated once); bad files raise, or with
    skip_bad are returned as (json path, problem)."""
    folders: dict[Path, dict] = {}
    done: dict[Path, Record | None] = {}
    records, skipped, no_spacing = [], [], False
    for path in map(Path, files):
        if path not in done:
            try:
                meta = _file_meta(path, folders, labels, spacing_mm)
                if meta["spacing"] is None and labels.hip:
                    meta["spacing"], no_spacing = np.asarray(HIP_DEFAULT_SPACING_MM, dtype=np.float64), True
                done[path] = labelme_record(path, labels, meta)
            except DataError as exc:
                if not skip_bad:
                    raise
                done[path] = None
                skipped.append((str(path), exc.problem if exc.path == str(path) else str(exc)))
        if done[path] is not None:
            records.append(done[path])
    if no_spacing:
        log.warning("labelme: no spacing_mm given and no dataset.json beside some hip files; using %s mm/px",
                    HIP_DEFAULT_SPACING_MM)
    if skipped:
        log.warning("labelme: skipped %d bad file(s):\n%s", len(skipped),
                    "\n".join(f"  {p}: {problem}" for p, problem in skipped))
    return records, skipped


def label_set_info(labels: LabelSet, opts: dict, images: Sequence[str | bytes]) -> DataInfo:
    """The DataInfo of a label set: hip files keep the published 3-channel input unless reader_args.channels says."""
    channels = 3 if labels.hip and opts["channels"] == "auto" else channels_of(opts, images)
    return DataInfo(labels.kpt_names, labels.class_names, resolve_flip_pairs(opts["flip_pairs"], labels.kpt_names)
                    if not labels.hip or opts["flip_pairs"] is not None else (), channels, "per_image")


def hip_preprocess(input_hw, decoder: str = "pil", preresize: bool = False) -> Preprocess:
    """The published hip input: letterbox, padded with 128/255, grey replicated to RGB."""
    return Preprocess(tuple(int(n) for n in input_hw), pad_value=PAD_VALUE, channels=3, decoder=decoder,
                      preresize=preresize)


# ------------------------------------------------------------------------------------------------------ reader
def check_options(opts: dict[str, Any], data_cfg=None) -> dict[str, Any]:
    if opts["require_all"] is not None and not isinstance(opts["require_all"], bool):
        raise OptionError(f"data.reader_args.require_all: true, false or null, got {opts['require_all']!r}")
    if opts["spacing_mm"] is not None:
        opts = {**opts, "spacing_mm": spacing_pair(opts["spacing_mm"], "data.reader_args.spacing_mm")}
    return check_generic_options(opts)


def _spacing(opts: dict, data_cfg):
    return opts["spacing_mm"] if opts["spacing_mm"] is not None else getattr(data_cfg, "spacing_mm", None)


def describe(root: Path, opts: dict, data_cfg) -> DataInfo:
    files = find_labelme_files(root)
    labels, report = resolve_labels(opts, files)
    if report is not None:
        log.info("labelme labels found in %s:\n  %s", root, "\n  ".join(report.lines()))
    images = []
    for path in files:
        try:
            doc = load_json_object(path, "labelme JSON")
        except DataError:
            continue
        if doc.get("imageData") is None and doc.get("imagePath"):
            image = path.parent / str(doc["imagePath"]).replace("\\", "/")
            if image.is_file():
                images.append(str(image))
    return label_set_info(labels, opts, images)


def read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    files = find_labelme_files(root)
    labels, report = resolve_labels(opts, files)
    if report is not None:
        log.info("labelme labels found in %s:\n  %s", root, "\n  ".join(report.lines()))
    records, skipped = labelme_records(files, labels, _spacing(opts, data_cfg), skip_bad)
    sources = [r.image.encoded() for r in records]
    return ReadResult(records, label_set_info(labels, opts, sources), skipped, root, "dataset.json 'split' fields")


def preprocess(opts: dict, data_cfg, info: DataInfo) -> Preprocess:
    return generic_preprocess(opts, data_cfg, info)


def oversample(opts: dict, data_cfg) -> dict | None:
    """Graf type II hips repeated data.oversample_type2 times in training (published: 2); other label sets: none."""
    factor = int(getattr(data_cfg, "oversample_type2", 1))
    return {"II": factor} if factor > 1 else None


_PREDICT_LABELS: dict[tuple[str, str], LabelSet] = {}


def _predict_labels(root: Path, opts: dict, path: Path) -> LabelSet:
    """The run's label set for predict inputs, discovered once per root and option set (a folder of inputs would
    otherwise re-scan the training folder per file)."""
    key = (str(root.resolve()), repr(opts["labels"]))
    if key not in _PREDICT_LABELS:
        files = find_labelme_files(root) if root.is_dir() else []
        _PREDICT_LABELS[key] = resolve_labels(opts, files or [path])[0]
    return _PREDICT_LABELS[key]


def predict_record(path: Path, opts: dict, data_cfg) -> Record | None:
    """A labelme JSON input (its image and truth); None for a plain image."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    labels = _predict_labels(Path(data_cfg.root), opts, path)
    meta = _file_meta(path, {}, labels, _spacing(opts, data_cfg))
    if meta["spacing"] is None and labels.hip:
        meta["spacing"] = np.asarray(HIP_DEFAULT_SPACING_MM, dtype=np.float64)
    return labelme_record(path, labels, meta)


READER = Reader(name="labelme", layout=LAYOUT, defaults=DEFAULTS, check_options=check_options, has_data=has_data,
                describe=describe, read=read, preprocess=preprocess, predict_record=predict_record,
                annotation_suffixes=(".json",), oversample=oversample)


# ------------------------------------------------------------------------------------------- the hip dataset
class HipDataset(LandmarkDataset):
    """labelme hip files as the engine's dataset (the first reader's constructor, kept for scripts and benchmarks):
    letterboxed, padded 128/255, grey replicated to RGB. spacing_mm: mm per original pixel for every file (None:
    dataset.json beside the files, else 0.2). Files are validated up front: with skip_bad the bad ones are dropped
    and listed in `.skipped` [(json path, problem)]. image_decoder: pil | cv2 (the torch path's decoder)."""

    def __init__(self, json_paths: Sequence[str | Path], input_hw: tuple[int, int] = (128, 160),
                 augment: AugmentParams | None = None, sigma_px: float = 2.0, heatmap_peak: float = 255.0,
                 spacing_mm: tuple[float, float] | None = None, label_map: dict[str, Any] = HIP_LABELS,
                 skip_bad: bool = False, seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                 require_all: bool = True, strict_labels: bool = True, image_decoder: str = "pil"):
        labels = HIP_SET if label_map is HIP_LABELS and require_all and strict_labels else LabelSet(
            label_map, tuple(HIP_KPT_NAMES), tuple(HIP_CLASS_NAMES), require_all, strict_labels, True)
        records, skipped = labelme_records(json_paths, labels, spacing_mm, skip_bad)
        if not records:
            raise DataError(Path(json_paths[0]).parent if len(json_paths) else ".",
                            f"no usable labelme files ({len(skipped)} skipped)")
        info = DataInfo(tuple(HIP_KPT_NAMES), tuple(HIP_CLASS_NAMES), (), 3, "per_image")
        super().__init__(records, info, hip_preprocess(input_hw, image_decoder), augment, sigma_px=sigma_px,
                         heatmap_peak=heatmap_peak, heatmap_impl=heatmap_impl, seed=seed, cache_decoded=cache_decoded,
                         skip_bad=skip_bad, skipped=skipped, where=str(Path(json_paths[0]).parent))

    @property
    def json_paths(self) -> list[Path]:
        return [Path(r.meta["json"]) for r in self.records]

    def hip_type(self, i: int) -> str:
        return self.records[i].stratum

    def patient_id(self, i: int) -> str:
        return self.group_id(i)
