"""Contrastive pre-training (issue 7): the memory bank's FIFO queue, InfoNCE against a hand-computed value, the
auto feature layer, `medpose pretrain` end to end and its encoder loading into fine-tuning with model.init_from."""
import json
import math

import pytest
import torch

from engine.pretrain import MemoryBank, info_nce, init_weights, pick_layer


def test_memory_bank_is_a_fifo_queue():
    bank = MemoryBank(4, 2)
    a = torch.arange(6.0).view(3, 2)
    bank.push(a)
    assert int(bank.ptr) == 3 and torch.equal(bank.keys[:3], a)
    b = 10 + torch.arange(6.0).view(3, 2)
    before = bank.keys[2].clone()
    bank.push(b)                               # wraps: slot 3, then the oldest slots 0 and 1
    assert int(bank.ptr) == 2
    assert torch.equal(bank.keys[3], b[0]) and torch.equal(bank.keys[0], b[1]) and torch.equal(bank.keys[1], b[2])
    assert torch.equal(bank.keys[2], before)   # the newest of the first batch is still there
    c = 100 + torch.arange(12.0).view(6, 2)    # more keys than slots: the last 4 are kept
    bank.push(c)
    assert sorted(bank.keys[:, 0].tolist()) == sorted(c[2:, 0].tolist())


def test_info_nce_hand_value():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits / T = (1, 0, -1) / 0.5 = (2, 0, -2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert float(info_nce(q, k, bank, 0.5)) == pytest.approx(expected, rel=1e-6)


def test_auto_layer_is_the_bottleneck():
    from models.seg import build_seg_model
    model = build_seg_model("simple_unet", in_channels=3, num_classes=2, base=4)
    name, channels = pick_layer(model, torch.randn(1, 3, 32, 32), "auto")
    feats = {}
    model.get_submodule(name).register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert feats["o"].shape[1] == channels and feats["o"].shape[-1] == 32 // 8     # 3 poolings
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="no module 'nope'"):
        pick_layer(model, torch.randn(1, 3, 32, 32), "nope")


@pytest.fixture(scope="module")
def hc18_root(tmp_path_factory):
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    root = tmp_path_factory.mktemp("hc18")
    generate_hc18_dataset(root, 24, seed=4, image_hw=(135, 200))
    return root


ARGS = ["--config", "seg_zoo", "data.num_workers=0", "data.num_folds=4", "log.progress=false",
        "data.input_hw=[64, 96]", "model.name=simple_unet", "model.args={num_classes: 2, base: 4}",
        "pretrain.batch_size=4", "pretrain.bank_size=32", "optim.lr=1e-3"]


def test_pretrain_then_fine_tune_from_the_encoder(tmp_path, hc18_root):
    from engine.config import ConfigError, load_config
    from engine.run import build_model
    from launch.cli import main
    out = tmp_path / "pre"
    assert main(["pretrain", *ARGS, f"data.root={hc18_root}", "pretrain.steps=12", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in rows)
    assert summary["chance_loss"] == pytest.approx(math.log(33))
    assert (out / "pretrain_loss.png").is_file()
    saved = torch.load(out / "encoder.pt", weights_only=True)
    assert saved["layer"] == summary["layer"] and saved["model"] == "simple_unet"
    # the encoder moved away from its initialisation
    cfg = load_config(None, ["data.task=segmentation", "model.name=simple_unet",
                             "model.args={num_classes: 2, base: 4}", "train.seed=967"])
    torch.manual_seed(967)
    fresh = build_model(cfg)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in saved["encoder"].items()
               if v.is_floating_point())
    # fine-tuning starts from exactly those weights
    cfg = load_config(None, ["data.task=segmentation", "model.name=simple_unet",
                             "model.args={num_classes: 2, base: 4}", f"model.init_from={out / 'encoder.pt'}"])
    model = build_model(cfg)
    for k, v in saved["encoder"].items():
        assert torch.equal(model.state_dict()[k], v), k
    # and a training run accepts it
    run = tmp_path / "ft"
    assert main(["train", "--no-test", *ARGS, f"data.root={hc18_root}", f"log.run_dir={run}", "train.max_steps=2",
                 "train.eval_every=0", f"model.init_from={out / 'encoder.pt'}"]) == 0
    assert "model.init_from" in (run / "train.log").read_text()
    # another width shares no weight shape: a clear error naming the file
    other = load_config(None, ["data.task=segmentation", "model.name=simple_unet",
                               "model.args={num_classes: 2, base: 8}",
                               f"model.init_from={out / 'encoder.pt'}"])
    with pytest.raises(ConfigError, match=r"encoder.pt: model.init_from: only \d+\.\d % of its weights match"):
        build_model(other)
    with pytest.raises(FileNotFoundError, match="missing.pt: model.init_from file not found"):
        init_weights(model, tmp_path / "missing.pt")
