"""Fault tolerance, under DDP and DeepSpeed ZeRO-2 on 2 CPU ranks: a worker SIGKILLed mid-run under `torchrun
--max-restarts=1` (launch/torchrun_single.sh, which passes --resume auto) is restarted with its group, resumes from
the latest complete checkpoint and finishes with the same step count, losses and weights as an uninterrupted run; a
kill inside a checkpoint write leaves the previous checkpoint `latest` and loadable; `--resume auto` with no
checkpoint yet starts fresh.

The kills come from engine/faults.py's test hooks: MEDPOSE_FAULT_KILL_AT_STEP=4 and MEDPOSE_FAULT_RANK=1 make rank 1
SIGKILL itself right after step 4 (MEDPOSE_FAULT_KILL_IN_SAVE: inside the save), once per run directory (a marker
file keeps the restarted group from killing itself again). Checkpoints every 3 steps, so the restart resumes from step 3 and
redoes step 4. Measured: the resumed run's losses and final weights are bit-identical to the uninterrupted run's
(data position, every rank's RNG, optimizer and scheduler state are restored), so the comparison is exact.
"""
import json

import pytest
import torch

from engine.checkpoint import (atomic_torch_save, checkpoint_path, find_latest, load_checkpoint_file,
                               resolve_resume, update_latest)
from test_launchers import run_single_node_script


STRATEGIES = {"ddp": (), "zero2": ("dist.strategy=deepspeed", "dist.deepspeed.zero_stage=2")}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, phantom):
    """Uninterrupted 6-step runs (checkpoints every 3 steps), one per strategy, made on first use."""
    made = {}

    def get(strategy: str):
        if strategy not in made:
            if strategy != "ddp":
                pytest.importorskip("deepspeed")
            run_dir = tmp_path_factory.mktemp(f"uninterrupted_{strategy}")
            run_single_node_script(run_dir, phantom, steps=6, ckpt_every=3, extra_args=STRATEGIES[strategy])
            made[strategy] = run_dir
        return made[strategy]
    return get


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _assert_same_run(run_dir, ref_dir):
    """Same final step count, each step logged once, same losses and final weights (exact: measured bit-identical,
    since data position, every rank's RNG, optimizer and scheduler state are restored)."""
    rows, ref_rows = _train_rows(run_dir), _train_rows(ref_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3, 4, 5, 6]
    for r, q in zip(rows, ref_rows):
        for key in ("loss", "loss_kpt", "loss_seg", "grad_norm", "lr"):
            assert r[key] == q[key], (r["step"], key, r[key], q[key])
    last, ref_last = (load_checkpoint_file(find_latest(d / "checkpoints")) for d in (run_dir, ref_dir))
    assert last["client"]["step"] == ref_last["client"]["step"] == 6
    assert last["client"]["data_pos"] == ref_last["client"]["data_pos"]
    for name, w in ref_last["model"].items():
        assert torch.equal(last["model"][name], w), name


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_worker_is_restarted_and_resumes_to_the_same_result(tmp_path, phantom, reference, strategy):
    ref_dir, run_dir = reference(strategy), tmp_path / "killed"
    proc = run_single_node_script(run_dir, phantom, steps=6, ckpt_every=3, max_restarts=1,
                                  extra_args=STRATEGIES[strategy],
                                  extra_env={"MEDPOSE_FAULT_KILL_AT_STEP": "4", "MEDPOSE_FAULT_RANK": "1"})
    # the kill happened once, on rank 1 after step 4, and torchrun restarted the worker group
    assert (run_dir / ".fault_injected_step4_rank1").is_file()
    assert "rank 1 kills itself after step 4" in proc.stderr
    assert "exitcode  : -9" in proc.stderr or "exitcode: -9" in proc.stderr      # SIGKILL reported by torchrun
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "ckpt_step00000003.pt at step 3 (epoch 0, sample 12 of the epoch)" in log
    assert "resumed from" not in (ref_dir / "train.log").read_text()
    _assert_same_run(run_dir, ref_dir)


@pytest.mark.parametrize("strategy,rank", [("ddp", 0), ("zero2", 1)])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one_loadable(tmp_path, phantom, reference, strategy,
                                                                        rank):
    """SIGKILL inside the save of step 6 (checkpoints at 3 and 6), no restart: under DDP rank 0 (the writer) dies
    with its temp file complete but not renamed; under ZeRO-2 rank 1 dies with its DeepSpeed shards on disk but
    the checkpoint not published. The run fails; step 3 stays `latest` and loads, with the uninterrupted run's
    step-3 weights; a second launch with --resume auto finishes with the uninterrupted run's result and removes
    what the killed save left."""
    ref_dir, run_dir = reference(strategy), tmp_path / "killed_in_save"
    ckpts = run_dir / "checkpoints"
    proc = run_single_node_script(run_dir, phantom, steps=6, ckpt_every=3, check=False,
                                  extra_args=STRATEGIES[strategy],
                                  extra_env={"MEDPOSE_FAULT_KILL_IN_SAVE": "6", "MEDPOSE_FAULT_RANK": str(rank)})
    assert proc.returncode != 0
    assert (run_dir / f".fault_injected_save6_rank{rank}").is_file()
    assert f"rank {rank} kills itself while saving the checkpoint of step 6" in proc.stderr
    assert not checkpoint_path(ckpts, 6).exists()
    left = ([p.name for p in ckpts.glob(".ckpt_step00000006.pt.*.tmp")] if strategy == "ddp" else
            [p.name for p in (ckpts / "deepspeed").glob("ckpt_step00000006-*")])
    assert len(left) == 1, left                         # the killed write's leftovers exist ...
    assert resolve_resume("auto", run_dir) == checkpoint_path(ckpts, 3)     # ... and are never resumed
    prev, ref_prev = (load_checkpoint_file(checkpoint_path(d / "checkpoints", 3)) for d in (run_dir, ref_dir))
    assert prev["client"]["step"] == 3
    for name, w in ref_prev["model"].items():          # loadable, and the same weights as the uninterrupted run's
        assert torch.equal(prev["model"][name], w), name

    proc = run_single_node_script(run_dir, phantom, steps=6, ckpt_every=3, extra_args=STRATEGIES[strategy],
                                  extra_env={"MEDPOSE_FAULT_KILL_IN_SAVE": "6", "MEDPOSE_FAULT_RANK": str(rank)})
    assert "ckpt_step00000003.pt at step 3 (epoch 0, sample 12 of the epoch)" in (run_dir / "train.log").read_text()
    _assert_same_run(run_dir, ref_dir)
    assert not list(ckpts.glob(".ckpt_step*.tmp"))
    if strategy != "ddp":
        owners = sorted(d.name.rsplit("-", 1)[0] for d in (ckpts / "deepspeed").iterdir() if d.is_dir())
        assert owners == sorted(p.stem for p in ckpts.glob("*.pt"))   # one shard folder per checkpoint file


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    assert resolve_resume("auto", tmp_path / "not_created_yet") is None
    (tmp_path / "checkpoints").mkdir()
    assert resolve_resume("auto", tmp_path) is None
    (tmp_path / "checkpoints" / "latest").write_text("ckpt_step00000003.pt\n")   # pointer to a vanished file
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume(str(tmp_path), None)          # an explicit directory without checkpoints is an error


def test_partial_write_of_the_next_checkpoint_is_never_resumed(tmp_path):
    # What a kill during the trainer's save leaves behind: the complete step-3 checkpoint behind `latest`, and the
    # step-6 write either as a truncated temp file (killed inside torch.save) or complete but not yet pointed to
    # (killed between the rename and the `latest` update). --resume auto takes step 3 in both cases.
    ckpt_dir = tmp_path / "checkpoints"
    good = checkpoint_path(ckpt_dir, 3)
    atomic_torch_save({"model": {"w": torch.full((4,), 3.0)}, "client": {"step": 3}}, good)
    update_latest(ckpt_dir, good)
    full = tmp_path / "full.pt"
    torch.save({"model": {"w": torch.full((4,), 6.0)}, "client": {"step": 6}}, full)
    (ckpt_dir / ".ckpt_step00000006.pt.abc123.tmp").write_bytes(full.read_bytes()[:100])
    assert resolve_resume("auto", tmp_path) == good
    assert load_checkpoint_file(good)["client"]["step"] == 3
    full.rename(checkpoint_path(ckpt_dir, 6))
    assert resolve_resume("auto", tmp_path) == good
    assert torch.equal(load_checkpoint_file(resolve_resume("auto", tmp_path))["model"]["w"], torch.full((4,), 3.0))
