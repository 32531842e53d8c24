"""The landmark-table reader (data.format=table, data_pipelines/readers/table.py) and the generic image path it
shares with every reader: named and numbered columns, CSV and TSV, unlabelled cells, spacing / split / patient
columns, errors naming the table, row and column; grey, RGB and 16-bit images, large images pre-resized, landmarks
always returned in the original image's pixels."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.build import build_data, describe_data
from data_pipelines.dataset import LandmarkDataset, working_hw
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.table import READER
from data_pipelines.transforms import warp_points
from engine.config import DataConfig

STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)


def _image(path, h=40, w=50, mode="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
    elif mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    else:                                                        # 16-bit grey
        Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(path)
    return path


def _write(root, header, rows, name="points.csv", sep=","):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(sep.join(map(str, r)) for r in [header, *rows]) + "\n")
    return root / name


def _cfg(root, **kw):
    return DataConfig(**{"root": str(root), "format": "table", "task": "landmarks", "synthetic": False,
                         "input_hw": (32, 32), "num_workers": 0, "cache_decoded": False, **kw})


def _set(root, n=6, **kw):
    header = ["image", "tip_x", "tip_y", "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y", "patient_id"]
    rows = []
    for i in range(n):
        _image(root / "images" / f"im{i}.png", seed=i)
        rows.append([f"images/im{i}.png", 10 + i, 5.5, 20, 30, "", "", f"p{i // 2}"])
    return _write(root, header, rows, **kw)


def test_named_columns_give_names_flip_pairs_and_unlabelled_cells(tmp_path):
    _set(tmp_path)
    cfg = _cfg(tmp_path)
    info = describe_data(cfg)
    assert info.kpt_names == ("tip", "left_eye", "right_eye") and info.flip_pairs == ((1, 2),)
    assert info.channels == 1 and info.class_names is None
    result = READER.read(tmp_path, {**READER.defaults}, cfg, False)
    r = result.records[3]
    np.testing.assert_array_equal(r.kpts_px_K2, [[13, 5.5], [20, 30], [0, 0]])
    assert r.kpts_visible_K.tolist() == [True, True, False] and r.patient_id == "p1" and r.id == "images/im3"
    assert r.spacing_mm is None and r.entry == "row 5"


def test_numbered_columns_tsv_spacing_and_split_columns(tmp_path):
    header = ["image", "x1", "y1", "x2", "y2", "spacing_mm", "split"]
    rows = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        _image(tmp_path / "images" / f"a{i}.png", seed=i)
        rows.append([f"images/a{i}.png", 1, 2, 3.25, 4, 0.1 * (i + 1), split])
    _write(tmp_path, header, rows, name="pts.tsv", sep="\t")
    data = build_data(_cfg(tmp_path), tmp_path / "run", STRATEGY, seed=0)
    assert data["kpt_names"] == ["L1", "L2"] and data["splits"]["source"].startswith("'split' column")
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (2, 1, 1)
    np.testing.assert_allclose(data["val"].original(0)["spacing_mm_2"], [0.3, 0.3])
    # mm per input pixel: the 50-px-wide image letterboxed into 32 px
    np.testing.assert_allclose(data["val"][0]["spacing_mm_2"].numpy(), [0.3 * 50 / 32] * 2, rtol=1e-6)


@pytest.mark.parametrize("rows, problem", [
    ([["images/im0.png", 10, ""]], r"row 2: landmark 'tip' has only one of its two coordinates"),
    ([["images/im0.png", "ten", 3]], r"row 2, column 'tip_x': 'ten' is not a number"),
    ([["images/im0.png", 60, 3]], r"row 2: landmark 'tip' at \(60, 3\) lies outside the 50x40 image"),
    ([["images/nope.png", 1, 3]], r"nope\.png.*image file not found"),
    ([["", 1, 3]], r"row 2: the 'image' cell is empty"),
])
def test_bad_rows_name_the_table_row_and_column(tmp_path, rows, problem):
    _image(tmp_path / "images" / "im0.png")
    path = _write(tmp_path, ["image", "tip_x", "tip_y"], rows)
    with pytest.raises(DataError, match=problem) as err:
        READER.read(tmp_path, {**READER.defaults}, _cfg(tmp_path), False)
    assert "points.csv" in str(err.value)


def test_bad_headers_and_options(tmp_path):
    _image(tmp_path / "images" / "im0.png")
    _write(tmp_path, ["file", "tip_x", "tip_y"], [["images/im0.png", 1, 1]])
    with pytest.raises(DataError, match="no 'image' column"):
        describe_data(_cfg(tmp_path))
    _write(tmp_path, ["image", "tip_x"], [["images/im0.png", 1]])
    with pytest.raises(DataError, match="'tip_x' has no 'tip_y' column"):
        describe_data(_cfg(tmp_path))
    _write(tmp_path, ["image", "x1", "y1", "x3", "y3"], [["images/im0.png", 1, 1, 1, 1]])
    with pytest.raises(DataError, match="x1, y1, ..., xK, yK with no gap"):
        describe_data(_cfg(tmp_path))
    with pytest.raises(OptionError, match="unknown option 'sheet'"):
        describe_data(_cfg(tmp_path, reader_args={"sheet": 1}))
    (tmp_path / "other.csv").write_text("image\n")
    with pytest.raises(DataError, match="2 tables here .*reader_args.table"):
        describe_data(_cfg(tmp_path))


def test_skip_bad_counts_rows_and_keeps_the_rest(tmp_path):
    _set(tmp_path, n=5)
    text = (tmp_path / "points.csv").read_text().splitlines()
    text[2] = text[2].replace("11,", "999,")                     # row 3: tip outside the 50-px image
    (tmp_path / "points.csv").write_text("\n".join(text) + "\n")
    result = READER.read(tmp_path, {**READER.defaults}, _cfg(tmp_path), True)
    assert len(result.records) == 4 and len(result.skipped) == 1 and "row 3" in result.skipped[0][1]


def test_rgb_and_16bit_images_and_channels(tmp_path):
    rgb, grey16 = tmp_path / "rgb", tmp_path / "g16"
    for root, mode in ((rgb, "RGB"), (grey16, "I;16")):
        rows = [[f"images/x{i}.png", 3, 4] for i in range(6)]
        for i in range(6):
            _image(root / "images" / f"x{i}.png", mode=mode, seed=i)
        _write(root, ["image", "a_x", "a_y"], rows)
    assert describe_data(_cfg(rgb)).channels == 3 and describe_data(_cfg(grey16)).channels == 1
    data = build_data(_cfg(grey16, num_folds=2), grey16 / "run", STRATEGY, seed=0)
    s = data["test"][0]
    assert s["image_CHW"].shape == (1, 32, 32)
    raw = np.asarray(Image.open(data["test"].records[0].image.path), dtype=np.float64)
    orig = data["test"].original(0)["image_HW3"]
    np.testing.assert_array_equal(orig[..., 0], np.clip(np.rint(raw * 255 / 65535), 0, 255).astype(np.uint8))
    assert build_data(_cfg(rgb, num_folds=2), rgb / "run", STRATEGY, seed=0)["test"][0]["image_CHW"].shape == \
        (3, 32, 32)
    with pytest.raises(OptionError, match="too few for 8 folds; lower data.num_folds"):
        build_data(_cfg(rgb, num_folds=8), rgb / "run2", STRATEGY, seed=0)


def test_large_image_is_preresized_once_and_points_stay_in_original_pixels(tmp_path):
    """A 2500 x 2500 16-bit image: the working copy is ~1.25x the input scale, the sample is letterboxed and the
    landmarks map from original pixels through the sample's matrix exactly."""
    (tmp_path / "images").mkdir()
    big = np.zeros((2500, 2500), np.uint16)
    big[1200:1300, 600:700] = 60000                            # a bright square, its centre at (649.5, 1249.5)
    Image.fromarray(big).save(tmp_path / "images" / "big.png")
    _write(tmp_path, ["image", "c_x", "c_y"], [["images/big.png", 649.5, 1249.5]] * 1)
    cfg = _cfg(tmp_path, input_hw=(64, 64), preresize=True, cache_decoded=True)
    from data_pipelines.build import reader_for
    reader, opts = reader_for(cfg)
    result = reader.read(tmp_path, opts, cfg, False)
    ds = LandmarkDataset(result.records, result.info, reader.preprocess(opts, cfg, result.info), None,
                         cache_decoded=True)
    image, _, p = ds.working(0)
    assert image.shape == (1, *working_hw((2500, 2500), ds.pre)) == (1, 80, 80)
    s = ds[0]
    m = np.array(s["meta"]["to_input_3x3"])
    np.testing.assert_allclose(s["kpts_px_K2"].numpy(), warp_points([[649.5, 1249.5]], m), atol=1e-4)
    np.testing.assert_allclose(warp_points(s["kpts_px_K2"].numpy(), np.linalg.inv(m)), [[649.5, 1249.5]], atol=1e-3)
    # the bright square lands where the point says (area-downscaled, then warped)
    x, y = s["kpts_px_K2"][0].round().long().tolist()
    assert s["image_CHW"][0, y, x] > 0.8 and s["image_CHW"][0, 5, 5] < 0.01
    assert ds.original(0)["image_HW3"].shape == (2500, 2500, 3)
