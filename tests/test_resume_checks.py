"""Named, early errors instead of silent or raw failures (issue 15, items 5, 7 and 8), on a tiny single-process run.

* A resume file that cannot restore the optimizer and scheduler (a consolidated or DeepSpeed checkpoint under
  single/DDP) stops with a message that names what is missing and offers --resume-weights-only, which starts a
  fresh run (step 0, fresh optimizer and LR schedule) from the file's weights.
* A truncated resume file, one without training state, a training split smaller than one batch per rank, an
  unknown model.name: each a one-line error naming the file or the field, before any data is generated.
* A failed launch leaves no run directory behind, unless its train.log holds a traceback worth keeping: a bug
  (here a ZeroDivisionError inside a sample's decode) is named by its file on the console and keeps its traceback,
  cause chain included, in train.log.
"""
import json

import pytest
import torch

from engine.checkpoint import atomic_torch_save, find_latest, load_checkpoint_file
from launch.cli import main

TINY = [
    "data.synth_n=40", "data.synth_image_hw=[96, 128]", "data.input_hw=[64, 96]", "data.sigma_px=1.5",
    "data.num_workers=0", "data.num_folds=4",
    "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
    "model.criterion_args={balance: fixed}", "train.batch_size=4", "log.progress=false", "log.tensorboard=false",
    "log.overlays=0", "train.eval_every=0", "train.log_every=1",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("phantom")
    generate_hip_dataset(root, 40, seed=3, image_hw=(96, 128))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom):
    """A 2-step single-process run; returns its last checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "--no-test", *TINY, f"data.root={phantom}", f"log.runs_root={runs}", "log.name=src",
                 "train.max_steps=2"]) == 0
    return find_latest(runs / "src" / "checkpoints")


def _train(tmp_path, phantom, *args):
    from engine.logger import setup_console_logging
    setup_console_logging(0)  # the console handler writes to this test's captured stderr
    return main(["train", "--no-test", *TINY, f"data.root={phantom}", f"log.runs_root={tmp_path / 'runs'}",
                 "train.max_steps=1", *args])


def _error_line(err: str, command: str = "train") -> str:
    """The CLI's error: exactly one line (the run's INFO lines go to stderr too), and no traceback on the console."""
    lines = [line for line in err.splitlines() if line.startswith(f"medpose {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_engine_checkpoint_loads_with_the_weights_only_unpickler(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["client"]["step"] == 2 and ckpt["optimizer"] is not None and ckpt["scheduler"] is not None
    assert len(ckpt["client"]["rng_per_rank"]) == 1


@pytest.mark.parametrize("kind", ["consolidated", "deepspeed"])
def test_resume_without_optimizer_state_names_what_is_missing(trained, tmp_path, phantom, capsys, kind):
    """Before: the optimizer and scheduler were skipped without a word and the LR schedule restarted at 0."""
    ckpt = load_checkpoint_file(trained)
    path = tmp_path / f"{kind}.pt"
    if kind == "consolidated":   # what engine.consolidate writes
        atomic_torch_save({"model": ckpt["model"], "client": ckpt["client"], "consolidated_from": "x.pt"}, path)
    else:                        # a deepspeed checkpoint file (consolidated weights + shard pointer)
        atomic_torch_save({"model": ckpt["model"], "client": ckpt["client"], "format": "medpose-deepspeed-1",
                           "deepspeed": {"dir": "deepspeed", "tag": "t", "zero_stage": 2, "world_size": 2,
                                         "config": {}}}, path)
    assert _train(tmp_path, phantom, "--resume", str(path), "log.name=r") == 2
    err = _error_line(capsys.readouterr().err)
    assert str(path) in err and "optimizer" in err and "scheduler" in err and "--resume-weights-only" in err
    if kind == "deepspeed":
        assert "dist.strategy=deepspeed" in err and "2 processes" in err
    assert not (tmp_path / "runs" / "r").exists()  # the failed launch left no run directory


@pytest.mark.parametrize("kind", ["weights_only", "truncated"])
def test_resume_file_without_training_state_or_truncated(trained, tmp_path, phantom, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "weights_only":   # before: KeyError: 'data_pos'
        atomic_torch_save({"model": load_checkpoint_file(trained)["model"]}, path)
        expected = "no training state (client) in this checkpoint"
    else:                        # before: a raw PytorchStreamReader traceback
        data = trained.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "not a readable MedPose checkpoint"
    assert _train(tmp_path, phantom, "--resume", str(path), "log.name=r") == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith(f"medpose train: error: {path}: {expected}"), err
    if kind == "weights_only":
        assert "--resume-weights-only" in err
    assert not (tmp_path / "runs" / "r").exists()


def test_resume_weights_only_starts_a_fresh_run_from_the_weights(trained, tmp_path, phantom):
    ckpt = load_checkpoint_file(trained)
    path = tmp_path / "consolidated.pt"
    atomic_torch_save({"model": ckpt["model"], "client": ckpt["client"], "consolidated_from": "x.pt"}, path)
    # optim.lr=0: the weights after one step are the loaded ones, exactly
    assert _train(tmp_path, phantom, "--resume", str(path), "--resume-weights-only", "log.name=w",
                  "optim.lr=0", "optim.weight_decay=0") == 0
    out = load_checkpoint_file(find_latest(tmp_path / "runs" / "w" / "checkpoints"))
    assert out["client"]["step"] == 1                          # started at step 0
    for name, value in ckpt["model"].items():
        torch.testing.assert_close(out["model"][name], value, rtol=0, atol=0, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1]
    # the source run is untouched (its metrics and checkpoints are not rewritten by the new run)
    assert load_checkpoint_file(trained)["client"]["step"] == 2


def test_resume_weights_only_needs_resume(tmp_path, phantom, capsys):
    assert _train(tmp_path, phantom, "--resume-weights-only", "log.name=x") == 2
    assert "--resume-weights-only needs --resume" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_too_small_training_split_is_a_config_error_and_leaves_no_run_dir(tmp_path, phantom, capsys):
    for _ in range(2):  # before: a ShardedSampler traceback, and runs/small, runs/small-2 left behind
        assert _train(tmp_path, phantom, "train.batch_size=64", "log.name=small") == 2
        err = _error_line(capsys.readouterr().err)
        assert "train.batch_size=64" in err and "world size 1" in err and "training split" in err
        assert f"data.root={phantom}" in err
    assert not (tmp_path / "runs").exists() or sorted(p.name for p in (tmp_path / "runs").iterdir()) == []


def test_unknown_model_name_before_any_data_is_generated(tmp_path):
    """Before: `medpose pretrain model.name=...` generated the synthetic data set first."""
    from engine.config import ConfigError, load_config
    from engine.pretrain import pretrain
    root = tmp_path / "synth"
    cfg = load_config(None, ["model.name=no_such_net", f"data.root={root}", "data.synth_n=8"])
    with pytest.raises(ConfigError, match="model.name: unknown model 'no_such_net'"):
        pretrain(cfg, tmp_path / "out")
    assert not root.exists()


def test_a_bug_in_decoding_names_the_file_and_keeps_its_traceback_in_train_log(tmp_path, phantom, capsys,
                                                                                monkeypatch):
    import data_pipelines.dataset as dataset

    def broken_decode_mask(mask, hw, where):
        return len(hw) / 0  # stands in for a bug in our own decode code

    monkeypatch.setattr(dataset, "decode_mask", broken_decode_mask)
    assert _train(tmp_path, phantom, "log.name=bug") == 2
    err = _error_line(capsys.readouterr().err)
    assert str(phantom) in err and "ZeroDivisionError" in err           # the file, and what went wrong
    log = tmp_path / "runs" / "bug" / "train.log"
    assert str(log) in err                                               # where the traceback is
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text
    assert "in broken_decode_mask" in text and "return len(hw) / 0" in text   # the cause's own frame
    assert "in decode" in text and "dataset.py" in text


def test_a_worker_data_error_is_one_line_on_the_console(monkeypatch, capsys):
    """With num_workers > 0 torch's DataLoader re-raises a worker's DataError with the worker's whole traceback as
    its message: the console gets its file and problem, one line."""
    import launch.cli as cli
    from data_pipelines.errors import DataError
    worker = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "data_pipelines/errors.py", line 48, in naming_file\n'
              "data_pipelines.errors.DataError: /data/a/1001_1.json: failed to load (ZeroDivisionError: division "
              "by zero)\n")

    def fails(args):
        raise DataError(worker)

    monkeypatch.setattr(cli, "_cmd_predict", fails)
    assert cli.main(["predict", "--checkpoint", "x.pt", "in.png", "--out", "o"]) == 2
    assert capsys.readouterr().err == ("medpose predict: error: /data/a/1001_1.json: failed to load "
                                       "(ZeroDivisionError: division by zero)\n")


def test_a_single_checkpoint_cannot_resume_a_deepspeed_run(trained, tmp_path):
    """The reverse direction (what DeepSpeedStrategy.load and engine/run.py check before any data is made)."""
    from engine.checkpoint import CheckpointError
    from engine.strategies import check_resumable
    ckpt = load_checkpoint_file(trained)
    check_resumable(trained, ckpt, "single", 1)                       # its own strategy: fine
    check_resumable(trained, ckpt, "ddp", 2)                          # DDP re-shards the epoch over 2 ranks
    with pytest.raises(CheckpointError) as err:
        check_resumable(trained, ckpt, "deepspeed", 2)
    msg = str(err.value)
    assert msg.startswith(f"{trained}: written by the single/ddp strategy, it has no DeepSpeed shards")
    assert "--resume-weights-only" in msg
    ds = {**ckpt, "deepspeed": {"dir": "deepspeed", "tag": "t", "zero_stage": 1, "world_size": 4}}
    with pytest.raises(CheckpointError, match=r"written by 4 processes, this run has 2; resume with 4 processes, "
                                              r"or start a new run from its weights with --resume-weights-only"):
        check_resumable(trained, ds, "deepspeed", 2)
