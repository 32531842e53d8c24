"""Task, model and data must fit, and a mismatch is a ConfigError naming the fields before any data is generated or
any step is run (engine/fitting.py) - each case that used to end in a traceback deep in training. Evaluation runs one
batch before training, and a checkpoint is written before every evaluation, so a failing evaluation loses nothing."""
import pytest
import torch

from data_pipelines.synthetic.ceph import generate_ceph_dataset
from engine import run as run_mod
from engine.checkpoint import find_latest, load_checkpoint_file
from engine.config import ConfigError, load_config
from engine.run import prepare, train
from launch.cli import CONFIG_DIR

FAST = ["data.input_hw=[64,64]", "data.num_workers=0", "data.num_folds=2", "train.max_steps=4", "train.batch_size=2",
        "train.log_every=1", "model.args.head_channels=8", "log.tensorboard=false",
        "log.progress=false", "log.overlays=0", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def k5(tmp_path_factory):
    root = tmp_path_factory.mktemp("k5")
    generate_ceph_dataset(root, 10, seed=2, image_hw=(120, 100), num_landmarks=5)
    return root


def _cfg(root, run, *extra):
    return load_config(CONFIG_DIR / "landmarks.yaml", [f"data.root={root}", f"log.run_dir={run}", *FAST, *extra])


@pytest.mark.parametrize("extra, message", [
    (["data.task=hip_xray"], r"data.task=hip_xray needs exactly 12 landmarks .* has 5 landmarks \(sella, nasion"),
    (["data.task=hip_us"], r"data.task=hip_us needs masks, but data.format=coco .* gives none \(reader_args.masks"),
    (["data.task=fetal_head"], r"data.task=fetal_head needs masks"),
    (["model.args.num_keypoints=12"], r"model.args.num_keypoints: 12, but the data .* has 5 landmarks"),
    (["model.args.in_channels=3"], r"model.args.in_channels: 3, but the data .* has 1-channel images \(grey\)"),
    (["model.name=multihipposenet", "model.args={}"], r"model.name=multihipposenet trains a segmentation head .* "
                                                      r"gives no masks"),
    (["model.name=unet", "model.args={}"], r"model.name=unet predicts no landmarks"),
    (["model.name=efficientnet_heatmap", "model.args={backbone: 'timm:test_efficientnet', input_hw: [96, 96]}"],
     r"model.args.input_hw: \[96, 96\], but data.input_hw is \[64, 64\]"),
    (["model.name=landmark_net"], r"model.name: unknown model 'landmark_net'"),
    (["model.args.widht=8"], r"model.args: unknown key 'widht' for model 'landmark_hrnet'"),
])
def test_mismatches_are_named_before_anything_runs(tmp_path, k5, extra, message):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train(_cfg(k5, run, *extra))
    assert not run.exists()                     # no run directory, nothing trained


def test_nothing_is_generated_for_a_run_that_cannot_fit(tmp_path):
    """The synthetic hip phantom would be written into data.root; a run whose task cannot use it stops first."""
    root = tmp_path / "phantom"
    cfg = load_config(CONFIG_DIR / "hip_demo.yaml", [f"data.root={root}", "data.task=hip_xray",
                                                     "data.format=labelme", f"log.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="needs exactly 12 landmarks .* has 6 landmarks"):
        train(cfg)
    cfg = load_config(CONFIG_DIR / "hip_demo.yaml", [f"data.root={root}", "model.name=multihipposenet2"])
    with pytest.raises(ConfigError, match="unknown model"):
        train(cfg)
    assert not root.exists()


def test_the_data_fills_the_models_arguments(k5, tmp_path):
    cfg, task, info = prepare(_cfg(k5, tmp_path / "run", "model.name=hourglass",
                                   "model.args={num_stacks: 1, num_features: 16}"))
    assert cfg.model.args == {"num_stacks": 1, "num_features": 16, "num_keypoints": 5, "in_channels": 1}
    assert info.kpt_names[:2] == ("sella", "nasion") and task.name == "landmarks"


def test_evaluation_is_tried_on_one_batch_before_training(tmp_path, k5, monkeypatch):
    from engine.tasks.landmarks import task as landmarks_task

    def broken(self, pred, orig, meta):
        raise KeyError("mask_HW")
    monkeypatch.setattr(landmarks_task.LandmarksAccumulator, "update_sample", broken)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="fails on the val split before training .*KeyError.*nothing was trained"):
        train(_cfg(k5, run, "train.eval_every=2"))
    assert find_latest(run / "checkpoints") is None and not (run / "metrics.jsonl").exists()


def test_a_crash_in_evaluation_leaves_the_checkpoint_of_that_step(tmp_path, k5, monkeypatch):
    real, calls = run_mod._evaluate, []

    def crash_after_the_check(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:                        # the first call is the one-batch check before training
            raise RuntimeError("evaluation failed")
        return real(*args, **kwargs)
    monkeypatch.setattr(run_mod, "_evaluate", crash_after_the_check)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(_cfg(k5, run, "train.eval_every=2", "train.ckpt_every=0"))
    latest = find_latest(run / "checkpoints")
    assert latest is not None and latest.name == "ckpt_step00000002.pt"
    ckpt = load_checkpoint_file(latest)
    assert ckpt["client"]["step"] == 2 and ckpt["client"]["data"]["info"]["kpt_names"][0] == "sella"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_bundled_config_fits_its_data_and_builds(name, tmp_path):
    """Each launch/configs/*.yaml, on the data its reader would generate (nothing is generated here): task, model
    and data fit, and the model builds with the filled-in arguments."""
    from engine.run import build_model
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", [f"data.root={tmp_path / 'none'}", "data.synthetic=true"])
    if cfg.model.name == "look_once":     # spine_disc's point classifier: trained on label point sets, not images
        from engine.tasks.spine_disc.look_once import look_once_args
        from models.look_once import build_look_once
        args = look_once_args(cfg)
        assert cfg.data.task == "spine_disc"
        assert sum(p.numel() for p in build_look_once(args.num_points, args.attention, args.width_div).parameters())
        return
    cfg, task, info = prepare(cfg)
    model = build_model(cfg)
    assert cfg.model.args.get("num_keypoints", info.num_keypoints) == info.num_keypoints
    assert sum(p.numel() for p in model.parameters()) > 0 and not (tmp_path / "none").exists()
