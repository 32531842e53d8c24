"""After a kill and `--resume auto`, metrics.jsonl equals the uninterrupted run's, not only the weights: a logging
window cut by the kill continues from the sums saved in the checkpoint (train.log_every=3 with checkpoints every 4
steps cuts every window), and an evaluation the kill interrupted (MEDPOSE_FAULT_KILL_IN_EVAL, engine/faults.py) is
run again on resume, so its validation row is there, once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_launchers import REPO, TINY

ARGS = [*TINY, "data.num_workers=0", "train.max_steps=10", "train.ckpt_every=4", "train.eval_every=4",
        "train.log_every=3", "train.keep_last=5"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


def _train(run_dir: Path, phantom: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", MPLBACKEND="Agg", OMP_NUM_THREADS="1", **env)
    for k in ("MEDPOSE_FAULT_KILL_AT_STEP", "MEDPOSE_FAULT_KILL_IN_SAVE"):
        full_env.pop(k, None)
    cmd = [sys.executable, "-m", "launch.cli", "train", "--resume", "auto", "--config", "hip_demo", "--no-test",
           *[a for a in ARGS if a != "train.eval_every=0"],
           f"data.root={phantom}", f"log.run_dir={run_dir}"]
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def test_killed_in_evaluation_resumes_to_the_same_metrics_file(tmp_path, phantom):
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    done = _train(ref, phantom)
    assert done.returncode == 0, done.stderr[-4000:]
    killed = _train(run, phantom, MEDPOSE_FAULT_KILL_IN_EVAL="8")
    assert killed.returncode != 0 and (run / ".fault_injected_eval8_rank0").is_file()
    cut = _rows(run)
    assert not any(r["split"] == "val" and r["step"] == 8 for r in cut)     # the kill came before the figures
    assert max(r["step"] for r in cut if r["split"] == "train") == 6         # steps 7-8 sit in an unlogged window
    resumed = _train(run, phantom, MEDPOSE_FAULT_KILL_IN_EVAL="8")          # its marker keeps it from dying again
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "evaluating now" in resumed.stderr
    rows, ref_rows = _rows(run), _rows(ref)
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in ref_rows]
    assert [(r["step"], r["split"]) for r in rows] == [(3, "train"), (4, "val"), (6, "train"), (8, "val"),
                                                       (9, "train"), (10, "train"), (10, "val")]
    assert rows == ref_rows                     # every figure, bit for bit: the window 7-9 crossed the kill
    a = torch.load(ref / "checkpoints" / "ckpt_step00000010.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "ckpt_step00000010.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
