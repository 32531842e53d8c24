import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.checkpoint import (atomic_torch_save, checkpoint_path, find_latest, load_checkpoint_file,
                               prune_checkpoints, update_latest)


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "ckpt_step00000001.pt"
    atomic_torch_save({"a": torch.arange(3)}, p)
    atomic_torch_save({"a": torch.arange(5)}, p)
    assert torch.equal(torch.load(p)["a"], torch.arange(5))
    assert [f.name for f in tmp_path.iterdir()] == [p.name]


def test_latest_pointer_and_pruning(tmp_path):
    for step in (10, 20, 30):
        path = checkpoint_path(tmp_path, step)
        atomic_torch_save({"step": step}, path)
        update_latest(tmp_path, path)
        prune_checkpoints(tmp_path, keep_last=2)
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 30)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_step00000020.pt", "ckpt_step00000030.pt"]
    (tmp_path / "latest").write_text("ckpt_step00000099.pt\n")  # stale pointer: fall back to the newest file
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 30)


def test_pruning_never_deletes_the_newest_and_removes_stale_temp_files(tmp_path):
    for step in (1, 2):
        atomic_torch_save({"step": step}, checkpoint_path(tmp_path, step))
    stale = tmp_path / ".ckpt_step00000003.pt.x1y2.tmp"     # what a writer SIGKILLed before its rename leaves
    stale.write_bytes(b"partial")
    prune_checkpoints(tmp_path, keep_last=0)                  # 0 would mean "keep none": the newest stays anyway
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_step00000002.pt"]
    from engine.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.keep_last: must be >= 1"):
        load_config(None, ["train.keep_last=0"])


def test_a_fault_before_the_rename_leaves_the_old_file_in_place(tmp_path):
    p = tmp_path / "ckpt_step00000001.pt"
    atomic_torch_save({"v": 1}, p)

    def die():
        raise KeyboardInterrupt   # stands in for the process dying between the complete temp file and the rename
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": 2}, p, before_publish=die)
    assert torch.load(p)["v"] == 1 and [f.name for f in tmp_path.iterdir()] == [p.name]


def test_truncated_checkpoint_error_names_file(tmp_path):
    from engine.checkpoint import CheckpointError
    p = tmp_path / "broken.pt"
    p.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"broken\.pt: not a readable MedPose checkpoint .*truncated"):
        load_checkpoint_file(p)


WRITER = r"""
import sys, torch
from engine.checkpoint import atomic_torch_save, checkpoint_path, update_latest
d = sys.argv[1]
big = {"w": torch.randn(64, 1024, 1024)}  # 256 MiB: the write takes long enough to be killed mid-way
print("ready", flush=True)
p = checkpoint_path(d, 2)
atomic_torch_save(big, p)
update_latest(d, p)
"""


def test_kill_during_write_keeps_previous_checkpoint_loadable(tmp_path):
    first = checkpoint_path(tmp_path, 1)
    atomic_torch_save({"w": torch.ones(3)}, first)
    update_latest(tmp_path, first)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    # wait until the temporary file exists, then kill the writer mid-write
    deadline = time.time() + 60
    while not any(f.name.endswith(".tmp") for f in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = find_latest(tmp_path)
    assert latest == first
    assert torch.equal(load_checkpoint_file(latest)["w"], torch.ones(3))
