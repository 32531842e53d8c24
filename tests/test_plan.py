"""`medpose plan` (launch/plan.py, data_pipelines/fingerprint.py): the fingerprint of the project's own synthetic sets
against figures computed here from the generated annotation files, the planning rules, and plans that load with the
engine's config loader and train two steps. Small sets; the timed probe runs once, on a tiny model."""
import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.fingerprint import fingerprint_dataset
from data_pipelines.synthetic.ceph import generate_ceph_dataset
from data_pipelines.synthetic.hc18 import generate_hc18_dataset
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.synthetic.spine import generate_spine_dataset
from data_pipelines.synthetic.xray import generate_xray_dataset
from engine.config import ConfigError, load_config
from launch import plan as P
from launch.cli import main

TRAIN_FAST = ["train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1",
              "data.num_workers=0", "log.tensorboard=false", "log.progress=false", "log.overlays=0",
              "optim.warmup_steps=0", "--no-test"]


# ------------------------------------------------------------------ independent figures from the generated files
def _nn(points_by_image, spacing=None):
    """Pooled nearest-neighbour distances (px, and mm with per-image (sx, sy))."""
    px, mm = [], []
    for i, pts in enumerate(points_by_image):
        pts = np.asarray(pts, dtype=float)
        for a in range(len(pts)):
            d = [(pts[b] - pts[a]) for b in range(len(pts)) if b != a]
            px.append(min(math.hypot(*v) for v in d))
            if spacing is not None:
                sx, sy = spacing[i]
                mm.append(min(math.hypot(v[0] * sx, v[1] * sy) for v in d))
    return np.array(px), np.array(mm)


def _hip(root):
    generate_hip_dataset(root, 12, seed=2, image_hw=(120, 160))
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*.json")) if p.name != "dataset.json"]
    pts = [[s["points"][0] for s in d["shapes"] if s["shape_type"] == "point"] for d in docs]
    hw = [(d["imageHeight"], d["imageWidth"]) for d in docs]
    sp = json.loads((root / "dataset.json").read_text())["spacing_mm"]
    return "hip_us", "labelme", pts, hw, [sp] * len(docs)


def _xray(root):
    generate_xray_dataset(root, 10, seed=2, image_hw=(192, 160))
    files = sorted((root / "annotations").glob("*.csv"))
    pts = [[tuple(float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", cell)) for cell in next(csv.reader(f.open()))]
           for f in files]
    hw = [Image.open(root / "images" / f"{f.stem}.png").size[::-1] for f in files]
    sp = json.loads((root / "dataset.json").read_text())["spacing_mm"]
    return "hip_xray", "xray_csv", pts, hw, [sp] * len(files)


def _ceph(root):
    generate_ceph_dataset(root, 8, seed=2, image_hw=(240, 200), num_landmarks=19, layout="coco")
    coco = json.loads((root / "annotations.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    anns = sorted(coco["annotations"], key=lambda a: a["image_id"])
    pts = [[a["keypoints"][3 * k:3 * k + 2] for k in range(19) if a["keypoints"][3 * k + 2] > 0] for a in anns]
    hw = [(images[a["image_id"]]["height"], images[a["image_id"]]["width"]) for a in anns]
    sp = json.loads((root / "dataset.json").read_text())["spacing_mm"]
    sp = [sp, sp] if isinstance(sp, (int, float)) else sp
    return "landmarks", "coco", pts, hw, [sp] * len(anns)


def _hc18(root):
    generate_hc18_dataset(root, 10, seed=2, image_hw=(135, 200))
    rows = list(csv.DictReader((root / "annotations.csv").open()))
    pts = [[(float(r[f"{n}_x"]), float(r[f"{n}_y"])) for n in ("ofd1", "ofd2", "bpd1", "bpd2")] for r in rows]
    hw = [(int(r["height"]), int(r["width"])) for r in rows]
    sp = [(float(r["pixel_size_mm"]),) * 2 for r in rows]
    return "fetal_head", "hc18", pts, hw, sp


def _spine(root):
    generate_spine_dataset(root, 5, seed=2)
    meta = json.loads(next(root.glob("*.json")).read_text())
    _lr, si, ap = meta["spacing_mm"]
    pts, hw = [], []
    for lab in sorted(root.glob("*/*_labels-disc.nii.gz")):
        img = nib.as_closest_canonical(nib.load(str(lab)))             # RAS: (L-R, A-P, S-I)
        data = np.asarray(img.dataobj)
        vox = [np.argwhere(data == v)[0] for v in range(1, 12) if (data == v).any()]
        pts.append([(float(v[1]), float(v[2])) for v in vox])          # in-plane (A-P, S-I) voxel steps
        hw.append((data.shape[2], data.shape[1]))                      # rows S-I, columns A-P
    return "spine_disc", "nifti", pts, hw, [(ap, si)] * len(pts)


@pytest.mark.parametrize("make", [_hip, _xray, _ceph, _hc18, _spine], ids=lambda f: f.__name__[1:])
def test_fingerprint_equals_figures_from_the_generated_annotations(tmp_path, make):
    root = tmp_path / "data"
    task, fmt, pts, hw, sp = make(root)
    cfg = load_config(None, [f"data.root={root}", "data.synthetic=false", f"data.format={fmt}", f"data.task={task}"])
    rep = fingerprint_dataset(cfg.data, progress=False).report
    assert rep["samples"] == len(pts)
    hw = np.array(hw, dtype=float)
    np.testing.assert_allclose(rep["image_size"]["median_hw"], np.median(hw, axis=0))
    np.testing.assert_allclose(rep["image_size"]["median_aspect_hw"], np.median(hw[:, 0] / hw[:, 1]), atol=1e-4)
    np.testing.assert_allclose(rep["spacing_mm"]["median_xy"], np.median(np.array(sp, dtype=float), axis=0),
                               rtol=1e-5)
    px, mm = _nn(pts, sp)
    lm = rep["landmarks"]
    np.testing.assert_allclose(lm["nn_distance_px"]["median"], np.median(px), atol=2e-3)
    np.testing.assert_allclose(lm["nn_distance_px"]["min"], px.min(), atol=2e-3)
    np.testing.assert_allclose(lm["nn_distance_mm"]["median"], np.median(mm), rtol=1e-3)
    assert sum(e["labelled"] for e in lm["per_landmark"]) == sum(len(p) for p in pts)


def test_mask_fingerprint_class_balance(tmp_path):
    root = tmp_path / "hc"
    generate_hc18_dataset(root, 6, seed=4, image_hw=(135, 200))
    cfg = load_config(None, [f"data.root={root}", "data.synthetic=false", "data.format=hc18",
                             "data.task=segmentation"])
    rep = fingerprint_dataset(cfg.data, progress=False).report
    fracs = [(np.array(Image.open(p)) > 0).mean() for p in sorted((root / "masks").glob("*.png"))]
    areas = [(np.array(Image.open(p)) > 0).sum() for p in sorted((root / "masks").glob("*.png"))]
    head = rep["masks"]["classes"]["head"]
    np.testing.assert_allclose(head["fraction_mean"], np.mean(fracs), atol=1e-5)
    np.testing.assert_allclose(head["median_area_px"], np.median(areas), atol=0.51)
    np.testing.assert_allclose(head["median_diameter_px"], np.median(2 * np.sqrt(np.array(areas) / np.pi)), atol=0.01)
    assert rep["masks"]["classes"]["head"]["images_with"] == 6


# ------------------------------------------------------------------------------------------------- the rules
def test_input_size_rule():
    assert P.plan_input_hw((240, 320), 0.75, 36_000, 32) == (160, 224)
    assert P.plan_input_hw((540, 800), 0.675, 224_000, 32) == (384, 576)
    assert P.plan_input_hw((208, 112), 208 / 112, 36_000, 32) == (192, 96)      # capped: never upsampled
    assert P.plan_input_hw((20, 20), 1.0, 36_000, 32) == (32, 32)               # tiny images: one stride
    for med, aspect, budget, stride in [((600, 500), 1.2, 36_000, 32), ((1200, 1000), 1.2, 82_000, 64),
                                        ((300, 900), 1 / 3, 50_000, 32)]:
        h, w = P.plan_input_hw(med, aspect, budget, stride)
        assert h % stride == 0 and w % stride == 0 and h <= med[0] and w <= med[1]
        assert abs(w - h / aspect) <= stride and h * w <= budget * P.BUDGET_SLACK


def _check_plan(result, stride=32):
    rep = result["report"]
    cfg = result["config"]
    h, w = cfg.data.input_hw
    med = rep["image_size"]["median_hw"]
    aspect = rep["image_size"]["median_aspect_hw"]
    assert h % stride == 0 and w % stride == 0 and h <= max(med[0], stride) and w <= max(med[1], stride)
    assert abs(w - h / aspect) <= stride                                       # the aspect, within one stride
    return cfg


def test_heatmap_plan_follows_the_rules_loads_and_trains(tmp_path, capsys):
    root = tmp_path / "hip"
    task, fmt, pts, hw, sp = _hip(root)
    out = tmp_path / "plan" / "plan.yaml"
    assert main(["plan", str(root), "--task", "hip_us", "--no-probe", "--out", str(out), "--budget-min", "10",
                 "model.args.width=8", "data.num_folds=2"]) == 0
    text = capsys.readouterr().out
    assert "data.sigma_px" in text and "train.max_steps" in text and "fingerprint" in text
    fp = json.loads((tmp_path / "plan" / "fingerprint.json").read_text())
    cfg = load_config(out)
    h, w = cfg.data.input_hw
    assert (h % 32, w % 32) == (0, 0) and (h, w) == (96, 160)       # 120 x 160 images, aspect 0.75, capped
    assert abs(w - h / fp["image_size"]["median_aspect_hw"]) <= 32
    # sigma: 0.15 x the median nearest-neighbour distance in input px (letterbox scale), clamped to [1.5, 4]
    scale = min(h / 120, w / 160)
    px, _ = _nn(pts)
    assert cfg.data.sigma_px == pytest.approx(min(max(0.15 * np.median(px) * scale, 1.5), 4.0), abs=0.006)
    assert cfg.model.args["width"] == 8                              # given on the command line: kept
    assert cfg.data.flip_p == 0.0                                    # the hip landmarks have no left/right pairs
    assert cfg.model.criterion_args["class_weights"] == [1.0] * 8
    assert cfg.data.task == "hip_us" and cfg.data.format == "labelme" and cfg.data.synthetic is False
    assert Path(cfg.data.root) == root.resolve()
    lo, hi = cfg.data.scale_range
    assert 0.75 <= lo <= 0.95 and 1.05 <= hi <= 1.33 and 5 <= cfg.data.rotation_deg <= 30
    every, steps = cfg.train.eval_every, cfg.train.max_steps
    assert every == cfg.train.ckpt_every and (every < 100 or every % 10 == 0)
    # 4 validations: the periodic ones, then the trainer's at the last step (none a few steps before it)
    assert len(set(range(every, steps + 1, every)) | {steps}) == 4
    assert steps % every == 0 or steps % every >= every // 4
    raw = out.read_text()
    assert re.search(r"^  sigma_px: [\d.]+  # median nearest-landmark distance", raw, re.M)
    assert re.search(r"^  input_hw: \[96, 160\]  # median image 120x160", raw, re.M)
    assert "# GroupNorm in the decoders" in raw                      # the base config's comments are kept
    assert fp["plan"]["data.sigma_px"]["value"] == cfg.data.sigma_px and fp["hardware"]["cpu_cores"] >= 1
    run = tmp_path / "run"
    assert main(["train", "--config", str(out), f"log.run_dir={run}", *TRAIN_FAST]) == 0
    assert (run / "checkpoints" / "best.pt").is_file()


@pytest.fixture(scope="module")
def small_hc18(tmp_path_factory):
    """12 synthetic HC18-layout images (135 x 200) shared by the segmentation plan tests (plans only read them)."""
    root = tmp_path_factory.mktemp("hc")
    generate_hc18_dataset(root, 12, seed=3, image_hw=(135, 200))
    return root


def test_segmentation_plan_unweighted_loads_and_trains(tmp_path, small_hc18):
    root = small_hc18
    out = tmp_path / "seg.yaml"
    result = P.make_plan(root, "segmentation", out=out, budget_min=5, use_probe=False, progress=False,
                         overrides=["data.num_folds=2", "model.args.base=8",
                                    "model.criterion_args.loss=0.5*wce + 0.5*focal"])
    cfg = _check_plan(result)
    assert cfg.model.name == "unet_pp" and cfg.data.task == "segmentation"
    assert cfg.model.criterion_args["class_weights"] == [1.0, 1.0]
    assert cfg.model.criterion_args["loss"] == "0.5*wce + 0.5*focal"            # given: kept as is
    assert "data.sigma_px" not in {p.key for p in result["planned"]}            # no heatmaps
    assert cfg.data.flip_p == 0.5                                                # ofd1/ofd2 swap on a flip
    result = P.make_plan(root, "segmentation", out=out, budget_min=5, use_probe=False, progress=False,
                         overrides=["data.num_folds=2", "model.args.base=8",
                                    "model.criterion_args.class_weights=[1.0, 5.0]"])
    planned = {p.key: p.value for p in result["planned"]}
    assert "model.criterion_args.class_weights" not in planned                  # given: never re-planned
    result = P.make_plan(root, "segmentation", out=out, budget_min=5, use_probe=False, progress=False,
                         overrides=["data.num_folds=2", "model.args.base=8", "train.max_steps=40"])
    cfg = result["config"]
    assert (cfg.train.max_steps, cfg.train.eval_every) == (40, 10)               # given steps: evaluations follow
    assert cfg.model.criterion_args["class_weights"] == [1.0, 1.0] and "iou" in cfg.model.criterion_args["loss"]
    run = tmp_path / "run"
    assert main(["train", "--config", str(out), f"log.run_dir={run}", *TRAIN_FAST]) == 0
    assert (run / "checkpoints" / "best.pt").is_file()


def test_class_weights_rule_rewrites_weighted_losses(tmp_path, small_hc18):
    root = small_hc18
    base = tmp_path / "base.yaml"
    text = (P.CONFIG_DIR / "seg_zoo.yaml").read_text().replace('loss: "0.8*ce + 0.2*iou"',
                                                                'loss: "wce", class_weights: [1.0, 5.0]')
    base.write_text(text)
    result = P.make_plan(root, "segmentation", out=tmp_path / "p.yaml", base=str(base), budget_min=5,
                         use_probe=False, progress=False, overrides=["data.num_folds=2"])
    args = result["config"].model.criterion_args
    assert args["class_weights"] == [1.0, 1.0] and args["loss"] == "0.8*ce + 0.2*dice"


def test_fetal_head_and_xray_plans(tmp_path):
    hc = tmp_path / "hc"
    generate_hc18_dataset(hc, 12, seed=5, image_hw=(135, 200))
    r = P.make_plan(hc, "fetal_head", out=tmp_path / "f.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    cfg = _check_plan(r)
    assert cfg.model.criterion_args["class_weights"] == [1.0, 1.0]             # unweighted
    assert 1.5 <= cfg.data.sigma_px <= 4.0
    assert cfg.data.rotation_deg == 30.0                     # heads lie at any angle; 5 min: 100s of epochs of 5
    assert cfg.data.scale_range[0] < 0.9 and cfg.data.scale_range[1] > 1.1     # wider than the base's 0.9-1.1
    short = P.make_plan(hc, "fetal_head", out=tmp_path / "f2.yaml", budget_min=5, use_probe=False, progress=False,
                        overrides=["data.num_folds=2", "train.max_steps=40"])
    rot = next(p for p in short["planned"] if p.key == "data.rotation_deg")
    assert 40 * short["config"].train.batch_size / 5 < P.AUG_FULL_EPOCHS    # a short run: the base config's ranges
    assert short["config"].data.rotation_deg == 15.0 and "-> +-30 deg" in rot.reason and "capped at the base" in \
        rot.reason
    lo, hi = cfg.data.scale_range
    assert tuple(short["config"].data.scale_range) == (max(lo, 0.9), min(hi, 1.1))
    xr = tmp_path / "xr"
    generate_xray_dataset(xr, 12, seed=5, image_hw=(192, 160))
    r = P.make_plan(xr, "hip_xray", out=tmp_path / "x.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    cfg = _check_plan(r)
    assert cfg.model.args["input_hw"] == list(cfg.data.input_hw) == cfg.model.criterion_args["normalize_hw"]
    sigma = next(p for p in r["planned"] if p.key == "data.sigma_px")
    assert cfg.data.flip_p == 0.5 and sigma.value == "(base)" and "regressed" in sigma.reason   # no heatmaps


# ------------------------------------------------------------------------------------------------ the probe
def test_probe_times_real_steps_of_a_tiny_model(tmp_path):
    root = tmp_path / "ceph"
    generate_ceph_dataset(root, 10, seed=1, image_hw=(120, 100), num_landmarks=5, layout="coco")
    result = P.make_plan(root, "landmarks", out=tmp_path / "p.yaml", budget_min=1, device="cpu", progress=False,
                         overrides=["data.num_folds=2", "model.name=landmark_unet",
                                    "model.args={width: 4, depth: 3, heatmap_stride: 2}", "data.preresize=false"])
    probe = result["probe"]
    (batch, entry), = probe["steps"].items()
    assert entry["s_per_step"] > 0 and probe["load_s_per_sample"] > 0 and probe["params"] > 0
    cfg = result["config"]
    assert cfg.train.batch_size == batch and cfg.model.args["width"] == 4
    reason = next(p.reason for p in result["planned"] if p.key == "train.max_steps")
    assert "s per step" in reason and cfg.train.max_steps >= 10
    assert json.loads((tmp_path / "fingerprint.json").read_text())["probe"]["steps"][str(batch)]["s_per_step"] > 0


def test_a_halved_cpu_batch_is_probed_again(tmp_path, monkeypatch):
    """A step of half the batch costs more than half a step: the plan takes max_steps from a probe at the batch it
    trains with (the X-ray, landmark and spine plans, scaled from batch 8 or 16 to 4, ran 8-17 % over budget)."""
    root = tmp_path / "hc"
    generate_hc18_dataset(root, 96, seed=2, image_hw=(135, 200))
    per_step = {8: 4.0, 4: 3.0}                         # seconds: batch 4 costs 1.5x the per-sample time of batch 8
    calls = []

    load = {"s": 0.001}

    def fake_probe(cfg, fp, hardware, batch_sizes, steps=2):
        calls.append(list(batch_sizes))
        return {"load_s_per_sample": load["s"], "device": "cpu", "params": 1,
                "steps": {b: {"s_per_step": per_step[b]} for b in batch_sizes}}

    monkeypatch.setattr(P, "probe", fake_probe)
    r = P.make_plan(root, "fetal_head", out=tmp_path / "p.yaml", budget_min=10, device="cpu", progress=False,
                    overrides=["data.num_folds=2"])
    cfg = r["config"]
    assert calls == [[8], [4]] and cfg.train.batch_size == 4
    reason = next(p.reason for p in r["planned"] if p.key == "train.max_steps")
    train_s = float(re.search(r"= (\d+) s /", reason).group(1))
    assert cfg.train.max_steps == P._round_steps(train_s / (P.STEP_OVERHEAD * per_step[4]))
    assert cfg.train.max_steps < P._round_steps(train_s / (P.STEP_OVERHEAD * per_step[8] / 2))   # scaling: more
    assert "re-probed at batch 4: 3.000 s/step" in next(p.reason for p in r["planned"] if p.key == "train.batch_size")
    # loading 1 ms of a 750-ms sample step: in the training process, no worker restarted every epoch
    assert cfg.data.num_workers == 0
    assert "loaded in the training process" in next(p.reason for p in r["planned"] if p.key == "data.num_workers")
    load["s"] = 0.2                                     # 27 % of the step: a worker process
    r = P.make_plan(root, "fetal_head", out=tmp_path / "q.yaml", budget_min=10, device="cpu", progress=False,
                    overrides=["data.num_folds=2"])
    cores = P.read_hardware("cpu")["cpu_cores"]
    assert r["config"].data.num_workers == max(1, min(cores // 2, 4))


# ------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_folder_or_the_task(tmp_path, capsys):
    missing, empty = tmp_path / "nothing_here", tmp_path / "empty"
    empty.mkdir()
    assert main(["plan", str(missing), "--task", "landmarks", "--no-probe"]) == 2
    assert f"{missing}: dataset folder not found" in capsys.readouterr().err
    assert main(["plan", str(empty), "--task", "landmarks", "--no-probe"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no dataset layout recognised" in err
    assert main(["plan", str(empty), "--task", "landmarks", "--format", "coco", "--no-probe"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert main(["plan", str(empty), "--task", "hips", "--no-probe"]) == 2
    assert "unknown task 'hips'" in capsys.readouterr().err
    hc = tmp_path / "hc"
    generate_hc18_dataset(hc, 6, seed=1, image_hw=(135, 200))
    with pytest.raises(ConfigError, match=re.escape(str(hc))):          # a task the data does not fit
        P.make_plan(hc, "hip_xray", out=tmp_path / "x.yaml", use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    with pytest.raises(DataError):
        P.make_plan(missing, "landmarks", use_probe=False)


def test_gpu_rules_without_a_gpu(tmp_path, monkeypatch):
    """The GPU branch (budget by free memory, GPU widths, batch by memory) with the hardware reading faked."""
    assert P.gpu_batch_size(1.0, 1.5, 40.0, 1000) == (32, 0.25)                  # capped at GPU_MAX_BATCH
    assert P.gpu_batch_size(1.0, 3.0, 10.0, 1000)[0] == 4                         # 1 GiB/sample, 6 GiB room
    assert P.gpu_batch_size(1.0, 1.5, 40.0, 9)[0] == 8                            # a quarter of the training split
    assert P.gpu_batch_size(4.0, 8.0, 4.0, 100)[0] == 2                           # never below 2
    fake = {"device": "cuda", "cpu_cores": 16, "cpu": "x86_64", "torch": "t", "gpu": "fake", "gpu_free_gib": 80.0,
            "gpu_total_gib": 80.0}
    monkeypatch.setattr(P, "read_hardware", lambda device="auto": fake)
    root = tmp_path / "hc"
    generate_hc18_dataset(root, 12, seed=3, image_hw=(270, 400))
    r = P.make_plan(root, "fetal_head", out=tmp_path / "g.yaml", budget_min=5, use_probe=False, progress=False,
                    overrides=["data.num_folds=2"])
    cfg = _check_plan(r)
    assert tuple(cfg.data.input_hw) == (256, 384)                   # 224k px budget, capped by the 270 x 400 images
    assert cfg.model.args["base"] == 32 and cfg.data.num_workers == 8
    n_train = r["splits"]["train"]                                  # 2 x the base batch, <= a quarter of the split
    assert cfg.train.batch_size == max(2, min(16, max(2, n_train // 4)))


def _plans_at_budgets(tmp_path, task: str, n: int, image_hw, seed: int, budgets) -> dict:
    """{budget: make_plan result} for one synthetic HC18-layout set planned at several CPU budgets (--no-probe)."""
    root = tmp_path / "hc"
    generate_hc18_dataset(root, n, seed=seed, image_hw=image_hw)
    return {b: P.make_plan(root, task, out=tmp_path / f"{b}.yaml", budget_min=b, use_probe=False, progress=False,
                           overrides=["data.num_folds=2"]) for b in budgets}


def test_cpu_batch_is_halved_for_steps_but_not_below_four(tmp_path):
    """A short CPU budget halves the base config's batch 8 to reach MIN_STEPS, but not below MIN_CPU_BATCH: BatchNorm
    statistics over 2 samples are noise (the synthetic segmentation set lost Dice 0.989 -> 0.980 at batch 2)."""
    plans = _plans_at_budgets(tmp_path, "fetal_head", 96, (135, 200), seed=2, budgets=(0.3, 60))
    got = {b: (r["config"].train.batch_size, r["config"].train.max_steps) for b, r in plans.items()}
    assert got[0.3][0] == P.MIN_CPU_BATCH == 4 and got[0.3][1] < P.MIN_STEPS     # halved once, no further
    assert got[60][0] == 8 and got[60][1] > P.MIN_STEPS                           # the base config's batch


def test_a_short_cpu_budget_keeps_the_base_input_size(tmp_path):
    """Steps matter more than pixels in a short run: when fewer than MIN_STEPS steps of batch 4 fit at the CPU pixel
    budget's 160 x 224, the plan keeps seg_zoo's 128 x 192 pixels (a 1.3-min plan at 160 x 224: 52 steps, Dice
    0.936 against the bundled config's 0.989 at 100 steps)."""
    got = {}
    for budget, r in _plans_at_budgets(tmp_path, "segmentation", 12, (270, 400), seed=4, budgets=(1.3, 30)).items():
        got[budget] = tuple(r["config"].data.input_hw)
        why = next(p.reason for p in r["planned"] if p.key == "data.input_hw")
        assert ("the base config's 128x192 pixels" in why) == (budget == 1.3), why
    assert got[30] == (160, 224) and got[1.3][0] * got[1.3][1] <= 128 * 192 < 160 * 224


def test_eval_interval_puts_the_fourth_validation_at_the_final_step():
    """steps / 4 rounded up (to tens from 100): the trainer's final validation is the fourth, never a fifth one a
    few steps after the last periodic one (270 steps at 67 gave 67, 134, 201, 268 and 270)."""
    from launch.plan import eval_interval
    assert [eval_interval(s) for s in (10, 270, 1150, 1800, 2345)] == [3, 68, 290, 450, 590]
    for steps in (10, 37, 270, 999, 1150, 1800, 2345):
        every = eval_interval(steps)
        assert len(set(range(every, steps + 1, every)) | {steps}) == 4, steps
