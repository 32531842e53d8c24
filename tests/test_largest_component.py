"""Keeping only the largest predicted region of a class (engine/tasks/postprocess.py): the region rule, the option's
parsing and errors, the original-frame mask that evaluation and `medpose predict` score, and the planner's rule from
the masks' fingerprint (launch/plan.py, data_pipelines/fingerprint.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.fingerprint import fingerprint_dataset
from data_pipelines.synthetic.hc18 import generate_hc18_dataset
from engine.config import ConfigError, load_config
from engine.evaluate import sample_prediction
from engine.tasks import build_task
from engine.tasks.postprocess import keep_largest_region, parse_largest_component, resolve_classes
from launch import plan as P


def _two_class_mask():
    m = np.zeros((20, 20), np.int64)
    m[2:8, 2:8] = 1                        # class 1: 36 px
    m[8, 8] = 1                            # touches (7, 7) diagonally: the same 8-connected region
    m[15:17, 15:17] = 1                    # class 1 island: 4 px
    m[12:14, 2:4] = 2                      # class 2: two regions of 4 and 1 px
    m[18, 10] = 2
    return m


def test_each_listed_class_keeps_its_largest_8_connected_region():
    m = _two_class_mask()
    out = keep_largest_region(m, [1])
    assert (out == 1).sum() == 37 and out[8, 8] == 1                  # the diagonal pixel belongs to the region
    assert out[15:17, 15:17].sum() == 0                                # the island became background
    np.testing.assert_array_equal(out == 2, m == 2)                    # class 2 was not listed
    both = keep_largest_region(m, [1, 2])
    assert (both == 2).sum() == 4 and both[18, 10] == 0
    assert (m == 1).sum() == 41                                        # the input is not modified
    np.testing.assert_array_equal(keep_largest_region(m, []), m)


def test_the_option_parses_and_names_unknown_classes():
    assert parse_largest_component(False) is None and parse_largest_component("none") is None
    assert parse_largest_component(True) == "all" and parse_largest_component("all") == "all"
    assert parse_largest_component("head") == ("head",) and parse_largest_component([1, "liver"]) == (1, "liver")
    names = ["background", "liver", "kidney"]
    assert resolve_classes("all", names, 3) == [1, 2]
    assert resolve_classes(("kidney", 1), names, 3) == [1, 2]
    with pytest.raises(ConfigError, match=r"largest_component: no class named 'spleen' \(classes: background, "
                                          r"liver, kidney\)"):
        resolve_classes(("spleen",), names, 3)
    with pytest.raises(ConfigError, match="not a foreground class"):
        resolve_classes((0,), names, 3)
    with pytest.raises(ConfigError, match="largest_component: expected"):
        parse_largest_component([1.5])
    with pytest.raises(ConfigError, match="no class named 'brain'"):
        build_task("fetal_head", {"largest_component": "brain"})       # at build time: before any step is run

    class _Train:
        class_names = names
    task = build_task("segmentation", {"largest_component": ["spleen"]})
    with pytest.raises(ConfigError, match="no class named 'spleen'"):
        task.fit(_Train())                                              # with the data's class names: before training


def _logits_with_an_island(h=32, w=48):
    logits = torch.zeros(1, 2, h, w)
    logits[0, 0] = 1.0
    logits[0, 1, 6:22, 8:30] = 3.0                                     # the object: 16 x 22
    logits[0, 1, 26:30, 40:45] = 3.0                                   # a stray island
    return logits


@pytest.mark.parametrize("task_name", ["segmentation", "fetal_head"])
def test_the_original_frame_mask_keeps_only_the_largest_region(task_name):
    logits = _logits_with_an_island()
    scale = np.diag([0.5, 0.5, 1.0])                                   # original frame twice the input
    preds = {}
    for opt in (False, True):
        task = build_task(task_name, {"largest_component": opt})
        task.class_names = ["background", "head"]
        out = task.decoder(load_config(None, [f"data.task={task_name}"]))({"seg_logits_BCHW": logits})
        preds[opt] = (out, sample_prediction({"seg_logits_BCHW": logits}, out, 0, scale, (64, 96)))
    raw, kept = preds[False][1]["mask_HW"], preds[True][1]["mask_HW"]
    assert raw[52:60, 80:90].sum() > 0 and kept[52:60, 80:90].sum() == 0            # the island is gone...
    np.testing.assert_array_equal(kept[:48], raw[:48])                               # ...the object is untouched
    assert preds[True][0]["mask_BHW"][0, 26:30, 40:45].sum() == 0                    # input frame too
    assert preds[True][0]["mask_BHW"][0].sum() == 16 * 22
    # HC and the axis landmarks come from the largest region either way: identical
    np.testing.assert_allclose(preds[True][1]["kpts_px_K2"], preds[False][1]["kpts_px_K2"])


def _add_island(mask_png):
    m = np.array(Image.open(mask_png))
    m[:4, :4] = m.max()                                                # a second region in the corner
    Image.fromarray(m).save(mask_png)


def test_the_planner_keeps_the_largest_region_of_one_region_classes(tmp_path):
    root = tmp_path / "hc"
    generate_hc18_dataset(root, 12, seed=2, image_hw=(135, 200))
    masks = sorted((root / "masks").glob("*.png"))
    r = P.make_plan(root, "segmentation", out=tmp_path / "a.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    assert r["report"]["masks"]["classes"]["head"]["single_region_share"] == 1.0
    assert r["config"].eval.task_args["largest_component"] is True
    assert "largest_component: true  # one 8-connected region" in (tmp_path / "a.yaml").read_text()
    _add_island(masks[3])
    cfg = load_config(None, [f"data.root={root}", "data.synthetic=false", "data.format=hc18",
                             "data.task=segmentation"])
    share = fingerprint_dataset(cfg.data, progress=False).report["masks"]["classes"]["head"]["single_region_share"]
    assert share == round(11 / 12, 4)
    r = P.make_plan(root, "fetal_head", out=tmp_path / "b.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    rule = next(p for p in r["planned"] if p.key == "eval.task_args.largest_component")
    assert rule.value is False and "head 92 %" in rule.reason                   # 11 of 12 < 98 %: off
    r = P.make_plan(root, "fetal_head", out=tmp_path / "c.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2", "eval.task_args.largest_component=true"])
    assert r["config"].eval.task_args["largest_component"] is True              # given: never re-planned
    assert "eval.task_args.largest_component" not in {p.key for p in r["planned"]}


def test_hip_structures_keep_their_largest_region_and_the_names_travel_in_the_task_state():
    logits = torch.zeros(1, 8, 40, 40)
    logits[0, 0] = 1.0
    logits[0, 3, 5:15, 5:15] = 3.0                                     # labrum: 100 px ...
    logits[0, 3, 30:33, 30:33] = 3.0                                   # ... and a 9-px island
    logits[0, 1, 20:26, 2:8] = 3.0                                     # femoral head: two regions, not listed
    logits[0, 1, 35:37, 20:22] = 3.0
    outputs = {"seg_logits_BCHW": logits, "kpts_px_BK2": torch.full((1, 6, 2), 10.0)}

    class _Train:
        class_names = ["background", "femoral_head", "greater_trochanter", "labrum", "cartilage_roof",
                       "synovial_fold", "perichondrium", "y_cartilage"]
    task = build_task("hip_us", {"largest_component": ["labrum"]})
    task.fit(_Train())
    fresh = build_task("hip_us", {"largest_component": ["labrum"]})
    fresh.load_state_dict(task.state_dict())
    cfg = load_config(None, ["data.task=hip_us"])
    out = fresh.decoder(cfg)(outputs)
    mask = out["mask_BHW"][0].numpy()
    assert (mask == 3).sum() == 100 and out["keep_largest_classes"] == [3]
    assert (mask == 1).sum() == 36 + 4                                 # not listed: both regions stay
    off = build_task("hip_us").decoder(cfg)(outputs)["mask_BHW"][0].numpy()
    assert (off == 3).sum() == 109
    with pytest.raises(ConfigError, match="no class named 'acetabulum'"):
        build_task("hip_us", {"largest_component": "acetabulum"}).fit(_Train())
