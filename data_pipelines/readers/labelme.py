"""labelme 5.x reader for landmark + segmentation annotations (the hip-ultrasound format of
docs/systems/hip_us_multihipposenet.md).

A labelme JSON holds `version`, `flags`, `shapes`, `imagePath`, `imageData` (base64 of the image file, or null
when the image lies beside the JSON), `imageHeight`, `imageWidth`; each shape has `label`, `points`, `shape_type`.
Polygons become class ids in a mask, points become landmarks, rectangles are ignored. Shapes come in no fixed
order, so they are matched by label through a label map.

Coordinates: labelme points are read as (x, y) in the pixel convention of data_pipelines/batch.py (pixel centres at
integer coordinates). Rasterisation follows the same convention: a pixel belongs to a polygon when its centre lies
inside it (even-odd rule, half-open on the right/bottom edges so that two polygons sharing an edge never both claim
a pixel) - a polygon with corners (0.5, 0.5) and (3.5, 2.5) covers exactly the 3 x 2 pixels of rows 1-2, columns 1-3.

Images decode with PIL (the reference) or, with decoder="cv2", OpenCV: the same RGB uint8 array either way
(IMAGE_DECODERS; tests/test_image_decoders.py holds them together). validate_labelme always checks with PIL.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.images import RGB_DECODERS, decode_rgb, open_image, source_name
from data_pipelines.masks import polygon_mask, rasterize_polygons  # noqa: F401 (public names of the reader)

# Structure names -> class ids (0 = background), point names -> landmark index, labels to skip.
# Chinese strings are the published annotations' (docs/systems/hip_us_multihipposenet.md); English names are accepted
# beside them.
HIP_LABELS: dict[str, Any] = {
    "classes": {
        "股骨头": 1, "大转子": 2, "盂唇": 3, "软骨性髋臼顶": 4, "滑膜皱襞": 5, "近端软骨膜": 6, "Y型软骨": 7,
        "femoral_head": 1, "greater_trochanter": 2, "labrum": 3, "cartilage_roof": 4, "synovial_fold": 5,
        "perichondrium": 6, "y_cartilage": 7,
    },
    "points": {
        "基线点": 0, "骨缘点": 1, "髂骨下缘点": 2, "盂唇中心点": 3, "骨性髋臼顶凸面最高点": 4, "回声失落点": 5,
        "P1": 0, "P2": 1, "P3": 2, "P4": 3, "P5": 4, "P6": 5,
        "baseline": 0, "bony_rim": 1, "ilium_lower_limb": 2, "labrum_centre": 3, "acetabular_peak": 4, "echo_loss": 5,
    },
    "ignore": ["矩形框", "rectangle", "bbox"],
}
HIP_CLASS_NAMES = ("background", "femoral_head", "greater_trochanter", "labrum", "cartilage_roof", "synovial_fold",
                   "perichondrium", "y_cartilage")
HIP_KPT_NAMES = ("P1", "P2", "P3", "P4", "P5", "P6")

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# labelme lets a click land on the image border; accept up to half a pixel beyond the pixel-centre extent.
_BORDER_TOL_PX = 0.5


@dataclass
class LabelmeRecord:
    image_HW3: np.ndarray        # uint8, grey replicated to 3 channels
    mask_HW: np.ndarray          # uint8 class ids, 0 = background
    kpts_px_K2: np.ndarray       # float32 (x, y) original pixels; 0 where not visible
    kpts_visible_K: np.ndarray   # bool, False for a landmark absent from the file (require_all=False)
    image_path: str              # the image file, or "<json>#imageData" for an embedded image
    json_path: str


@dataclass(frozen=True)
class LabelmeInfo:
    json_path: str
    image_path: str              # the image file, or "<json>#imageData" for an embedded image
    hw: tuple[int, int]


@dataclass
class _Parsed:
    hw: tuple[int, int]
    polygons: list[tuple[int, np.ndarray]]   # (class id, (N, 2) float64), sorted by class id
    kpts_px_K2: np.ndarray
    kpts_visible_K: np.ndarray
    image_source: str | bytes                # path of the image file, or the embedded file's bytes


def _norm_label(label: str) -> str:
    return label.strip().lower()


def _label_tables(label_map: dict[str, Any]) -> tuple[dict[str, int], dict[str, int], set[str], int]:
    """Case-insensitive lookup tables (structure -> class id, point -> index, ignored labels) and K."""
    try:
        classes = {_norm_label(k): int(v) for k, v in label_map["classes"].items()}
        points = {_norm_label(k): int(v) for k, v in label_map["points"].items()}
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"label_map needs dicts 'classes' (name -> id >= 1) and 'points' (name -> index): {exc}")
    if any(v < 1 or v > 255 for v in classes.values()):
        raise ValueError("label_map['classes']: class ids must lie in 1..255 (0 is background)")
    if not points or sorted(set(points.values())) != list(range(max(points.values()) + 1)):
        raise ValueError("label_map['points']: indices must cover 0..K-1")
    ignore = {_norm_label(k) for k in label_map.get("ignore", ())}
    return classes, points, ignore, max(points.values()) + 1


# ----------------------------------------------------------------------------------------------------------------
# JSON parsing (shared by read_labelme and validate_labelme)
# ----------------------------------------------------------------------------------------------------------------

def load_json_object(json_path: Path, kind: str) -> dict[str, Any]:
    """A JSON file whose top level is an object; unreadable bytes, bad UTF-8, invalid JSON or another top level
    raise a DataError naming the file (`kind` names the format in the last case, e.g. "labelme JSON")."""
    try:
        text = json_path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(json_path, f"cannot read the file ({exc.strerror or exc})")
    except UnicodeDecodeError as exc:
        raise DataError(json_path, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(json_path, f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    if not isinstance(doc, dict):
        raise DataError(json_path, f"invalid {kind}: top level is a {type(doc).__name__}, not an object")
    return doc


def _load_json(json_path: Path) -> dict[str, Any]:
    doc = load_json_object(json_path, "labelme JSON")
    for key in ("shapes", "imageHeight", "imageWidth"):
        if key not in doc:
            raise DataError(json_path, f"missing key '{key}'")
    if doc.get("imageData") is None and not doc.get("imagePath"):
        raise DataError(json_path, "missing key 'imagePath' (and no embedded 'imageData')")
    return doc


def _image_hw(doc: dict[str, Any], json_path: Path) -> tuple[int, int]:
    h, w = doc["imageHeight"], doc["imageWidth"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise DataError(json_path, f"imageHeight/imageWidth must be positive integers, got {h!r}/{w!r}")
    return h, w


def _shape_points(shape: dict[str, Any], json_path: Path, label: str) -> np.ndarray:
    try:
        pts = np.asarray(shape["points"], dtype=np.float64)
    except KeyError:
        raise DataError(json_path, f"shape '{label}': missing key 'points'")
    except (TypeError, ValueError):
        raise DataError(json_path, f"shape '{label}': points are not a list of numeric (x, y) pairs")
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
        raise DataError(json_path, f"shape '{label}': points are not a list of finite (x, y) pairs")
    return pts


def _parse_point(pts: np.ndarray, label: str, hw: tuple[int, int], json_path: Path) -> np.ndarray:
    if pts.shape[0] != 1:
        raise DataError(json_path, f"point '{label}' has {pts.shape[0]} coordinate pairs, expected 1")
    x, y = pts[0]
    h, w = hw
    tol = 0.5 + _BORDER_TOL_PX
    if not (-tol <= x <= w - 1 + tol and -tol <= y <= h - 1 + tol):
        raise DataError(json_path, f"point '{label}' at ({x:.2f}, {y:.2f}) lies outside the {w}x{h} image")
    return pts[0]


def _parse_shapes(doc, json_path, label_map, require_all, strict_labels) -> _Parsed:
    classes, points, ignore, k = _label_tables(label_map)
    hw = _image_hw(doc, json_path)
    shapes = doc["shapes"]
    if not isinstance(shapes, list):
        raise DataError(json_path, "'shapes' is not a list")
    polygons: list[tuple[int, np.ndarray]] = []
    kpts_K2 = np.zeros((k, 2), dtype=np.float32)
    visible_K = np.zeros(k, dtype=bool)
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise DataError(json_path, f"shape #{i} has no string 'label'")
        label, key = shape["label"], _norm_label(shape["label"])
        shape_type = shape.get("shape_type") or "polygon"   # labelme < 4 wrote no shape_type: polygons only
        if shape_type == "rectangle" or key in ignore:
            continue
        if key in classes:
            if shape_type != "polygon":
                raise DataError(json_path, f"structure '{label}' has shape_type '{shape_type}', expected polygon")
            pts = _shape_points(shape, json_path, label)
            if pts.shape[0] < 3:
                raise DataError(json_path, f"polygon '{label}' has {pts.shape[0]} points, needs at least 3")
            polygons.append((classes[key], pts))
        elif key in points:
            if shape_type != "point":
                raise DataError(json_path, f"landmark '{label}' has shape_type '{shape_type}', expected point")
            idx = points[key]
            if visible_K[idx]:
                raise DataError(json_path, f"landmark '{label}' appears more than once")
            kpts_K2[idx] = _parse_point(_shape_points(shape, json_path, label), label, hw, json_path)
            visible_K[idx] = True
        elif strict_labels:
            raise DataError(json_path, f"unknown shape label '{label}' (shape #{i}, {shape_type})")
    if require_all:
        _check_complete(polygons, visible_K, classes, points, json_path)
    polygons.sort(key=lambda item: item[0])
    source = _image_source(doc, json_path)
    return _Parsed(hw, polygons, kpts_K2, visible_K, source)


def _aliases(table: dict[str, int], value: int) -> str:
    return "/".join(name for name, v in table.items() if v == value)


def _check_complete(polygons, visible_K, classes, points, json_path) -> None:
    present = {cls for cls, _ in polygons}
    missing_cls = sorted(set(classes.values()) - present)
    if missing_cls:
        names = "; ".join(f"class {c} ({_aliases(classes, c)})" for c in missing_cls)
        raise DataError(json_path, f"missing structure: {names}")
    missing_pts = [int(i) for i in np.nonzero(~visible_K)[0]]
    if missing_pts:
        names = "; ".join(f"landmark {i} ({_aliases(points, i)})" for i in missing_pts)
        raise DataError(json_path, f"missing point: {names}")


def _image_source(doc: dict[str, Any], json_path: Path) -> str | bytes:
    data = doc.get("imageData")
    if data is not None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise DataError(json_path, "imageData is not valid base64")
    rel = str(doc["imagePath"]).replace("\\", "/")      # labelme on Windows writes backslashes
    candidate = (json_path.parent / rel)
    if candidate.is_file():
        return str(candidate)
    # Datasets are often moved without their relative layout: fall back to an image with the JSON's stem beside it.
    for suffix in (Path(rel).suffix.lower(),) + _IMAGE_SUFFIXES:
        beside = json_path.with_suffix(suffix) if suffix else None
        if beside is not None and beside.is_file():
            return str(beside)
    raise DataError(json_path, f"image file not found: '{doc['imagePath']}' (looked for {candidate})")


# ----------------------------------------------------------------------------------------------------------------
# Image decoding
# ----------------------------------------------------------------------------------------------------------------

def _image_name(source: str | bytes, json_path: Path) -> str:
    return source_name(source, json_path)


def _open_image(source: str | bytes, json_path: Path) -> Image.Image:
    return open_image(source, json_path)


def _check_hw(height: int, width: int, hw: tuple[int, int], source, json_path: Path) -> None:
    if (height, width) != hw:
        raise DataError(_image_name(source, json_path),
                        f"image is {width}x{height} but {json_path} says imageWidth x imageHeight = "
                        f"{hw[1]}x{hw[0]}")


def _check_size(img: Image.Image, hw: tuple[int, int], source, json_path: Path) -> None:
    _check_hw(img.height, img.width, hw, source, json_path)


def _checked(decoder: str):
    """A data_pipelines/images.py RGB decoder whose size check speaks labelme's field names."""
    def decode(source: str | bytes, hw: tuple[int, int], json_path: Path) -> np.ndarray:
        if decoder == "pil":
            with _open_image(source, json_path) as img:
                _check_size(img, hw, source, json_path)
        rgb = decode_rgb(source, None, json_path, decoder)
        _check_hw(rgb.shape[0], rgb.shape[1], hw, source, json_path)
        return rgb
    return decode


# decoder name -> (source, (H, W), json_path) -> uint8 (H, W, 3); "pil" is the reference (data_pipelines/images.py).
IMAGE_DECODERS = {name: _checked(name) for name in RGB_DECODERS}


def decode_image(source: str | bytes, hw: tuple[int, int], json_path: str | Path, decoder: str = "pil") -> np.ndarray:
    """uint8 (H, W, 3) of an image file path or embedded file bytes, checked against the JSON's size, by `decoder`
    (a key of IMAGE_DECODERS); an unreadable or corrupt image raises a DataError naming it and the JSON file."""
    return _decoder(decoder)(source, hw, Path(json_path))


def _decoder(name: str):
    if name not in IMAGE_DECODERS:
        raise ValueError(f"data_pipelines/readers/labelme.py: unknown image decoder {name!r} (choose from "
                         f"{', '.join(repr(k) for k in IMAGE_DECODERS)})")
    return IMAGE_DECODERS[name]


# ----------------------------------------------------------------------------------------------------------------
# Public readers
# ----------------------------------------------------------------------------------------------------------------

def read_labelme(json_path: str | Path, label_map: dict[str, Any] = HIP_LABELS, require_all: bool = True,
                 strict_labels: bool = True, decoder: str = "pil") -> LabelmeRecord:
    """Decode one labelme file: image (embedded or beside it), class-id mask from the polygons, landmarks.

    require_all: every structure and point of the label map must be present (else DataError naming which); when
    False, absent landmarks come back with visible=False. strict_labels: an unknown label is an error (else skipped).
    decoder: "pil" (the reference) or "cv2" (OpenCV, imported only then): the same RGB uint8 array (IMAGE_DECODERS).
    """
    decode = _decoder(decoder)
    json_path = Path(json_path)
    parsed = _parse_shapes(_load_json(json_path), json_path, label_map, require_all, strict_labels)
    image_HW3 = decode(parsed.image_source, parsed.hw, json_path)
    return LabelmeRecord(
        image_HW3=image_HW3,
        mask_HW=rasterize_polygons(parsed.polygons, parsed.hw),
        kpts_px_K2=parsed.kpts_px_K2,
        kpts_visible_K=parsed.kpts_visible_K,
        image_path=_image_name(parsed.image_source, json_path),
        json_path=str(json_path),
    )


def validate_labelme(json_path: str | Path, label_map: dict[str, Any] = HIP_LABELS, require_all: bool = True,
                     strict_labels: bool = True) -> LabelmeInfo:
    """Everything read_labelme checks, without decoding pixels: JSON, shapes, labels, points inside the image, the
    image's header size and PIL's `verify()` of its file structure (chunk CRCs for PNG)."""
    json_path = Path(json_path)
    parsed = _parse_shapes(_load_json(json_path), json_path, label_map, require_all, strict_labels)
    with _open_image(parsed.image_source, json_path) as img:
        _check_size(img, parsed.hw, parsed.image_source, json_path)
        try:
            img.verify()
        except Exception as exc:
            raise DataError(_image_name(parsed.image_source, json_path),
                            f"image does not decode ({type(exc).__name__}: {exc}) - referenced by {json_path}")
    return LabelmeInfo(str(json_path), _image_name(parsed.image_source, json_path), parsed.hw)
