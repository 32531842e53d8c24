import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.readers.labelme import HIP_LABELS, polygon_mask, rasterize_polygons, read_labelme, validate_labelme

SMALL_MAP = {"classes": {"head": 1, "roof": 3}, "points": {"A": 0, "B": 1}, "ignore": ["box"]}
IMG_HW = (6, 8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _grey_image() -> np.ndarray:
    return (np.arange(48, dtype=np.uint8).reshape(IMG_HW) * 5).astype(np.uint8)


def _shape(label, points, kind):
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def _doc(**overrides):
    doc = {
        "version": "5.2.1", "flags": {}, "imagePath": "small.png",
        "imageData": base64.b64encode(_png_bytes(_grey_image())).decode("ascii"),
        "imageHeight": IMG_HW[0], "imageWidth": IMG_HW[1],
        # roof (class 3) listed before head (class 1) and overlapping it: class order, not file order, decides
        "shapes": [
            _shape("box", [[0, 0], [7, 5]], "rectangle"),
            _shape("roof", [[2.5, 0.5], [5.5, 0.5], [5.5, 1.5], [2.5, 1.5]], "polygon"),
            _shape("B", [[7.0, 5.0]], "point"),
            _shape("head", [[0.5, 0.5], [3.5, 0.5], [3.5, 2.5], [0.5, 2.5]], "polygon"),
            _shape("A", [[1.25, 2.75]], "point"),
        ],
    }
    doc.update(overrides)
    return doc


def _write(tmp_path, doc, name="small.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def test_polygon_mask_counts_pixel_centres_inside_half_open():
    # corners at half-pixels: centres rows 1..2, columns 1..3 -> 6 pixels
    m = polygon_mask(np.array([[0.5, 0.5], [3.5, 0.5], [3.5, 2.5], [0.5, 2.5]]), (5, 6))
    assert m.sum() == 6 and m[1:3, 1:4].all()
    # integer corners: the right/bottom edges are open -> rows 0..2, columns 0..2 = 9 pixels
    m = polygon_mask(np.array([[0, 0], [3, 0], [3, 3], [0, 3]]), (5, 6))
    assert m.sum() == 9 and m[0:3, 0:3].all()
    # right triangle (0,0),(4,0),(0,4): centre (c, r) inside iff c + r < 4 (and the closed left/top edges) -> 10 px
    m = polygon_mask(np.array([[0, 0], [4, 0], [0, 4]]), (6, 6))
    rr, cc = np.mgrid[0:6, 0:6]
    np.testing.assert_array_equal(m, (rr + cc < 4))


def test_polygons_sharing_an_edge_claim_each_pixel_once():
    left = np.array([[0.2, 0.2], [3.3, 0.2], [3.3, 4.7], [0.2, 4.7]])
    right = np.array([[3.3, 0.2], [7.6, 0.2], [7.6, 4.7], [3.3, 4.7]])
    a, b = polygon_mask(left, (6, 9)), polygon_mask(right, (6, 9))
    assert not (a & b).any()
    np.testing.assert_array_equal(a | b, polygon_mask(np.array([[0.2, 0.2], [7.6, 0.2], [7.6, 4.7], [0.2, 4.7]]),
                                                      (6, 9)))


def test_read_embedded_image_mask_and_points_by_label(tmp_path):
    rec = read_labelme(_write(tmp_path, _doc()), SMALL_MAP)
    assert rec.image_HW3.shape == (6, 8, 3) and rec.image_HW3.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rec.image_HW3[..., c], _grey_image())
    expected = np.zeros(IMG_HW, np.uint8)
    expected[1:3, 1:4] = 1
    expected[1, 3:6] = 3          # class 3 drawn after class 1 even though it comes first in the file
    np.testing.assert_array_equal(rec.mask_HW, expected)
    np.testing.assert_allclose(rec.kpts_px_K2, [[1.25, 2.75], [7.0, 5.0]])
    assert rec.kpts_visible_K.tolist() == [True, True]
    assert rec.image_path.endswith("small.json#imageData")


def test_read_image_beside_json_with_windows_path_and_stem_fallback(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "sub" / "pic.png")
    rec = read_labelme(_write(tmp_path, _doc(imageData=None, imagePath="sub\\pic.png")), SMALL_MAP)
    np.testing.assert_array_equal(rec.image_HW3, rgb)
    # moved dataset: imagePath points nowhere, but an image with the JSON's stem lies beside it
    Image.fromarray(rgb).save(tmp_path / "moved.png")
    rec = read_labelme(_write(tmp_path, _doc(imageData=None, imagePath="../old/x.png"), "moved.json"), SMALL_MAP)
    np.testing.assert_array_equal(rec.image_HW3, rgb)


def test_hip_label_map_accepts_chinese_and_english_names():
    assert HIP_LABELS["classes"]["股骨头"] == HIP_LABELS["classes"]["femoral_head"] == 1
    assert HIP_LABELS["classes"]["Y型软骨"] == 7
    assert HIP_LABELS["points"]["回声失落点"] == HIP_LABELS["points"]["P6"] == 5
    assert HIP_LABELS["points"]["盂唇中心点"] == HIP_LABELS["points"]["labrum_centre"] == 3


def test_missing_point_and_structure_are_named(tmp_path):
    doc = _doc()
    doc["shapes"] = [s for s in doc["shapes"] if s["label"] != "B"]
    with pytest.raises(DataError, match=r"missing point: landmark 1 \(b\)") as err:
        read_labelme(_write(tmp_path, doc), SMALL_MAP)
    assert err.value.path.endswith("small.json")
    rec = read_labelme(_write(tmp_path, doc), SMALL_MAP, require_all=False)
    assert rec.kpts_visible_K.tolist() == [True, False]
    doc["shapes"] = [s for s in _doc()["shapes"] if s["label"] != "roof"]
    with pytest.raises(DataError, match=r"missing structure: class 3 \(roof\)"):
        validate_labelme(_write(tmp_path, doc), SMALL_MAP)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("shapes"), "missing key 'shapes'"),
    (lambda d: d.pop("imageHeight"), "missing key 'imageHeight'"),
    (lambda d: d["shapes"][4].update(points=[[1.0, 2.0], [3.0, 4.0]]), "point 'A' has 2 coordinate pairs"),
    (lambda d: d["shapes"][4].update(points=[[1.0, 2.0, 3.0]]), "points are not a list of finite"),
    (lambda d: d["shapes"][4].update(points=[[9.2, 2.0]]), "point 'A' at \\(9.20, 2.00\\) lies outside the 8x6"),
    (lambda d: d["shapes"].append(_shape("tumour", [[1, 1]], "point")), "unknown shape label 'tumour'"),
    (lambda d: d["shapes"].append(_shape("A", [[1, 1]], "point")), "landmark 'A' appears more than once"),
    (lambda d: d["shapes"][1].update(shape_type="linestrip"), "structure 'roof' has shape_type 'linestrip'"),
    (lambda d: d.update(imageHeight=7), "image is 8x6 but .* says imageWidth x imageHeight = 8x7"),
    (lambda d: d.update(imageData="%%%not base64"), "imageData is not valid base64"),
    (lambda d: d.update(imageData=None, imagePath="nowhere.png"), "image file not found: 'nowhere.png'"),
])
def test_bad_files_raise_data_error_naming_file_and_problem(tmp_path, mutate, message):
    doc = _doc()
    mutate(doc)
    path = _write(tmp_path, doc)
    for check in (read_labelme, validate_labelme):
        with pytest.raises(DataError, match=message) as err:
            check(path, SMALL_MAP)
        assert "small" in err.value.path


def test_unknown_labels_ignored_when_not_strict(tmp_path):
    doc = _doc()
    doc["shapes"].append(_shape("tumour", [[1, 1], [2, 1], [2, 2]], "polygon"))
    rec = read_labelme(_write(tmp_path, doc), SMALL_MAP, strict_labels=False)
    assert set(np.unique(rec.mask_HW)) == {0, 1, 3}


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"shapes": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
        validate_labelme(path, SMALL_MAP)
    with pytest.raises(DataError, match=r"nothere\.json: cannot read the file"):
        read_labelme(tmp_path / "nothere.json", SMALL_MAP)


def test_corrupt_and_truncated_png_are_reported_with_the_image_path(tmp_path):
    png = _png_bytes(_grey_image())
    (tmp_path / "small.png").write_bytes(png[: len(png) // 2])        # truncated: header readable, data not
    path = _write(tmp_path, _doc(imageData=None))
    with pytest.raises(DataError, match=r"small\.png: image does not decode") as err:
        validate_labelme(path, SMALL_MAP)                             # caught cheaply by verify()
    assert err.value.path.endswith("small.png") and "small.json" in err.value.problem
    with pytest.raises(DataError, match=r"small\.png: image does not decode"):
        read_labelme(path, SMALL_MAP)
    (tmp_path / "small.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"small\.png: image does not decode"):
        validate_labelme(path, SMALL_MAP)


def test_validate_returns_image_path_and_size(tmp_path):
    info = validate_labelme(_write(tmp_path, _doc()), SMALL_MAP)
    assert info.hw == IMG_HW and info.image_path.endswith("#imageData")


def test_rasterize_polygons_orders_by_class_id():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], dtype=float)
    mask = rasterize_polygons([(5, square), (2, square + 2.0)], (6, 6))
    assert mask[1, 1] == 5 and mask[3, 3] == 5 and mask[5, 5] == 2 and mask[0, 5] == 0
