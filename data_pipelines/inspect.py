"""`medpose data inspect DIR`: what a dataset holds, read by the same reader training uses - before training on it.

Counts (samples, patients, given splits), image sizes and channels, pixel spacings, landmark names with how often
each is labelled, mask classes, the problems the reader found (bad files, points outside their image, ...: every
sample is read with skip_bad, so one bad file does not hide the rest), duplicate ids and duplicate image files (same
bytes under two names), and a PNG sheet of a few images with their landmarks numbered, to look at.
The format is detected from the folder when not given (FORMAT_ORDER: the first reader that finds its layout).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_pipelines.build import reader_for
from data_pipelines.errors import DataError
from data_pipelines.records import Record

# Detection order: the more specific layouts first (HC18's annotations.csv is also a table).
FORMAT_ORDER = ("hc18", "coco", "xray_csv", "nifti", "table", "labelme")


def detect_format(root: Path, reader_args: dict | None = None) -> str:
    """The first reader (FORMAT_ORDER) that finds its layout in root (with default options)."""
    from data_pipelines.readers import READERS
    for name in FORMAT_ORDER:
        reader = READERS[name]
        try:
            opts = {**reader.defaults, **(reader_args or {})} if set(reader_args or {}) <= set(reader.defaults) \
                else dict(reader.defaults)
            if reader.has_data(root, opts):
                return name
        except DataError:
            continue
    raise DataError(root, "no dataset layout recognised here (COCO annotations.json, a CSV/TSV table, labelme JSON, "
                          "HC18, X-ray CSV folders or NIfTI volumes); give --format")


def _sizes(records: Sequence[Record]) -> dict[str, Any]:
    hw = np.array([r.hw for r in records], dtype=np.int64)
    distinct = Counter(map(tuple, hw.tolist()))
    return {"distinct": len(distinct), "most_common": [[h, w, n] for (h, w), n in distinct.most_common(5)],
            "height": [int(hw[:, 0].min()), int(np.median(hw[:, 0])), int(hw[:, 0].max())],
            "width": [int(hw[:, 1].min()), int(np.median(hw[:, 1])), int(hw[:, 1].max())],
            "megapixels_median": round(float(np.median(hw[:, 0] * hw[:, 1])) / 1e6, 3)}


def _spacings(records: Sequence[Record]) -> dict[str, Any]:
    known = [tuple(np.round(r.spacing_mm, 6)) for r in records if r.spacing_mm is not None
             and np.all(np.isfinite(r.spacing_mm))]
    distinct = Counter(known)
    return {"known": len(known), "unknown": len(records) - len(known),
            "distinct": [[float(a), float(b), n] for (a, b), n in distinct.most_common(5)]}


def _duplicates(records: Sequence[Record]) -> dict[str, Any]:
    """Ids used twice, and image files with the same bytes under different names (a copy that would leak between
    splits)."""
    ids = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    by_hash: dict[str, list[str]] = {}
    for r in {r.image.path: r for r in records if r.image.path}.values():
        digest = hashlib.sha1(Path(r.image.path).read_bytes()).hexdigest()
        by_hash.setdefault(digest, []).append(r.image.path)
    same = [paths for paths in by_hash.values() if len(paths) > 1]
    return {"ids": ids, "identical_images": same}


def _problems(skipped: Sequence[tuple[str, str]]) -> dict[str, Any]:
    kinds = Counter()
    for _, problem in skipped:
        text = problem.lower()
        kind = ("point outside the image" if "outside" in text else "image does not decode" if "decode" in text
                else "file not found" if "not found" in text else "missing label" if "missing" in text
                else "other")
        kinds[kind] += 1
    return {"count": len(skipped), "by_kind": dict(kinds), "first": [list(s) for s in skipped[:10]]}


def inspect_dataset(data_cfg, out_dir: Path | None = None, sheet: int = 12) -> dict[str, Any]:
    """The report (module docstring) of data_cfg.root read as data_cfg.format; writes inspect.json and sheet.png into
    out_dir when given."""
    reader, opts = reader_for(data_cfg)
    root = Path(data_cfg.root)
    if not reader.has_data(root, opts):
        raise DataError(root, reader.missing_message(root, opts))
    result = reader.read(root, opts, data_cfg, True)
    records, info = result.records, result.info
    counts = [int(r.kpts_visible_K.sum()) for r in records]
    labelled = np.sum([r.kpts_visible_K for r in records], axis=0) if records else np.zeros(info.num_keypoints)
    report = {
        "root": str(root), "format": data_cfg.format, "samples": len(records),
        "patients": len({r.patient_id or r.id for r in records}),
        "splits_given": dict(Counter(r.split for r in records if r.split)) or None,
        "landmarks": {"names": list(info.kpt_names), "labelled_per_landmark": [int(v) for v in labelled],
                      "labelled_per_image": [min(counts, default=0), max(counts, default=0)]},
        "flip_pairs": [[info.kpt_names[a], info.kpt_names[b]] for a, b in info.flip_pairs],
        "mask_classes": list(info.class_names) if info.class_names else None,
        "channels": info.channels, "image_size": _sizes(records) if records else None,
        "spacing_mm": _spacings(records), "problems": _problems(result.skipped),
        "duplicates": _duplicates(records),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "inspect.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        if records and sheet > 0:
            report["sheet"] = str(write_sheet(records, info, data_cfg, out_dir / "sheet.png", sheet))
    return report


def write_sheet(records: Sequence[Record], info, data_cfg, out_path: Path, count: int = 12) -> Path:
    """A grid of `count` images spread over the dataset, each with its labelled landmarks numbered (1-based, the
    legend lists the names)."""
    from matplotlib.figure import Figure

    from data_pipelines.dataset import LandmarkDataset
    from data_pipelines.records import Preprocess
    picks = np.unique(np.linspace(0, len(records) - 1, min(count, len(records))).round().astype(int))
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(4.0 * cols, 4.0 * rows + 0.6))
    ds = LandmarkDataset([records[i] for i in picks], info, Preprocess((32, 32), channels=info.channels), None,
                         heatmaps=False)
    for n in range(len(picks)):
        ax = fig.add_subplot(rows, cols, n + 1)
        orig = ds.original(n)
        image = orig["image_HW3"]
        step = max(1, int(math.ceil(max(image.shape[:2]) / 800)))       # draw big images downscaled
        ax.imshow(image[::step, ::step], extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        vis = orig["kpts_visible_K"]
        pts = orig["kpts_px_K2"]
        ax.scatter(pts[vis, 0], pts[vis, 1], s=14, c="#ff3030", edgecolors="white", linewidths=0.5)
        for k in np.flatnonzero(vis):
            ax.annotate(str(k + 1), pts[k], xytext=(3, 3), textcoords="offset points", color="yellow", fontsize=7)
        ax.set_title(f"{orig['id']} ({image.shape[1]}x{image.shape[0]})", fontsize=8)
        ax.set_axis_off()
    legend = "  ".join(f"{k + 1} {name}" for k, name in enumerate(info.kpt_names))
    fig.text(0.01, 0.005, legend, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    return out_path


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lm, size, sp, pr, dup = (report["landmarks"], report["image_size"], report["spacing_mm"], report["problems"],
                             report["duplicates"])
    lines = [f"{report['root']}  (format {report['format']})",
             f"  samples {report['samples']}, patients {report['patients']}, splits "
             f"{report['splits_given'] or 'none given (grouped splits will be made)'}",
             f"  {len(lm['names'])} landmarks: " + ", ".join(f"{n} ({c})" for n, c in
                                                         zip(lm["names"], lm["labelled_per_landmark"])),
             f"  labelled per image: {lm['labelled_per_image'][0]}..{lm['labelled_per_image'][1]}; flip pairs: "
             f"{report['flip_pairs'] or 'none'}; mask classes: {report['mask_classes'] or 'none'}",
             f"  channels {report['channels']}"]
    if size:
        lines.append(f"  image size H {size['height'][0]}/{size['height'][1]}/{size['height'][2]}, W "
                     f"{size['width'][0]}/{size['width'][1]}/{size['width'][2]} (min/median/max), "
                     f"{size['distinct']} distinct, median {size['megapixels_median']} Mpx")
    lines.append(f"  spacing: {sp['known']} known {[tuple(d[:2]) for d in sp['distinct']]}, {sp['unknown']} unknown"
                 + (" (errors will be in px)" if sp["unknown"] else ""))
    lines.append(f"  problems: {pr['count']}" + (f" {pr['by_kind']}; first: {pr['first'][0][0]}: "
                                                 f"{pr['first'][0][1]}" if pr["count"] else ""))
    lines.append(f"  duplicates: {len(dup['ids'])} ids, {len(dup['identical_images'])} identical image files"
                 + (f" (e.g. {dup['identical_images'][0]})" if dup["identical_images"] else ""))
    if report.get("sheet"):
        lines.append(f"  sheet: {report['sheet']}")
    return "\n".join(lines)
