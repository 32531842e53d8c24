"""labelme folders with any label set (data_pipelines/readers/labelme_reader.py): labels discovered from the files
(points in first-appearance order, polygons as mask classes, other shapes ignored and reported), the published hip
set recognised, an explicit list enforced, spacing from dataset.json."""
import json
import types

import numpy as np
import pytest
from PIL import Image

from data_pipelines.build import build_data, describe_data
from data_pipelines.errors import DataError, OptionError
from data_pipelines.readers.labelme_reader import HIP_SET, discover_labels, find_labelme_files, resolve_labels
from data_pipelines.synthetic.hip import generate_hip_dataset
from engine.config import DataConfig

STRATEGY = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1), barrier=lambda: None)


def _shape(label, pts, kind="point"):
    return {"label": label, "points": pts, "group_id": None, "description": "", "shape_type": kind, "flags": {}}


def _file(root, stem, shapes, h=30, w=40):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), 90, np.uint8)).save(root / f"{stem}.png")
    doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.png", "imageData": None,
           "imageHeight": h, "imageWidth": w}
    (root / f"{stem}.json").write_text(json.dumps(doc))


def _folder(root, n=6):
    for i in range(n):
        shapes = [_shape("Nose", [[10.0 + i, 5.0]]), _shape("Chin", [[12.0, 25.0]]),
                  _shape("bone", [[2, 2], [20, 2], [20, 20], [2, 20]], "polygon"),
                  _shape("roi", [[0, 0], [5, 5]], "rectangle")]
        if i != 2:                                      # one file lacks the third landmark
            shapes.insert(1, _shape("Ear", [[30.0, 12.5]]))
        _file(root, f"s{i}", shapes)
    (root / "dataset.json").write_text(json.dumps({"spacing_mm": [0.25, 0.25]}))
    return root


def _cfg(root, **kw):
    return DataConfig(**{"root": str(root), "format": "labelme", "task": "landmarks", "synthetic": False,
                         "input_hw": (32, 32), "num_workers": 0, "cache_decoded": False, "num_folds": 2, **kw})


def test_labels_are_discovered_in_first_appearance_order_and_reported(tmp_path):
    root = _folder(tmp_path / "d")
    report = discover_labels(find_labelme_files(root))
    assert list(report.points) == ["Nose", "Ear", "Chin"] and report.points["Ear"] == 5
    assert list(report.polygons) == ["bone"] and report.ignored == {"roi (rectangle)": 6}
    assert any("3 point labels: Nose (6), Ear (5), Chin (6)" in line for line in report.lines())
    info = describe_data(_cfg(root))
    assert info.kpt_names == ("Nose", "Ear", "Chin") and info.class_names == ("background", "bone")
    assert info.channels == 1 and info.flip_pairs == ()


def test_a_missing_landmark_is_unlabelled_and_masks_and_spacing_are_read(tmp_path):
    root = _folder(tmp_path / "d")
    data = build_data(_cfg(root), tmp_path / "run", STRATEGY, seed=0)
    everything = [ds.original(i) for name in ("train", "val", "test") for ds in [data[name]] for i in range(len(ds))]
    by_id = {o["id"]: o for o in everything}
    assert by_id["s2"]["kpts_visible_K"].tolist() == [True, False, True]
    assert by_id["s0"]["kpts_visible_K"].tolist() == [True, True, True]
    np.testing.assert_array_equal(by_id["s3"]["kpts_px_K2"], [[13, 5], [30, 12.5], [12, 25]])
    assert by_id["s0"]["mask_HW"].sum() == 18 * 18 and by_id["s0"]["mask_HW"].max() == 1   # centres 2..19: half-open edges
    np.testing.assert_allclose(by_id["s1"]["spacing_mm_2"], [0.25, 0.25])
    assert data["num_classes"] == 2 and data["channels"] == 1


def test_explicit_labels_reject_unknown_ones_and_require_all_when_asked(tmp_path):
    root = _folder(tmp_path / "d")
    cfg = _cfg(root, reader_args={"labels": {"points": ["Chin", "Nose"], "ignore": ["roi"]}})
    with pytest.raises(DataError, match="unknown shape label 'Ear'"):
        build_data(cfg, tmp_path / "run", STRATEGY, seed=0)
    cfg = _cfg(root, reader_args={"labels": {"points": ["Chin", "Nose", "Ear"], "classes": ["bone"],
                                             "ignore": ["roi"]}, "require_all": True})
    with pytest.raises(DataError, match=r"s2\.json: missing point: landmark 2 \(ear\)"):
        build_data(cfg, tmp_path / "run", STRATEGY, seed=0)
    info = describe_data(_cfg(root, reader_args={"labels": {"points": ["Chin", "Nose", "Ear"], "ignore": ["roi"]}}))
    assert info.kpt_names == ("Chin", "Nose", "Ear") and info.class_names is None
    with pytest.raises(OptionError, match="labels"):
        describe_data(_cfg(root, reader_args={"labels": "all"}))


def test_the_published_hip_set_is_recognised_in_either_language(tmp_path):
    for english in (False, True):
        files = generate_hip_dataset(tmp_path / str(english), 3, seed=1, image_hw=(60, 80), english_labels=english)
        labels, report = resolve_labels({"labels": "auto", "require_all": None}, files)
        assert labels is HIP_SET and len(report.points) == 6
    info = describe_data(_cfg(tmp_path / "True"))
    assert info.kpt_names == ("P1", "P2", "P3", "P4", "P5", "P6") and len(info.class_names) == 8
    assert info.channels == 3                        # the published input: grey replicated to RGB


def test_a_folder_without_point_shapes_is_an_error_that_lists_what_was_found(tmp_path):
    _file(tmp_path / "d", "a", [_shape("bone", [[2, 2], [20, 2], [20, 20]], "polygon")])
    with pytest.raises(DataError, match="no point shapes .*1 polygon labels: bone"):
        describe_data(_cfg(tmp_path / "d"))
