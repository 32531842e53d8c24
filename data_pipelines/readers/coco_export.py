"""COCO keypoints exporter: MedPose samples / Datasets -> a COCO file that read_coco (data_pipelines/readers/coco.py) reads
back exactly.

Coordinates: the exporter applies x_coco = x_medpose + pixel_offset (the inverse of the reader's shift, see
data_pipelines/readers/coco.py), writes visibility 2 for every visible point, and masks as uncompressed RLE
{"size": [h, w], "counts": [...]} (column-major runs starting with background), which pycocotools reads for any
iscrowd value and which is exact (a traced polygon is not).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines.transforms import points_in_frame


def rle_encode(mask_HW: np.ndarray) -> dict[str, Any]:
    """The inverse of data_pipelines.readers.coco.rle_decode (a mask starting with foreground gets a leading 0-length
    background run)."""
    flat = np.asarray(mask_HW, dtype=bool).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [int(mask_HW.shape[0]), int(mask_HW.shape[1])], "counts": ([0] if flat[0] else []) + counts}


def _bbox_area(pts_coco_N2: np.ndarray, mask: np.ndarray | None, offset: float) -> tuple[list[float], float]:
    """bbox [x, y, w, h] (COCO coordinates) around the labelled points and the mask's pixels (each pixel spans its
    centre +- 0.5); area = mask pixel count, else the box's area."""
    boxes = []
    if len(pts_coco_N2):
        boxes.append((*pts_coco_N2.min(axis=0), *pts_coco_N2.max(axis=0)))
    if mask is not None and mask.any():
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append((cols[0] - 0.5 + offset, rows[0] - 0.5 + offset, cols[-1] + 0.5 + offset, rows[-1] + 0.5 + offset))
    if not boxes:
        return [0.0, 0.0, 0.0, 0.0], 0.0
    b = np.asarray(boxes, dtype=np.float64)
    x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    area = float(mask.sum()) if mask is not None and mask.any() else float((x1 - x0) * (y1 - y0))
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area


def _export_entry(n: int, s: Mapping[str, Any], k: int, offset: float) -> tuple[dict, dict]:
    name = f"export_coco: sample {n} ({s.get('file_name')!r})"
    h, w = int(s["height"]), int(s["width"])
    pts = np.asarray(s["kpts_px_K2"], dtype=np.float64)
    vis = np.asarray(s["kpts_visible_K"], dtype=bool)
    if pts.shape != (k, 2) or vis.shape != (k,):
        raise ValueError(f"{name}: kpts_px_K2 {pts.shape} / kpts_visible_K {vis.shape} do not match {k} names")
    if not (points_in_frame(pts, (h, w)) | ~vis).all():
        raise ValueError(f"{name}: a visible point lies outside the {w}x{h} image")
    mask = s.get("mask_HW")
    if mask is not None:
        mask = np.asarray(mask) > 0
        if mask.shape != (h, w):
            raise ValueError(f"{name}: mask_HW {mask.shape} differs from (height, width) = {(h, w)}")
    coco = pts + offset                                  # MedPose -> COCO coordinates (module docstring)
    flat: list[float | int] = []
    for (x, y), v in zip(coco.tolist(), vis.tolist()):
        flat += [x, y, 2] if v else [0.0, 0.0, 0]
    bbox, area = _bbox_area(coco[vis], mask, offset)
    image = {"id": n, "file_name": str(s["file_name"]), "width": w, "height": h}
    for key in ("patient_id", "split"):
        if s.get(key) is not None:
            image[key] = str(s[key])
    spacing = None if s.get("spacing_mm") is None else np.asarray(s["spacing_mm"], dtype=np.float64).reshape(2)
    if spacing is not None and np.all(np.isfinite(spacing)):          # NaN = unknown: no field
        image["spacing_mm"] = [float(v) for v in spacing]
    ann = {"id": n, "image_id": n, "category_id": 1, "keypoints": flat, "num_keypoints": int(vis.sum()),
           "bbox": bbox, "area": area, "iscrowd": 0}
    if mask is not None:
        ann["segmentation"] = rle_encode(mask)
    return image, ann


def export_coco(samples: Iterable[Mapping[str, Any]], out_json: str | Path, kpt_names: Sequence[str],
                category_name: str = "anatomy", skeleton: Sequence[tuple[int | str, int | str]] = (),
                pixel_offset: float = 0.5) -> Path:
    """Write a COCO keypoints file, one image + one annotation (category 1) per sample dict {"file_name", "width",
    "height", "kpts_px_K2" (MedPose pixels), "kpts_visible_K", optional "mask_HW", "patient_id", "spacing_mm",
    "split"}. skeleton: pairs of 0-based indices or names (written 1-based). read_coco(out) gives the points back
    exactly (x_coco = x + pixel_offset in float64 is undone exactly) and the masks (RLE)."""
    names = [str(n) for n in kpt_names]
    index = {n: i for i, n in enumerate(names)}
    edges = [[(index[v] if isinstance(v, str) else int(v)) + 1 for v in pair] for pair in skeleton]
    if any(not 1 <= v <= len(names) for e in edges for v in e):
        raise ValueError(f"export_coco: skeleton {list(skeleton)!r} names a keypoint outside 0..{len(names) - 1}")
    images, annotations = [], []
    for n, s in enumerate(samples, start=1):
        image, ann = _export_entry(n, s, len(names), float(pixel_offset))
        images.append(image)
        annotations.append(ann)
    doc = {"info": {"description": "exported by MedPose (data_pipelines/readers/coco.py)", "pixel_offset": pixel_offset},
           "licenses": [], "images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": category_name, "supercategory": category_name, "keypoints": names,
                           "skeleton": edges}]}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)       # atomic: a crash never leaves half a file where a reader would look
    return out


def _image_file(o: Mapping[str, Any], image_root: Path, used: set[str]) -> str:
    """file_name of the sample's image under image_root: its own file when it lies there already, else a PNG."""
    own = o.get("image")
    if own and Path(own).is_file():
        try:
            return Path(own).resolve().relative_to(image_root.resolve()).as_posix()
        except ValueError:
            pass        # elsewhere on disk: write a copy under image_root
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(o["id"])) or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    img = np.asarray(o["image_HW3"], dtype=np.uint8)
    grey = np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    Image.fromarray(img[..., 0] if grey else img).save(image_root / name)
    return name


def dataset_to_coco(dataset, out_json: str | Path, image_root: str | Path, category_name: str = "anatomy",
                    pixel_offset: float = 0.5) -> Path:
    """Any MedPose Dataset with original(i) (and kpt_names) as a COCO file: images written as PNG under image_root
    unless original(i)["image"] already lies there; file_names are relative to image_root. A repeated sample id
    (oversampling) is written once; a multi-class mask becomes the category's foreground (class > 0)."""
    image_root = Path(image_root)
    image_root.mkdir(parents=True, exist_ok=True)
    group_of = getattr(dataset, "group_id", None) or getattr(dataset, "patient_id", None)

    def rows():
        seen, used = set(), set()
        for i in range(len(dataset)):
            o = dataset.original(i)
            if o["id"] in seen:
                continue
            seen.add(o["id"])
            file_name = _image_file(o, image_root, used)
            used.add(file_name)
            h, w = o["image_HW3"].shape[:2]
            yield {"file_name": file_name, "width": w, "height": h, "kpts_px_K2": o["kpts_px_K2"],
                   "kpts_visible_K": o["kpts_visible_K"], "mask_HW": o.get("mask_HW"),
                   "spacing_mm": o.get("spacing_mm_2"), "patient_id": group_of(i) if group_of else None}

    return export_coco(rows(), out_json, list(dataset.kpt_names), category_name, pixel_offset=pixel_offset)
