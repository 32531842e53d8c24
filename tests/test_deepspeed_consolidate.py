"""dist.deepspeed.consolidate_on_save=false (issue 15, item 2): the checkpoint files hold `model: None` and point to
their shard folders. The final report, `medpose eval`, `predict` and load_for_inference consolidate the weights from
the shards on demand; a file whose shards are gone is a one-line error that says how to consolidate.

Two real runs of engine.run.train on 2 CPU processes (torchrun, gloo), ZeRO-2: 4 steps with the held-out report,
then --resume-weights-only from that run's best.pt (weights merged from its shards, loaded before DeepSpeed wraps the
model) with optim.lr=0, so its checkpoint — consolidated from ZeRO's fp32 master partitions — must equal them."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from _dist_utils import REPO, torchrun
from test_deepspeed import TINY_RUN

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("noconsolidate")
    generate_hip_dataset(root / "phantom", 40, seed=3, image_hw=(96, 128))
    job = ["-", *TINY_RUN, f"data.root={root / 'phantom'}", f"log.run_dir={root / 'z2'}", "dist.strategy=deepspeed",
           "dist.deepspeed.zero_stage=2", "dist.deepspeed.consolidate_on_save=false", "final_test"]
    best = root / "z2" / "checkpoints" / "best.pt"   # written by the first launch
    again = [str(best), *TINY_RUN, f"data.root={root / 'phantom'}", f"log.run_dir={root / 'w'}",
             "dist.strategy=deepspeed", "dist.deepspeed.zero_stage=2", "train.max_steps=1", "optim.lr=0",
             "optim.weight_decay=0", "weights_only"]
    for args in (job, again):  # one launch each: a second process group in the same two processes hangs on gloo
        torchrun([str(REPO / "tests" / "deepspeed_worker.py"), "train", ";".join(args)], nproc=2, timeout=300)
    return root


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")


def test_final_report_is_written_from_the_shards(run):
    """Before: TypeError (load_state_dict(None)) at the end of training, on every rank."""
    from engine.checkpoint import load_checkpoint_file
    best = run / "z2" / "checkpoints" / "best.pt"
    assert load_checkpoint_file(best)["model"] is None          # saved without consolidated weights
    report = json.loads((run / "z2" / "report.json").read_text())
    assert report["run"]["checkpoint"].endswith("best.pt") and report["run"]["strategy"] == "deepspeed"
    assert 0.0 <= report["seg_miou"] <= 1.0 and report["landmark_mre_px"] >= 0.0


def test_inference_consolidates_on_demand_like_engine_consolidate(run, tmp_path):
    from engine.checkpoint import load_checkpoint_file
    from engine.run import load_for_inference
    best = run / "z2" / "checkpoints" / "best.pt"
    model, cfg, _, _ = load_for_inference(best)
    assert cfg.dist.deepspeed.consolidate_on_save is False
    out = tmp_path / "best_fp32.pt"
    proc = subprocess.run([sys.executable, "-m", "engine.consolidate", str(best), str(out)], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    merged = load_checkpoint_file(out)["model"]
    state = model.state_dict()
    assert set(state) == set(merged)
    for name, value in merged.items():
        assert value.dtype == state[name].dtype or not value.is_floating_point()
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def test_eval_and_predict_read_the_checkpoint(run, tmp_path):
    from engine.predict import predict_files
    best = run / "z2" / "checkpoints" / "best.pt"
    rows = predict_files(best, [str(next((run / "phantom").rglob("*.png")))], tmp_path / "pred", overlays=0)
    assert len(rows) == 1 and rows[0]["input"].endswith(".png")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "--checkpoint", str(best), "--out",
                           str(tmp_path / "eval")], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["run"]["checkpoint"] == str(best) and 0.0 <= report["seg_miou"] <= 1.0


def test_without_its_shards_the_file_is_a_named_error_that_says_how_to_consolidate(run, tmp_path, capsys):
    from engine.checkpoint import CheckpointError
    from engine.run import load_for_inference
    from launch.cli import main
    lone = tmp_path / "best.pt"
    shutil.copy(run / "z2" / "checkpoints" / "best.pt", lone)
    with pytest.raises(CheckpointError) as err:
        load_for_inference(lone)
    msg = str(err.value)
    assert msg.startswith(f"{lone}: ") and "consolidate_on_save=false" in msg
    assert "shard folder" in msg and "python -m engine.consolidate" in msg
    assert main(["predict", "--checkpoint", str(lone), str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"medpose predict: error: {msg}"


def test_resume_weights_only_under_zero2_starts_from_the_merged_weights(run):
    from engine.checkpoint import load_checkpoint_file
    from engine.run import load_for_inference
    source = load_for_inference(run / "z2" / "checkpoints" / "best.pt")[0].state_dict()
    out = load_checkpoint_file(run / "w" / "checkpoints" / "ckpt_step00000001.pt")
    assert out["client"]["step"] == 1                      # a new run from step 0
    for name, value in source.items():
        torch.testing.assert_close(out["model"][name], value, rtol=0, atol=0, msg=name)
