"""The published hip X-ray annotation format (SEEDS.md §2): one CSV per image, 12 landmarks, and its folder layout.

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

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipelines.errors import DataError

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
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8))
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except Exception as exc:
        raise DataError(path, f"image does not decode ({type(exc).__name__}: {exc})") from None


def equalize_hist(img_HW: np.ndarray) -> np.ndarray:
    """Histogram equalisation of an 8-bit grey image, the formula of OpenCV's equalizeHist.

    With hist the 256-bin histogram, i0 the first non-empty bin and N the pixel count: lut[i0] = 0 and, for
    i > i0, lut[i] = round((cdf(i) - hist[i0]) * 255 / (N - hist[i0])) (float32 maths, round half to even like
    cvRound); a single-valued image stays as it is.
    """
    img = np.asarray(img_HW)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"equalize_hist: need a uint8 (H, W) image, got {img.dtype} {img.shape}")
    hist = np.bincount(img.ravel(), minlength=256).astype(np.int64)
    i0 = int(np.flatnonzero(hist)[0]) if img.size else 0
    total = int(img.size)
    if total == 0 or hist[i0] == total:
        return img.copy()
    scale = np.float32(255.0) / np.float32(total - hist[i0])
    sums = np.cumsum(hist) - hist[i0]                 # exact integers, as OpenCV's running int sum
    lut = np.clip(np.rint(sums.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    lut[:i0 + 1] = 0
    return lut[img]


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
