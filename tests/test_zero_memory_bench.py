"""benchmarks/zero_memory.py: the ZeRO model-state formula and a 2-rank smoke run whose measured figures must sit
where the formula says (DDP: 20 bytes per parameter; ZeRO-2 below DDP)."""
import json
import sys

import pytest

from _dist_utils import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from zero_memory import main, model_state_formula  # noqa: E402


def test_formula_matches_the_zero_paper():
    psi = 7.5e9                      # the paper's example: 7.5 B parameters, 64 GPUs, mixed precision, K = 12
    gb = 1e9
    assert model_state_formula(psi, "ddp", 64, "bf16", ddp_buckets=False) / gb == pytest.approx(120)
    assert model_state_formula(psi, "zero1", 64, "bf16") / gb == pytest.approx(31.4, abs=0.05)
    assert model_state_formula(psi, "zero2", 64, "bf16") / gb == pytest.approx(16.6, abs=0.05)
    assert model_state_formula(psi, "zero3", 64, "bf16") / gb == pytest.approx(1.875)
    assert model_state_formula(1e6, "zero2", 2, "fp32") == pytest.approx(1e6 * (4 + 16 / 2))


def test_quick_run_measures_ddp_and_zero2(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(sys, "argv", ["zero_memory.py", "--quick", "--out", str(tmp_path)])
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    by = {c["strategy"]: c for c in res["cases"]}
    psi = by["ddp"]["params"]
    assert psi == 6_795_239                                     # the published hourglass with attention
    ddp = max(by["ddp"]["ranks"][0]["mem"].values())
    z2 = max(by["zero2"]["ranks"][0]["mem"].values())
    assert 0.95 * 20 * psi < ddp < 1.25 * 20 * psi, ddp / psi  # measured 21.5 bytes per parameter
    assert z2 < 0.8 * ddp, (z2, ddp)                             # measured 0.66
    assert "| 2x256 | 6.80 M | zero2 |" in (tmp_path / "table.md").read_text()
