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
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data_pipelines import task_data
from data_pipelines.errors import DataError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.transforms import (AffineDraw, AugmentParams, affine_from_draw, apply_flip_pairs,
                                       augment_intensity, draw_affine, letterbox_matrix, points_in_frame,
                                       sampling_grid, warp_image, warp_mask, warp_points)

log = logging.getLogger(__name__)

HC18_KPT_NAMES = ("ofd1", "ofd2", "bpd1", "bpd2")
HC18_CLASS_NAMES = ("background", "head")
HC18_FLIP_PAIRS = ((0, 1),)          # horizontal flip: the long-axis ends trade the smaller-x role
HC18_COLUMNS = ("stem", "width", "height", "pixel_size_mm", "hc_mm", "ofd1_x", "ofd1_y", "ofd2_x", "ofd2_y",
                "bpd1_x", "bpd1_y", "bpd2_x", "bpd2_y", "exam_id", "center_x", "center_y", "semi_major_px",
                "semi_minor_px", "angle_deg", "hc_fit_mm")
_TEXT_COLUMNS = ("stem", "exam_id")
_FLOAT_COLUMNS = tuple(c for c in HC18_COLUMNS if c not in _TEXT_COLUMNS)
PAD_VALUE = 128.0 / 255.0
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


# ------------------------------------------------------------------------------------------------- ordering rule
def axis_order(kpts_42: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Index permutation (4,) that puts points into the README order: ofd1 = smaller x (ties within eps: smaller y),
    bpd1 = smaller y (ties: smaller x)."""
    k = np.asarray(kpts_42, dtype=np.float64).reshape(4, 2)
    perm = np.arange(4)
    for first, primary in ((0, 0), (2, 1)):
        p, q = k[first], k[first + 1]
        d = q[primary] - p[primary]
        swap = d < -eps if abs(d) > eps else q[1 - primary] < p[1 - primary]
        if swap:
            perm[[first, first + 1]] = perm[[first + 1, first]]
    return perm


def order_axis_points(kpts_42: np.ndarray, visible_4: np.ndarray | None = None):
    """Points (and visibility, when given) re-ordered by the README's rule (`axis_order`)."""
    perm = axis_order(kpts_42)
    pts = np.asarray(kpts_42)[perm]
    return pts if visible_4 is None else (pts, np.asarray(visible_4)[perm])


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


# ------------------------------------------------------------------------------------------------------- dataset
class HC18Dataset(Dataset):
    """Validated HC18 records -> sample dicts (data_pipelines/task_data.py contract; hip_dataset.py pattern).

    Per sample: one matrix M = augment o letterbox moves image (bilinear, pad 128/255), mask (nearest) and the four
    landmarks; a flip swaps ofd1/ofd2 and the README order is then re-imposed (module docstring); Gaussian heatmaps
    at the warped landmarks. The augmentation of (index, epoch) comes from numpy's Generator seeded with
    (seed, epoch, index), whichever worker loads it.
    """

    class_names = HC18_CLASS_NAMES
    kpt_names = HC18_KPT_NAMES

    def __init__(self, records: Sequence[HC18Record], input_hw: tuple[int, int] = DEFAULT_INPUT_HW,
                 augment: AugmentParams | None = None, sigma_px: float = 2.0, heatmap_peak: float = 255.0,
                 seed: int = 0, heatmap_impl: str = "numba", cache_decoded: bool = False,
                 skipped: Sequence[tuple[str, str]] = (), skip_bad: bool = False):
        if len(input_hw) != 2 or min(input_hw) < 2:
            raise ValueError(f"HC18Dataset: input_hw must be (H, W) with both >= 2, got {input_hw}")
        if sigma_px <= 0:
            raise ValueError(f"HC18Dataset: sigma_px must be > 0, got {sigma_px}")
        if not records:
            raise ValueError("HC18Dataset: no records")
        self.records = list(records)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmap_impl = float(sigma_px), float(heatmap_peak), heatmap_impl
        self.seed, self.epoch = int(seed), 0
        self.skipped = list(skipped)
        self.skip_bad = bool(skip_bad)       # the DALI loader then drops a file that stops decoding
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        if cache_decoded:      # an oversampled list repeats stems; each is decoded once
            self._cache = {}
            for rec in self.records:
                if rec.stem not in self._cache:
                    self._cache[rec.stem] = (read_image(rec), read_mask(rec))
        render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)  # compile before fork

    @classmethod
    def from_root(cls, root: str | Path, skip_bad: bool = False, **kwargs: Any) -> "HC18Dataset":
        records, skipped = scan_hc18(root, skip_bad)
        return cls(records, skipped=skipped, skip_bad=skip_bad, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_id(self, i: int) -> str:
        return self.records[i].stem

    def group_id(self, i: int) -> str:
        return self.records[i].exam_id

    def stratum(self, i: int) -> None:
        return None

    def _decoded(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.records[i]
        return self._cache[rec.stem] if self._cache is not None else (read_image(rec), read_mask(rec))

    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original frame: image_HW3, mask_HW, kpts (all visible), spacing, id, and the reference
        hc_mm (HC18's), hc_fit_mm, pixel_size_mm, exam_id and the annotated ellipse (pixels, degrees)."""
        rec = self.records[i]
        image, mask = self._decoded(i)
        return {"image_HW3": np.repeat(image[..., None], 3, axis=2), "mask_HW": mask,
                "kpts_px_K2": rec.kpts_px_42.astype(np.float32), "kpts_visible_K": np.ones(4, bool),
                "spacing_mm_2": np.full(2, rec.pixel_size_mm, dtype=np.float64), "id": rec.stem,
                "hc_mm": rec.hc_mm, "hc_fit_mm": rec.hc_fit_mm, "pixel_size_mm": rec.pixel_size_mm,
                "exam_id": rec.exam_id, "ellipse": dict(rec.ellipse), "image": str(rec.image_path)}

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        return naming_file(self.records[i].image_path, self._load, i, epoch)

    def draws(self, i: int, epoch: int, orig_hw: tuple[int, int]):
        """(letterbox, M = augment o letterbox, input pixels per original pixel, AffineDraw or None, the Generator
        positioned after the geometric draw or None): the (seed, epoch, index) draws both loaders share (the
        intensity draw comes next from the Generator)."""
        letterbox = letterbox_matrix(orig_hw, self.input_hw)
        m, scale, draw, rng = letterbox, float(letterbox[0, 0]), None, None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            a = self.augment
            draw = draw_affine(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac, a.shear_deg,
                               a.flip_p)
            m_aug = affine_from_draw(self.input_hw, draw)
            m = m_aug @ letterbox
            scale *= float(np.sqrt(abs(np.linalg.det(m_aug[:2, :2]))))
        return letterbox, m, scale, draw, rng

    def dali_source(self, decode: str = "auto"):
        """This dataset as a DALI loader source (data_pipelines/dali/hc18.py)."""
        from data_pipelines.dali.hc18 import HC18DaliSource
        return HC18DaliSource(self, decode=decode)

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        rec = self.records[i]
        image_u8, mask = self._decoded(i)
        orig_hw = image_u8.shape
        _, m, scale, draw, rng = self.draws(i, epoch, orig_hw)
        image = image_u8[None].astype(np.float32) / 255.0
        if rng is not None:
            image = augment_intensity(image, rng, self.augment)
        grid = sampling_grid(m, orig_hw, self.input_hw)
        image_CHW = warp_image(image, m, self.input_hw, pad_value=PAD_VALUE, grid=grid).expand(3, -1, -1)
        return {"image_CHW": image_CHW.contiguous(), "mask_HW": warp_mask(mask, m, self.input_hw, grid=grid),
                **self.finish_targets(i, tuple(orig_hw), m, scale, draw, warp_points(rec.kpts_px_42, m))}

    def finish_targets(self, i: int, orig_hw: tuple[int, int], m: np.ndarray, scale: float,
                       draw: AffineDraw | None, kpts_K2: np.ndarray) -> dict[str, Any]:
        """Everything of the sample dict but image and mask, from the warped landmarks (4, 2) (both loaders)."""
        rec = self.records[i]
        kpts = np.asarray(kpts_K2, dtype=np.float64)
        visible = points_in_frame(kpts, self.input_hw)
        flipped = draw is not None and draw.flipped
        if flipped and self.augment.flip_pairs:
            kpts, visible = apply_flip_pairs(kpts, visible, self.augment.flip_pairs)
        kpts, visible = order_axis_points(kpts, visible)     # rotations can reverse an order too (docstring)
        kpts = kpts.astype(np.float32)
        heatmap = render_heatmaps(kpts, visible, self.input_hw, self.sigma_px, self.heatmap_peak,
                                  impl=self.heatmap_impl)
        return {
            "kpts_px_K2": torch.from_numpy(kpts),
            "kpts_visible_K": torch.from_numpy(np.ascontiguousarray(visible)),
            **heatmap_item(heatmap),
            # isotropic spacing and a similarity transform: mm per input pixel is exact
            "spacing_mm_2": torch.full((2,), rec.pixel_size_mm / scale, dtype=torch.float32),
            "meta": {"index": i, "id": rec.stem, "exam_id": rec.exam_id, "image": str(rec.image_path),
                     "orig_hw": tuple(orig_hw), "to_input_3x3": m.tolist(), "flipped": flipped},
        }


# ---------------------------------------------------------------------------------------------- run-level data
def ensure_hc18(data_cfg, strategy) -> Path:
    """data.root; rank 0 writes the synthetic HC18 set there first when it has no annotations.csv and
    data.synthetic is true (every rank waits at the barrier)."""
    root = Path(data_cfg.root)
    if not (root / "annotations.csv").is_file():
        if not data_cfg.synthetic:
            raise DataError(root / "annotations.csv", "not found (and data.synthetic=false)")
        if strategy.info.is_main:
            from data_pipelines.synthetic.hc18 import generate_hc18_dataset   # generator imports this module
            log.info("generating %d synthetic HC18 images into %s", data_cfg.synth_n, root)
            generate_hc18_dataset(root, data_cfg.synth_n, seed=data_cfg.synth_seed,
                                  image_hw=tuple(data_cfg.synth_image_hw), progress=True)
        strategy.barrier()
    return root


def build_hc18_data(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
    """The reader contract of data_pipelines/task_data.py for data.format=hc18 (exam-grouped splits, no strata;
    data.spacing_mm is not used: every row carries its pixel size)."""
    task_data.reader_options(getattr(data_cfg, "reader_args", None) or {}, DEFAULTS, "hc18")
    root = ensure_hc18(data_cfg, strategy)
    records, skipped = scan_hc18(root, skip_bad=data_cfg.skip_bad)
    common = dict(input_hw=tuple(data_cfg.input_hw), sigma_px=data_cfg.sigma_px,
                  heatmap_peak=data_cfg.heatmap_peak, seed=seed, skipped=skipped,
                  heatmap_impl=task_data.loader_heatmap_impl(data_cfg))
    probe = HC18Dataset(records, **common)
    splits = task_data.splits_of(probe, data_cfg, seed)
    task_data.record_splits(run_dir, strategy, splits, skipped)
    by_stem = {r.stem: r for r in records}
    augment = task_data.augment_params(data_cfg, flip_pairs=HC18_FLIP_PAIRS)

    def subset(stems: Sequence[str], aug: AugmentParams | None) -> HC18Dataset:
        return HC18Dataset([by_stem[s] for s in stems], augment=aug, cache_decoded=data_cfg.cache_decoded,
                           skip_bad=data_cfg.skip_bad, **common)   # skip_bad: files that go bad during the run

    out = {"train": subset(splits["train_oversampled"], augment), "val": subset(splits["val"], None),
           "test": subset(splits["test"], None), "splits": splits, "num_classes": len(HC18_CLASS_NAMES),
           "class_names": list(HC18_CLASS_NAMES), "kpt_names": list(HC18_KPT_NAMES), "skipped": list(skipped)}
    log.info("hc18: %d train, %d val, %d test images, %d skipped", len(out["train"]), len(out["val"]),
             len(out["test"]), len(skipped))
    return out


def _predict_truth(path: Path, shape: tuple[int, int]) -> tuple[HC18Record | None, np.ndarray | None]:
    """The annotations.csv row (and mask) of an image that sits in an HC18 layout, else (None, None)."""
    root = path.parent.parent
    if path.parent.name != "images" or not (root / "annotations.csv").is_file():
        return None, None
    records, _ = read_annotations(root, skip_bad=True)
    rec = next((r for r in records if r.stem == path.stem), None)
    if rec is None or (rec.height, rec.width) != shape:
        return None, None
    return rec, (read_mask(rec) if rec.mask_path.is_file() else None)


def load_for_predict(path: str | Path, data_cfg) -> dict[str, Any]:
    """One PNG for `medpose predict` (task_data contract). Pixel size: the annotations.csv row when the file sits in
    an HC18 layout (then the truth comes too), else data.spacing_mm (x, y), else NaN (no HC in mm)."""
    path = Path(path)
    image = _read_png(path, "image")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DataError(path, f"image must be 8-bit grey, got {image.dtype} {image.shape}")
    input_hw = tuple(int(n) for n in getattr(data_cfg, "input_hw", DEFAULT_INPUT_HW))
    m = letterbox_matrix(image.shape, input_hw)
    x = warp_image(image[None].astype(np.float32) / 255.0, m, input_hw, pad_value=PAD_VALUE).expand(3, -1, -1)
    rec, mask = _predict_truth(path, image.shape)
    truth = None
    if rec is not None:
        spacing = np.full(2, rec.pixel_size_mm)
        truth = {"kpts_px_K2": rec.kpts_px_42.astype(np.float32), "kpts_visible_K": np.ones(4, bool),
                 "hc_mm": rec.hc_mm, "ellipse": dict(rec.ellipse)}
        if mask is not None:
            truth["mask_HW"] = mask
    elif getattr(data_cfg, "spacing_mm", None) is not None:
        spacing = np.asarray(data_cfg.spacing_mm, dtype=np.float64).reshape(2)
    else:
        spacing = np.full(2, np.nan)
        log.warning("%s: no pixel size (not in an HC18 layout and data.spacing_mm unset); HC in mm is undefined",
                    path)
    return {"image_HW3": np.repeat(image[..., None], 3, axis=2), "input_CHW": x.contiguous(),
            "to_input_3x3": m, "spacing_mm_2": spacing.astype(np.float64), "truth": truth,
            "kpt_names": list(HC18_KPT_NAMES)}
