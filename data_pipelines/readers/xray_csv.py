"""The published hip X-ray annotation format (docs/systems/hip_xray_efficientnet.md): one CSV per image, 12 landmarks,
and its folder layout.

Annotation: `<name>.csv` beside the image's `<name>.png|jpg` (in `annotations/` vs `images/`), ONE line of 12 quoted
integer tuples in original pixels, x right, y down (data_pipelines/batch.py convention):
    "(553, 424)","(601, 447)",...,"(1377, 612)"
Reading is tolerant of whitespace, missing quotes, floats and trailing blank lines, strict about the count (12) and
about every coordinate being a finite number inside the image ([-0.5, W-0.5] x [-0.5, H-0.5]).

Landmarks (0-based index = k - 1 for pk). Image-left hip (the patient's right): p1 lateral acetabular edge, p2 on the
acetabular roof between, p3 medial roof end = triradiate (Hilgenreiner) point; p4..p6 femoral points - in the
phantom (data_pipelines/synthetic/xray.py) p4 the medial and p6 the lateral corner of the proximal femoral metaphysis
(the IHDI H-point is their midpoint) and p5 the femoral-head ossification centre. Image-right hip mirrored: p7
triradiate point, p8 roof, p9 lateral edge, p10 medial metaphysis corner, p11 head centre, p12 lateral corner.
Hilgenreiner line through p3 and p7; Perkin lines through p1 and p9 perpendicular to it.

Layouts: `<root>/{train,val,test}/{images,annotations}/` (the published splits, used as given) or a flat
`<root>/images` + `<root>/annotations` (the engine makes grouped splits).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError, OptionError
from data_pipelines.images import decode_grey, equalize_hist  # noqa: F401 (public names of this reader)
from data_pipelines.dataset import stretch_matrix  # noqa: F401 (a public name of this reader)
from data_pipelines.readers.base import Reader, ReadResult, dataset_spacing
from data_pipelines.records import NORMALIZE_MODES, RESIZE_MODES, DataInfo, ImageSource, Preprocess, Record
from data_pipelines.transforms import AugmentParams

log = logging.getLogger("medpose")

NUM_XRAY_KPTS = 12
XRAY_KPT_NAMES = tuple(f"p{k}" for k in range(1, NUM_XRAY_KPTS + 1))
XRAY_KPT_DESCRIPTIONS = (
    "left hip: lateral acetabular edge", "left hip: acetabular roof", "left hip: triradiate (Hilgenreiner) point",
    "left femur: medial metaphysis corner", "left femur: head ossification centre",
    "left femur: lateral metaphysis corner",
    "right hip: triradiate (Hilgenreiner) point", "right hip: acetabular roof", "right hip: lateral acetabular edge",
    "right femur: medial metaphysis corner", "right femur: head ossification centre",
    "right femur: lateral metaphysis corner",
)
# A horizontal flip turns the image-left hip into the image-right one: p1<->p9, p2<->p8, p3<->p7 (the roof runs
# lateral->medial on the left, medial->lateral on the right), p4<->p10, p5<->p11, p6<->p12.
XRAY_FLIP_PAIRS = ((0, 8), (1, 7), (2, 6), (3, 9), (4, 10), (5, 11))
SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_TUPLE = re.compile(r"\(([^()]*)\)")
_FILLER = re.compile(r'^[\s",]*$')


@dataclass(frozen=True)
class XrayRecord:
    """One validated sample: paths, original size (H, W), landmarks (12, 2) float64 original pixels."""
    image_path: Path
    csv_path: Path
    hw: tuple[int, int]
    kpts_px_K2: np.ndarray
    split: str | None = None

    @property
    def name(self) -> str:
        return self.image_path.stem


# ----------------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------------

def _number(text: str, field: str, path: Path) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(path, f"unparsable point {field}: '{text.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise DataError(path, f"unparsable point {field}: '{text.strip()}' is not a finite number")
    return value


def parse_xray_points(text: str, path: str | Path = "<text>") -> np.ndarray:
    """(12, 2) float64 from the text of one annotation file; DataError(path, problem) when malformed."""
    path = Path(path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(path, f"empty annotation (expected one line of {NUM_XRAY_KPTS} points)")
    if len(lines) > 1:
        raise DataError(path, f"expected one line of {NUM_XRAY_KPTS} points, found {len(lines)} non-empty lines")
    line = lines[0]
    leftover = _TUPLE.sub(",", line)
    if not _FILLER.match(leftover):
        junk = re.sub(r'[\s",]+', " ", leftover).strip()
        raise DataError(path, f"unparsable text outside the point tuples: '{junk[:40]}'")
    fields = _TUPLE.findall(line)
    if len(fields) != NUM_XRAY_KPTS:
        raise DataError(path, f"wrong number of points: expected {NUM_XRAY_KPTS}, found {len(fields)}")
    pts = np.empty((NUM_XRAY_KPTS, 2), dtype=np.float64)
    for k, body in enumerate(fields):
        parts = body.split(",")
        if len(parts) != 2:
            raise DataError(path, f"unparsable point {XRAY_KPT_NAMES[k]}: '({body})' is not an (x, y) pair")
        pts[k] = [_number(p, XRAY_KPT_NAMES[k], path) for p in parts]
    return pts


def read_xray_csv(path: str | Path) -> np.ndarray:
    """(12, 2) float64 landmarks of one annotation file (original pixels)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")     # a BOM from spreadsheet exports is not part of the data
    except FileNotFoundError:
        raise DataError(path, "annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable annotation ({type(exc).__name__}: {exc})") from None
    return parse_xray_points(text, path)


def check_points_in_image(kpts_K2: np.ndarray, hw: tuple[int, int], path: str | Path) -> None:
    """Every point inside the image extent [-0.5, W-0.5] x [-0.5, H-0.5]; else DataError naming the first one."""
    h, w = hw
    for k, (x, y) in enumerate(np.asarray(kpts_K2, dtype=np.float64)):
        if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            raise DataError(path, f"point {XRAY_KPT_NAMES[k]} ({x:g}, {y:g}) lies outside the {w}x{h} image")


def format_xray_line(kpts_K2: np.ndarray) -> str:
    """The published line: 12 quoted integer tuples, coordinates rounded to the nearest pixel (half to even)."""
    pts = np.asarray(kpts_K2, dtype=np.float64)
    if pts.shape != (NUM_XRAY_KPTS, 2):
        raise ValueError(f"format_xray_line: need ({NUM_XRAY_KPTS}, 2) points, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("format_xray_line: points must be finite")
    ints = np.rint(pts).astype(np.int64)
    return ",".join(f'"({x}, {y})"' for x, y in ints)


def write_xray_csv(path: str | Path, kpts_K2: np.ndarray) -> Path:
    """Write one annotation file in the published format (integer pixels); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_xray_line(kpts_K2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

def image_hw(path: str | Path) -> tuple[int, int]:
    """(H, W) from the header, after PIL's verify() of the file structure (chunk CRCs for PNG); no pixel decode."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as img:
            hw = (int(img.height), int(img.width))
            img.verify()
    except Exception as exc:   # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise DataError(path, f"image does not decode ({type(exc).__name__}: {exc})") from None
    return hw


def read_grey(path: str | Path) -> np.ndarray:
    """uint8 (H, W): 8-bit grey as is, 16-bit scaled by 255/65535, colour to luma (PIL 'L', ITU-R 601-2)."""
    return decode_grey(str(path))


# ----------------------------------------------------------------------------------------------------------------
# Layout and validation
# ----------------------------------------------------------------------------------------------------------------

def validate_xray_pair(image_path: str | Path, csv_path: str | Path, split: str | None = None) -> XrayRecord:
    """Parse the CSV, read the image header (verify), check the points lie inside it."""
    image_path, csv_path = Path(image_path), Path(csv_path)
    kpts = read_xray_csv(csv_path)
    if not image_path.is_file():
        raise DataError(csv_path, f"missing image: {image_path} not found")
    hw = image_hw(image_path)
    check_points_in_image(kpts, hw, csv_path)
    return XrayRecord(image_path, csv_path, hw, kpts, split)


def image_for_csv(csv_path: str | Path) -> Path:
    """The image of an annotation: `<base>/images/<stem>.*` for `<base>/annotations/<stem>.csv`, else beside it."""
    csv_path = Path(csv_path)
    folders = [csv_path.parent.parent / "images"] if csv_path.parent.name == "annotations" else []
    for folder in folders + [csv_path.parent]:
        for suffix in IMAGE_SUFFIXES:
            for cand in (folder / (csv_path.stem + suffix), folder / (csv_path.stem + suffix.upper())):
                if cand.is_file():
                    return cand
    where = " or ".join(str(f) for f in folders + [csv_path.parent])
    raise DataError(csv_path, f"missing image: no {csv_path.stem}.png/.jpg in {where}")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in found:
                raise DataError(p, f"two images share the name '{p.stem}' ({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    return found


def _pair_folder(base: Path, skip_bad: bool, skipped: list[tuple[str, str]]) -> list[tuple[Path, Path]]:
    """(image, csv) pairs of base/images + base/annotations; an unmatched file raises (or is counted skipped)."""
    img_dir, ann_dir = base / "images", base / "annotations"
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(d, "folder not found (expected images/ and annotations/ side by side)")
    images = _images_by_stem(img_dir)
    csvs = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".csv"}
    problems = [(str(images[s]), f"missing annotation: {ann_dir / (s + '.csv')} not found")
                for s in sorted(set(images) - set(csvs))]
    problems += [(str(csvs[s]), f"missing image: no {s}.png/.jpg in {img_dir}")
                 for s in sorted(set(csvs) - set(images))]
    if problems and not skip_bad:
        raise DataError(*problems[0])
    skipped.extend(problems)
    return [(images[s], csvs[s]) for s in sorted(set(images) & set(csvs))]


def find_xray_samples(root: str | Path, skip_bad: bool = False) -> tuple[dict[str | None, list[tuple[Path, Path]]],
                                                                         list[tuple[str, str]]]:
    """({split: [(image, csv)]}, skipped). Split folders -> keys "train", "val", "test" (all three required);
    flat layout -> the single key None."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    skipped: list[tuple[str, str]] = []
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    flat = (root / "images").is_dir() or (root / "annotations").is_dir()
    if present and flat:
        raise DataError(root, f"both split folders ({', '.join(present)}) and a flat images/ annotations/ layout; "
                              "keep one")
    if not present and not flat:
        raise DataError(root, "no X-ray dataset here: expected <root>/{train,val,test}/{images,annotations}/ or "
                              "<root>/images + <root>/annotations")
    if present:
        missing = [s for s in SPLIT_NAMES if s not in present]
        if missing:
            raise DataError(root / missing[0], f"split folder missing (found {', '.join(present)}; the published "
                                               "layout has train, val and test)")
        found = {s: _pair_folder(root / s, skip_bad, skipped) for s in SPLIT_NAMES}
    else:
        found = {None: _pair_folder(root, skip_bad, skipped)}
    return found, skipped


def validate_pairs(pairs: Sequence[tuple[Path, Path, str | None]], skip_bad: bool,
                   skipped: list[tuple[str, str]]) -> list[XrayRecord]:
    """validate_xray_pair over (image, csv, split) triples; bad ones raise or are appended to `skipped`."""
    records = []
    for image_path, csv_path, split in pairs:
        try:
            records.append(validate_xray_pair(image_path, csv_path, split))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path, exc.problem))
    return records


# ----------------------------------------------------------------------------------------------------------------
# Records, the dataset and the reader (data.format = xray_csv)
# ----------------------------------------------------------------------------------------------------------------
# Per sample: grey uint8 original -> histogram equalisation (published: on) -> /255 -> M = augment o resize (stretch:
# the published cv2.resize, aspect not kept; letterbox: aspect kept, padded with black, the X-ray background) moves
# image and landmarks; grey is replicated to 3 channels (optionally ImageNet-normalised). A horizontal flip swaps the
# hips' landmarks (XRAY_FLIP_PAIRS). Heatmap targets only with heatmaps=True (the published models regress).
XRAY_DEFAULTS = {"resize": "stretch", "equalize": True, "heatmaps": False, "normalize": "none"}
XRAY_PAD_VALUE = 0.0
XRAY_DEFAULT_SPACING_MM = (1.0, 1.0)
XRAY_INFO = DataInfo(XRAY_KPT_NAMES, None, XRAY_FLIP_PAIRS, 3, "per_image")
XRAY_LAYOUT = "<root>/{train,val,test}/{images,annotations}/ or <root>/images + <root>/annotations (one CSV per image)"
_VIEW_SUFFIX = re.compile(r"^(?P<group>.+?)_(?P<view>\d+)$")
_WARNED_SPACING: set[str] = set()


def group_of(name: str) -> str:
    """The patient / exam of an image name: the stem up to an optional `_<digits>` view suffix."""
    found = _VIEW_SUFFIX.match(name)
    return found["group"] if found else name


def xray_records(records: Sequence[XrayRecord], spacing_mm: Sequence[float] | None = None) -> list[Record]:
    """Validated CSV/image pairs as Records; spacing: data.spacing_mm, else dataset.json above the images, else
    1.0 mm/px (warned once per folder: X-ray errors are then reported in pixels)."""
    cache: dict[Path, Any] = {}
    out, missing = [], []
    for rec in records:
        value = spacing_mm if spacing_mm is not None else dataset_spacing(rec.image_path, cache)
        if value is None:
            value = XRAY_DEFAULT_SPACING_MM
            missing.append(str(rec.image_path.parent))
        out.append(Record(id=rec.name, where=str(rec.csv_path), image=ImageSource(path=str(rec.image_path),
                                                                                 name=str(rec.image_path)),
                          hw=tuple(rec.hw), kpts_px_K2=np.asarray(rec.kpts_px_K2, dtype=np.float32),
                          kpts_visible_K=np.ones(len(rec.kpts_px_K2), bool),
                          spacing_mm=np.asarray(value, dtype=np.float64).reshape(2), patient_id=group_of(rec.name),
                          split=rec.split, meta={"csv": str(rec.csv_path)}))
    new = sorted(set(missing) - _WARNED_SPACING)
    if new:
        _WARNED_SPACING.update(new)
        log.warning("xray_csv: no spacing_mm given and no dataset.json with 'spacing_mm' above %s; using %s mm/px "
                    "(X-ray errors are reported in pixels)", ", ".join(new[:3]), XRAY_DEFAULT_SPACING_MM)
    return out


def xray_preprocess(input_hw, resize: str = "stretch", equalize: bool = True, normalize: str = "none",
                    preresize: bool = False) -> Preprocess:
    return Preprocess(tuple(int(n) for n in input_hw), resize=resize, pad_value=XRAY_PAD_VALUE, color="grey",
                      channels=3, equalize=equalize, normalize=normalize, preresize=preresize)


def _as_triple(item) -> tuple[Path, Path, str | None]:
    if isinstance(item, (str, Path)):
        return image_for_csv(item), Path(item), None
    image, csv, *rest = item
    return Path(image), Path(csv), (rest[0] if rest else None)


class XrayDataset(LandmarkDataset):
    """Hip X-ray samples as the engine's dataset (the first reader's constructor, kept for scripts): items are
    XrayRecords, CSV paths or (image, csv[, split]) tuples, validated here (skip_bad: bad ones listed in .skipped)."""

    def __init__(self, items: Sequence[Any], input_hw: tuple[int, int] = (224, 224), resize: str = "letterbox",
                 equalize: bool = True, augment: AugmentParams | None = None, sigma_px: float = 2.0,
                 heatmap_peak: float = 255.0, heatmaps: bool = False, spacing_mm: Sequence[float] | None = None,
                 normalize: str = "none", skip_bad: bool = False, seed: int = 0, cache_decoded: bool = False,
                 heatmap_impl: str = "numba"):
        for name, value, allowed in (("resize", resize, RESIZE_MODES), ("normalize", normalize, NORMALIZE_MODES)):
            if value not in allowed:
                raise OptionError(f"data.reader_args.{name}: '{value}' is not one of {', '.join(allowed)}")
        skipped: list[tuple[str, str]] = []
        recs = [it for it in items if isinstance(it, XrayRecord)]
        recs += validate_pairs([_as_triple(it) for it in items if not isinstance(it, XrayRecord)], skip_bad, skipped)
        if skipped:
            log.warning("XrayDataset: skipped %d bad sample(s):\n%s", len(skipped),
                        "\n".join(f"  {p}: {problem}" for p, problem in skipped))
        if not recs:
            first = items[0] if len(items) else "."
            where = first.csv_path if isinstance(first, XrayRecord) else first if isinstance(first, (str, Path)) \
                else first[1]
            raise DataError(Path(where).parent, f"no usable X-ray samples ({len(skipped)} skipped)")
        super().__init__(xray_records(recs, spacing_mm), XRAY_INFO, xray_preprocess(input_hw, resize, equalize,
                                                                                  normalize), augment,
                         sigma_px=sigma_px, heatmap_peak=heatmap_peak, heatmap_impl=heatmap_impl, heatmaps=heatmaps,
                         seed=seed, cache_decoded=cache_decoded, skip_bad=skip_bad, skipped=skipped)


def _check_options(opts: dict, data_cfg=None) -> dict:
    if opts["resize"] not in RESIZE_MODES:
        raise OptionError(f"data.reader_args.resize: '{opts['resize']}' is not one of {', '.join(RESIZE_MODES)}")
    if opts["normalize"] not in NORMALIZE_MODES:
        raise OptionError(f"data.reader_args.normalize: '{opts['normalize']}' is not one of "
                          f"{', '.join(NORMALIZE_MODES)}")
    for key in ("equalize", "heatmaps"):
        if not isinstance(opts[key], bool):
            raise OptionError(f"data.reader_args.{key}: must be true or false, got {opts[key]!r}")
    return opts


def _has_data(root: Path, opts: dict) -> bool:
    """The published split folders, or images/ + annotations/ side by side."""
    return any((root / s).is_dir() for s in SPLIT_NAMES) or ((root / "images").is_dir()
                                                              and (root / "annotations").is_dir())


def _read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    layout, skipped = find_xray_samples(root, skip_bad=skip_bad)
    triples = [(img, csv, split) for split, pairs in layout.items() for img, csv in pairs]
    recs = validate_pairs(triples, skip_bad, skipped)
    if None not in layout:
        for s in SPLIT_NAMES:
            if not any(r.split == s for r in recs):
                raise DataError(root / s, "split folder holds no usable samples")
    return ReadResult(xray_records(recs, getattr(data_cfg, "spacing_mm", None)), XRAY_INFO, skipped, root,
                      "folders")


def _predict_record(path: Path, opts: dict, data_cfg) -> Record | None:
    """A CSV annotation input (its image and the truth); None for a plain image."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return None
    return xray_records([validate_xray_pair(image_for_csv(path), path)], getattr(data_cfg, "spacing_mm", None))[0]


XRAY_READER = Reader(
    name="xray_csv", layout=XRAY_LAYOUT, defaults=XRAY_DEFAULTS, check_options=_check_options, has_data=_has_data,
    describe=lambda root, opts, cfg: XRAY_INFO, read=_read,
    preprocess=lambda opts, cfg, info: xray_preprocess(cfg.input_hw, opts["resize"], opts["equalize"],
                                                       opts["normalize"], bool(getattr(cfg, "preresize", False))),
    predict_record=_predict_record, annotation_suffixes=(".csv",), heatmaps=lambda opts: opts["heatmaps"],
    # X-ray noise is additive quantum noise, not ultrasound speckle: keep the multiplicative speckle small.
    augment_overrides={"speckle_sigma_max": 0.03})
