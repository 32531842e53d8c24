"""fp16's loss scaler backing off is a skipped step, never a divergence: SingleStrategy.step answers LossScaleSkip
when the scaler finds inf/NaN gradients (weights untouched, scale halved), and the trainer counts such steps
(`loss_scale_skips` in metrics.jsonl) and goes on under the default train.nan_policy=stop; only a long run of them in
a row stops training."""
import json

import pytest
import torch

from engine.dist import DistInfo
from engine.strategies import LossScaleSkip, SingleStrategy

from test_train_e2e import _cfg, phantom_root  # noqa: F401 (fixture)


def _cpu_info() -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), source="none")


def test_fp16_scaler_overflow_is_a_loss_scale_skip_on_the_cpu():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    strategy = SingleStrategy(_cpu_info(), precision="fp16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy.setup(model, opt)
    init = 2.0 ** 127                       # scaled gradients overflow fp32: inf
    strategy.scaler = torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1000)
    x = torch.full((8, 4), 3.0)
    before = [p.detach().clone() for p in model.parameters()]
    answers = []
    for _ in range(40):
        strategy.backward((model(x) ** 2).mean() * 1e3)
        out = strategy.step()
        answers.append(out)
        if not isinstance(out, LossScaleSkip):
            break
    skips = [a for a in answers if isinstance(a, LossScaleSkip)]
    assert len(skips) >= 1 and isinstance(answers[-1], float), answers
    # each back-off halves the scale, and the answer carries the new one
    assert [s.scale for s in skips] == [init / 2 ** (i + 1) for i in range(len(skips))]
    # the skipped steps left the weights alone; the applied one moved them
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_fp32_non_finite_gradients_are_still_none():
    model = torch.nn.Linear(2, 1)
    strategy = SingleStrategy(_cpu_info(), precision="fp32")
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.backward(model(torch.tensor([[float("inf"), 1.0]])).sum())
    assert strategy.step() is None


def _steps_with_skips(monkeypatch, skip_calls: set[int]):
    """SingleStrategy.step answers LossScaleSkip on the given (1-based) calls, as fp16's scaler does on overflow."""
    real = SingleStrategy.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] in skip_calls:
            self.optimizer.zero_grad(set_to_none=True)
            return LossScaleSkip(2.0 ** (16 - calls["n"]))
        return real(self)
    monkeypatch.setattr(SingleStrategy, "step", step)


def test_trainer_counts_loss_scale_skips_and_goes_on(tmp_path, phantom_root, monkeypatch):  # noqa: F811
    from engine.run import train
    _steps_with_skips(monkeypatch, {2, 3})
    cfg = _cfg(tmp_path, phantom_root, "train.max_steps=6", "train.eval_every=0", "train.log_every=1",
               "train.nan_policy=stop")
    result = train(cfg, final_test=False)
    assert result["step"] == 6 and result["loss_scale_skips"] == 2 and result["skipped_steps"] == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
    # a row per applied step; the skipped steps 2 and 3 have no figures of their own but are counted
    assert sorted(train_rows) == [1, 4, 5, 6]
    assert [train_rows[s]["loss_scale_skips"] for s in (1, 4, 5, 6)] == [0, 2, 2, 2]
    assert all(train_rows[s]["skipped_steps"] == 0 for s in train_rows)
    assert "fp16 gradients overflowed" in (tmp_path / "train.log").read_text()


def test_a_long_run_of_back_offs_is_a_divergence(tmp_path, phantom_root, monkeypatch):  # noqa: F811
    from engine import trainer as trainer_mod
    from engine.run import train
    monkeypatch.setattr(trainer_mod, "MAX_LOSS_SCALE_SKIPS", 3)
    _steps_with_skips(monkeypatch, set(range(2, 100)))
    cfg = _cfg(tmp_path, phantom_root, "train.max_steps=10", "train.eval_every=0", "train.ckpt_every=1",
               "train.log_every=1")
    with pytest.raises(trainer_mod.TrainingDiverged, match="overflowed 4 steps in a row"):
        train(cfg, final_test=False)
