"""`medpose data inspect` (data_pipelines/inspect.py) and predict's input expansion (folders, globs, annotation files
beside their images): what a newcomer runs before training, and what predict reads."""
import json
import shutil

import numpy as np
import pytest

from data_pipelines.errors import DataError
from data_pipelines.inspect import detect_format, format_report
from data_pipelines.predict_input import expand_inputs
from data_pipelines.synthetic.ceph import generate_ceph_dataset
from data_pipelines.synthetic.hip import generate_hip_dataset
from launch.cli import main


@pytest.fixture()
def table(tmp_path):
    root = tmp_path / "t"
    generate_ceph_dataset(root, 6, seed=1, image_hw=(120, 100), num_landmarks=4, layout="table")
    lines = (root / "points.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = "500.0"                                     # row 4: the first landmark far outside its 100-px image
    lines[3] = ",".join(cells)
    (root / "points.csv").write_text("\n".join(lines) + "\n")
    first = root / lines[1].split(",")[0]                   # an identical copy of image 1 under another name
    shutil.copy(first, root / "images" / "copy.png")
    lines.append(",".join(["images/copy.png"] + lines[1].split(",")[1:]))
    (root / "points.csv").write_text("\n".join(lines) + "\n")
    return root


def test_inspect_counts_problems_duplicates_and_draws_a_sheet(table, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["data", "inspect", str(table), "--out", str(out), "--sheet", "4"]) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["format"] == "table" and report["samples"] == 6             # 6 rows + the copy - the bad row
    assert report["problems"]["count"] == 1 and report["problems"]["by_kind"] == {"point outside the image": 1}
    assert "row 4" in report["problems"]["first"][0][1]
    assert len(report["duplicates"]["identical_images"]) == 1
    assert report["landmarks"]["names"][:2] == ["sella", "nasion"] and report["landmarks"]["labelled_per_image"] == [4, 4]
    assert report["image_size"]["height"] == [120, 120, 120] and report["spacing_mm"]["unknown"] == 0
    np.testing.assert_allclose(report["spacing_mm"]["distinct"][0][:2], [1.0, 1.0])      # 0.1 mm x 1000 / 100 px
    assert (out / "sheet.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "problems: 1 {'point outside the image': 1}" in text and "1 identical image files" in text


def test_formats_are_detected(tmp_path, table):
    coco, hip = tmp_path / "c", tmp_path / "h"
    generate_ceph_dataset(coco, 2, seed=1, image_hw=(60, 50), num_landmarks=2)
    generate_hip_dataset(hip, 2, seed=1, image_hw=(60, 80))
    assert [detect_format(p) for p in (coco, table, hip)] == ["coco", "table", "labelme"]
    with pytest.raises(DataError, match="no dataset layout recognised"):
        detect_format(tmp_path / "empty")
    report = {"root": "r", "format": "coco", "samples": 2, "patients": 2, "splits_given": None,
              "landmarks": {"names": ["a"], "labelled_per_landmark": [2], "labelled_per_image": [1, 1]},
              "flip_pairs": [], "mask_classes": None, "channels": 1, "image_size": None,
              "spacing_mm": {"known": 0, "unknown": 2, "distinct": []}, "problems": {"count": 0},
              "duplicates": {"ids": [], "identical_images": []}}
    assert "(errors will be in px)" in format_report(report)


def test_predict_inputs_expand_folders_globs_and_prefer_annotations(tmp_path):
    hip = tmp_path / "h"
    files = generate_hip_dataset(hip, 3, seed=1, image_hw=(60, 80))
    assert expand_inputs([hip], (".json",)) == sorted(files)         # the images come through their JSON files
    pngs = expand_inputs([str(hip / "*.png")])
    assert [p.suffix for p in pngs] == [".png"] * 3
    assert expand_inputs([hip / "1_1.png", str(hip / "*.png")])[0] == hip / "1_1.png"   # each once, in order
    with pytest.raises(DataError, match="no input files here"):
        expand_inputs([str(tmp_path / "nothing*.png")])
