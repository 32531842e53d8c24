"""The labelme reader's two image decoders (PIL, the reference; OpenCV with decoder="cv2") give the same RGB uint8
arrays, and the synthetic hip generator's JPEG option writes files both decode close to the PNG phantom.

JPEG: PIL and OpenCV each bundle libjpeg-turbo (on the pinned environment: Pillow 13 / libjpeg-turbo with libjpeg 6.2
API, OpenCV 5.0 / libjpeg-turbo 3.1.2) and decode the test files to identical arrays; the test allows JPEG_TOL = 1
grey level so that another pairing of libjpeg builds (a different IDCT/upsampling SIMD path) still passes.
"""
import base64
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.readers.labelme import IMAGE_DECODERS, decode_image, read_labelme
from data_pipelines.synthetic.hip import generate_hip_dataset

needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv-python is not installed")

SMALL_MAP = {"classes": {"head": 1}, "points": {"A": 0}}
HW = (24, 40)
JPEG_TOL = 1          # grey levels, PIL vs OpenCV on the same JPEG (0 on the pinned environment)
SYNTH_JPEG_MAX = 16   # grey levels, quality-95 JPEG vs the PNG phantom (measured: max 9, mean 1.3)
SYNTH_JPEG_MEAN = 2.5


def _rng():
    return np.random.default_rng(7)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _smooth(channels: int) -> np.ndarray:
    """A smooth uint8 gradient + mild noise (JPEG-friendly, every value distinct per channel)."""
    yy, xx = np.mgrid[0:HW[0], 0:HW[1]].astype(np.float64)
    planes = [40 + 3 * xx + 2 * yy + 17 * c + _rng().integers(0, 6, HW) for c in range(channels)]
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8).squeeze()


def _cv2_png16(arr: np.ndarray) -> bytes:
    import cv2
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _case(kind: str) -> tuple[bytes, str, np.ndarray | None]:
    """(file bytes, suffix, the RGB array PIL must give, or None when only PIL == cv2 is checked)."""
    rng = _rng()
    if kind == "grey_png":
        g = rng.integers(0, 256, HW, dtype=np.uint8)
        return _encode(Image.fromarray(g), "PNG"), ".png", np.repeat(g[..., None], 3, axis=2)
    if kind == "rgb_png":
        rgb = rng.integers(0, 256, (*HW, 3), dtype=np.uint8)
        return _encode(Image.fromarray(rgb), "PNG"), ".png", rgb
    if kind == "rgba_png":      # alpha dropped, colour kept as stored (no compositing) by both
        rgba = rng.integers(0, 256, (*HW, 4), dtype=np.uint8)
        return _encode(Image.fromarray(rgba), "PNG"), ".png", rgba[..., :3]
    if kind == "grey_alpha_png":
        g, a = rng.integers(0, 256, HW, dtype=np.uint8), rng.integers(0, 256, HW, dtype=np.uint8)
        img = Image.merge("LA", [Image.fromarray(g), Image.fromarray(a)])
        return _encode(img, "PNG"), ".png", np.repeat(g[..., None], 3, axis=2)
    if kind == "palette_png":   # with a transparent palette entry: OpenCV gives BGRA, PIL a P image
        rgb = rng.integers(0, 256, (*HW, 3), dtype=np.uint8)
        pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return _encode(pal, "PNG", transparency=3), ".png", np.asarray(pal.convert("RGB"))
    if kind == "grey16_png":
        g16 = rng.integers(0, 65536, HW, dtype=np.uint16)
        expected = np.clip(np.rint(g16 * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return _cv2_png16(g16), ".png", np.repeat(expected[..., None], 3, axis=2)
    if kind == "rgb16_png":     # PIL's PNG decoder keeps the high byte of 16-bit colour
        bgr16 = rng.integers(0, 65536, (*HW, 3), dtype=np.uint16)
        return _cv2_png16(bgr16), ".png", (bgr16[..., ::-1] >> 8).astype(np.uint8)
    if kind == "grey_jpg":
        return _encode(Image.fromarray(_smooth(1)), "JPEG", quality=90), ".jpg", None
    if kind == "rgb_jpg":       # 4:2:0 chroma subsampling: both decoders upsample the same way
        return _encode(Image.fromarray(_smooth(3)), "JPEG", quality=90, subsampling=2), ".jpg", None
    if kind == "rgb_bmp":
        rgb = rng.integers(0, 256, (*HW, 3), dtype=np.uint8)
        return _encode(Image.fromarray(rgb), "BMP"), ".bmp", rgb
    raise KeyError(kind)


CASES = ["grey_png", "rgb_png", "rgba_png", "grey_alpha_png", "palette_png", "grey16_png", "rgb16_png", "grey_jpg",
         "rgb_jpg", "rgb_bmp"]


def _doc(image_name: str, image_bytes: bytes | None, hw=HW) -> dict:
    shapes = [{"label": "head", "points": [[2.5, 2.5], [12.5, 2.5], [12.5, 9.5]], "shape_type": "polygon"},
              {"label": "A", "points": [[5.0, 6.0]], "shape_type": "point"}]
    data = None if image_bytes is None else base64.b64encode(image_bytes).decode("ascii")
    return {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_name, "imageData": data,
            "imageHeight": hw[0], "imageWidth": hw[1]}


def _write_pair(tmp_path: Path, data: bytes, suffix: str, embedded: bool, stem: str = "case") -> Path:
    name = f"{stem}{suffix}"
    if not embedded:
        (tmp_path / name).write_bytes(data)
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps(_doc(name, data if embedded else None)), encoding="utf-8")
    return path


def _max_abs(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


@needs_cv2
@pytest.mark.parametrize("embedded", [False, True], ids=["file", "imageData"])
@pytest.mark.parametrize("kind", CASES)
def test_pil_and_cv2_decode_to_the_same_rgb(tmp_path, kind, embedded):
    data, suffix, expected = _case(kind)
    path = _write_pair(tmp_path, data, suffix, embedded)
    pil = read_labelme(path, SMALL_MAP, decoder="pil")
    cv = read_labelme(path, SMALL_MAP, decoder="cv2")
    for rec in (pil, cv):
        assert rec.image_HW3.dtype == np.uint8 and rec.image_HW3.shape == (*HW, 3)
        assert rec.image_HW3.flags.c_contiguous
    if expected is not None:
        np.testing.assert_array_equal(pil.image_HW3, expected)
    if suffix == ".jpg":
        assert _max_abs(pil.image_HW3, cv.image_HW3) <= JPEG_TOL
        assert _max_abs(pil.image_HW3, _smooth(3 if kind == "rgb_jpg" else 1).reshape(*HW, -1)) <= 12  # lossy, close
    else:
        np.testing.assert_array_equal(cv.image_HW3, pil.image_HW3)
    # the decoder changes the pixels' path only: mask, landmarks and the image's name are the same
    np.testing.assert_array_equal(cv.mask_HW, pil.mask_HW)
    np.testing.assert_array_equal(cv.kpts_px_K2, pil.kpts_px_K2)
    assert cv.image_path == pil.image_path
    assert cv.image_path.endswith("#imageData" if embedded else f"case{suffix}")


@needs_cv2
@pytest.mark.parametrize("decoder", sorted(IMAGE_DECODERS))
def test_corrupt_image_file_names_the_image_and_the_json(tmp_path, decoder):
    png = _case("grey_png")[0]
    for stem, data in (("garbage", b"\x89PNG\r\n\x1a\n not a png at all"), ("truncated", png[: len(png) // 2]),
                       ("empty", b"")):
        path = _write_pair(tmp_path, data, ".png", embedded=False, stem=stem)
        with pytest.raises(DataError, match="image does not decode") as err:
            read_labelme(path, SMALL_MAP, decoder=decoder)
        assert err.value.path.endswith(f"{stem}.png")
        assert f"{stem}.json" in err.value.problem and f"{stem}.png" in str(err.value)


@needs_cv2
@pytest.mark.parametrize("decoder", sorted(IMAGE_DECODERS))
def test_corrupt_embedded_image_names_the_json(tmp_path, decoder):
    jpg = _case("grey_jpg")[0]
    path = _write_pair(tmp_path, jpg[: len(jpg) // 2], ".jpg", embedded=True, stem="inline")
    with pytest.raises(DataError, match="image does not decode") as err:
        read_labelme(path, SMALL_MAP, decoder=decoder)
    assert err.value.path == f"{path}#imageData" and "inline.json" in err.value.problem


@needs_cv2
@pytest.mark.parametrize("decoder", sorted(IMAGE_DECODERS))
def test_size_mismatch_is_the_same_error_for_both(tmp_path, decoder):
    data = _case("rgb_png")[0]
    (tmp_path / "big.png").write_bytes(data)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_doc("big.png", None, hw=(HW[0] + 1, HW[1]))), encoding="utf-8")
    with pytest.raises(DataError) as err:
        decode_image(str(tmp_path / "big.png"), (HW[0] + 1, HW[1]), path, decoder=decoder)
    assert err.value.path.endswith("big.png")
    assert err.value.problem == f"image is {HW[1]}x{HW[0]} but {path} says imageWidth x imageHeight = 40x25"


@needs_cv2
def test_cv2_refuses_float_images_naming_the_file(tmp_path):
    f32 = Image.fromarray(_rng().random(HW).astype(np.float32), "F")
    path = _write_pair(tmp_path, _encode(f32, "TIFF"), ".tif", embedded=False, stem="float")
    with pytest.raises(DataError, match=r"float\.tif: image has 1 channel\(s\) of float32") as err:
        read_labelme(path, SMALL_MAP, decoder="cv2")
    assert "decoder='pil'" in err.value.problem and "float.json" in err.value.problem


def test_unknown_decoder_is_a_value_error_listing_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown image decoder 'turbo' \(choose from 'pil', 'cv2'\)"):
        read_labelme(tmp_path / "never_read.json", SMALL_MAP, decoder="turbo")
    with pytest.raises(ValueError, match="choose from 'pil', 'cv2'"):
        decode_image(b"", HW, tmp_path / "x.json", decoder="PIL")


def test_missing_opencv_is_a_clear_error_and_pil_still_works(tmp_path, monkeypatch):
    data, suffix, expected = _case("rgb_png")
    path = _write_pair(tmp_path, data, suffix, embedded=True)
    monkeypatch.setitem(sys.modules, "cv2", None)          # `import cv2` now raises ImportError
    with pytest.raises(ImportError, match=r"decoder='cv2' needs OpenCV .*opencv-python-headless.*decoder='pil'"):
        read_labelme(path, SMALL_MAP, decoder="cv2")
    np.testing.assert_array_equal(read_labelme(path, SMALL_MAP).image_HW3, expected)


def test_importing_the_reader_does_not_import_opencv():
    code = "import sys, data_pipelines.readers.labelme, data_pipelines.readers.labelme_reader; print('cv2' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------------------------
# synth_hip image_format="jpg"

def test_synth_hip_jpg_matches_the_png_phantom(tmp_path):
    png = generate_hip_dataset(tmp_path / "png", 3, seed=5)
    jpg = generate_hip_dataset(tmp_path / "jpg", 3, seed=5, image_format="jpg")
    assert [p.name for p in png] == [p.name for p in jpg]
    meta = json.loads((tmp_path / "jpg" / "dataset.json").read_text(encoding="utf-8"))
    decoders = ["pil", "cv2"] if importlib.util.find_spec("cv2") is not None else ["pil"]
    for p_png, p_jpg, row in zip(png, jpg, meta["samples"]):
        doc = json.loads(p_jpg.read_text(encoding="utf-8"))
        assert doc["imagePath"] == f"{p_jpg.stem}.jpg" == row["image"] and doc["imageData"] is None
        assert (tmp_path / "jpg" / doc["imagePath"]).read_bytes()[:2] == b"\xff\xd8"      # a JPEG stream
        assert not (tmp_path / "jpg" / f"{p_jpg.stem}.png").exists()
        ref = read_labelme(p_png)
        with Image.open(tmp_path / "jpg" / doc["imagePath"]) as im:
            assert im.format == "JPEG" and im.mode == "L"
        for decoder in decoders:
            rec = read_labelme(p_jpg, decoder=decoder)
            assert rec.image_path.endswith(".jpg")
            diff = np.abs(rec.image_HW3.astype(np.int64) - ref.image_HW3)
            assert 0 < diff.max() <= SYNTH_JPEG_MAX and diff.mean() <= SYNTH_JPEG_MEAN
            np.testing.assert_array_equal(rec.mask_HW, ref.mask_HW)
            np.testing.assert_array_equal(rec.kpts_px_K2, ref.kpts_px_K2)
    png_meta = json.loads((tmp_path / "png" / "dataset.json").read_text(encoding="utf-8"))
    assert [r["alpha_deg"] for r in png_meta["samples"]] == [r["alpha_deg"] for r in meta["samples"]]


def test_synth_hip_default_format_is_png_and_unknown_format_is_refused(tmp_path):
    (path,) = generate_hip_dataset(tmp_path, 1, seed=1)
    assert json.loads(path.read_text(encoding="utf-8"))["imagePath"] == f"{path.stem}.png"
    with Image.open(path.with_suffix(".png")) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match=r"image_format must be one of \['png', 'jpg'\], got 'gif'"):
        generate_hip_dataset(tmp_path / "x", 1, image_format="gif")
