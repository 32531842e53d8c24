"""DDP on 2 CPU processes (gloo) gives the same gradients as one process on the same global batch."""
import os

import pytest
import torch

from _dist_utils import REPO, torchrun


def _run_single(tmp_path, grad_accum, kind="toy"):
    import subprocess
    import sys
    out = tmp_path / f"single_{grad_accum}_{kind}.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(REPO / "tests" / "ddp_grad_worker.py"), str(out), str(grad_accum), kind],
                   check=True, env=env, cwd=REPO)
    return torch.load(out)


@pytest.mark.parametrize("grad_accum,kind", [(1, "toy"), (2, "toy"), (1, "hip")])
def test_ddp_two_ranks_match_single_process_gradients(tmp_path, grad_accum, kind):
    ref = _run_single(tmp_path, grad_accum=1, kind=kind)
    out = tmp_path / "ddp.pt"
    torchrun([str(REPO / "tests" / "ddp_grad_worker.py"), str(out), str(grad_accum), kind], nproc=2)
    ddp = torch.load(out)
    assert ddp["rank_sum"] == 3.0  # all_reduce_sum over ranks 1 + 2
    assert ref["grads"].keys() == ddp["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in ref["grads"].values())


def test_grad_accumulation_matches_full_batch_single_process(tmp_path):
    full = _run_single(tmp_path, grad_accum=1)
    accum = _run_single(tmp_path, grad_accum=4)
    for name, g in full["grads"].items():
        torch.testing.assert_close(accum["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
