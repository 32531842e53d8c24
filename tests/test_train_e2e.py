"""End to end on a tiny phantom: the loss falls and the errors drop below bounds; resume equals the uninterrupted run;
DDP training on 2 processes runs the same loop; the CLI's eval and predict read what train wrote."""
import json
import math
from pathlib import Path

import pytest
import torch

from _dist_utils import REPO, torchrun
from engine.config import load_config
from engine.run import prepare, resolve_config, resolve_targets, train

TINY = [
    "data.synth_n=40", "data.synth_image_hw=[96, 128]", "data.input_hw=[64, 96]", "data.sigma_px=1.5",
    "data.num_workers=0", "data.num_folds=4",
    "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
    "model.criterion_args={balance: fixed}", "train.batch_size=4", "log.progress=false", "log.tensorboard=false", "log.overlays=2",
]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


def _cfg(tmp_path, phantom_root, *extra):
    return load_config(None, [*TINY, f"data.root={phantom_root}", f"log.run_dir={tmp_path}", *extra])


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _val_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"]


def test_tiny_run_learns_and_writes_report(tmp_path, phantom_root):
    cfg = _cfg(tmp_path, phantom_root, "train.max_steps=60", "train.eval_every=30", "train.log_every=5",
               "optim.lr=2e-3", "train.ckpt_every=30")
    result = train(cfg)
    losses = _train_losses(tmp_path)
    first, last = losses[5], losses[60]
    assert last < 0.6 * first, losses
    report = json.loads((tmp_path / "report.json").read_text())
    # Bounds a model that learnt nothing cannot meet on this phantom: an untrained network's MRE is ~1/3 of the
    # image width and its foreground mIoU ~0.0-0.1 (checked by test_untrained_model_fails_the_bounds below).
    assert report["landmark_mre_px"] < 0.2 * 128
    assert report["seg_miou"] > 0.2
    for key in ("seg_miou", "landmark_mre_px", "alpha_mae_deg", "beta_mae_deg", "screening_accuracy"):
        assert key in report and report[key] is not None
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "figures" / "curve_loss.png").is_file()
    assert len(list((tmp_path / "figures" / "overlays").glob("*.png"))) == 2
    assert result["step"] == 60 and result["best_step"] in (30, 60)
    saved = load_config(tmp_path / "config.yaml")
    # the saved config is the resolved one (format, best metric, where targets are rendered, the model's data-shaped
    # arguments: filled in)
    assert saved == resolve_targets(prepare(cfg)[0], torch.device("cpu"))
    assert {k: saved.model.args[k] for k in ("num_keypoints", "in_channels", "num_classes")} == \
        {"num_keypoints": 6, "in_channels": 3, "num_classes": 8} and saved.model.criterion_args["num_classes"] == 8
    assert saved.data.format == "labelme" and saved.train.best_metric == "loss"
    assert saved.data.targets == "loader"              # CPU training: the loader renders the heatmap targets


def test_targets_rendered_on_the_device_train_like_loader_targets(tmp_path, phantom_root):
    """data.targets=device: the loader renders nothing and the loss renders the targets from the keypoints; the
    losses match a run whose loader rendered them (same values by definition, data_pipelines/heatmaps.py)."""
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "optim.lr=2e-3"]
    runs = {}
    for where in ("loader", "device"):
        run_dir = tmp_path / where
        train(_cfg(run_dir, phantom_root, *common, f"data.targets={where}"), final_test=False)
        runs[where] = _train_losses(run_dir)
        assert load_config(run_dir / "config.yaml").data.targets == where
    assert sorted(runs["device"]) == [1, 2, 3, 4]
    for step, loss in runs["loader"].items():
        assert math.isclose(runs["device"][step], loss, rel_tol=1e-4), (step, runs)


@pytest.mark.dali
def test_dali_loader_trains_like_the_torch_loader(tmp_path, phantom_root):
    """data.loader=dali (DALI decode, augmentation and warps, CPU-only pipeline): the torch loader's losses on the same
    draws (within 1 %: only the speckle noise field differs, DALI draws it; measured 0.1-0.3 %), and a held-out report
    from DALI-fed evaluation."""
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "optim.lr=2e-3", "data.targets=device"]
    runs = {}
    for loader in ("torch", "dali"):
        run_dir = tmp_path / loader
        train(_cfg(run_dir, phantom_root, *common, f"data.loader={loader}"), final_test=loader == "dali")
        runs[loader] = _train_losses(run_dir)
    assert sorted(runs["dali"]) == [1, 2, 3, 4]
    for step, loss in runs["torch"].items():
        assert math.isclose(runs["dali"][step], loss, rel_tol=1e-2), (step, runs)
    report = json.loads((tmp_path / "dali" / "report.json").read_text())
    assert report["landmark_mre_px"] is not None and report["seg_miou"] is not None


def test_loader_auto_resolves_to_torch_without_cuda(tmp_path, phantom_root):
    """data.loader=auto is saved resolved: torch on a CPU run (DALI is for CUDA devices), whatever is installed."""
    from engine.config import load_config
    from engine.run import resolve_loader
    train(_cfg(tmp_path, phantom_root, "train.max_steps=1", "train.eval_every=0"), final_test=False)
    saved = load_config(tmp_path / "config.yaml")
    assert saved.data.loader == "torch"
    cfg = _cfg(tmp_path, phantom_root, "data.format=nifti")
    assert resolve_loader(cfg, "cpu").data.loader == "torch"
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="'nifti' reader has no DALI path"):
        resolve_loader(_cfg(tmp_path, phantom_root, "data.format=nifti", "data.loader=dali"), "cpu")


def test_dali_loader_refuses_loader_rendered_targets(tmp_path, phantom_root):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="data.targets=loader"):
        train(_cfg(tmp_path, phantom_root, "train.max_steps=1", "data.loader=dali", "data.targets=loader"))


def test_untrained_model_fails_the_bounds(tmp_path, phantom_root):
    cfg = _cfg(tmp_path, phantom_root, "train.max_steps=1", "optim.lr=1e-9", "train.eval_every=0")
    train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["landmark_mre_px"] > 0.2 * 128 or report["seg_miou"] < 0.2


def test_resume_reproduces_the_uninterrupted_run(tmp_path, phantom_root):
    common = ["train.max_steps=8", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=4",
              "train.keep_last=5", "optim.lr=2e-3", "data.num_workers=2"]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    train(_cfg(full_dir, phantom_root, *common), final_test=False)
    train(_cfg(part_dir, phantom_root, *common, "train.stop_at_step=4"), final_test=False)
    assert max(_train_losses(part_dir)) == 4
    train(_cfg(part_dir, phantom_root, *common), resume="auto", final_test=False)
    full, resumed = _train_losses(full_dir), _train_losses(part_dir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    a = torch.load(full_dir / "checkpoints" / "ckpt_step00000008.pt", weights_only=True)["model"]
    b = torch.load(part_dir / "checkpoints" / "ckpt_step00000008.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, phantom_root):
    """Two sane steps (checkpoint at step 2), then the `step` schedule multiplies the LR by 1e15: the weights blow
    up and the next forward pass is not finite. The run stops naming the last good checkpoint, which holds the
    weights of step 2 exactly as a run stopped there writes them."""
    from engine.checkpoint import find_latest, load_checkpoint_file
    from engine.trainer import TrainingDiverged
    common = ["train.max_steps=6", "train.ckpt_every=2", "optim.lr=2e-3", "optim.scheduler=step",
              "optim.step_milestones=[2]", "optim.step_gamma=1e15", "train.eval_every=0", "train.log_every=1"]
    with pytest.raises(TrainingDiverged, match="not finite") as exc:
        train(_cfg(tmp_path / "nan", phantom_root, *common), final_test=False)
    latest = find_latest(tmp_path / "nan" / "checkpoints")
    assert latest is not None and latest.name == "ckpt_step00000002.pt"
    assert str(latest) in str(exc.value)
    state = load_checkpoint_file(latest)
    assert state["client"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    train(_cfg(tmp_path / "ref", phantom_root, *common, "train.stop_at_step=2"), final_test=False)
    ref = load_checkpoint_file(tmp_path / "ref" / "checkpoints" / "ckpt_step00000002.pt")["model"]
    assert state["model"].keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)


def test_nan_policy_skip_counts_skipped_steps(tmp_path, phantom_root):
    from engine.trainer import TrainingDiverged
    cfg = _cfg(tmp_path, phantom_root, "train.max_steps=6", "optim.lr=1e12", "train.eval_every=0",
               "train.nan_policy=skip", "train.max_skipped_steps=2", "train.log_every=1")
    with pytest.raises(TrainingDiverged, match="skipped in a row"):
        train(cfg, final_test=False)


def test_ddp_two_processes_train_and_report(tmp_path, phantom_root):
    args = [*TINY, f"data.root={phantom_root}", f"log.run_dir={tmp_path}", "train.max_steps=4",
            "train.eval_every=2", "train.log_every=1", "train.batch_size=2"]
    torchrun(["-m", "launch.cli", "train", "--config", str(REPO / "launch/configs/hip_demo.yaml"), *args], nproc=2)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["run"]["world_size"] == 2 and report["run"]["strategy"] == "ddp"
    val = _val_rows(tmp_path)
    assert [r["step"] for r in val] == [2, 4]
    # every validation image counted exactly once across the two ranks
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert val[-1]["num_images"] == len(splits["val"])
    assert report["figures"]["num_images"] == len(splits["test"])


def test_cli_eval_and_predict_read_the_checkpoint(tmp_path, phantom_root):
    from launch.cli import main
    cfg_args = [*TINY, f"data.root={phantom_root}", f"log.run_dir={tmp_path / 'run'}", "train.max_steps=2",
                "train.eval_every=0"]
    assert main(["train", "--no-test", *cfg_args]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert main(["eval", "--checkpoint", str(ckpt), "--split", "val", "--out", str(tmp_path / "ev"),
                 "eval.sdr_radii_mm=[0.25, 7]"]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["run"]["split"] == "val"
    assert sorted(k for k in ev["figures"] if k.startswith("sdr_")) == ["sdr_0.25mm", "sdr_7mm"]
    assert ev["figures"]["sdr_7mm"] >= ev["figures"]["sdr_0.25mm"]
    inputs = sorted(str(p) for p in Path(phantom_root).glob("*.png"))[:2]
    json_in = sorted(str(p) for p in Path(phantom_root).glob("*.json") if p.name != "dataset.json")[:1]
    assert main(["predict", "--checkpoint", str(ckpt), *inputs, *json_in, "--out", str(tmp_path / "pr")]) == 0
    rows = (tmp_path / "pr" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("input,alpha_deg,beta_deg,graf_type")
    assert len(list((tmp_path / "pr").glob("*_overlay.png"))) == 3


def test_cli_reports_bad_config_key_with_file(tmp_path, capsys):
    from launch.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.max_step" in err and str(bad) in err
