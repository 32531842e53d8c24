"""Image files -> pixels: the one decoder every reader uses (PNG, JPEG, BMP, TIFF; grey, RGB, RGBA, palette, 16-bit).

A source is a path (str / Path) or the bytes of an encoded file (e.g. labelme's embedded `imageData`). Every failure
is a DataError naming the image (and, through `referenced_by`, the annotation file that points to it).

Colour rules (`color`):
  "auto" - RGB stays RGB, except that an RGB file whose three channels are equal is kept as one grey channel (it
           warps three times faster and carries nothing more); grey, grey+alpha, bilevel and 16-bit files are grey;
  "grey" - one channel: 8-bit grey as is, colour to luma (PIL's 'L', ITU-R 601-2);
  "rgb"  - three channels, grey replicated.
16-bit grey is scaled to 8 bits by 255 / 65535 (rounded); PIL's 32-bit integer mode "I" by its maximum; alpha is
dropped. decoder="cv2" (OpenCV, imported only then) gives the same uint8 RGB as "pil" for the formats both read
(tests/test_image_decoders.py holds them together); PIL is the reference and checks the file structure in verify().
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
COLOR_MODES = ("auto", "grey", "rgb")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def source_name(source: str | Path | bytes, referenced_by: str | Path | None = None) -> str:
    """How errors name an image: its path, or "<annotation>#imageData" for embedded bytes."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"{referenced_by}#imageData" if referenced_by is not None else "<embedded image>"


def _suffix(referenced_by) -> str:
    return f" - referenced by {referenced_by}" if referenced_by is not None else ""


def open_image(source: str | Path | bytes, referenced_by: str | Path | None = None) -> Image.Image:
    """PIL image (header read, no pixels); a missing or unreadable file is a DataError naming it."""
    name = source_name(source, referenced_by)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise DataError(name, "image file not found" + _suffix(referenced_by))
    try:
        return Image.open(str(source) if isinstance(source, (str, Path)) else io.BytesIO(source))
    except Exception as exc:   # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise DataError(name, f"image does not decode ({type(exc).__name__}: {exc}){_suffix(referenced_by)}")


def check_hw(hw_found: tuple[int, int], hw_declared: tuple[int, int] | None, name: str, declared_by: str) -> None:
    if hw_declared is not None and tuple(hw_found) != tuple(hw_declared):
        raise DataError(name, f"image is {hw_found[1]}x{hw_found[0]} but {declared_by} says width x height = "
                              f"{hw_declared[1]}x{hw_declared[0]}")


def verify_image(source: str | Path | bytes, referenced_by: str | Path | None = None,
                 hw: tuple[int, int] | None = None) -> tuple[tuple[int, int], str, str]:
    """((H, W), PIL mode, format) from the header, after PIL's verify() of the file structure (chunk CRCs for PNG);
    no pixel decode. `hw` (declared by an annotation) must match the header."""
    name = source_name(source, referenced_by)
    with open_image(source, referenced_by) as img:
        found, mode, fmt = (int(img.height), int(img.width)), img.mode, img.format
        check_hw(found, hw, name, str(referenced_by) if referenced_by is not None else "the annotation")
        try:
            img.verify()
        except Exception as exc:
            raise DataError(name, f"image does not decode ({type(exc).__name__}: {exc}){_suffix(referenced_by)}")
    return found, mode, fmt or ""


def _scale_16bit(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def _decode_pil(source, hw, referenced_by, convert) -> np.ndarray:
    """convert(PIL image with its pixels loaded) -> array, with the size check and every failure named."""
    name = source_name(source, referenced_by)
    with open_image(source, referenced_by) as img:
        check_hw((img.height, img.width), hw, name, str(referenced_by))
        try:
            img.load()
            return convert(img)
        except Exception as exc:
            raise DataError(name, f"image does not decode ({type(exc).__name__}: {exc}){_suffix(referenced_by)}")


def _rgb_of(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        return grey_to_rgb(_scale_16bit(img))
    if img.mode == "L":
        return grey_to_rgb(np.asarray(img, dtype=np.uint8))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _grey_of(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        return _scale_16bit(img)
    return np.ascontiguousarray(np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8))


def _decode_rgb_pil(source, hw, referenced_by) -> np.ndarray:
    """uint8 (H, W, 3); grey and 16-bit images become 8-bit grey replicated to 3 channels."""
    return _decode_pil(source, hw, referenced_by, _rgb_of)


def grey_to_rgb(grey_HW: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey_HW[:, :, None], 3, axis=2))


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(f"data_pipelines/images.py: decoder='cv2' needs OpenCV ({exc}); install "
                          f"opencv-python-headless, or use decoder='pil'") from exc
    return cv2


def _cv2_to_rgb(arr: np.ndarray, name: str, referenced_by) -> np.ndarray:
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if arr.ndim == 3 and channels == 1:
        arr = arr[:, :, 0]
    if channels == 1 and arr.dtype == np.uint8:
        return grey_to_rgb(arr)
    if channels == 1 and arr.dtype == np.uint16:
        return grey_to_rgb(np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    if channels == 1 and arr.dtype == np.int32:
        top = max(float(arr.max()), 1.0)
        return grey_to_rgb(np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8))
    if channels in (3, 4) and arr.dtype in (np.uint8, np.uint16):
        rgb = arr[:, :, 2::-1]                                 # BGR(A) -> RGB, alpha dropped
        if arr.dtype == np.uint16:
            rgb = (rgb >> 8).astype(np.uint8)
        return np.ascontiguousarray(rgb)
    raise DataError(name, f"image has {channels} channel(s) of {arr.dtype}, which decoder='cv2' does not convert "
                          f"(decoder='pil' may){_suffix(referenced_by)}")


def _decode_rgb_cv2(source, hw, referenced_by) -> np.ndarray:
    """The same uint8 (H, W, 3) as the PIL path, decoded by OpenCV (cv2.imdecode, IMREAD_UNCHANGED: no EXIF rotation,
    as PIL's Image.open). Per OpenCV's result: grey uint8 -> replicated; BGR -> RGB; BGRA -> RGB with alpha dropped
    (PIL's convert("RGB") drops it too; palette and grey+alpha files arrive as BGR/BGRA); 16-bit grey -> rounded
    v * 255 / 65535 (PIL's I;16 path); 16-bit colour -> the high byte (what PIL's PNG decoder keeps); 32-bit integer
    grey -> scaled by its maximum (PIL's mode "I"). Other pixel types (float, signed 16-bit) raise a DataError."""
    cv2 = _import_cv2()
    name = source_name(source, referenced_by)
    if isinstance(source, (str, Path)):
        try:
            data = np.fromfile(str(source), dtype=np.uint8)
        except OSError as exc:
            raise DataError(name, f"cannot read the file ({exc.strerror or exc}){_suffix(referenced_by)}")
    else:
        data = np.frombuffer(source, dtype=np.uint8)
    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as exc:
        raise DataError(name, f"image does not decode (cv2.error: {str(exc).strip()}){_suffix(referenced_by)}")
    if arr is None:
        raise DataError(name, f"image does not decode (cv2.imdecode returned nothing: not an image, or a corrupt "
                              f"or truncated file){_suffix(referenced_by)}")
    check_hw(arr.shape[:2], hw, name, str(referenced_by))
    return _cv2_to_rgb(arr, name, referenced_by)


# decoder name -> (source, (H, W) or None, referenced_by) -> uint8 (H, W, 3); "pil" is the reference.
RGB_DECODERS = {"pil": _decode_rgb_pil, "cv2": _decode_rgb_cv2}


def decode_rgb(source: str | Path | bytes, hw: tuple[int, int] | None = None, referenced_by: str | Path | None = None,
               decoder: str = "pil") -> np.ndarray:
    """uint8 (H, W, 3) of an image file or embedded file bytes, checked against a declared (H, W) when given."""
    if decoder not in RGB_DECODERS:
        raise ValueError(f"data_pipelines/images.py: unknown image decoder {decoder!r} (choose from "
                         f"{', '.join(repr(k) for k in RGB_DECODERS)})")
    return RGB_DECODERS[decoder](source, hw, referenced_by)


def decode_grey(source: str | Path | bytes, hw: tuple[int, int] | None = None,
                referenced_by: str | Path | None = None) -> np.ndarray:
    """uint8 (H, W): 8-bit grey as is, 16-bit scaled by 255/65535, colour to luma (PIL 'L', ITU-R 601-2)."""
    return _decode_pil(source, hw, referenced_by, _grey_of)


def is_grey_rgb(rgb_HW3: np.ndarray) -> bool:
    return bool(np.array_equal(rgb_HW3[..., 0], rgb_HW3[..., 1]) and np.array_equal(rgb_HW3[..., 0], rgb_HW3[..., 2]))


def decode_pixels(source: str | Path | bytes, color: str = "auto", decoder: str = "pil",
                  hw: tuple[int, int] | None = None, referenced_by: str | Path | None = None) -> np.ndarray:
    """uint8 (C, H, W) by the colour rule (module docstring): C = 1 or 3."""
    if color == "grey":
        return np.ascontiguousarray(decode_grey(source, hw, referenced_by)[None])
    if color not in COLOR_MODES:
        raise ValueError(f"data_pipelines/images.py: color must be one of {COLOR_MODES}, got {color!r}")
    rgb = decode_rgb(source, hw, referenced_by, decoder)
    if color == "auto" and is_grey_rgb(rgb):
        return np.ascontiguousarray(rgb[None, :, :, 0])
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def header_channels(mode: str | None) -> int | None:
    """Channels the "auto" rule gives a file of PIL mode `mode` (None when the header does not tell: an RGB file may
    still be grey in its pixels)."""
    if mode is None:
        return None
    if mode in ("L", "LA", "1", "P;L") or mode in _SIXTEEN_BIT or mode == "F":
        return 1
    return None


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


def area_resize(image_CHW: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased downscale (OpenCV INTER_AREA: each output pixel the mean of the source area it covers) of a
    uint8 or float (C, H, W) image to (C, h, w); the pixel-centre convention maps x' = (x + 0.5) w / W - 0.5."""
    cv2 = _import_cv2()
    h, w = int(out_hw[0]), int(out_hw[1])
    planes = [cv2.resize(np.ascontiguousarray(c), (w, h), interpolation=cv2.INTER_AREA) for c in image_CHW]
    return np.ascontiguousarray(np.stack(planes))


def zscore(image_HW: np.ndarray, path: str | Path = "") -> np.ndarray:
    """(I - mean) / std over the image (the per-image z-score of MRI slabs); a constant image is a DataError."""
    mean, std = float(image_HW.mean(dtype=np.float64)), float(image_HW.std(dtype=np.float64))
    if not std > 0:
        raise DataError(path, "the sagittal slab is constant (std 0); cannot z-score it")
    return ((image_HW - mean) / std).astype(np.float32)


def display_uint8(image_HW: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """A 2-D float image scaled for figures: percentiles [low, high] -> [0, 255], clipped, uint8."""
    lo, hi = np.percentile(image_HW, [low_pct, high_pct])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((image_HW - lo) * scale, 0, 255).round().astype(np.uint8)
