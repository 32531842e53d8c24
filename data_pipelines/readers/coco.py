"""COCO keypoints files (the exchange format of pose tools): the parser (read_coco and its validation), its Records,
the reader (data.format = coco: options, describe / read / predict_record) and CocoDataset for scripts.

The exporter (export_coco, dataset_to_coco) is data_pipelines/readers/coco_export.py; it imports from here, never
the reverse.

A COCO file holds "images" [{id, file_name, width, height, optional spacing_mm [sx, sy], patient_id, split}],
"annotations" [{id, image_id, category_id, keypoints [x1, y1, v1, ...], num_keypoints, optional bbox,
segmentation, iscrowd}] and "categories" [{id, name, keypoints [names], skeleton [[a, b], ...] (1-based)}].
One category is read (reader_args `category`; options and defaults: DEFAULTS below); K = its number of
keypoint names.

Visibility: v = 0 -> not labelled (visible False, coordinates 0); v = 1 (labelled, occluded) and v = 2 (labelled,
visible) -> True. The exporter writes 2 for every visible point.

Coordinates: COCO tools treat coordinates as continuous, with the image covering [0, W] x [0, H], so the centre of
pixel (row r, column c) sits at (c + 0.5, r + 0.5). MedPose puts pixel centres at integers (data_pipelines/batch.py),
so the reader applies

    x_medpose = x_coco - pixel_offset,    y_medpose = y_coco - pixel_offset       (default pixel_offset = 0.5)

to keypoints and polygon vertices, and the exporter applies the inverse (read(export(x)) == x). Set pixel_offset=0
for files whose writer stored pixel indices. A labelled point must lie in the image, [-0.5, W - 0.5] in MedPose
coordinates ([0, W] in COCO's at the default offset).

Masks (option masks=true): class 1 = the category, drawn from the annotation's polygons with labelme's pixel-centre
rasteriser (data_pipelines/readers/labelme.py) or from an uncompressed RLE {"size": [h, w], "counts": [...]} (column-major
runs starting with background). The exporter writes masks as uncompressed RLE, which pycocotools reads for any
iscrowd value and which is exact (a traced polygon is not). Crowd annotations (iscrowd=1) mark regions the COCO
evaluation ignores: they are checked for ids and references and otherwise left out.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines.dataset import LandmarkDataset, decode_mask
from data_pipelines.errors import DataError, OptionError
from data_pipelines.images import decode_pixels
from data_pipelines.masks import rle_decode  # noqa: F401 (a public name of the reader)
from data_pipelines.readers.base import (GENERIC_OPTIONS, PAD_VALUE, Reader, ReadResult, channels_of,
                                         check_generic_options, flip_pairs_from_names,  # noqa: F401 (public name)
                                         generic_preprocess, resolve_flip_pairs)
from data_pipelines.readers.labelme import load_json_object
from data_pipelines.records import DataInfo, ImageSource, MaskSource, Preprocess, Record
from data_pipelines.transforms import AugmentParams, points_in_frame

log = logging.getLogger("medpose")

SPLIT_NAMES = ("train", "val", "test")
_TOP_KEYS = ("images", "annotations", "categories")


@dataclass(frozen=True)
class CocoCategory:
    id: int
    name: str
    kpt_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]        # 0-based keypoint indices (the file stores them 1-based)


@dataclass
class CocoSample:
    id: str                      # file_name without its suffix (+ "#<annotation id>" with one_per_image=False)
    file_name: str
    image_path: Path
    hw: tuple[int, int]
    kpts_px_K2: np.ndarray       # float32, MedPose pixels of the original image; 0 where not labelled
    kpts_visible_K: np.ndarray   # bool
    segments: list               # (N, 2) float64 polygons in MedPose pixels, or {"size", "counts"} RLE dicts
    spacing_mm: np.ndarray | None
    patient_id: str | None
    split: str | None
    entry: str                   # "images[i] (id n)"
    ann_entry: str               # "annotations[j] (id m)"


@dataclass
class CocoIndex:
    """A validated COCO file: the samples of one category, and the entries left out."""
    json_path: Path
    images_dir: Path
    category: CocoCategory
    samples: list[CocoSample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unannotated: list[str] = field(default_factory=list)    # images without an annotation of the category
    pixel_offset: float = 0.5
    masks: bool = False


class _Bad(Exception):
    """One entry's problem; read_coco turns it into a DataError naming the file and the entry, or a skipped record."""


@dataclass
class _Image:
    entry: str
    file_name: str
    path: Path
    hw: tuple[int, int]
    spacing_mm: np.ndarray | None
    patient_id: str | None
    split: str | None


@dataclass
class _Ann:
    entry: str
    id: int
    image_id: int
    kpts_px_K2: np.ndarray
    kpts_visible_K: np.ndarray
    segments: list


class _Issues:
    def __init__(self, json_path: Path, skip_bad: bool):
        self.json_path, self.skip_bad = json_path, skip_bad
        self.skipped: list[tuple[str, str]] = []

    def bad(self, entry: str, problem: str) -> None:
        if not self.skip_bad:
            raise DataError(self.json_path, f"{entry}: {problem}")
        self.skipped.append((str(self.json_path), f"{entry}: {problem}"))


# ----------------------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(item: dict, key: str) -> int:
    if key not in item:
        raise _Bad(f"missing '{key}'")
    if not _is_int(item[key]):
        raise _Bad(f"'{key}' must be an integer, got {item[key]!r}")
    return item[key]


def _entry(kind: str, i: int, item: Any) -> str:
    return f"{kind}[{i}] (id {item['id']})" if isinstance(item, dict) and "id" in item else f"{kind}[{i}]"


def _duplicates(items: list, key: str, kind: str) -> dict[int, str]:
    """{position: problem} for every entry whose `key` value another entry of the list also has."""
    where: dict[Any, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get(key), (int, str)) and not isinstance(item.get(key), bool):
            where[item[key]].append(i)
    out = {}
    for value, places in where.items():
        for i in places if len(places) > 1 else ():
            others = ", ".join(f"{kind}[{j}]" for j in places if j != i)
            out[i] = f"duplicate {key} {value!r} (also {others})"
    return out


def _load_doc(json_path: Path) -> dict[str, Any]:
    doc = load_json_object(json_path, "COCO file")
    for key in _TOP_KEYS:
        if key not in doc:
            raise DataError(json_path, f"missing top-level key '{key}'")
        if not isinstance(doc[key], list):
            raise DataError(json_path, f"top-level '{key}' is a {type(doc[key]).__name__}, not a list")
    return doc


# ----------------------------------------------------------------------------------------------------------------
# Categories and images
# ----------------------------------------------------------------------------------------------------------------

def _parse_category(item: Any) -> CocoCategory:
    if not isinstance(item, dict):
        raise _Bad("not an object")
    cat_id = _int_field(item, "id")
    name = item.get("name")
    names = item.get("keypoints", [])
    if not isinstance(name, str) or not name:
        raise _Bad("'name' must be a non-empty string")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise _Bad("'keypoints' must be a list of distinct names")
    skeleton = item.get("skeleton", []) or []
    if not isinstance(skeleton, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(_is_int(v) and 1 <= v <= len(names) for v in e)
            for e in skeleton):
        raise _Bad(f"'skeleton' must list pairs of 1-based keypoint numbers in 1..{len(names)}")
    return CocoCategory(cat_id, name, tuple(names), tuple((a - 1, b - 1) for a, b in skeleton))


def _categories(doc: dict, json_path: Path) -> dict[int, CocoCategory]:
    """Every category (a bad one is a bad file: annotations could not be checked against it)."""
    dups = _duplicates(doc["categories"], "id", "categories")
    cats: dict[int, CocoCategory] = {}
    for i, item in enumerate(doc["categories"]):
        try:
            if i in dups:
                raise _Bad(dups[i])
            cat = _parse_category(item)
        except _Bad as bad:
            raise DataError(json_path, f"{_entry('categories', i, item)}: {bad}")
        cats[cat.id] = cat
    return cats


def _choose_category(cats: dict[int, CocoCategory], wanted: int | str | None, json_path: Path) -> CocoCategory:
    listing = ", ".join(f"{c.id} '{c.name}'" for c in cats.values()) or "none"
    if wanted is None:
        if len(cats) != 1:
            raise DataError(json_path, f"{len(cats)} categories ({listing}): choose one with reader_args.category")
        chosen = next(iter(cats.values()))
    else:
        found = [c for c in cats.values() if c.name == wanted or (_is_int(wanted) and c.id == wanted)]
        if not found:
            raise DataError(json_path, f"no category {wanted!r} (categories: {listing})")
        chosen = found[0]
    if not chosen.kpt_names:
        raise DataError(json_path, f"category {chosen.id} '{chosen.name}' lists no keypoint names")
    return chosen


def _parse_image(item: Any, images_dir: Path) -> tuple[int, _Image]:
    if not isinstance(item, dict):
        raise _Bad("not an object")
    img_id = _int_field(item, "id")
    file_name = item.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise _Bad("'file_name' must be a non-empty string")
    w, h = _int_field(item, "width"), _int_field(item, "height")
    if w < 1 or h < 1:
        raise _Bad(f"width/height must be positive, got {w}/{h}")
    spacing = item.get("spacing_mm")
    if spacing is not None:
        if not (isinstance(spacing, list) and len(spacing) == 2 and all(_is_num(v) and math.isfinite(v) and v > 0
                                                                        for v in spacing)):
            raise _Bad(f"'spacing_mm' must be [sx, sy] in mm per pixel, both > 0, got {spacing!r}")
        spacing = np.asarray(spacing, dtype=np.float64)
    patient = item.get("patient_id")
    if patient is not None and not (isinstance(patient, str) or _is_int(patient)):
        raise _Bad(f"'patient_id' must be a string or an integer, got {patient!r}")
    split = item.get("split")
    if split is not None and split not in SPLIT_NAMES:
        raise _Bad(f"'split' must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    file_name = file_name.replace("\\", "/")        # written on Windows
    return img_id, _Image("", file_name, images_dir / file_name, (h, w), spacing,
                          None if patient is None else str(patient), split)


def _images(doc: dict, images_dir: Path, issues: _Issues) -> tuple[dict[int, _Image], set[int]]:
    """({id: image} of the good entries, every id declared - annotations of a bad image are dropped quietly)."""
    items = doc["images"]
    dups = {**_duplicates(items, "file_name", "images"), **_duplicates(items, "id", "images")}
    images, declared = {}, set()
    for i, item in enumerate(items):
        entry = _entry("images", i, item)
        if isinstance(item, dict) and _is_int(item.get("id")):
            declared.add(item["id"])
        try:
            if i in dups:
                raise _Bad(dups[i])
            img_id, image = _parse_image(item, images_dir)
        except _Bad as bad:
            issues.bad(entry, str(bad))
            continue
        image.entry = entry
        images[img_id] = image
    return images, declared


def _check_image_file(image: _Image) -> None:
    """Exists, opens, has the declared size, and passes PIL's verify() (file structure, PNG chunk CRCs)."""
    if not image.path.is_file():
        raise _Bad(f"image file not found: {image.path}")
    try:
        with Image.open(image.path) as img:
            size = (img.height, img.width)
            img.verify()
    except Exception as exc:        # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise _Bad(f"image file {image.path} does not decode ({type(exc).__name__}: {exc})")
    if size != image.hw:
        raise _Bad(f"image file {image.path} is {size[1]}x{size[0]} but the entry says width x height = "
                   f"{image.hw[1]}x{image.hw[0]}")


# ----------------------------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------------------------

def _parse_keypoints(item: dict, cat: CocoCategory, hw: tuple[int, int], offset: float):
    k = len(cat.kpt_names)
    raw = item.get("keypoints")
    if not isinstance(raw, list):
        raise _Bad("missing 'keypoints' list")
    if len(raw) != 3 * k:
        raise _Bad(f"'keypoints' has {len(raw)} numbers, expected 3 x {k} = {3 * k} for category '{cat.name}'")
    if not all(_is_num(v) and math.isfinite(v) for v in raw):
        raise _Bad("'keypoints' holds a value that is not a finite number")
    arr = np.asarray(raw, dtype=np.float64).reshape(k, 3)
    for j, v in enumerate(arr[:, 2]):
        if v not in (0.0, 1.0, 2.0):
            raise _Bad(f"keypoint {j} ('{cat.kpt_names[j]}') has visibility {v:g}; COCO allows 0 (not labelled), "
                       f"1 (labelled, occluded), 2 (labelled, visible)")
    labelled = arr[:, 2] > 0
    nk = item.get("num_keypoints")
    if nk is not None and nk != int(labelled.sum()):
        raise _Bad(f"num_keypoints is {nk!r} but {int(labelled.sum())} points are labelled (v > 0)")
    pts = arr[:, :2] - offset
    outside = labelled & ~points_in_frame(pts, hw)
    if outside.any():
        j = int(np.argmax(outside))
        raise _Bad(f"keypoint {j} ('{cat.kpt_names[j]}') at ({arr[j, 0]:g}, {arr[j, 1]:g}) lies outside the "
                   f"{hw[1]}x{hw[0]} image")
    pts[~labelled] = 0.0
    return pts.astype(np.float32), labelled


def _parse_segments(seg: Any, hw: tuple[int, int], offset: float) -> list:
    """Polygons [[x1, y1, x2, y2, ...], ...] (to MedPose pixels) or one uncompressed RLE; absent / [] = no mask."""
    if seg is None:
        return []
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if isinstance(counts, str):
            raise _Bad("segmentation is compressed RLE (string counts); only polygons and uncompressed RLE are read "
                       "- decode it with pycocotools.mask and store polygons or a counts list")
        if size != [hw[0], hw[1]]:
            raise _Bad(f"segmentation RLE size {size!r} differs from the image's [height, width] = {list(hw)}")
        if not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)
                and sum(counts) == hw[0] * hw[1]):
            raise _Bad(f"segmentation RLE counts must be non-negative integers summing to {hw[0] * hw[1]}")
        return [{"size": list(size), "counts": counts}]
    if not isinstance(seg, list):
        raise _Bad(f"'segmentation' is a {type(seg).__name__}, expected a list of polygons or an RLE object")
    polygons = []
    for n, poly in enumerate(seg):
        if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                and all(_is_num(v) and math.isfinite(v) for v in poly)):
            raise _Bad(f"segmentation polygon {n} must be [x1, y1, x2, y2, ...] with at least 3 finite points")
        polygons.append(np.asarray(poly, dtype=np.float64).reshape(-1, 2) - offset)
    return polygons


def _parse_annotation(item: Any, ctx: dict) -> _Ann | None:
    """The annotation of the chosen category, or None for one that is not used (other category, crowd region,
    image not selected or bad); ids and references are checked for every annotation."""
    if not isinstance(item, dict):
        raise _Bad("not an object")
    ann_id, image_id, cat_id = (_int_field(item, key) for key in ("id", "image_id", "category_id"))
    if image_id not in ctx["declared"]:
        raise _Bad(f"unknown image_id {image_id}")
    if cat_id not in ctx["cats"]:
        raise _Bad(f"unknown category_id {cat_id}")
    crowd = item.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, bool):
        raise _Bad(f"'iscrowd' must be 0 or 1, got {crowd!r}")
    box = item.get("bbox")
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(_is_num(v) and math.isfinite(v)
                                                                                 for v in box) and min(box[2:]) >= 0):
        raise _Bad(f"'bbox' must be [x, y, width, height] with width, height >= 0, got {box!r}")
    if cat_id != ctx["chosen"].id or crowd or image_id not in ctx["selected"]:
        return None
    image = ctx["images"][image_id]
    pts, vis = _parse_keypoints(item, ctx["chosen"], image.hw, ctx["offset"])
    segments = _parse_segments(item.get("segmentation"), image.hw, ctx["offset"]) if ctx["masks"] else []
    return _Ann("", ann_id, image_id, pts, vis, segments)


def _annotations(doc: dict, ctx: dict, issues: _Issues) -> dict[int, list[_Ann]]:
    items = doc["annotations"]
    dups = _duplicates(items, "id", "annotations")
    by_image: dict[int, list[_Ann]] = defaultdict(list)
    for i, item in enumerate(items):
        entry = _entry("annotations", i, item)
        try:
            if i in dups:
                raise _Bad(dups[i])
            ann = _parse_annotation(item, ctx)
        except _Bad as bad:
            issues.bad(entry, str(bad))
            continue
        if ann is not None:
            ann.entry = entry
            by_image[ann.image_id].append(ann)
    return by_image


def _samples(images: dict[int, _Image], selected: set[int], by_image: dict[int, list[_Ann]], cat: CocoCategory,
             one_per_image: bool, issues: _Issues) -> tuple[list[CocoSample], list[str]]:
    samples, unannotated = [], []
    for img_id, image in images.items():
        if img_id not in selected:
            continue
        anns = by_image.get(img_id, [])
        if not anns:
            unannotated.append(image.entry)
            continue
        try:
            if one_per_image and len(anns) > 1:
                raise _Bad(f"{len(anns)} annotations of category '{cat.name}' ({', '.join(a.entry for a in anns)}); "
                           f"one_per_image=true expects one subject per image")
            _check_image_file(image)
        except _Bad as bad:
            issues.bad(f"{image.entry} '{image.file_name}'", str(bad))
            continue
        stem = str(PurePosixPath(image.file_name).with_suffix(""))
        for ann in anns:
            samples.append(CocoSample(stem if one_per_image else f"{stem}#{ann.id}", image.file_name, image.path,
                                      image.hw, ann.kpts_px_K2, ann.kpts_visible_K, ann.segments, image.spacing_mm,
                                      image.patient_id, image.split, image.entry, ann.entry))
    return samples, unannotated


def read_coco(json_path: str | Path, images_dir: str | Path | None = None, category: int | str | None = None,
              pixel_offset: float = 0.5, masks: bool = False, one_per_image: bool = True, skip_bad: bool = False,
              only: set[Path] | None = None) -> CocoIndex:
    """Validate a COCO keypoints file and return the samples of one category (pixels decoded later, by the Dataset).

    images_dir: folder the file_names are relative to (default: the JSON's folder). A bad entry raises
    DataError(json_path, "<entry>: <problem>"), or with skip_bad=True is left out and listed in `.skipped`; an
    annotation of a bad image is dropped with it. A problem of the whole file (not JSON, a missing top-level key, a bad
    category) always raises. only: resolved image paths to use (the others' annotations are checked for ids only).
    """
    json_path = Path(json_path)
    images_dir = json_path.parent if images_dir is None else Path(images_dir)
    doc = _load_doc(json_path)
    cats = _categories(doc, json_path)
    chosen = _choose_category(cats, category, json_path)
    issues = _Issues(json_path, skip_bad)
    images, declared = _images(doc, images_dir, issues)
    selected = set(images) if only is None else {i for i, im in images.items() if im.path.resolve() in only}
    ctx = {"declared": declared, "cats": cats, "chosen": chosen, "selected": selected, "images": images,
           "offset": float(pixel_offset), "masks": masks}
    by_image = _annotations(doc, ctx, issues)
    samples, unannotated = _samples(images, selected, by_image, chosen, one_per_image, issues)
    return CocoIndex(json_path, images_dir, chosen, samples, issues.skipped, unannotated, float(pixel_offset), masks)


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------

def sample_mask(segments: list, hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): 1 where a polygon (labelme's pixel-centre rasteriser) or an RLE of the annotation covers."""
    return decode_mask(_mask_source(segments), hw, "COCO segmentation")


def _mask_source(segments: list) -> MaskSource:
    return MaskSource(polygons=[(1, p) for p in segments if isinstance(p, np.ndarray)],
                      rles=[s for s in segments if isinstance(s, dict)], max_class=1)


def decode_image_CHW(path: Path) -> np.ndarray:
    """uint8 (C, H, W) by the "auto" colour rule of data_pipelines/images.py (C = 1 for grey, else 3)."""
    return decode_pixels(path, "auto")


# ----------------------------------------------------------------------------------------------------------------
# Records and the dataset
# ----------------------------------------------------------------------------------------------------------------

def coco_records(index: CocoIndex, spacing_mm: Sequence[float] | None = None) -> list[Record]:
    """The index's samples as Records. spacing_mm: for images without a "spacing_mm" field (None: unknown)."""
    fallback = None if spacing_mm is None else np.asarray(spacing_mm, dtype=np.float64).reshape(2)
    out = []
    for s in index.samples:
        out.append(Record(
            id=s.id, where=str(index.json_path), entry=s.entry,
            image=ImageSource(path=str(s.image_path), name=str(s.image_path)), hw=tuple(s.hw),
            kpts_px_K2=s.kpts_px_K2, kpts_visible_K=s.kpts_visible_K,
            mask=_mask_source(s.segments) if index.masks else None,
            spacing_mm=s.spacing_mm if s.spacing_mm is not None else fallback,
            patient_id=s.patient_id if s.patient_id is not None else PurePosixPath(s.file_name).stem,
            split=s.split, meta={"json": str(index.json_path)}))
    return out


def coco_info(index: CocoIndex, flip_pairs=(), channels: int = 3) -> DataInfo:
    names = tuple(index.category.kpt_names)
    classes = ("background", index.category.name) if index.masks else None
    return DataInfo(names, classes, tuple(flip_pairs), channels, "per_image")


def CocoDataset(index: CocoIndex, input_hw: tuple[int, int] = (128, 160), augment: AugmentParams | None = None,
                sigma_px: float = 2.0, heatmap_peak: float = 255.0, spacing_mm: Sequence[float] | None = None,
                seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                ids: Sequence[str] | None = None, channels: int = 3) -> LandmarkDataset:
    """A read COCO file as the engine's dataset (data_pipelines/dataset.py): letterboxed into input_hw, padded with
    128/255, grey replicated to `channels`. ids: the samples to use, by sample id, repeats allowed (None = all, and
    only then `.skipped` lists the entries read_coco left out); spacing_mm for images without one (None: unknown)."""
    records = coco_records(index, spacing_mm)
    if ids is not None:
        by_id = {r.id: r for r in records}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"CocoDataset: {index.json_path} has no sample {unknown[0]!r}")
        records = [by_id[i] for i in ids]
    if not records:
        raise DataError(index.json_path, f"no usable samples of category '{index.category.name}' "
                        f"({len(index.skipped)} entries skipped, {len(index.unannotated)} images unannotated)")
    if ids is None:
        _log_left_out(index)
    pre = Preprocess(tuple(int(n) for n in input_hw), pad_value=PAD_VALUE, channels=channels)
    return LandmarkDataset(records, coco_info(index, augment.flip_pairs if augment else (), channels), pre, augment,
                           sigma_px=sigma_px, heatmap_peak=heatmap_peak, heatmap_impl=heatmap_impl, seed=seed,
                           cache_decoded=cache_decoded, skipped=list(index.skipped) if ids is None else [],
                           where=str(index.json_path))


def _log_left_out(index: CocoIndex) -> None:
    if index.skipped:
        log.warning("%s: skipped %d bad entr%s:\n%s", index.json_path, len(index.skipped),
                    "y" if len(index.skipped) == 1 else "ies", "\n".join(f"  {problem}" for _, problem in index.skipped))
    if index.unannotated:
        log.info("%s: %d image(s) without an annotation of '%s' left out (first: %s)", index.json_path,
                 len(index.unannotated), index.category.name, index.unannotated[0])


# ----------------------------------------------------------------------------------------------------------------
# The reader (data.format = coco)
# ----------------------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {"annotations": "annotations.json", "images": "auto", "category": None,
                            "pixel_offset": 0.5, "masks": False, "splits_from": None, "one_per_image": True,
                            **GENERIC_OPTIONS}
LAYOUT = ("a COCO keypoints file (reader_args.annotations, default annotations.json) with its images beside it or in "
          "images/ (reader_args.images)")


def check_options(opts: dict[str, Any], data_cfg=None) -> dict[str, Any]:
    """data.reader_args over DEFAULTS, each value checked (OptionError naming the option)."""
    checks = {
        "annotations": isinstance(opts["annotations"], str) and bool(opts["annotations"]),
        "images": isinstance(opts["images"], str),
        "category": opts["category"] is None or isinstance(opts["category"], str) or _is_int(opts["category"]),
        "pixel_offset": _is_num(opts["pixel_offset"]) and math.isfinite(opts["pixel_offset"]),
        "masks": isinstance(opts["masks"], bool),
        "one_per_image": isinstance(opts["one_per_image"], bool),
        "splits_from": opts["splits_from"] is None or (
            isinstance(opts["splits_from"], Mapping) and sorted(opts["splits_from"]) == sorted(SPLIT_NAMES)
            and all(isinstance(v, str) and v for v in opts["splits_from"].values())),
    }
    for key, ok in checks.items():
        if not ok:
            raise OptionError(f"data.reader_args.{key}: bad value {opts[key]!r} (see data_pipelines/readers/coco.py: "
                              f"annotations str, images str (auto: the JSON's folder, or images/ beside it), category "
                              f"name|id, pixel_offset number, masks and one_per_image bool, splits_from {{train, val, "
                              f"test: file}})")
    return check_generic_options(opts)


def _annotation_files(root: Path, opts: dict) -> list[Path]:
    return [root / f for f in (opts["splits_from"].values() if opts["splits_from"] else [opts["annotations"]])]


def images_dir(json_path: Path, opts: dict, doc: dict | None = None) -> Path:
    """reader_args.images relative to the JSON's folder; "auto": the JSON's folder, or images/ beside the JSON when
    the first image's file_name is not found directly."""
    if opts["images"] != "auto":
        return json_path.parent / opts["images"]
    beside = json_path.parent / "images"
    if not beside.is_dir():
        return json_path.parent
    doc = doc if doc is not None else load_json_object(json_path, "COCO file")
    first = next((im.get("file_name") for im in doc.get("images", []) if isinstance(im, dict)
                  and isinstance(im.get("file_name"), str)), None)
    if first is not None and not (json_path.parent / first.replace("\\", "/")).is_file():
        return beside
    return json_path.parent


def _read(json_path: Path, opts: dict, skip_bad: bool, only: set[Path] | None = None) -> CocoIndex:
    return read_coco(json_path, images_dir(json_path, opts), opts["category"], opts["pixel_offset"], opts["masks"],
                     opts["one_per_image"], skip_bad, only)


def has_data(root: Path, opts: dict) -> bool:
    return all(p.is_file() for p in _annotation_files(root, opts))


def describe(root: Path, opts: dict, data_cfg) -> DataInfo:
    """Names, classes and flip pairs from the category; channels from the image headers (no pixels decoded)."""
    json_path = _annotation_files(root, opts)[0]
    doc = _load_doc(json_path)
    chosen = _choose_category(_categories(doc, json_path), opts["category"], json_path)
    folder = images_dir(json_path, opts, doc)
    files = [folder / im["file_name"].replace("\\", "/") for im in doc["images"]
             if isinstance(im, dict) and isinstance(im.get("file_name"), str)]
    files = [str(f) for f in files if f.is_file()]
    return DataInfo(tuple(chosen.kpt_names), ("background", chosen.name) if opts["masks"] else None,
                    resolve_flip_pairs(opts["flip_pairs"], chosen.kpt_names), channels_of(opts, files), "per_image")


def read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    """Every sample of the annotation file(s); a record's split comes from splits_from files or "split" fields."""
    spacing = getattr(data_cfg, "spacing_mm", None)
    if opts["splits_from"]:
        indices = {name: _read(root / opts["splits_from"][name], opts, skip_bad) for name in SPLIT_NAMES}
        names = {indices[n].category.kpt_names for n in SPLIT_NAMES}
        if len(names) > 1:
            raise DataError(root, f"the split files' categories list different keypoints: {sorted(names)}")
        records = []
        for name in SPLIT_NAMES:
            for r in coco_records(indices[name], spacing):
                r.split = name
                records.append(r)
        index, where, source = indices["train"], root, "reader_args.splits_from"
        skipped = [s for n in SPLIT_NAMES for s in indices[n].skipped]
    else:
        index = _read(_annotation_files(root, opts)[0], opts, skip_bad)
        records, where = coco_records(index, spacing), index.json_path
        source, skipped = f"'split' fields of {index.json_path.name}", list(index.skipped)
    _log_left_out(index)
    info = describe(root, opts, data_cfg) if records else coco_info(index)
    return ReadResult(records, info, skipped, where, source)


def preprocess(opts: dict, data_cfg, info: DataInfo) -> Preprocess:
    return generic_preprocess(opts, data_cfg, info)


def predict_record(path: Path, opts: dict, data_cfg) -> Record | None:
    """The image's record in the run's COCO file(s) when listed there (truth, spacing), else None."""
    root = Path(data_cfg.root)
    for json_path in _annotation_files(root, opts):
        if not json_path.is_file():
            continue
        try:
            index = _read(json_path, opts, skip_bad=True, only={Path(path).resolve()})
        except DataError as exc:
            log.warning("no ground truth for %s: %s", path, exc)
            continue
        if index.samples:
            return coco_records(index, getattr(data_cfg, "spacing_mm", None))[0]
    return None


READER = Reader(name="coco", layout=LAYOUT, defaults=DEFAULTS, check_options=check_options, has_data=has_data,
                describe=describe, read=read, preprocess=preprocess, predict_record=predict_record,
                annotation_suffixes=())
