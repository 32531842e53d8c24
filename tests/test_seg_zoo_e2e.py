"""The segmentation zoo through the engine (issue 7): `medpose train --config seg_zoo` learns on synthetic HC18-layout
data, `eval` writes the metrics JSON and contour overlays, `predict` writes overlays; the STN switch trains; the same
commands run under DDP and DeepSpeed on 2 CPU ranks.
"""
import csv
import json

import pytest

from _dist_utils import torchrun
from launch.cli import main

COMMON = ["--config", "seg_zoo", "data.num_workers=0", "data.num_folds=4", "log.progress=false",
          "log.tensorboard=false", "log.overlays=2", "data.synth_image_hw=[135, 200]", "data.input_hw=[96, 128]",
          "train.batch_size=4", "optim.lr=2e-3", "optim.name=adam"]
SMALL = ["model.name=simple_unet", "model.args={num_classes: 2, base: 8}"]


@pytest.fixture(scope="module")
def hc18_root(tmp_path_factory):
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    root = tmp_path_factory.mktemp("hc18")
    generate_hc18_dataset(root, 40, seed=2, image_hw=(135, 200))
    return root


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_zoo_model_learns_then_eval_and_predict(tmp_path, hc18_root):
    run = tmp_path / "run"
    assert main(["train", *COMMON, *SMALL, f"data.root={hc18_root}", f"log.run_dir={run}", "train.max_steps=60",
                 "train.eval_every=30", "train.ckpt_every=30"]) == 0
    rep = _report(run)
    assert rep["task"] == "segmentation"
    # measured on this set: untrained (lr 0) foreground Dice 0.28 (with background 0.55); after 60 steps 0.9+
    assert rep["dice"] > 0.8, rep["dice"]
    assert rep["dice_with_bg"] > rep["dice"] - 0.2 and rep["miou"] > 0.6
    ckpt = run / "checkpoints" / "best.pt"
    ev = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(ckpt), "--split", "val", "--out", str(ev)]) == 0
    ev_rep = _report(ev)
    for key in ("dice", "miou", "dice_with_bg", "miou_with_bg", "hd95_mm"):
        assert ev_rep[key] is not None and 0 <= ev_rep[key] <= (1 if "hd95" not in key else 1e3), key
    pngs = {p.name for p in ev.rglob("*.png")}
    assert {"dice_per_class.png", "iou_per_class.png"} <= pngs
    # the task's contour overlays of the worst / median / best images by Dice (4), plus log.overlays (2) in overlays/
    picks = [p for p in ev.rglob("overlay_*.png") if p.parent.name != "overlays"]
    assert len(picks) == 4 and len(list(ev.rglob("overlays/*.png"))) == 2
    images = sorted((hc18_root / "images").glob("*.png"))[:2]
    pr = tmp_path / "pr"
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, images), "--out", str(pr)]) == 0
    with open(pr / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(int(r["head_area_px"]) > 100 for r in rows)
    assert len(list(pr.glob("*_overlay.png"))) == 2


def test_stn_front_end_and_deep_supervision_train(tmp_path, hc18_root):
    run = tmp_path / "run"
    assert main(["train", "--no-test", *COMMON, "model.name=unet_pp",
                 "model.args={num_classes: 2, base: 4, stn: true, deep_supervision: true}",
                 "model.criterion_args={num_classes: 2, loss: '0.5*ce + 0.5*dice'}", f"data.root={hc18_root}",
                 f"log.run_dir={run}", "train.max_steps=4", "train.eval_every=0"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["step"] == 4
    assert all(k in train[-1] for k in ("loss_ce", "loss_dice", "loss_aux"))


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_zoo_model_under_two_ranks(tmp_path, hc18_root, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    extra = ["dist.strategy=deepspeed", "dist.deepspeed.zero_stage=2"] if strategy == "deepspeed" else []
    torchrun(["-m", "launch.cli", "train", *COMMON, *SMALL, f"data.root={hc18_root}", f"log.run_dir={tmp_path}",
              "train.max_steps=2", "train.eval_every=2", "train.batch_size=2", *extra], nproc=2)
    rep = _report(tmp_path)
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert rep["run"]["world_size"] == 2 and rep["figures"]["num_images"] == len(splits["test"])


def _small_args() -> dict:
    """Each zoo model's small build, as its unit tests use it (SETR's ViT sized to this input)."""
    from test_seg_new_nets import SMALL as new_nets
    from test_seg_zoo_encoder import SMALL as encoder
    from test_seg_zoo_u2_light import SMALL as u2_light
    from test_seg_zoo_unet import SMALL as unet
    small = {**unet, **encoder, **u2_light, **new_nets}
    small["setr"] = {**small["setr"], "input_hw": [96, 128]}
    return small


def _zoo_names():
    from models.seg import SEG_SPECS
    return sorted(SEG_SPECS)


@pytest.mark.parametrize("name", _zoo_names())
def test_every_zoo_model_trains_a_step_and_predicts(name, tmp_path, hc18_root):
    small = _small_args()
    assert set(small) == set(_zoo_names())
    run = tmp_path / "run"
    assert main(["train", "--no-test", *COMMON, f"model.name={name}",
                 "model.args=" + json.dumps({"num_classes": 2, **small[name]}), f"data.root={hc18_root}",
                 f"log.run_dir={run}", "train.max_steps=1", "train.eval_every=0", "train.batch_size=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["loss"] > 0
    image = sorted((hc18_root / "images").glob("*.png"))[0]
    from engine.checkpoint import find_latest
    assert main(["predict", "--checkpoint", str(find_latest(run / "checkpoints")), str(image),
                 "--out", str(tmp_path / "pr")]) == 0
    with open(tmp_path / "pr" / "predictions.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert int(row["head_area_px"]) >= 0 and row["overlay"].endswith("_overlay.png")
