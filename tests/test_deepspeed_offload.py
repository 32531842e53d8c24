"""DeepSpeed ZeRO CPU offload run for real on 2 CPU processes (gloo): `dist.deepspeed.offload_optimizer=cpu` under
ZeRO-2, and `offload_optimizer=cpu` + `offload_params=cpu` under ZeRO-3, each beside the same run without offload.

One torchrun launch runs every scenario (tests/deepspeed_offload_worker.py; ~15 s on 2 cores). Measured on this CPU:
the offloaded runs' losses, weights and probe outputs equal the plain runs' exactly and the grad norms agree to
2e-7 relative; the tests allow rtol=1e-6, atol=1e-7. Offloaded checkpoints resume bit for bit, and the consolidated
fp32 weights in the checkpoint file equal the trained weights."""
import pytest
import torch

from _dist_utils import REPO, torchrun

pytestmark = pytest.mark.deepspeed

TOL = {"rtol": 1e-6, "atol": 1e-7}
SCENARIOS = [
    "z2:2:none:none:6",
    "z2_off:2:cpu:none:6:save=3",
    "z2_off_resume:2:cpu:none:6:resume=3",
    "z3:3:none:none:6",
    "z3_off:3:cpu:cpu:6:save=3",
    "z3_off_resume:3:cpu:cpu:6:resume=3",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    out = root / "results.pt"
    torchrun([str(REPO / "tests" / "deepspeed_offload_worker.py"), str(out), str(root / "ckpt"), *SCENARIOS],
             nproc=2, timeout=300)
    return torch.load(out, weights_only=True), root / "ckpt"


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("plain,offloaded,params", [("z2", "z2_off", False), ("z3", "z3_off", True)])
def test_offloaded_run_trains_like_the_plain_one(runs, plain, offloaded, params):
    res, _ = runs
    ref, off = res[plain], res[offloaded]
    # DeepSpeed really offloaded (and the plain run did not): the engine's own view of its config
    assert off["offloaded"] == {"optimizer": True, "params": params}
    assert ref["offloaded"] == {"optimizer": False, "params": False}
    assert off["ds_zero"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ("offload_param" in off["ds_zero"]) == params
    assert len(off["losses"]) == len(ref["losses"]) == 6
    assert off["losses"][-1] < 0.9 * off["losses"][0]              # it trains (one fixed batch, Adam)
    _close(off["losses"], ref["losses"])
    _close(off["norms"], ref["norms"])
    assert off["state"].keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        torch.testing.assert_close(off["state"][name], value, **TOL, msg=name)
    torch.testing.assert_close(off["probe"], ref["probe"], **TOL)
    # the weights moved away from their initial values: not a comparison of two untrained models
    from deepspeed_offload_worker import make_model
    initial = make_model().state_dict()
    assert max(float((off["state"][k] - initial[k].float()).abs().max()) for k in initial) > 1e-3
    # ZeRO-2 and ZeRO-3 (different partitioning, same arithmetic) reach the same weights too
    for name, value in res["z2"]["state"].items():
        torch.testing.assert_close(off["state"][name], value, **TOL, msg=name)


@pytest.mark.parametrize("name", ["z2_off", "z3_off"])
def test_offloaded_checkpoint_resumes_bit_for_bit(runs, name):
    res, _ = runs
    full, resumed = res[name], res[f"{name}_resume"]
    assert len(resumed["losses"]) == 3                                # steps 4..6 after resuming at step 3
    assert resumed["losses"] == full["losses"][3:]
    assert resumed["norms"] == full["norms"][3:]
    assert torch.equal(resumed["probe"], full["probe"])
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), key


@pytest.mark.parametrize("name,stage", [("z2_off", 2), ("z3_off", 3)])
def test_offloaded_checkpoint_file_holds_the_trained_weights(runs, name, stage):
    from engine.checkpoint import load_checkpoint_file
    res, ckpt = runs
    data = load_checkpoint_file(ckpt / name / "ckpt_step00000006.pt")
    assert data["client"]["step"] == 6 and data["deepspeed"]["zero_stage"] == stage
    assert data["deepspeed"]["config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    weights = data["model"]
    assert set(weights) == set(res[name]["state"])
    for key, value in res[name]["state"].items():
        assert weights[key].dtype == torch.float32
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
