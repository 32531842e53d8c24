"""Writers of landmark sample dicts into three annotation layouts: COCO keypoints, a points table (CSV), labelme 5.

The synthetic generators (ceph.py) and tests that need a small dataset on disk in a given layout share these, so
each layout is written one way only. A sample dict:

    {"id": str (file stem, unique), "image_HW": uint8 or uint16 (H, W) grey, "kpts_px_K2": float (K, 2),
     "kpts_visible_K": bool (K,), "spacing_mm": float (isotropic mm per pixel) or (sx, sy),
     "patient_id": str, "split": str | None}

with the K landmark names given once per call. Samples may come from a generator: each image is written as soon
as its sample arrives and only the annotations are kept, so 900 full-size images never sit in memory together.

Coordinates: kpts_px_K2 are MedPose pixels (data_pipelines/batch.py: pixel centres at integer coordinates,
x = column, y = row). Per layout:
- "coco" (root/annotations.json + root/images/<id>.<ext>): COCO's continuous convention, the image covering
  [0, W] x [0, H], so x_coco = x + 0.5 (readers/coco_export.export_coco writes the file and applies the shift; the
  COCO reader undoes it); v = 2 labelled, v = 0 with x = y = 0 not labelled; file_name relative to root/images.
- "table" (root/points.csv + root/images/<id>.<ext>): MedPose pixels with 3 decimals, both cells empty for a
  landmark not labelled; `image` relative to the CSV's folder.
- "labelme" (root/<id>.<ext> + root/<id>.json side by side): MedPose pixels (readers/labelme.py reads points
  unshifted), one point shape per labelled landmark.
Every layout also gets root/dataset.json: {"layout", "names", "spacing_mm" [sx, sy] (when all samples share it),
"samples": [{"id", "image", "patient_id", "split", "spacing_mm"[, "json"]}], plus the caller's `meta`} - the
labelme and X-ray readers take the pixel spacing from it.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines.readers.coco_export import export_coco
from data_pipelines.transforms import points_in_frame

LAYOUTS = ("coco", "table", "labelme")
IMAGE_FORMATS = ("png", "jpg")
LABELME_VERSION = "5.2.1"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save_grey(path: str | Path, image_HW: np.ndarray, image_format: str = "png") -> Path:
    """One grey image: uint8 -> 8-bit PNG (fast compression) or baseline JPEG quality 95; uint16 -> 16-bit PNG
    (PIL mode I;16). A 16-bit JPEG does not exist in baseline JPEG, so uint16 + "jpg" raises."""
    img = np.asarray(image_HW)
    if img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"save_grey: need a uint8 or uint16 (H, W) image, got {img.dtype} {img.shape}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"save_grey: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format == "jpg" and img.dtype == np.uint16:
        raise ValueError("save_grey: a 16-bit image can only be written as PNG")
    path = Path(path)
    options = {"quality": 95} if image_format == "jpg" else {"compress_level": 1}
    Image.fromarray(img).save(path, **options)       # uint16 -> mode I;16, uint8 -> mode L
    return path


def _spacing_2(value: Any, where: str) -> list[float]:
    try:
        s = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        s = np.array([np.nan])
    if s.size == 1:
        s = np.repeat(s, 2)
    if s.size != 2 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{where}: spacing_mm must be a positive number or (sx, sy), got {value!r}")
    return [float(s[0]), float(s[1])]


def _checked(s: Mapping[str, Any], k: int, seen: set[str], n: int) -> dict[str, Any]:
    """The sample with its arrays as numpy, after checking id, shapes and that labelled points lie in the image."""
    sid = str(s.get("id", ""))
    where = f"writers: sample {n} ({sid!r})"
    if not _SAFE_ID.match(sid):
        raise ValueError(f"{where}: id must be a file stem of letters, digits, '.', '_', '-'")
    if sid in seen:
        raise ValueError(f"{where}: duplicate id")
    seen.add(sid)
    img = np.asarray(s["image_HW"])
    pts = np.asarray(s["kpts_px_K2"], dtype=np.float64)
    vis = np.asarray(s["kpts_visible_K"], dtype=bool)
    if pts.shape != (k, 2) or vis.shape != (k,):
        raise ValueError(f"{where}: kpts_px_K2 {pts.shape} / kpts_visible_K {vis.shape} do not match {k} names")
    if img.ndim != 2:
        raise ValueError(f"{where}: image_HW must be (H, W) grey, got {img.shape}")
    if not (points_in_frame(pts, img.shape) | ~vis).all() or not np.isfinite(pts[vis]).all():
        raise ValueError(f"{where}: a labelled point lies outside the {img.shape[1]}x{img.shape[0]} image")
    split = s.get("split")
    return {"id": sid, "image_HW": img, "kpts_px_K2": pts, "kpts_visible_K": vis,
            "spacing_mm": _spacing_2(s["spacing_mm"], where), "patient_id": str(s.get("patient_id", sid)),
            "split": None if split is None else str(split)}


def _stream(samples: Iterable[Mapping[str, Any]], names: Sequence[str], image_dir: Path, image_format: str,
            rows: list[dict]):
    """Yield each checked sample (without its pixels) after writing its image; append its dataset.json row."""
    seen: set[str] = set()
    image_dir.mkdir(parents=True, exist_ok=True)
    for n, raw in enumerate(samples):
        s = _checked(raw, len(names), seen, n)
        image_name = f"{s['id']}.{image_format}"
        save_grey(image_dir / image_name, s["image_HW"], image_format)
        s["image_name"], s["hw"] = image_name, s.pop("image_HW").shape
        rows.append({"id": s["id"], "patient_id": s["patient_id"], "split": s["split"],
                     "spacing_mm": s["spacing_mm"]})
        yield s


def write_dataset_json(root: Path, layout: str, names: Sequence[str], rows: list[dict],
                       meta: Mapping[str, Any] | None) -> Path:
    """root/dataset.json (module docstring); keys of `meta` (generator, seed, ...) come first, ours override."""
    spacings = {tuple(r["spacing_mm"]) for r in rows}
    doc = dict(meta or {})
    doc.update({"layout": layout, "names": list(names), "n": len(rows)})
    if len(spacings) == 1:
        doc["spacing_mm"] = list(spacings.pop())
    doc["samples"] = rows
    return _write_atomic(root / "dataset.json", json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> Path:
    """Written beside and renamed: a crash never leaves half an annotation file where a reader looks."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_coco(root: str | Path, samples: Iterable[Mapping[str, Any]], names: Sequence[str],
               image_format: str = "png", meta: Mapping[str, Any] | None = None,
               category_name: str = "anatomy") -> Path:
    """root/annotations.json (one category, empty skeleton) + root/images/<id>.<ext>; returns the JSON path."""
    root, rows = Path(root), []

    def entries():
        for s in _stream(samples, names, root / "images", image_format, rows):
            rows[-1]["image"] = f"images/{s['image_name']}"
            yield {"file_name": s["image_name"], "height": s["hw"][0], "width": s["hw"][1],
                   "kpts_px_K2": s["kpts_px_K2"], "kpts_visible_K": s["kpts_visible_K"],
                   "spacing_mm": s["spacing_mm"], "patient_id": s["patient_id"], "split": s["split"]}

    out = export_coco(entries(), root / "annotations.json", names, category_name=category_name, skeleton=())
    write_dataset_json(root, "coco", names, rows, meta)
    return out


def table_header(names: Sequence[str], with_split: bool) -> list[str]:
    """image, <name>_x, <name>_y for each landmark, spacing_mm, patient_id[, split]."""
    cols = ["image"] + [f"{n}_{axis}" for n in names for axis in ("x", "y")] + ["spacing_mm", "patient_id"]
    return cols + ["split"] if with_split else cols


def _table_row(s: dict[str, Any]) -> list[str]:
    sx, sy = s["spacing_mm"]
    if sx != sy:
        raise ValueError(f"write_table: sample {s['id']!r}: the table has one spacing_mm column, got ({sx}, {sy})")
    cells = [f"images/{s['image_name']}"]
    for (x, y), v in zip(s["kpts_px_K2"].tolist(), s["kpts_visible_K"].tolist()):
        cells += [f"{x:.3f}", f"{y:.3f}"] if v else ["", ""]
    return cells + [repr(sx), s["patient_id"], s["split"] or ""]


def write_table(root: str | Path, samples: Iterable[Mapping[str, Any]], names: Sequence[str],
                image_format: str = "png", meta: Mapping[str, Any] | None = None) -> Path:
    """root/points.csv + root/images/<id>.<ext>; returns the CSV path. The split column is there when any sample
    has a split (empty for those without)."""
    root, rows = Path(root), []
    body = []
    for s in _stream(samples, names, root / "images", image_format, rows):
        rows[-1]["image"] = f"images/{s['image_name']}"
        body.append(_table_row(s))
    with_split = any(r["split"] is not None for r in rows)
    tmp = root / "points.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table_header(names, with_split))
        writer.writerows(r if with_split else r[:-1] for r in body)
    tmp.replace(root / "points.csv")
    write_dataset_json(root, "table", names, rows, meta)
    return root / "points.csv"


def labelme_doc(s: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """labelme 5 document of a checked sample (one point shape per labelled landmark, image beside the JSON)."""
    shapes = [{"label": name, "points": [[float(x), float(y)]], "group_id": None, "description": "",
               "shape_type": "point", "flags": {}}
              for name, (x, y), v in zip(names, s["kpts_px_K2"].tolist(), s["kpts_visible_K"].tolist()) if v]
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": s["image_name"],
            "imageData": None, "imageHeight": int(s["hw"][0]), "imageWidth": int(s["hw"][1])}


def write_labelme(root: str | Path, samples: Iterable[Mapping[str, Any]], names: Sequence[str],
                  image_format: str = "png", meta: Mapping[str, Any] | None = None) -> list[Path]:
    """root/<id>.<ext> + root/<id>.json per sample; returns the JSON paths."""
    root, rows, paths = Path(root), [], []
    for s in _stream(samples, names, root, image_format, rows):
        path = root / f"{s['id']}.json"
        _write_atomic(path, json.dumps(labelme_doc(s, names), ensure_ascii=False, indent=1) + "\n")
        rows[-1].update(image=s["image_name"], json=path.name)
        paths.append(path)
    write_dataset_json(root, "labelme", names, rows, meta)
    return paths


def write_layout(layout: str, root: str | Path, samples: Iterable[Mapping[str, Any]], names: Sequence[str],
                 image_format: str = "png", meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Dispatch to the layout's writer; returns the annotation files written (one for coco/table)."""
    if layout not in LAYOUTS:
        raise ValueError(f"write_layout: layout must be one of {LAYOUTS}, got {layout!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"write_layout: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    Path(root).mkdir(parents=True, exist_ok=True)
    if layout == "labelme":
        return write_labelme(root, samples, names, image_format, meta)
    writer = write_coco if layout == "coco" else write_table
    return [writer(root, samples, names, image_format, meta)]
