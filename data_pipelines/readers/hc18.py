"""HC18 fetal-head ultrasound (van den Heuvel et al., PLoS ONE 2018) in the layout of /work/shared/data/hc18:

    root/images/<stem>.png   8-bit grey B-mode image (mostly 800x540)
    root/masks/<stem>.png    same size, 1 inside the head ellipse (pixel centre inside), 0 outside
    root/annotations.csv     one row per image: HC18_COLUMNS

Landmarks (4, in HC18_KPT_NAMES order) are the ellipse's axis end points: ofd1/ofd2 the long (occipito-frontal) axis,
bpd1/bpd2 the short (biparietal) axis. Ordering rule (README): ofd1 is the long-axis end with the smaller x (ties:
smaller y); bpd1 is the short-axis end with the smaller y (ties: smaller x).

Flips. A horizontal mirror x -> W-1-x reverses the x order of the long-axis ends, so ofd1 <-> ofd2 swap (flip pair
(0, 1)); y is unchanged, so the bpd order (by y) stays - except on an exact y tie, where the x tie-break reverses.
A rotation can also carry a near-vertical long axis across the vertical (or a near-horizontal short axis across the
horizontal) and so reverse an order. The dataset therefore applies the flip pair and then re-imposes the README's
rule on the warped points (`order_axis_points`), which is exact in every case: the label of a channel is always a
function of the image the network sees. tests/test_hc18.py checks both.

Exams: images sharing the 3-digit prefix `exam_id` come from one exam and never straddle splits (group_id).
Pixel spacing is isotropic: spacing_mm_2 = (pixel_size_mm, pixel_size_mm).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError
from data_pipelines.point_order import axis_order, order_axis_points  # noqa: F401 (public names of the reader)
from data_pipelines.readers.base import PAD_VALUE, Reader, ReadResult
from data_pipelines.records import DataInfo, ImageSource, MaskSource, Preprocess, Record
from data_pipelines.transforms import AugmentParams, points_in_frame

log = logging.getLogger(__name__)

HC18_KPT_NAMES = ("ofd1", "ofd2", "bpd1", "bpd2")
HC18_CLASS_NAMES = ("background", "head")
HC18_FLIP_PAIRS = ((0, 1),)          # horizontal flip: the long-axis ends trade the smaller-x role
HC18_COLUMNS = ("stem", "width", "height", "pixel_size_mm", "hc_mm", "ofd1_x", "ofd1_y", "ofd2_x", "ofd2_y",
                "bpd1_x", "bpd1_y", "bpd2_x", "bpd2_y", "exam_id", "center_x", "center_y", "semi_major_px",
                "semi_minor_px", "angle_deg", "hc_fit_mm")
_TEXT_COLUMNS = ("stem", "exam_id")
_FLOAT_COLUMNS = tuple(c for c in HC18_COLUMNS if c not in _TEXT_COLUMNS)
DEFAULT_INPUT_HW = (224, 320)        # 800x540 letterboxed: scale 0.4, 8 px of padding top and bottom
DEFAULTS: dict[str, Any] = {}         # data.reader_args of format hc18: none


@dataclass(frozen=True)
class HC18Record:
    """One validated annotations.csv row (pixel units, original frame)."""
    stem: str
    exam_id: str
    image_path: Path
    mask_path: Path
    width: int
    height: int
    pixel_size_mm: float
    hc_mm: float
    hc_fit_mm: float
    kpts_px_42: np.ndarray            # float64 [ofd1, ofd2, bpd1, bpd2]
    ellipse: dict[str, float]         # center_x, center_y, semi_major_px, semi_minor_px, angle_deg
    row: int                          # line number in annotations.csv (header = 1)


# ---------------------------------------------------------------------------------------------- annotations.csv
def _parse_row(row: dict[str, str], line: int, csv_path: Path, root: Path) -> HC18Record:
    stem = (row.get("stem") or "").strip()
    where = f"row {line} (stem {stem or '?'})"
    if not stem:
        raise DataError(csv_path, f"row {line}: column 'stem' is empty")
    exam = (row.get("exam_id") or "").strip()
    if not exam:
        raise DataError(csv_path, f"{where}: column 'exam_id' is empty")
    vals: dict[str, float] = {}
    for col in _FLOAT_COLUMNS:
        text = (row.get(col) or "").strip()
        try:
            vals[col] = float(text)
        except ValueError:
            raise DataError(csv_path, f"{where}: column '{col}' = {text!r} is not a number") from None
        if not math.isfinite(vals[col]):
            raise DataError(csv_path, f"{where}: column '{col}' = {text!r} is not finite")
    if not vals["pixel_size_mm"] > 0:
        raise DataError(csv_path, f"{where}: column 'pixel_size_mm' must be > 0 (got {vals['pixel_size_mm']})")
    for col in ("width", "height"):
        if vals[col] < 1 or vals[col] != int(vals[col]):
            raise DataError(csv_path, f"{where}: column '{col}' must be a positive integer (got {vals[col]})")
    kpts = np.array([[vals[f"{n}_x"], vals[f"{n}_y"]] for n in HC18_KPT_NAMES], dtype=np.float64)
    w, h = int(vals["width"]), int(vals["height"])
    outside = ~points_in_frame(kpts, (h, w))
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise DataError(csv_path, f"{where}: landmark {HC18_KPT_NAMES[k]} ({kpts[k, 0]:g}, {kpts[k, 1]:g}) lies "
                                  f"outside the {w}x{h} image")
    ellipse = {c: vals[c] for c in ("center_x", "center_y", "semi_major_px", "semi_minor_px", "angle_deg")}
    return HC18Record(stem, exam, root / "images" / f"{stem}.png", root / "masks" / f"{stem}.png", w, h,
                      vals["pixel_size_mm"], vals["hc_mm"], vals["hc_fit_mm"], kpts, ellipse, line)


def read_annotations(root: str | Path, skip_bad: bool = False) -> tuple[list[HC18Record], list[tuple[str, str]]]:
    """Parse and check root/annotations.csv (no image access). A missing file or column always raises; a bad row
    raises, or with skip_bad is returned in the skipped list [(path, problem)]."""
    root = Path(root)
    csv_path = root / "annotations.csv"
    if not csv_path.is_file():
        raise DataError(csv_path, "annotations.csv not found")
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in HC18_COLUMNS if c not in header]
            if missing:
                raise DataError(csv_path, f"missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
            reader.fieldnames = header
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"unreadable CSV ({exc})") from None
    records, skipped, seen = [], [], set()
    for line, row in rows:
        try:
            rec = _parse_row(row, line, csv_path, root)
            if rec.stem in seen:
                raise DataError(csv_path, f"row {line}: stem {rec.stem} appears twice")
            seen.add(rec.stem)
            records.append(rec)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path, exc.problem))
    return records, skipped


# --------------------------------------------------------------------------------------------------- image files
def _read_png(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        with Image.open(path) as im:
            im.load()
            if what == "image" and im.mode != "L":
                im = im.convert("L")       # an RGB export of a grey B-mode image: luminance
            return np.array(im)          # a writable copy (torch warns on read-only arrays)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(path, f"{what} does not decode ({type(exc).__name__}: {exc})") from None


def read_image(rec: HC18Record) -> np.ndarray:
    """uint8 (H, W) grey image, checked against the CSV size."""
    img = _read_png(rec.image_path, "image")
    if img.dtype != np.uint8 or img.ndim != 2:
        raise DataError(rec.image_path, f"image must be 8-bit grey, got {img.dtype} {img.shape}")
    if img.shape != (rec.height, rec.width):
        raise DataError(rec.image_path, f"image is {img.shape[1]}x{img.shape[0]} (W x H) but annotations.csv row "
                                        f"{rec.row} says {rec.width}x{rec.height}")
    return img


def read_mask(rec: HC18Record) -> np.ndarray:
    """uint8 (H, W) mask with values in {0, 1}, checked against the CSV size."""
    mask = _read_png(rec.mask_path, "mask")
    if mask.ndim != 2:
        raise DataError(rec.mask_path, f"mask must be single-channel, got shape {mask.shape}")
    if mask.shape != (rec.height, rec.width):
        raise DataError(rec.mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} (W x H) but the image is "
                                       f"{rec.width}x{rec.height}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):     # min/max: np.unique would sort every time
        raise DataError(rec.mask_path, f"mask values must be 0/1, found {np.unique(mask)[:8].tolist()}")
    return mask.astype(np.uint8, copy=False)


def scan_hc18(root: str | Path, skip_bad: bool = False) -> tuple[list[HC18Record], list[tuple[str, str]]]:
    """Every usable record of an HC18 folder, each image and mask decoded once and checked (validation up front, so
    no worker ever meets a bad file). Returns (records, skipped); skipped ones are logged."""
    records, skipped = read_annotations(root, skip_bad)
    kept = []
    for rec in records:
        try:
            read_image(rec)
            read_mask(rec)
            kept.append(rec)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path, exc.problem))
    if skipped:
        log.warning("hc18: skipped %d bad row(s)/file(s):\n%s", len(skipped),
                    "\n".join(f"  {p}: {problem}" for p, problem in skipped))
    if not kept:
        raise DataError(Path(root) / "annotations.csv", f"no usable rows ({len(skipped)} skipped)")
    return kept, skipped


# ------------------------------------------------------------------------------------------------------- records
HC18_INFO = DataInfo(HC18_KPT_NAMES, HC18_CLASS_NAMES, HC18_FLIP_PAIRS, 3, "per_image", "hc18_axis")


def hc18_record(rec: HC18Record) -> Record:
    """One annotations.csv row as a Record (truth in the original frame; HC18's reference HC and ellipse as extras)."""
    return Record(id=rec.stem, where=str(rec.image_path), image=ImageSource(path=str(rec.image_path),
                                                                           name=str(rec.image_path)),
                  hw=(rec.height, rec.width), kpts_px_K2=rec.kpts_px_42.astype(np.float32),
                  kpts_visible_K=np.ones(4, bool), mask=MaskSource(path=str(rec.mask_path), max_class=1),
                  spacing_mm=np.full(2, rec.pixel_size_mm, dtype=np.float64), patient_id=rec.exam_id,
                  extras={"hc_mm": rec.hc_mm, "hc_fit_mm": rec.hc_fit_mm, "pixel_size_mm": rec.pixel_size_mm,
                          "exam_id": rec.exam_id, "ellipse": dict(rec.ellipse)},
                  meta={"exam_id": rec.exam_id})


def hc18_preprocess(input_hw, preresize: bool = False) -> Preprocess:
    """Letterbox padded with 128/255, grey (an RGB export is converted to luma), replicated to 3 channels."""
    return Preprocess(tuple(int(n) for n in input_hw), pad_value=PAD_VALUE, color="grey", channels=3,
                      preresize=preresize)


class HC18Dataset(LandmarkDataset):
    """Validated HC18 records as the engine's dataset (data_pipelines/dataset.py): the four axis ends, the head
    mask, a flip swaps ofd1/ofd2 and the README's axis order is re-imposed after every warp (module docstring)."""

    def __init__(self, records: Sequence[HC18Record], input_hw: tuple[int, int] = DEFAULT_INPUT_HW,
                 augment: AugmentParams | None = None, sigma_px: float = 2.0, heatmap_peak: float = 255.0,
                 seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                 skipped: Sequence[tuple[str, str]] = (), skip_bad: bool = False):
        if not records:
            raise ValueError("HC18Dataset: no records")
        self.hc18_records = list(records)
        super().__init__([hc18_record(r) for r in records], HC18_INFO, hc18_preprocess(input_hw), augment,
                         sigma_px=sigma_px, heatmap_peak=heatmap_peak, heatmap_impl=heatmap_impl, seed=seed,
                         cache_decoded=cache_decoded, skip_bad=skip_bad, skipped=skipped)

    @classmethod
    def from_root(cls, root: str | Path, skip_bad: bool = False, **kwargs: Any) -> "HC18Dataset":
        records, skipped = scan_hc18(root, skip_bad)
        return cls(records, skipped=skipped, skip_bad=skip_bad, **kwargs)


# ------------------------------------------------------------------------------------------------------ reader
LAYOUT = "images/<stem>.png, masks/<stem>.png and annotations.csv (HC18 columns)"


def _check_options(opts: dict, data_cfg=None) -> dict:
    return opts


def has_data(root: Path, opts: dict) -> bool:
    return (root / "annotations.csv").is_file()


def read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    """Every usable row; images and masks decoded once and checked (data.spacing_mm is not used: every row carries
    its pixel size)."""
    records, skipped = scan_hc18(root, skip_bad=skip_bad)
    return ReadResult([hc18_record(r) for r in records], HC18_INFO, skipped, root / "annotations.csv")


def predict_record(path: Path, opts: dict, data_cfg) -> Record | None:
    """The annotations.csv row (and mask) of an image that sits in an HC18 layout, else None."""
    path = Path(path)
    root = path.parent.parent
    if path.parent.name != "images" or not (root / "annotations.csv").is_file():
        return None
    records, _ = read_annotations(root, skip_bad=True)
    rec = next((r for r in records if r.stem == path.stem), None)
    if rec is None:
        return None
    out = hc18_record(rec)
    if not rec.mask_path.is_file():
        out.mask = None
    return out


READER = Reader(name="hc18", layout=LAYOUT, defaults=DEFAULTS, check_options=_check_options, has_data=has_data,
                describe=lambda root, opts, cfg: HC18_INFO, read=read,
                preprocess=lambda opts, cfg, info: hc18_preprocess(cfg.input_hw, bool(getattr(cfg, "preresize",
                                                                                              False))),
                predict_record=predict_record)
