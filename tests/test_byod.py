"""Bring your own data, end to end on the CPU: a user-written COCO file with K = 5 and one with K = 19, a points
table and a labelme folder with a new label set each train with `--config landmarks` and the data's location alone
(plus sizes that keep the test short), and give the report, the figures, `eval --data-root` and `predict` rows in
the original images' pixels. The model's K and channels come from the data and travel in the checkpoint."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.synthetic.ceph import CEPH_NAMES, generate_ceph_dataset
from engine.config import load_config
from launch.cli import main

FAST = ["data.input_hw=[64,64]", "data.num_workers=0", "data.num_folds=2", "train.max_steps=4", "train.batch_size=2",
        "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1", "model.args.head_channels=8",
        "log.tensorboard=false", "log.progress=false", "log.overlays=1", "optim.warmup_steps=0"]


def _train(root: Path, fmt: str, run: Path, *extra: str) -> None:
    assert main(["train", "--config", "landmarks", f"data.format={fmt}", f"data.root={root}", f"log.run_dir={run}",
                 *FAST, *extra]) == 0


@pytest.mark.parametrize("layout, k", [("coco", 5), ("coco", 19), ("table", 19), ("labelme", 7)])
def test_user_data_trains_reports_and_predicts(tmp_path, layout, k):
    root, run = tmp_path / "data", tmp_path / "run"
    generate_ceph_dataset(root, 10, seed=3, image_hw=(120, 100), num_landmarks=k, layout=layout)
    names = CEPH_NAMES[:k]
    _train(root, layout, run)
    saved = load_config(run / "config.yaml")
    assert saved.data.task == "landmarks" and saved.model.args["num_keypoints"] == k
    assert saved.model.args["in_channels"] == 1                      # grey images: one input channel
    ckpt = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["client"]["data"]["info"]["kpt_names"] == list(names)
    report = json.loads((run / "report.json").read_text())
    splits = json.loads((run / "splits.json").read_text())
    assert report["task"] == "landmarks" and report["figures"]["num_images"] == len(splits["test"])
    assert report["figures"]["num_landmarks_scored"] == k * len(splits["test"])
    for key in ("landmark_mre_px", "landmark_mre_mm", "sdr_2mm", "pck"):          # spacing known: mm figures
        assert isinstance(report[key], float), key
    assert [f"landmark_mre_px_{j + 1}" in report["figures"] for j in range(k)] == [True] * k
    figures = {p.name for p in (run / "figures").glob("*.png")}
    assert {"landmark_error_boxes.png", "sdr_curve.png", "error_heatmap.png"} <= figures
    assert any(n.startswith("overlay_worst") for n in figures) and any(n.startswith("overlay_best") for n in figures)
    # predict a whole folder: one row per image, <name>_x/_y/_conf, in the original image's pixels - the very
    # points the evaluation scored for the test images
    images = root / ("images" if layout != "labelme" else "")
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(images), "--out",
                 str(tmp_path / "pred"), "--overlays", "2"]) == 0
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = {Path(r["input"]).stem: r for r in csv.DictReader(fh)}
    assert len(rows) == 10 and len(list((tmp_path / "pred").glob("*_overlay.png"))) == 2
    assert {f"{n}_{c}" for n in names for c in ("x", "y", "conf")} <= set(next(iter(rows.values())))
    scored = [json.loads(line) for line in (run / "per_image.jsonl").read_text().splitlines()]
    for rec in scored:
        row = rows[Path(rec["id"]).name]
        got = np.array([[float(row[f"{n}_x"]), float(row[f"{n}_y"])] for n in names])
        np.testing.assert_allclose(got, np.asarray(rec["kpts_pred_px"]), atol=0.011)   # predict rounds to 0.01


def test_eval_scores_another_dataset_as_a_whole(tmp_path):
    root, other, run = tmp_path / "site_a", tmp_path / "site_b", tmp_path / "run"
    generate_ceph_dataset(root, 10, seed=3, image_hw=(120, 100), num_landmarks=5)
    generate_ceph_dataset(other, 7, seed=9, image_hw=(150, 120), num_landmarks=5, layout="table")
    _train(root, "coco", run)
    best = run / "checkpoints" / "best.pt"
    assert main(["eval", "--checkpoint", str(best), "--data-root", str(other), "data.format=table"]) == 0
    report = json.loads((run / "eval_site_b" / "report.json").read_text())
    assert report["figures"]["num_images"] == 7 and report["run"]["split"] == "all"
    # another dataset with a different number of landmarks is refused, naming both
    generate_ceph_dataset(tmp_path / "k3", 4, seed=1, image_hw=(120, 100), num_landmarks=3)
    assert main(["eval", "--checkpoint", str(best), "--data-root", str(tmp_path / "k3")]) == 2
