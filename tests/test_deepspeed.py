"""The deepspeed strategy: generated JSON, option errors, and on 2 CPU processes (gloo) ZeRO 0-3 against DDP, grad
accumulation (loss divided once), save → resume, and consolidation into a plain fp32 state_dict.

All multi-process runs share ONE torchrun launch (tests/deepspeed_worker.py runs the scenarios one after another in
the same two processes), so DeepSpeed's import and the process group are paid once. Measured on this CPU: the
ZeRO-1/2/3 loss curves equal DDP's exactly (max |Δloss| = 0.0 over 6 steps) and the grad norms within 6e-8; the
comparisons with DDP assert rtol=1e-5, atol=1e-6. A resumed run must equal the uninterrupted one bit for bit (losses,
grad norms, LRs and the probe output; also through engine.run.train under ZeRO-3)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from _dist_utils import REPO, torchrun

pytestmark = pytest.mark.deepspeed

TOL = {"rtol": 1e-5, "atol": 1e-6}
SCENARIOS = [
    "ddp:ddp:0:1:6",
    "z0:deepspeed:0:1:6",
    "z1:deepspeed:1:1:6:save=3",
    "z1_resume:deepspeed:1:1:6:resume=3",
    "z2:deepspeed:2:1:6:save=3:noconsolidate",
    "z2_resume:deepspeed:2:1:6:resume=3",
    "z3:deepspeed:3:1:6:save=3",
    "z3_resume:deepspeed:3:1:6:resume=3",
    "ddp_acc2:ddp:0:2:4",
    "z2_acc2:deepspeed:2:2:4",
    "ddp_nan:ddp:0:2:4:nan=1.1",
    "z2_nan:deepspeed:2:2:4:nan=1.1",
    "z1_nan:deepspeed:1:2:4:nan=1.1",
    "z3_nan:deepspeed:3:2:4:nan=1.1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    out = root / "results.pt"
    torchrun([str(REPO / "tests" / "deepspeed_worker.py"), str(out), str(root / "ckpt"), *SCENARIOS], nproc=2,
             timeout=240)
    return torch.load(out), root / "ckpt"


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), **TOL)


# ---------------------------------------------------------------- no processes

def test_generated_json_equals_expected():
    from engine.config import DeepSpeedConfig
    from engine.strategy_deepspeed import deepspeed_json
    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_params="cpu",
                         extra={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 50})
    got = deepspeed_json(ds, batch_size=4, grad_accum=2, grad_clip=1.5, precision="bf16", world_size=8)
    assert got == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 64,
        "gradient_clipping": 1.5,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 3, "overlap_comm": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "offload_param": {"device": "cpu", "pin_memory": False}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 50,  # extra merged last wins
        "wall_clock_breakdown": False,
        "data_types": {"buffer_dtype": "bf16"},   # BatchNorm statistics follow the bf16 weights
    }


def test_config_section_and_defaults():
    from engine.config import load_config
    cfg = load_config(None, overrides=["dist.strategy=deepspeed", "dist.deepspeed.zero_stage=1",
                                       "dist.deepspeed.extra={communication_data_type: fp32}"])
    assert cfg.dist.strategy == "deepspeed"
    assert cfg.dist.deepspeed.zero_stage == 1
    assert cfg.dist.deepspeed.extra == {"communication_data_type": "fp32"}
    assert cfg.to_dict()["dist"]["deepspeed"]["consolidate_on_save"] is True


@pytest.mark.parametrize("override,key", [
    ("dist.deepspeed.zero_stage=5", "dist.deepspeed.zero_stage"),
    ("dist.deepspeed.offload_params=cpu", "dist.deepspeed.offload_params"),  # default stage 2: needs 3
    ("dist.deepspeed.extra={gradient_clipping: 1.0}", "dist.deepspeed.extra.gradient_clipping"),
    ("dist.deepspeed.extra={zero_optimization: {stage: 1}}", "dist.deepspeed.extra.zero_optimization.stage"),
    ("dist.deepspeed.zero_stag=1", "dist.deepspeed.zero_stag"),
])
def test_bad_option_names_the_key(override, key):
    from engine.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides=[override])


def test_unknown_extra_key_is_an_error_naming_it():
    from engine.config import ConfigError, DeepSpeedConfig
    from engine.strategy_deepspeed import deepspeed_json, known_top_level_keys
    known = known_top_level_keys()
    assert {"zero_optimization", "activation_checkpointing", "communication_data_type"} <= known
    ok = deepspeed_json(DeepSpeedConfig(extra={"activation_checkpointing": {"partition_activations": True}}),
                        batch_size=1, grad_accum=1, grad_clip=0.0, precision="fp32", world_size=1, known_keys=known)
    assert ok["activation_checkpointing"] == {"partition_activations": True}
    with pytest.raises(ConfigError, match=r"dist\.deepspeed\.extra\.zero_optimisation: not a DeepSpeed config key"):
        deepspeed_json(DeepSpeedConfig(extra={"zero_optimisation": {}}), batch_size=1, grad_accum=1, grad_clip=0.0,
                       precision="fp32", world_size=1, known_keys=known)


def test_build_strategy_needs_batch_size_for_deepspeed():
    from engine.dist import DistInfo
    from engine.strategies import build_strategy
    with pytest.raises(ValueError, match="batch_size"):
        build_strategy("deepspeed", DistInfo(), grad_accum=1)


# ---------------------------------------------------------------- 2 processes, gloo

@pytest.mark.parametrize("name", ["z0", "z1", "z2", "z3"])
def test_zero_stages_follow_ddp_loss_curve(runs, name):
    res, _ = runs
    ref = res["ddp"]
    assert len(res[name]["losses"]) == 6
    _close(res[name]["losses"], ref["losses"])
    _close(res[name]["norms"], ref["norms"])
    _close(res[name]["lrs"], ref["lrs"])
    torch.testing.assert_close(res[name]["probe"], ref["probe"], **TOL)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    assert ref["norms"][0] > 0.1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_matches_uninterrupted_run(runs, stage):
    """Bit for bit: the same two processes, the same reduction order, every state restored (measured: equal)."""
    res, _ = runs
    full, resumed = res[f"z{stage}"], res[f"z{stage}_resume"]
    assert len(resumed["losses"]) == 3  # steps 4..6 after resuming at step 3
    assert resumed["losses"] == full["losses"][3:]
    assert resumed["norms"] == full["norms"][3:]
    assert resumed["lrs"] == full["lrs"][3:]  # scheduler restored
    assert torch.equal(resumed["probe"], full["probe"])


def test_grad_accumulation_divides_loss_once(runs):
    res, _ = runs
    ddp, ds = res["ddp_acc2"], res["z2_acc2"]
    _close(ds["norms"], ddp["norms"])  # a second division would halve every norm
    _close(ds["losses"], ddp["losses"])
    torch.testing.assert_close(ds["probe"], ddp["probe"], **TOL)
    assert ds["norms"][0] > 0.1


@pytest.mark.parametrize("name", ["z1_nan", "z2_nan", "z3_nan"])
def test_abandoned_step_keeps_deepspeed_aligned(runs, name):
    """Micro-batch 2 of step 2 has a non-finite loss: the trainer drops the step (strategy.zero_grad, no step).
    The half-accumulated gradients must not leak into step 3, and DeepSpeed's micro-step counter must stay on the
    trainer's boundaries (backward raises otherwise)."""
    res, _ = runs
    ddp, ds = res["ddp_nan"], res[name]
    assert math.isnan(ds["norms"][1]) and math.isnan(ddp["norms"][1])
    keep = [0, 2, 3]
    _close([ds["norms"][i] for i in keep], [ddp["norms"][i] for i in keep])
    _close([ds["lrs"][i] for i in keep], [ddp["lrs"][i] for i in keep])
    torch.testing.assert_close(ds["probe"], ddp["probe"], **TOL)
    assert ds["norms"][2] != pytest.approx(res["z2_acc2"]["norms"][2], rel=1e-3)  # the skip changed the run


def _plain_outputs(state_dict):
    import deepspeed_worker as w
    model = w.make_model()
    torch.manual_seed(123)
    for p in model.parameters():  # make sure every weight really comes from the checkpoint
        p.data.normal_()
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return model(w.PROBE_X)


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_file_holds_consolidated_fp32_weights(runs, stage):
    from engine.checkpoint import find_latest, load_checkpoint_file
    res, ckpt = runs
    latest = find_latest(ckpt / f"z{stage}")
    assert latest.name == "ckpt_step00000006.pt"
    data = load_checkpoint_file(latest)
    assert data["client"]["step"] == 6 and data["deepspeed"]["zero_stage"] == stage
    assert all(v.dtype == torch.float32 for v in data["model"].values())
    torch.testing.assert_close(_plain_outputs(data["model"]), res[f"z{stage}"]["probe"], **TOL)
    # the previous checkpoint stays complete and loadable beside the new one
    prev = load_checkpoint_file(ckpt / f"z{stage}" / "ckpt_step00000003.pt")
    assert (ckpt / f"z{stage}" / "deepspeed" / prev["deepspeed"]["tag"]).is_dir()
    assert prev["client"]["step"] == 3


def test_consolidate_later_writes_a_plain_checkpoint(runs, tmp_path):
    from engine.checkpoint import find_latest, load_checkpoint_file
    from engine.consolidate import consolidate
    res, ckpt = runs
    latest = find_latest(ckpt / "z2")
    assert load_checkpoint_file(latest)["model"] is None  # saved with consolidate_on_save=false
    out = consolidate(latest, tmp_path / "fp32.pt")
    data = load_checkpoint_file(out)
    assert set(data) >= {"model", "client"} and "deepspeed" not in data
    assert data["client"]["step"] == 6
    torch.testing.assert_close(_plain_outputs(data["model"]), res["z2"]["probe"], **TOL)


def test_consolidate_rejects_a_plain_checkpoint(tmp_path):
    from engine.checkpoint import atomic_torch_save
    from engine.consolidate import consolidate
    path = tmp_path / "ckpt_step00000001.pt"
    atomic_torch_save({"model": {}, "client": {}}, path)
    with pytest.raises(ValueError, match="ckpt_step00000001.pt: not written by the deepspeed strategy"):
        consolidate(path)


def test_shard_folders_follow_their_checkpoint_files(tmp_path):
    from engine.checkpoint import prune_checkpoints
    from engine.strategy_deepspeed import clean_shards
    root = tmp_path / "deepspeed"
    for name in ("ckpt_step00000002-aa", "ckpt_step00000004-bb", "ckpt_step00000006-cc", "best-old", "best-new",
                 "ckpt_step00000008-partial"):
        (root / name).mkdir(parents=True)
    for name in ("ckpt_step00000002.pt", "ckpt_step00000004.pt", "ckpt_step00000006.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"x")
    prune_checkpoints(tmp_path, keep_last=2)  # the trainer removes ckpt_step2.pt, and its shard folder with it
    assert sorted(d.name for d in root.iterdir()) == ["best-new", "best-old", "ckpt_step00000004-bb",
                                                      "ckpt_step00000006-cc", "ckpt_step00000008-partial"]
    clean_shards(root, keep=None, stem=None)  # start of the next save: orphans (a killed write) go
    assert sorted(d.name for d in root.iterdir()) == ["best-new", "best-old", "ckpt_step00000004-bb",
                                                      "ckpt_step00000006-cc"]
    clean_shards(root, keep="best-new", stem="best")  # after best.pt was republished pointing to best-new
    assert sorted(d.name for d in root.iterdir()) == ["best-new", "ckpt_step00000004-bb", "ckpt_step00000006-cc"]


# ---------------------------------------------------------------- the real trainer (engine.run.train), 2 processes

TINY_RUN = [
    "data.synth_n=40", "data.synth_image_hw=[96, 128]", "data.input_hw=[64, 96]", "data.sigma_px=1.5",
    "data.num_workers=0", "data.num_folds=4",
    "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
    "model.criterion_args={balance: fixed}", "train.batch_size=2", "log.progress=false", "log.tensorboard=false",
    "log.overlays=0", "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2", "train.keep_last=2",
    "train.eval_every=0",
]


def _train(resume: str, *overrides: str) -> None:
    torchrun([str(REPO / "tests" / "deepspeed_worker.py"), "train", ";".join([resume, *TINY_RUN, *overrides])],
             nproc=2, timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MultiHipPoseNet (tiny) through engine.run.train: ZeRO-3 for 4 steps, DDP for 4 steps, and ZeRO-3 resumed
    from the first run's step-2 checkpoint, that one with the held-out report (best weights loaded into the
    sharded model, figures drawn on rank 0 alone)."""
    from data_pipelines.synthetic.hip import generate_hip_dataset
    root = tmp_path_factory.mktemp("train")
    generate_hip_dataset(root / "phantom", 40, seed=3, image_hw=(96, 128))
    data = f"data.root={root / 'phantom'}"
    _train("-", data, f"log.run_dir={root / 'z3'}", "dist.strategy=deepspeed", "dist.deepspeed.zero_stage=3")
    _train("-", data, f"log.run_dir={root / 'ddp'}", "dist.strategy=ddp")
    _train(str(root / "z3" / "checkpoints" / "ckpt_step00000002.pt"), data, f"log.run_dir={root / 'resumed'}",
           "dist.strategy=deepspeed", "dist.deepspeed.zero_stage=3", "final_test", "log.overlays=1")
    return root


def _train_rows(run_dir):
    import json
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_trainer_zero3_matches_ddp_and_resumes(trained):
    z3, ddp, resumed = (_train_rows(trained / name) for name in ("z3", "ddp", "resumed"))
    assert sorted(z3) == sorted(ddp) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in z3:
        for key in ("loss", "grad_norm", "lr"):
            assert z3[step][key] == pytest.approx(ddp[step][key], rel=1e-5, abs=1e-6), (step, key)
    for step in resumed:
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == z3[step][key], (step, key)        # bit for bit (measured)
    assert z3[4]["loss"] < z3[1]["loss"]


def test_trainer_checkpoints_publish_and_load_for_inference(trained):
    from engine.checkpoint import find_latest, load_checkpoint_file, resolve_resume
    from engine.run import load_for_inference
    ckpts = trained / "z3" / "checkpoints"
    assert find_latest(ckpts).name == "ckpt_step00000004.pt" == resolve_resume("auto", trained / "z3").name
    final = load_checkpoint_file(ckpts / "ckpt_step00000004.pt")
    assert final["client"]["step"] == 4 and final["client"]["config"]["dist"]["deepspeed"]["zero_stage"] == 3
    # each shard folder belongs to a published checkpoint file (keep_last=2 plus best.pt)
    owners = sorted(d.name.rsplit("-", 1)[0] for d in (ckpts / "deepspeed").iterdir() if d.is_dir())
    assert owners == ["best", "ckpt_step00000002", "ckpt_step00000004"]
    model, cfg, _, _ = load_for_inference(ckpts / "best.pt")  # what `medpose predict` / export use
    assert cfg.dist.strategy == "deepspeed"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final["model"][name], rtol=0, atol=0, msg=name)


def test_trainer_zero3_final_report_uses_best_weights(trained):
    import json
    from engine.checkpoint import load_checkpoint_file
    run = trained / "resumed"
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["strategy"] == "deepspeed" and report["run"]["world_size"] == 2
    assert report["run"]["checkpoint"].endswith("best.pt") and report["run"]["best_step"] == 4
    assert 0.0 <= report["seg_miou"] <= 1.0 and math.isfinite(report["landmark_mre_px"])
    assert len(list((run / "figures" / "overlays").glob("*.png"))) == 1
    best = load_checkpoint_file(run / "checkpoints" / "best.pt")
    assert best["client"]["step"] == 4


BN_BF16_SCRIPT = r"""
import json, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[1])
from benchmarks.zero_memory import malloc_in_use
from engine.dist import read_dist_info
from engine.strategies import build_strategy
info = read_dist_info({}, use_cuda=False)
strat = build_strategy("deepspeed", info, grad_accum=1, grad_clip=0.0, precision="bf16", batch_size=2,
                       deepspeed={"zero_stage": 3, "consolidate_on_save": False})
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 2, 1))
n = sum(p.numel() for p in model.parameters())
base = malloc_in_use()
model, opt, _ = strat.setup(model, torch.optim.Adam(model.parameters(), lr=1e-2), None)
after_setup = malloc_in_use() - base
x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
losses = []
for _ in range(4):
    with strat.accumulate(is_boundary=True), strat.autocast():
        loss = ((model(x).float() - y) ** 2).mean()
    strat.backward(loss)
    strat.step()
    strat.zero_grad()
    losses.append(float(loss))
zero = strat.ds_config["zero_optimization"]
print(json.dumps({"n": n, "losses": losses, "after_setup": after_setup, "zero": zero}))
strat.close()
"""


def test_zero3_bf16_with_batchnorm_trains_and_buckets_fit_the_model(tmp_path):
    """Two regressions found by benchmarks/zero_memory.py: DeepSpeed 0.19 leaves BatchNorm's running statistics in
    fp32 beside bf16 weights ("expected scalar type BFloat16 but found Float" on the CPU), and ZeRO-3 allocated its
    default 5e8-element reduce bucket whole (~1 GB per rank) for any model."""
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    script = tmp_path / "bn_bf16.py"
    script.write_text(BN_BF16_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["losses"][-1] < got["losses"][0]
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        assert got["zero"][key] == -(-got["n"] // 64) * 64, key          # the model, rounded up to 64 elements
    assert got["after_setup"] < 64 * 2 ** 20, got["after_setup"]      # was ~1 GB with DeepSpeed's bucket sizes
