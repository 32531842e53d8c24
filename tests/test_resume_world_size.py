"""A resume with another world size: the data position is global (samples of the epoch's permutation consumed by all
ranks), so the rest of the epoch is re-sharded over the new ranks and every sample of the epoch is used exactly once
across the change (2 -> 1 and 1 -> 2 ranks, launch/torchrun_single.sh for real, gloo on the CPU). Every rank appends
the dataset indices it takes to samples_rank<r>.jsonl (MEDPOSE_TRACE_SAMPLES=1, engine/faults.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_launchers import GLOO_TEARDOWN_ABORT, LAUNCH, REPO, TINY


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


def _launch(run_dir: Path, phantom: Path, nproc: int, steps: int, ckpt_every: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, NPROC=str(nproc), CORES="2", MAX_RESTARTS="0", NUMBA_THREADING_LAYER="workqueue",
               MPLBACKEND="Agg", MEDPOSE_TRACE_SAMPLES="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    args = ["--config", "hip_demo", "--no-test", *TINY, "data.oversample_type2=1", f"data.root={phantom}",
            f"log.run_dir={run_dir}", f"train.max_steps={steps}", f"train.ckpt_every={ckpt_every}"]

    def launch():
        return subprocess.run(["bash", str(LAUNCH / "torchrun_single.sh"), *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    proc = launch()
    if proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stderr and not (run_dir / "metrics.jsonl").exists():
        proc = launch()
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def _train_size(log: str) -> int:
    m = re.search(r"data \(\w+\): (\d+) train \((\d+) after oversampling\)", log)
    assert m, log[-3000:]
    return int(m.group(2))


def _taken(run_dir: Path) -> dict[int, list[tuple[int, int, list[int]]]]:
    """epoch -> [(rank, step, indices of one micro-batch)] over every rank's trace."""
    out: dict[int, list] = {}
    for f in sorted(run_dir.glob("samples_rank*.jsonl")):
        rank = int(f.stem.removeprefix("samples_rank"))
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["epoch"], []).append((rank, row["step"], row["index"]))
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_every_sample_of_the_epoch_once_across_a_world_size_change(tmp_path, phantom, before, after):
    run = tmp_path / "run"
    first = _launch(run, phantom, before, steps=3, ckpt_every=3)
    n = _train_size(first.stderr)
    batch = 2
    assert 3 * batch * before < n
    steps_left = (n - 3 * batch * before) // (batch * after)         # the rest of epoch 0 on the new ranks
    second = _launch(run, phantom, after, steps=3 + steps_left + 2, ckpt_every=50)
    assert f"saved with world size {before}, resuming with {after}" in second.stderr
    assert "re-sharded" in second.stderr

    taken = _taken(run)
    epoch0 = [i for _, _, idx in taken[0] for i in idx]
    assert len(epoch0) == len(set(epoch0)), "a sample of epoch 0 was used twice across the change"
    assert len(epoch0) == 3 * batch * before + steps_left * batch * after
    assert n - len(epoch0) < batch * after            # only a tail smaller than one batch per new rank is left
    assert set(epoch0) <= set(range(n))
    # after the change, each new rank took the same number of batches of epoch 0 (DDP's collectives line up)
    per_rank = {}
    for rank, step, _ in taken[0]:
        if step > 3:
            per_rank[rank] = per_rank.get(rank, 0) + 1
    assert per_rank == dict.fromkeys(range(after), steps_left)
    # epoch 1 starts from its own permutation's beginning on the new ranks
    assert len(taken[1]) == 2 * after
    ckpt = torch.load(run / "checkpoints" / f"ckpt_step{3 + steps_left + 2:08d}.pt", map_location="cpu",
                      weights_only=True)
    assert ckpt["client"]["world_size"] == after
    assert ckpt["client"]["data_pos"]["epoch"] == 1
    assert ckpt["client"]["data_pos"]["samples"] == 2 * batch * after
