"""COCO keypoints files (the exchange format of pose tools): the reader (read_coco and its validation) and CocoDataset.

The run-level data builder (build_coco_data, load_for_predict, reader options) is data_pipelines/coco_data.py; the
exporter (export_coco, dataset_to_coco) is data_pipelines/readers/coco_export.py. Both import from here, never the reverse.

A COCO file holds "images" [{id, file_name, width, height, optional spacing_mm [sx, sy], patient_id, split}],
"annotations" [{id, image_id, category_id, keypoints [x1, y1, v1, ...], num_keypoints, optional bbox,
segmentation, iscrowd}] and "categories" [{id, name, keypoints [names], skeleton [[a, b], ...] (1-based)}].
One category is read (reader_args `category`; options and defaults: coco_data.DEFAULTS); K = its number of
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
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_pipelines.errors import DataError, OptionError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.readers.labelme import load_json_object, rasterize_polygons
from data_pipelines.transforms import (AugmentParams, apply_flip_pairs, augment_intensity, letterbox_matrix,
                                       points_in_frame, random_affine_matrix, sampling_grid, warp_image, warp_mask,
                                       warp_points)

log = logging.getLogger("medpose")

SPLIT_NAMES = ("train", "val", "test")
PAD_VALUE = 128.0 / 255.0       # letterbox padding, the input convention of the other readers
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
# Masks, flip pairs, pixels
# ----------------------------------------------------------------------------------------------------------------

def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """bool (H, W) from an uncompressed COCO RLE: runs alternate 0 / 1 starting with 0, over the column-major
    (Fortran-order) flattening of the mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    flat = np.repeat(np.arange(counts.size) % 2 == 1, counts)
    return flat.reshape((h, w), order="F")


def sample_mask(segments: list, hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): 1 where a polygon (labelme's pixel-centre rasteriser) or an RLE of the annotation covers."""
    mask = rasterize_polygons([(1, p) for p in segments if isinstance(p, np.ndarray)], hw)
    for rle in (s for s in segments if isinstance(s, dict)):
        mask[rle_decode(rle)] = 1
    return mask


_SIDE_PREFIX = re.compile(r"^(left|right|l|r)([_\-. ])(.+)$", re.IGNORECASE)
_SIDE_SUFFIX = re.compile(r"^(.+?)([_\-. ])(left|right|l|r)$", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left", "l": "r", "r": "l"}


def _mirror_name(name: str) -> str | None:
    """left_eye -> right_eye, femur_l -> femur_r, Left-Knee -> Right-Knee; None for a name without a side."""
    for pattern, group in ((_SIDE_PREFIX, 1), (_SIDE_SUFFIX, 3)):
        found = pattern.match(name)
        if found:
            side = found.group(group)
            other = _OTHER_SIDE[side.lower()]
            other = other.upper() if side.isupper() else other.capitalize() if side[0].isupper() else other
            return name[:found.start(group)] + other + name[found.end(group):]
    return None


def flip_pairs_from_names(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Index pairs swapped by a horizontal flip: names differing only in their side word (left_*/right_*, l_*/r_*,
    *_left/*_right, *_l/*_r; separators _ - . or space). A side name without its partner stays unpaired."""
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        j = index.get(_mirror_name(name) or "")
        if j is not None and i < j:
            pairs.append((i, j))
    return tuple(pairs)


def resolve_flip_pairs(spec: Sequence[Sequence[int | str]] | None, names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """reader_args.flip_pairs (pairs of 0-based indices or keypoint names) or, when None, pairs from the names."""
    if spec is None:
        return flip_pairs_from_names(names)
    index = {n: i for i, n in enumerate(names)}
    pairs, used = [], set()
    for pair in spec:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise OptionError(f"data.reader_args.flip_pairs: {pair!r} is not a pair")
        ab = [index.get(v) if isinstance(v, str) else v if _is_int(v) and 0 <= v < len(names) else None for v in pair]
        if None in ab or ab[0] == ab[1] or used & set(ab):
            raise OptionError(f"data.reader_args.flip_pairs: {list(pair)!r} must name two different keypoints "
                              f"(0-based index or name of {list(names)}) not used in another pair")
        used.update(ab)
        pairs.append((ab[0], ab[1]))
    return tuple(pairs)


def decode_image_CHW(path: Path) -> np.ndarray:
    """uint8 (C, H, W): C = 1 for a grey image (16-bit scaled to 8), else 3 (RGB; an RGB file whose channels are
    equal is kept as one channel, which warps three times faster)."""
    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I;16"):
            grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        elif img.mode in ("I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            grey = np.clip(np.rint(arr * (255.0 / max(float(arr.max()), 1.0))), 0, 255).astype(np.uint8)
        elif img.mode in ("L", "LA", "1"):
            grey = np.asarray(img.convert("L"), dtype=np.uint8)
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                return np.ascontiguousarray(rgb.transpose(2, 0, 1))
            grey = rgb[..., 0]
    return np.ascontiguousarray(grey[None])


def _to_input(image_CHW: np.ndarray, m: np.ndarray, input_hw: tuple[int, int], grid) -> torch.Tensor:
    """Float image in [0, 1] -> the 3-channel network input (bilinear warp, pad 128/255, grey replicated)."""
    out = warp_image(image_CHW, m, input_hw, pad_value=PAD_VALUE, grid=grid)
    return out.expand(3, -1, -1).contiguous() if out.shape[0] == 1 else out


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------

class CocoDataset(Dataset):
    """A read COCO file -> sample dicts for collate_samples (contract: data_pipelines/task_data.py).

    index: from read_coco (validated up front). ids: the samples to use, by sample id, repeats allowed (a split,
    an oversampled training list); None = all, and only then `.skipped` lists the entries read_coco left out.
    spacing_mm: mm per original pixel (x, y) for images without a "spacing_mm" field; None -> 1.0 (distances in
    "mm" are then pixels). Augmentation draws from numpy's Generator seeded with (seed, epoch, index), whichever
    worker loads the sample; flips swap the landmark pairs of augment.flip_pairs.
    """

    def __init__(self, index: CocoIndex, input_hw: tuple[int, int] = (128, 160), augment: AugmentParams | None = None,
                 sigma_px: float = 2.0, heatmap_peak: float = 255.0, spacing_mm: Sequence[float] | None = None,
                 seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                 ids: Sequence[str] | None = None):
        if len(input_hw) != 2 or min(input_hw) < 2:
            raise ValueError(f"CocoDataset: input_hw must be (H, W) with both >= 2, got {input_hw}")
        if sigma_px <= 0:
            raise ValueError(f"CocoDataset: sigma_px must be > 0, got {sigma_px}")
        self.index, self.input_hw = index, (int(input_hw[0]), int(input_hw[1]))
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmap_impl = float(sigma_px), float(heatmap_peak), heatmap_impl
        self.seed, self.epoch = int(seed), 0
        self.kpt_names = tuple(index.category.kpt_names)
        self.class_names = ("background", index.category.name) if index.masks else None
        self.samples = self._select(index, ids)
        self.skipped: list[tuple[str, str]] = list(index.skipped) if ids is None else []
        if ids is None:
            self._log_left_out(index)
        fallback = np.asarray(spacing_mm if spacing_mm is not None else (1.0, 1.0), dtype=np.float64).reshape(2)
        if ids is None and spacing_mm is None and any(s.spacing_mm is None for s in self.samples):
            log.info("%s: images without spacing_mm use 1.0 mm/px (distances in mm are pixels)", index.json_path)
        self._spacing = [s.spacing_mm if s.spacing_mm is not None else fallback for s in self.samples]
        self._cache = self._decode_all() if cache_decoded else None
        render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)   # compile before fork

    @staticmethod
    def _select(index: CocoIndex, ids: Sequence[str] | None) -> list[CocoSample]:
        if ids is None:
            chosen = list(index.samples)
        else:
            by_id = {s.id: s for s in index.samples}
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise ValueError(f"CocoDataset: {index.json_path} has no sample {unknown[0]!r}")
            chosen = [by_id[i] for i in ids]
        if not chosen:
            raise DataError(index.json_path, f"no usable samples of category '{index.category.name}' "
                            f"({len(index.skipped)} entries skipped, {len(index.unannotated)} images unannotated)")
        return chosen

    @staticmethod
    def _log_left_out(index: CocoIndex) -> None:
        if index.skipped:
            log.warning("%s: skipped %d bad entr%s:\n%s", index.json_path, len(index.skipped),
                        "y" if len(index.skipped) == 1 else "ies",
                        "\n".join(f"  {problem}" for _, problem in index.skipped))
        if index.unannotated:
            log.info("%s: %d image(s) without an annotation of '%s' left out (first: %s)", index.json_path,
                     len(index.unannotated), index.category.name, index.unannotated[0])

    def _decode(self, s: CocoSample) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            image = decode_image_CHW(s.image_path)
        except Exception as exc:
            raise DataError(self.index.json_path, f"{s.entry}: image file {s.image_path} does not decode "
                            f"({type(exc).__name__}: {exc})") from exc
        if image.shape[1:] != s.hw:
            raise DataError(self.index.json_path, f"{s.entry}: image file {s.image_path} changed size since it was "
                            f"checked ({image.shape[2]}x{image.shape[1]})")
        return image, sample_mask(s.segments, s.hw) if self.index.masks else None

    def _decode_all(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        decoded: dict[str, tuple] = {}       # repeats (oversampling, several annotations) share one decoded copy
        for s in self.samples:
            if s.id not in decoded:
                decoded[s.id] = self._decode(s)
        return [decoded[s.id] for s in self.samples]

    # -------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_id(self, i: int) -> str:
        return self.samples[i].id

    def group_id(self, i: int) -> str:
        """The image's patient_id, else its file stem: a patient's images never straddle two splits."""
        s = self.samples[i]
        return s.patient_id if s.patient_id is not None else PurePosixPath(s.file_name).stem

    def stratum(self, i: int) -> None:
        return None

    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original frame: image_HW3 uint8, kpts_px_K2, kpts_visible_K, spacing_mm_2 (mm per original
        pixel), id, json, image, optional mask_HW."""
        s = self.samples[i]
        image, mask = self._cache[i] if self._cache is not None else self._decode(s)
        hw3 = image.transpose(1, 2, 0)
        out = {"image_HW3": np.repeat(hw3, 3, axis=2) if hw3.shape[2] == 1 else hw3,
               "kpts_px_K2": s.kpts_px_K2.copy(), "kpts_visible_K": s.kpts_visible_K.copy(),
               "spacing_mm_2": self._spacing[i].copy(), "id": s.id, "json": str(self.index.json_path),
               "image": str(s.image_path), "patient_id": self.group_id(i)}
        if mask is not None:
            out["mask_HW"] = mask
        return out

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        return naming_file(self.index.json_path, self._load, i, epoch, prefix=f"{self.samples[i].entry}: ")

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        s = self.samples[i]
        image_u8, mask = self._cache[i] if self._cache is not None else self._decode(s)
        m = letterbox_matrix(s.hw, self.input_hw)
        scale = m[0, 0]
        image = image_u8.astype(np.float32) * np.float32(1.0 / 255.0)
        flipped = False
        if self.augment is not None:
            a = self.augment
            rng = np.random.default_rng([self.seed, epoch, i])
            m_aug, flipped = random_affine_matrix(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac,
                                                  a.shear_deg, a.flip_p)
            m = m_aug @ m
            scale *= float(np.sqrt(abs(np.linalg.det(m_aug[:2, :2]))))
            image = augment_intensity(image, rng, a)       # before the warp: the padding stays exactly 128/255
        grid = sampling_grid(m, s.hw, self.input_hw)
        kpts = warp_points(s.kpts_px_K2, m)
        visible = s.kpts_visible_K & points_in_frame(kpts, self.input_hw)
        if flipped and self.augment.flip_pairs:
            kpts, visible = apply_flip_pairs(kpts, visible, self.augment.flip_pairs)
        kpts = kpts.astype(np.float32)
        out = {
            "image_CHW": _to_input(image, m, self.input_hw, grid),
            "kpts_px_K2": torch.from_numpy(kpts),
            "kpts_visible_K": torch.from_numpy(visible),
            **heatmap_item(render_heatmaps(kpts, visible, self.input_hw, self.sigma_px, self.heatmap_peak,
                                           impl=self.heatmap_impl)),
            # mm per input pixel: exact for the letterbox and for a similarity augmentation of isotropic spacing
            "spacing_mm_2": torch.from_numpy((self._spacing[i] / scale).astype(np.float32)),
            "meta": {"index": i, "id": s.id, "json": str(self.index.json_path), "image": str(s.image_path),
                     "patient_id": self.group_id(i), "orig_hw": tuple(s.hw), "to_input_3x3": m.tolist(),
                     "flipped": flipped},
        }
        if mask is not None:
            out["mask_HW"] = warp_mask(mask, m, self.input_hw, grid=grid)
        return out
