"""Untrusted files never run code (issue 15, item 6): every torch file a user names — `medpose eval --checkpoint`,
`predict --checkpoint`, `train --resume`, `model.args.weights`, `model.init_from`, DeepSpeed shard folders — is
loaded with torch's weights-only unpickler. A pickle that would execute code is refused, the error names the file
and the opt-out (MEDPOSE_TRUST_CHECKPOINTS=1), and the code does not run. The engine's own checkpoints (RNG states,
config, client state) load under that unpickler."""
import os
import random

import numpy as np
import pytest
import torch

from engine.checkpoint import (TRUST_ENV, CheckpointError, atomic_torch_save, capture_rng, load_checkpoint_file,
                               restore_rng)


class _RunsCode:
    """Unpickling this calls os.system: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _evil_file(path, marker, layout="checkpoint"):
    payload = _RunsCode(marker)
    if layout == "checkpoint":
        obj = {"model": {"w": torch.zeros(2)}, "client": {"step": 1, "data_pos": {"epoch": 0, "samples": 0},
                                                          "note": payload}}
    else:  # a plain state_dict whose tensor sits beside the payload
        obj = {"weight": torch.zeros(2), "payload": payload}
    torch.save(obj, path)
    return path


@pytest.fixture()
def evil(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "code_ran"
    return _evil_file(tmp_path / "evil.pt", marker), marker


def _assert_refused(message: str, path, marker) -> None:
    assert str(path) in message, message
    assert TRUST_ENV in message, message
    assert not marker.exists(), "the pickle's code ran"


def test_the_payload_runs_code_when_trusted_and_is_refused_by_default(evil, monkeypatch):
    path, marker = evil
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    _assert_refused(str(err.value), path, marker)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)  # what it refused, named
    monkeypatch.setenv(TRUST_ENV, "1")  # the opt-out: the file is loaded the old way (and the payload runs)
    assert load_checkpoint_file(path)["client"]["step"] == 1
    assert marker.exists()


def test_cli_eval_and_predict_refuse_the_file(evil, tmp_path, capsys):
    from launch.cli import main
    path, marker = evil
    assert main(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "eval")]) == 2
    _assert_refused(capsys.readouterr().err, path, marker)
    image = tmp_path / "in.png"
    image.write_bytes(b"")
    assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    _assert_refused(err, path, marker)
    assert err.startswith("medpose predict: error: ") and err.count("\n") == 1  # one line, no traceback


def test_cli_train_resume_refuses_the_file_before_any_data_is_made(evil, tmp_path, capsys):
    from launch.cli import main
    path, marker = evil
    data_root = tmp_path / "phantom"
    rc = main(["train", "--resume", str(path), f"log.runs_root={tmp_path / 'runs'}", "log.name=r",
               f"data.root={data_root}", "data.synth_n=40", "data.synth_image_hw=[96, 128]",
               "data.input_hw=[64, 96]", "data.num_workers=0", "data.num_folds=4", "train.batch_size=4",
               "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
               "train.max_steps=1", "log.progress=false", "log.tensorboard=false"])
    assert rc == 2
    _assert_refused(capsys.readouterr().err, path, marker)
    assert not data_root.exists()                   # refused before the phantom was generated


def test_model_weights_and_init_from_refuse_the_file(evil, tmp_path):
    from engine.config import ConfigError, load_config
    from engine.run import build_model
    path, marker = evil
    plain = _evil_file(tmp_path / "weights.pt", marker, layout="state_dict")
    for file in (path, plain):
        with pytest.raises(CheckpointError) as err:      # a segmentation-zoo model's model.args.weights
            build_model(load_config(None, ["model.name=unet", f"model.args={{weights: '{file}'}}"]))
        _assert_refused(str(err.value), file, marker)
        assert "model.args.weights" in str(err.value)
        with pytest.raises(ConfigError) as err:          # model.init_from (engine/pretrain.init_weights)
            build_model(load_config(None, ["model.name=unet", f"model.init_from={file}"]))
        _assert_refused(str(err.value), file, marker)
        assert "model.init_from" in str(err.value)
        with pytest.raises(ValueError) as err:           # the landmark networks' weights= (models/landmark_nets.py)
            build_model(load_config(None, ["model.name=landmark_unet", f"model.args={{weights: '{file}'}}"]))
        assert str(file) in str(err.value) and not marker.exists()


def test_engine_rng_state_loads_weights_only_and_restores_the_streams(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"client": {"rng_per_rank": [capture_rng()]}}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = torch.load(path, map_location="cpu", weights_only=True)   # no allow-list needed
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(loaded["client"]["rng_per_rank"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_an_old_checkpoint_with_numpy_objects_needs_the_opt_out(tmp_path, monkeypatch):
    """Checkpoints written before the RNG state was stored as plain containers hold numpy arrays: refused by
    default (with the way out named), loaded with MEDPOSE_TRUST_CHECKPOINTS=1, and their RNG state restores."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path = tmp_path / "old.pt"
    np.random.seed(3)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"model": {}, "client": {"step": 2, "rng_per_rank": [old_rng]}}, path)
    expected = np.random.rand()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value) and TRUST_ENV in str(err.value) and "numpy" in str(err.value)
    monkeypatch.setenv(TRUST_ENV, "1")
    client = load_checkpoint_file(path)["client"]
    np.random.seed(0)
    restore_rng(client["rng_per_rank"][0])
    assert np.random.rand() == expected


@pytest.mark.deepspeed
def test_deepspeed_shards_are_checked_before_deepspeed_loads_them(tmp_path, monkeypatch):
    """DeepSpeed reads its shard files with weights_only=False: the engine checks every file of the shard folder
    with the weights-only unpickler first (consolidation on demand, engine.consolidate and the strategy's load)."""
    from engine.consolidate import checkpoint_weights, consolidate
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "code_ran"
    tag = tmp_path / "deepspeed" / "ckpt_step00000002-abcd1234"
    tag.mkdir(parents=True)
    shard = _evil_file(tag / "mp_rank_00_model_states.pt", marker, layout="state_dict")
    _evil_file(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, layout="state_dict")
    ckpt = tmp_path / "ckpt_step00000002.pt"
    atomic_torch_save({"model": None, "client": {"step": 2}, "format": "medpose-deepspeed-1",
                       "deepspeed": {"dir": "deepspeed", "tag": tag.name, "zero_stage": 2, "world_size": 1,
                                     "config": {}}}, ckpt)
    for load in (checkpoint_weights, consolidate):
        with pytest.raises(CheckpointError) as err:
            load(ckpt)
        assert str(tag) in str(err.value) and TRUST_ENV in str(err.value)
        assert shard.name in str(err.value) or "optim_states" in str(err.value)
        assert not marker.exists()


def test_plain_state_leaves_only_what_the_weights_only_unpickler_reads(tmp_path):
    from pathlib import Path

    from engine.checkpoint import plain_state
    state = {"spacing": np.float64(0.1), "kpts": np.arange(4, dtype=np.int32).reshape(2, 2),
             "version": torch.__version__, "where": Path("/data/x"), "names": ("a", "b"), "shape": torch.Size([2, 3]), "w": torch.ones(2)}
    path = tmp_path / "state.pt"
    torch.save(plain_state(state), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["spacing"] == 0.1 and type(loaded["spacing"]) is float
    assert loaded["kpts"] == [[0, 1], [2, 3]] and type(loaded["version"]) is str
    assert loaded["where"] == "/data/x" and loaded["names"] == ("a", "b") and loaded["shape"] == torch.Size([2, 3])
    assert torch.equal(loaded["w"], torch.ones(2))
