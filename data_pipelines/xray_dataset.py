"""The hip X-ray reader (data.format = xray_csv, SEEDS.md §2): CSV landmarks + grey images -> sample dicts.

Per sample: grey uint8 original -> histogram equalisation (published: on) -> /255 -> one matrix M = augment o resize
(original pixels -> input pixels, data_pipelines/batch.py convention) moves image (bilinear) and landmarks; grey is
replicated to 3 channels at the end (optionally ImageNet-normalised). Resize modes:
  stretch   (published, aspect not kept): x' = (x + 0.5) W'/W - 0.5, y' = (y + 0.5) H'/H - 0.5;
  letterbox (aspect kept, padded with black, the X-ray background): data_pipelines/transforms.letterbox_matrix.
A horizontal flip swaps the hips' landmarks (XRAY_FLIP_PAIRS). Augmentation of sample i in epoch e comes from numpy's
Generator seeded with (seed, e, i): the same in any worker. Heatmap targets only when heatmaps=True (the published
models regress coordinates). Files are parsed and checked once, at construction; errors never wait for a worker.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipelines.errors import DataError, OptionError, index_and_epoch, naming_file
from data_pipelines.heatmaps import heatmap_item, render_heatmaps
from data_pipelines.synthetic.xray import generate_xray_dataset
from data_pipelines.task_data import augment_params, loader_heatmap_impl, reader_options, record_splits, splits_of
from data_pipelines.transforms import (AffineDraw, AugmentParams, affine_from_draw, apply_flip_pairs,
                                       augment_intensity, draw_affine, letterbox_matrix, points_in_frame,
                                       sampling_grid, warp_image, warp_points)
from data_pipelines.readers.xray_csv import (SPLIT_NAMES, XRAY_FLIP_PAIRS, XRAY_KPT_NAMES, XrayRecord, equalize_hist,
                                     find_xray_samples, image_for_csv, read_grey, validate_xray_pair)

log = logging.getLogger(__name__)

DEFAULTS = {"resize": "stretch", "equalize": True, "heatmaps": False, "normalize": "none"}
RESIZE_MODES = ("stretch", "letterbox")
NORMALIZE_MODES = ("none", "imagenet")
PAD_VALUE = 0.0                    # X-ray background is black
DEFAULT_SPACING_MM = (1.0, 1.0)
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_VIEW_SUFFIX = re.compile(r"^(?P<group>.+?)_(?P<view>\d+)$")
_WARNED_SPACING: set[str] = set()


def stretch_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Plain resize, aspect not kept (the published cv2.resize): x' = (x + 0.5) W'/W - 0.5, y' likewise."""
    (h, w), (dh, dw) = src_hw, dst_hw
    sx, sy = dw / w, dh / h
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def input_matrix(src_hw: tuple[int, int], dst_hw: tuple[int, int], resize: str) -> np.ndarray:
    if resize == "stretch":
        return stretch_matrix(src_hw, dst_hw)
    if resize == "letterbox":
        return letterbox_matrix(src_hw, dst_hw)
    raise OptionError(f"data.reader_args.resize: '{resize}' is not one of {', '.join(RESIZE_MODES)}")


def grey_to_float(grey_HW: np.ndarray, equalize: bool) -> np.ndarray:
    """float32 (1, H, W) in [0, 1]; histogram equalisation on the 8-bit original first (published order)."""
    g = equalize_hist(grey_HW) if equalize else grey_HW
    return g[None].astype(np.float32) * np.float32(1.0 / 255.0)


def network_input(image_1HW: torch.Tensor, normalize: str) -> torch.Tensor:
    """Grey (..., 1, H, W) -> (..., 3, H, W), optionally ImageNet mean/std normalised (on the image's device: the
    DALI loader normalises its (B, 1, H, W) batch with this too, data_pipelines/dali/xray.py)."""
    out = image_1HW.expand(*image_1HW.shape[:-3], 3, *image_1HW.shape[-2:]).contiguous()
    if normalize == "imagenet":
        dev = out.device
        return (out - _IMAGENET_MEAN.to(dev)) / _IMAGENET_STD.to(dev)
    if normalize != "none":
        raise OptionError(f"data.reader_args.normalize: '{normalize}' is not one of {', '.join(NORMALIZE_MODES)}")
    return out


def input_spacing_mm(spacing_mm_2: np.ndarray, m: np.ndarray) -> np.ndarray:
    """mm per input pixel (x, y): the original-frame length, in mm, of one input-pixel step along each input axis
    (columns of the inverse linear part scaled by the original spacing; exact for stretch and letterbox)."""
    inv = np.linalg.inv(np.asarray(m, dtype=np.float64)[:2, :2])
    return np.hypot(inv[0] * spacing_mm_2[0], inv[1] * spacing_mm_2[1])


def group_of(name: str) -> str:
    """The patient / exam of an image name: the stem up to an optional `_<digits>` view suffix."""
    found = _VIEW_SUFFIX.match(name)
    return found["group"] if found else name


def dataset_spacing(image_path: Path, cache: dict[Path, Any]) -> list[float] | None:
    """'spacing_mm' of the nearest dataset.json in the image's folder or up to three folders above it."""
    for folder in list(image_path.parents)[:4]:
        if folder not in cache:
            path = folder / "dataset.json"
            try:
                meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(path, f"unreadable dataset.json ({exc})") from None
            cache[folder] = meta if isinstance(meta, dict) else None
        if cache[folder] is not None and cache[folder].get("spacing_mm") is not None:
            return cache[folder]["spacing_mm"]
    return None


def _as_triple(item) -> tuple[Path, Path, str | None]:
    if isinstance(item, (str, Path)):
        return image_for_csv(item), Path(item), None
    image, csv, *rest = item
    return Path(image), Path(csv), (rest[0] if rest else None)


def _where(items: Sequence[Any]) -> Path:
    """A folder to name when nothing in `items` is usable."""
    if not len(items):
        return Path(".")
    first = items[0]
    csv = first.csv_path if isinstance(first, XrayRecord) else first if isinstance(first, (str, Path)) else first[1]
    return Path(csv).parent


class XrayDataset(Dataset):
    """Hip X-ray samples (see the module docstring and data_pipelines/task_data.py for the contract).

    items: XrayRecords (already validated, e.g. by a probe dataset), CSV paths, or (image, csv[, split]) tuples.
    spacing_mm: mm per original pixel (x, y); None reads dataset.json above the images, else 1.0 mm/px (warned).
    """

    kpt_names = list(XRAY_KPT_NAMES)
    class_names = None

    def __init__(self, items: Sequence[Any], input_hw: tuple[int, int] = (224, 224), resize: str = "letterbox",
                 equalize: bool = True, augment: AugmentParams | None = None, sigma_px: float = 2.0,
                 heatmap_peak: float = 255.0, heatmaps: bool = False, spacing_mm: Sequence[float] | None = None,
                 normalize: str = "none", skip_bad: bool = False, seed: int = 0, cache_decoded: bool = False,
                 heatmap_impl: str = "numba"):
        if len(input_hw) != 2 or min(input_hw) < 2:
            raise ValueError(f"XrayDataset: input_hw must be (H, W) with both >= 2, got {input_hw}")
        if sigma_px <= 0:
            raise ValueError(f"XrayDataset: sigma_px must be > 0, got {sigma_px}")
        input_matrix((2, 2), (2, 2), resize)
        network_input(torch.zeros(1, 1, 1), normalize)          # both raise OptionError on an unknown mode
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.resize, self.equalize, self.normalize = resize, bool(equalize), normalize
        self.augment = augment if augment is not None and augment.enabled else None
        self.sigma_px, self.heatmap_peak, self.heatmaps = float(sigma_px), float(heatmap_peak), bool(heatmaps)
        self.heatmap_impl, self.seed, self.epoch = heatmap_impl, int(seed), 0
        self.skip_bad = bool(skip_bad)          # also: the DALI loader drops a file that stops decoding
        self.skipped: list[tuple[str, str]] = []
        self.records = self._validate(items, skip_bad)
        self._cache = self._decode_all(skip_bad) if cache_decoded else None
        if self.skipped:
            log.warning("XrayDataset: skipped %d bad sample(s):\n%s", len(self.skipped),
                        "\n".join(f"  {p}: {problem}" for p, problem in self.skipped))
        if not self.records:
            raise DataError(_where(items), f"no usable X-ray samples ({len(self.skipped)} skipped)")
        self._spacing = self._spacings(spacing_mm)
        if self.heatmaps:
            render_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (3, 3), 1.0, impl=heatmap_impl)  # compile pre-fork

    # -------------------------------------------------------------------------------------------------------------
    def _validate(self, items: Sequence[Any], skip_bad: bool) -> list[XrayRecord]:
        records: list[XrayRecord] = []
        for item in items:
            if isinstance(item, XrayRecord):
                records.append(item)
                continue
            try:
                records.append(validate_xray_pair(*_as_triple(item)))
            except DataError as exc:
                if not skip_bad:
                    raise
                self.skipped.append((exc.path, exc.problem))
        return records

    def _decode(self, rec: XrayRecord) -> np.ndarray:
        grey = read_grey(rec.image_path)
        if grey.shape != tuple(rec.hw):
            raise DataError(rec.image_path, f"image is {grey.shape[1]}x{grey.shape[0]} now, "
                                            f"{rec.hw[1]}x{rec.hw[0]} when validated")
        return grey

    def _decode_all(self, skip_bad: bool) -> list[np.ndarray]:
        """Decode each distinct image once (repeated records share one array); failures raise or are skipped."""
        decoded: dict[Path, np.ndarray] = {}
        kept = []
        for rec in self.records:
            if rec.image_path not in decoded:
                try:
                    decoded[rec.image_path] = self._decode(rec)
                except DataError as exc:   # passes verify() but fails to decode fully (e.g. truncated deflate data)
                    if not skip_bad:
                        raise
                    self.skipped.append((exc.path, exc.problem))
                    continue
            kept.append(rec)
        self.records = kept
        return [decoded[r.image_path] for r in kept]

    def _spacings(self, spacing_mm) -> list[np.ndarray]:
        cache: dict[Path, Any] = {}
        out, missing = [], []
        for rec in self.records:
            value = spacing_mm if spacing_mm is not None else dataset_spacing(rec.image_path, cache)
            if value is None:
                value = DEFAULT_SPACING_MM
                missing.append(str(rec.image_path.parent))
            out.append(np.asarray(value, dtype=np.float64).reshape(2))
        new = sorted(set(missing) - _WARNED_SPACING)
        if new:
            _WARNED_SPACING.update(new)
            log.warning("XrayDataset: no spacing_mm given and no dataset.json with 'spacing_mm' above %s; using "
                        "%s mm/px (X-ray errors are reported in pixels)", ", ".join(new[:3]), DEFAULT_SPACING_MM)
        return out

    # -------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_id(self, i: int) -> str:
        return self.records[i].name

    def group_id(self, i: int) -> str:
        return group_of(self.records[i].name)

    def stratum(self, i: int) -> None:
        return None

    def _grey(self, i: int) -> np.ndarray:
        return self._cache[i] if self._cache is not None else self._decode(self.records[i])

    def original(self, i: int) -> dict[str, Any]:
        """Sample i in its original frame: image_HW3 (uint8, not equalised), kpts_px_K2, kpts_visible_K (all
        True), spacing_mm_2 (mm per original pixel), id, csv, image."""
        rec = self.records[i]
        grey = naming_file(rec.image_path, self._grey, i)
        return {"image_HW3": np.repeat(grey[:, :, None], 3, axis=2), "kpts_px_K2": rec.kpts_px_K2.copy(),
                "kpts_visible_K": np.ones(len(rec.kpts_px_K2), dtype=bool), "spacing_mm_2": self._spacing[i].copy(),
                "id": rec.name, "csv": str(rec.csv_path), "image": str(rec.image_path)}

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = index_and_epoch(index, self.epoch)
        return naming_file(self.records[i].csv_path, self._load, i, epoch)

    def _load(self, i: int, epoch: int) -> dict[str, Any]:
        rec = self.records[i]
        image = grey_to_float(self._grey(i), self.equalize)
        _, m, draw, rng = self.draws(i, epoch)
        if rng is not None:
            image = augment_intensity(image, rng, self.augment)
        grid = sampling_grid(m, rec.hw, self.input_hw)
        image_CHW = network_input(warp_image(image, m, self.input_hw, pad_value=PAD_VALUE, grid=grid), self.normalize)
        return {"image_CHW": image_CHW, **self.finish_targets(i, m, draw, warp_points(rec.kpts_px_K2, m))}

    def draws(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray, AffineDraw | None,
                                                  np.random.Generator | None]:
        """(resize matrix, M = augment o resize, AffineDraw or None, the Generator positioned after the geometric
        draw or None): the (seed, epoch, index) draws both loaders share (the intensity draw comes next from it)."""
        pre = input_matrix(self.records[i].hw, self.input_hw, self.resize)
        m, draw, rng = pre, None, None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, i])
            a = self.augment
            draw = draw_affine(rng, self.input_hw, a.rotation_deg, a.scale_range, a.translate_frac, a.shear_deg,
                               a.flip_p)
            m = affine_from_draw(self.input_hw, draw) @ pre
        return pre, m, draw, rng

    def dali_source(self, decode: str = "auto"):
        """This dataset as a DALI loader source (data_pipelines/dali/xray.py)."""
        from data_pipelines.dali.xray import XrayDaliSource
        return XrayDaliSource(self, decode=decode)

    def finish_targets(self, i: int, m: np.ndarray, draw: AffineDraw | None, kpts_K2: np.ndarray) -> dict[str, Any]:
        """Everything of the sample dict but the image, from the warped landmarks (K, 2) (both loaders)."""
        rec = self.records[i]
        kpts = np.asarray(kpts_K2, dtype=np.float64)
        visible = points_in_frame(kpts, self.input_hw)
        flipped = draw is not None and draw.flipped
        if flipped and self.augment.flip_pairs:
            kpts, visible = apply_flip_pairs(kpts, visible, self.augment.flip_pairs)
        kpts = kpts.astype(np.float32)      # out-of-frame points keep their coordinates; visible says False
        sample = {
            "kpts_px_K2": torch.from_numpy(kpts),
            "kpts_visible_K": torch.from_numpy(visible),
            "spacing_mm_2": torch.from_numpy(input_spacing_mm(self._spacing[i], m).astype(np.float32)),
            "meta": {"index": i, "id": rec.name, "group_id": group_of(rec.name), "image": str(rec.image_path),
                     "csv": str(rec.csv_path), "split": rec.split, "orig_hw": tuple(rec.hw),
                     "to_input_3x3": m.tolist(), "flipped": flipped},
        }
        if self.heatmaps:
            sample.update(heatmap_item(render_heatmaps(kpts, visible, self.input_hw, self.sigma_px,
                                                       self.heatmap_peak, impl=self.heatmap_impl)))
        return sample


# ----------------------------------------------------------------------------------------------------------------
# The reader: build_xray_csv_data / load_for_predict
# ----------------------------------------------------------------------------------------------------------------

def xray_options(reader_args: dict[str, Any] | None) -> dict[str, Any]:
    opts = reader_options(reader_args or {}, DEFAULTS, "xray_csv")
    if opts["resize"] not in RESIZE_MODES:
        raise OptionError(f"data.reader_args.resize: '{opts['resize']}' is not one of {', '.join(RESIZE_MODES)}")
    if opts["normalize"] not in NORMALIZE_MODES:
        raise OptionError(f"data.reader_args.normalize: '{opts['normalize']}' is not one of "
                          f"{', '.join(NORMALIZE_MODES)}")
    for key in ("equalize", "heatmaps"):
        if not isinstance(opts[key], bool):
            raise OptionError(f"data.reader_args.{key}: must be true or false, got {opts[key]!r}")
    return opts


def ensure_xray_dataset(data_cfg, strategy) -> Path:
    """data.root; with data.synthetic, rank 0 first writes the phantom when the folder is empty. Every rank calls
    the barrier whenever data.synthetic is set (not only when the folder looked empty to it), so no rank can wait
    on a barrier the others skip."""
    root = Path(data_cfg.root)
    if data_cfg.synthetic:
        if strategy.info.is_main and (not root.is_dir() or not any(root.iterdir())):
            log.info("generating %d phantom X-rays into %s", data_cfg.synth_n, root)
            generate_xray_dataset(root, data_cfg.synth_n, seed=data_cfg.synth_seed,
                                  image_hw=tuple(data_cfg.synth_image_hw), progress=True)
        strategy.barrier()
    elif not root.is_dir() or not any(root.iterdir()):
        raise DataError(root, "dataset folder is missing or empty (and data.synthetic=false)")
    return root


def _folder_splits(probe: XrayDataset, seed: int) -> dict[str, Any]:
    """The published split folders as given; a group found in two of them is only warned about."""
    ids = {s: sorted(probe.sample_id(i) for i in range(len(probe)) if probe.records[i].split == s)
           for s in SPLIT_NAMES}
    for s in SPLIT_NAMES:
        if not ids[s]:
            raise DataError(Path(probe.records[0].image_path).parents[2] / s, "split folder holds no usable samples")
    where: dict[str, set[str]] = {}
    for i in range(len(probe)):
        where.setdefault(probe.group_id(i), set()).add(probe.records[i].split)
    straddle = sorted(g for g, s in where.items() if len(s) > 1)
    if straddle:
        log.warning("xray_csv: %d group(s) appear in more than one published split folder (e.g. %s); kept as given",
                    len(straddle), straddle[0])
    return {**ids, "train_oversampled": list(ids["train"]), "source": "folders", "fold": None, "num_folds": None,
            "seed": seed}


def _check_unique(records: Sequence[XrayRecord]) -> None:
    seen: dict[str, XrayRecord] = {}
    for rec in records:
        if rec.name in seen:
            raise DataError(rec.csv_path, f"sample name '{rec.name}' also used by {seen[rec.name].csv_path}")
        seen[rec.name] = rec


def build_xray_csv_data(data_cfg, run_dir: Path, strategy, seed: int) -> dict[str, Any]:
    """The reader contract of data_pipelines/task_data.py for the hip X-ray CSV format."""
    opts = xray_options(getattr(data_cfg, "reader_args", None))
    root = ensure_xray_dataset(data_cfg, strategy)
    layout, skipped = find_xray_samples(root, skip_bad=data_cfg.skip_bad)
    common = dict(input_hw=tuple(data_cfg.input_hw), resize=opts["resize"], equalize=opts["equalize"],
                  sigma_px=data_cfg.sigma_px, heatmap_peak=data_cfg.heatmap_peak, heatmaps=opts["heatmaps"],
                  spacing_mm=data_cfg.spacing_mm, normalize=opts["normalize"], seed=seed,
                  heatmap_impl=loader_heatmap_impl(data_cfg))
    triples = [(img, csv, split) for split, pairs in layout.items() for img, csv in pairs]
    # One validation pass over all files (bad files raise or are skipped here, never inside a worker).
    probe = XrayDataset(triples, skip_bad=data_cfg.skip_bad, **common)
    _check_unique(probe.records)
    skipped = skipped + probe.skipped
    if None in layout:
        splits = {**splits_of(probe, data_cfg, seed), "source": "grouped"}
    else:
        splits = _folder_splits(probe, seed)
    record_splits(run_dir, strategy, splits, skipped)
    record_of = {probe.sample_id(i): probe.records[i] for i in range(len(probe))}
    # X-ray noise is additive quantum noise, not ultrasound speckle: keep the multiplicative speckle small.
    augment = augment_params(data_cfg, flip_pairs=XRAY_FLIP_PAIRS, speckle_sigma_max=0.03)

    def subset(ids, aug):
        return XrayDataset([record_of[i] for i in ids], augment=aug, cache_decoded=data_cfg.cache_decoded,
                           skip_bad=data_cfg.skip_bad, **common)   # skip_bad: files that go bad during the run

    out = {"train": subset(splits["train_oversampled"], augment), "val": subset(splits["val"], None),
           "test": subset(splits["test"], None), "splits": splits, "num_classes": 0, "class_names": None,
           "kpt_names": list(XRAY_KPT_NAMES), "skipped": list(skipped)}
    log.info("data: %d train, %d val, %d test X-rays (%s splits), %d skipped", len(out["train"]), len(out["val"]),
             len(out["test"]), splits["source"], len(skipped))
    return out


def load_for_predict(path: str | Path, data_cfg) -> dict[str, Any]:
    """One input of `medpose predict`: an image file, or a CSV annotation (its image + the truth), preprocessed
    exactly like an evaluation sample (equalise, resize per data.reader_args, /255, 3 channels)."""
    opts = xray_options(getattr(data_cfg, "reader_args", None))
    path = Path(path)
    truth = None
    if path.suffix.lower() == ".csv":
        rec = validate_xray_pair(image_for_csv(path), path)
        image_path = rec.image_path
        truth = {"kpts_px_K2": rec.kpts_px_K2, "kpts_visible_K": np.ones(len(rec.kpts_px_K2), dtype=bool)}
    else:
        image_path = path
    grey = read_grey(image_path)
    input_hw = tuple(data_cfg.input_hw)
    m = input_matrix(grey.shape, input_hw, opts["resize"])
    x = warp_image(grey_to_float(grey, opts["equalize"]), m, input_hw, pad_value=PAD_VALUE)
    spacing = data_cfg.spacing_mm if data_cfg.spacing_mm is not None else dataset_spacing(image_path, {})
    return {"image_HW3": np.repeat(grey[:, :, None], 3, axis=2), "input_CHW": network_input(x, opts["normalize"]),
            "to_input_3x3": m, "spacing_mm_2": np.asarray(spacing or DEFAULT_SPACING_MM, dtype=np.float64),
            "truth": truth, "kpt_names": list(XRAY_KPT_NAMES)}
