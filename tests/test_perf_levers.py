"""The training step's speed levers (config section `perf`, engine/perf.py): host_sync=log reads the device once per
log window yet gives the same weights, metrics and NaN handling as host_sync=step; channels_last and the optimizer
implementations train to the same result within rounding; torch.compile keeps the state_dict keys; cpu_malloc=keep
stops the page faults of re-allocated large tensors; impossible combinations are ConfigErrors before any data."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.perf import check_perf
from engine.run import train

from test_train_e2e import _cfg, phantom_root  # noqa: F401 (fixture)

COMMON = ["train.max_steps=8", "train.eval_every=0", "train.log_every=4", "train.ckpt_every=0", "optim.lr=2e-3",
          "optim.scheduler=constant", "perf.optimizer_impl=fused"]


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows if r["split"] == "train"]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "ckpt_step00000008.pt", weights_only=True)["model"]


def _nan_on_calls(monkeypatch, calls: set[int]):
    """The criterion answers a NaN loss on the given (1-based) training-mode calls."""
    from models.losses import MultiHipPoseCriterion
    real = MultiHipPoseCriterion.forward
    n = {"calls": 0}

    def forward(self, outputs, targets):
        out = real(self, outputs, targets)
        if self.training:
            n["calls"] += 1
            if n["calls"] in calls:
                out = {**out, "loss": out["loss"] * float("nan")}
        return out
    monkeypatch.setattr(MultiHipPoseCriterion, "forward", forward)


def test_host_sync_log_equals_host_sync_step(tmp_path, phantom_root):  # noqa: F811
    a, b = tmp_path / "step", tmp_path / "log"
    train(_cfg(a, phantom_root, *COMMON, "perf.host_sync=step"), final_test=False)
    train(_cfg(b, phantom_root, *COMMON, "perf.host_sync=log"), final_test=False)
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [4, 8] and rows_a == rows_b
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_host_sync_log_skips_a_nan_step_like_host_sync_step(tmp_path, phantom_root, monkeypatch):  # noqa: F811
    """nan_policy=skip: the NaN step (the 3rd) is not applied under either mode, counted in skipped_steps, and the
    weights and figures that follow are equal (constant LR: the schedule's position does not matter)."""
    out = {}
    for mode in ("step", "log"):
        _nan_on_calls(monkeypatch, {3})
        run = tmp_path / mode
        out[mode] = train(_cfg(run, phantom_root, *COMMON, "train.nan_policy=skip", f"perf.host_sync={mode}"),
                          final_test=False)
        monkeypatch.undo()
    assert out["step"]["skipped_steps"] == out["log"]["skipped_steps"] == 1
    rows_s, rows_l = _rows(tmp_path / "step"), _rows(tmp_path / "log")
    assert [r["skipped_steps"] for r in rows_l] == [1, 1] and rows_s == rows_l
    ws, wl = _weights(tmp_path / "step"), _weights(tmp_path / "log")
    assert all(torch.equal(ws[k], wl[k]) for k in ws)
    assert all(torch.isfinite(v).all() for v in wl.values() if v.is_floating_point())


def test_host_sync_log_stops_on_nan_before_the_next_checkpoint(tmp_path, phantom_root, monkeypatch):  # noqa: F811
    """nan_policy=stop: the NaN of step 5 is read at the step-8 window's end, before its checkpoint is written; the
    error names step 5 (0-based: 4) and the step-4 checkpoint is the last one, with finite weights."""
    from engine.checkpoint import find_latest
    from engine.trainer import TrainingDiverged
    _nan_on_calls(monkeypatch, {5})
    cfg = _cfg(tmp_path, phantom_root, *COMMON[:3], "train.ckpt_every=4", *COMMON[4:], "perf.host_sync=log")
    with pytest.raises(TrainingDiverged, match=r"step 4: loss or gradient norm is not finite"):
        train(cfg, final_test=False)
    latest = find_latest(tmp_path / "checkpoints")
    assert latest is not None and latest.name == "ckpt_step00000004.pt"


def test_channels_last_and_optimizer_impls_train_alike(tmp_path, phantom_root):  # noqa: F811
    base = [c for c in COMMON if not c.startswith("perf.")]
    runs = {"ref": ["perf.optimizer_impl=for"], "foreach": ["perf.optimizer_impl=foreach"],
            "fused_cl": ["perf.optimizer_impl=fused", "perf.channels_last=true"]}
    weights = {}
    for name, extra in runs.items():
        train(_cfg(tmp_path / name, phantom_root, *base, *extra), final_test=False)
        weights[name] = _weights(tmp_path / name)
    ref, foreach, fused_cl = weights["ref"], weights["foreach"], weights["fused_cl"]
    # foreach does the same arithmetic as the per-tensor loop here: equal bit for bit
    assert all(torch.equal(foreach[k], ref[k]) for k in ref)
    # fused + channels-last reorder the floating-point work: the same training within rounding (Adam's normalised
    # steps amplify single weights' rounding, so the check is on the whole model and on the losses)
    num = sum(float((fused_cl[k].double() - v.double()).pow(2).sum()) for k, v in ref.items() if v.is_floating_point())
    den = sum(float(v.double().pow(2).sum()) for v in ref.values() if v.is_floating_point())
    assert (num / den) ** 0.5 < 1e-2
    losses = {name: [r["loss"] for r in _rows(tmp_path / name)] for name in runs}
    assert losses["fused_cl"] == pytest.approx(losses["ref"], rel=1e-3)
    assert losses["fused_cl"] != losses["ref"]   # the levers were in effect


def test_compile_keeps_the_modules_state_dict_keys_and_outputs():
    """nn.Module.compile in place: same object, same state_dict keys (no `_orig_mod.` prefix), same outputs and
    gradients within rounding (a small network: compiling MultiHipPoseNet takes minutes on a CPU)."""
    from engine.perf import compile_modules
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 2, 1))
    criterion = torch.nn.MSELoss()
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 2, 16, 16)
    keys = list(model.state_dict())
    eager = criterion(model(x), y)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compile_modules(load_config(None, ["perf.compile=both"]), model, criterion)
    compiled = criterion(model(x), y)
    compiled.backward()
    assert list(model.state_dict()) == keys
    assert float(compiled) == pytest.approx(float(eager), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_trainer_with_a_compiled_criterion_trains_like_eager(tmp_path, phantom_root):  # noqa: F811
    base = [c for c in COMMON if c != "train.max_steps=8"] + ["train.max_steps=4", "train.log_every=2",
                                                              "train.ckpt_every=4"]
    train(_cfg(tmp_path / "eager", phantom_root, *base), final_test=False)
    train(_cfg(tmp_path / "compiled", phantom_root, *base, "perf.compile=loss"), final_test=False)
    la = [r["loss"] for r in _rows(tmp_path / "eager")]
    lb = [r["loss"] for r in _rows(tmp_path / "compiled")]
    assert len(la) == 2 and lb == pytest.approx(la, rel=1e-4)
    a = torch.load(tmp_path / "eager" / "checkpoints" / "ckpt_step00000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoints" / "ckpt_step00000004.pt", weights_only=True)["model"]
    assert list(a) == list(b)


@pytest.mark.parametrize("overrides, match", [
    (["optim.name=rmsprop", "perf.optimizer_impl=fused"], "no fused rmsprop"),
    (["optim.name=sgd", "perf.host_sync=log"], "only adam/adamw"),
    (["perf.optimizer_impl=foreach", "perf.host_sync=log"], "needs the fused optimizer"),
    (["train.precision=fp16", "perf.host_sync=log"], "fp16"),
    (["dist.strategy=deepspeed", "perf.host_sync=log"], "DeepSpeed"),
])
def test_impossible_lever_combinations_are_config_errors(overrides, match):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=match):
        check_perf(cfg, cfg.dist.strategy, cfg.train.precision)


def test_unknown_perf_key_is_a_config_error():
    with pytest.raises(ConfigError, match="perf"):
        load_config(None, ["perf.chanels_last=true"])


def test_cpu_malloc_keep_stops_page_faults_of_reallocated_tensors():
    """Allocating and freeing a 64 MB tensor 20 times: glibc's defaults return it to the OS each time (>= 16k minor
    page faults per round); cpu_malloc=keep reuses it (a few rounds' worth in all)."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from engine.perf import apply_cpu_malloc
        if sys.argv[1] == "keep":
            assert apply_cpu_malloc("keep", torch.device("cpu")) == "keep"
        torch.ones(16 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            x = torch.ones(16 << 20)   # 64 MB, written in full
            del x
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {}
    for mode in ("system", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    assert faults["system"] >= 20 * 16_000, faults
    assert faults["keep"] < 2 * 16_384, faults


def test_host_sync_log_under_ddp_equals_host_sync_step(tmp_path, phantom_root):  # noqa: F811
    """2 ranks (torchrun, gloo): the finiteness flag is all-reduced on the device and the window read at the log
    line; metrics.jsonl and the final weights equal host_sync=step's."""
    from _dist_utils import torchrun
    from test_train_e2e import TINY
    for mode in ("step", "log"):
        torchrun(["-m", "launch.cli", "train", "--no-test", *TINY, f"data.root={phantom_root}",
                  f"log.run_dir={tmp_path / mode}", *COMMON, "train.batch_size=2", f"perf.host_sync={mode}"],
                 nproc=2)
    assert _rows(tmp_path / "step") == _rows(tmp_path / "log") and len(_rows(tmp_path / "log")) == 2
    a, b = _weights(tmp_path / "step"), _weights(tmp_path / "log")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_task_fusion_sets_share_one_concatenation_with_the_same_result():
    """MultiHipPoseNet concatenates each level's expert features once for both task fusion sets; an ME-GCT module
    given the concatenation answers what it answers given the list."""
    from models.me_gct import MEGCT
    torch.manual_seed(0)
    m = MEGCT(num_experts=3, channels=8, gn_groups=4)
    with torch.no_grad():
        m.gate.gamma.fill_(0.7)
        m.gate.beta.fill_(0.1)
    feats = [torch.randn(2, 8, 5, 6) for _ in range(3)]
    a = m(feats)
    b = m(torch.cat(feats, dim=1))
    assert torch.equal(a, b) and float(a.abs().sum()) > 0
    with pytest.raises(ValueError, match="24 concatenated channels, got 16"):
        m(torch.cat(feats[:2], dim=1))
