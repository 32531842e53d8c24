"""benchmarks/gpu_throughput.py (issue 17's GPU throughput checks) without a GPU: one --quick run of the fast parts
in a subprocess with CUDA hidden, checked for numeric figures, same-run ratios and "skipped: no CUDA device" rows
where a figure needs CUDA; plus the pieces that decide on a GPU (the batch search on out-of-memory errors, goals,
time limits, history rows, the table) driven directly. No test here needs CUDA."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_throughput.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_throughput as gt  # noqa: E402
import history  # noqa: E402


def _env() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "NUMBA_THREADING_LAYER": "workqueue",
           "MPLBACKEND": "Agg"}
    env.pop("TRITON_INTERPRET", None)          # the script turns the interpreter on for gct_gate by itself
    return env


def _run(tmp_path: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of host_sync (engine steps), gct_gate (Triton interpreter), dali (DALI CPU pipeline when
    installed) and zero (CUDA only), ~40 s on a 2-core CPU."""
    tmp = tmp_path_factory.mktemp("gpu_throughput")
    prefix = tmp / "sub" / "quick"
    proc = _run(tmp, "--quick", "--parts", "zero,host_sync,dali,gct_gate", "--out", str(prefix))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(Path(f"{prefix}.json").read_text())
    return data, Path(f"{prefix}.md").read_text(), proc.stdout


def _rows(data, part):
    return {r["name"]: r for r in data["parts"][part]["rows"]}


def test_quick_run_names_the_machine_and_keeps_the_parts_in_order(quick_run):
    data, md, _ = quick_run
    meta = data["meta"]
    assert meta["quick"] is True
    assert list(data["parts"]) == ["host_sync", "gct_gate", "dali", "zero"]      # the script's order, not --parts'
    dev = meta["device_meta"]
    assert dev["cuda"] is False and dev["device"].startswith("CPU ") and dev["torch"] == torch.__version__
    assert all(p["status"] == "ok" for p in data["parts"].values()), {k: p["status"] for k, p in data["parts"].items()}
    assert "Smoke run (--quick)" in md and dev["device"] in md and torch.__version__ in md


def test_host_sync_rows_are_positive_and_the_ratio_is_of_this_run(quick_run):
    rows = _rows(quick_run[0], "host_sync")
    step, log = rows["engine step, host_sync=step"], rows["engine step, host_sync=log"]
    for r in (step, log):
        assert r["status"] == "ok" and r["unit"] == "ms/step" and _positive(r["value"])
        assert r["spread"][0] <= r["value"] <= r["spread"][1] and r["batch"] == 2
    assert log["peer"] == step["name"]
    assert log["speedup"] == pytest.approx(step["value"] / log["value"])


def test_gct_gate_times_every_provider_mode_and_dtype_and_leaves_the_goal_unjudged(quick_run):
    rows = _rows(quick_run[0], "gct_gate")
    assert len(rows) == 2 * 2 * 3                       # 1 tiny shape x {triton, torch} x {fp32, bf16} x 3 modes
    assert all(r["status"] == "ok" and _positive(r["value"]) and r["unit"] == "ms" for r in rows.values())
    goal = rows["gct_gate triton bwd 2x12x16x20 bf16"]
    fp32 = rows["gct_gate triton bwd 2x12x16x20 fp32"]
    assert goal["peer"] == fp32["name"] and goal["speedup"] == pytest.approx(fp32["value"] / goal["value"])
    assert goal["goal"]["min_speedup"] == 1.0 and goal["goal_met"] is None
    assert goal["goal_note"].startswith("not judged: no CUDA device")
    assert "interpreter" in goal["detail"]


def test_dali_runs_what_the_cpu_can_and_skips_the_gpu_pipeline(quick_run):
    rows = _rows(quick_run[0], "dali")
    mem = rows["engine step, in-memory batch on the device"]
    assert mem["status"] == "ok" and _positive(mem["value"])
    cpu = rows["engine step, dali-cpu-t1 png"]
    if gt.versions().get("nvidia-dali"):
        assert cpu["status"] == "ok" and _positive(cpu["value"]) and _positive(cpu["speedup"])
    else:
        assert cpu["status"].startswith("skipped: nvidia.dali is not installed")
    gpu = rows["engine step, dali-gpu-t1 png"]
    assert gpu["status"] == "skipped: no CUDA device" and gpu["value"] is None
    assert gpu["goal"] and gpu["goal_met"] is None


def test_zero_is_skipped_without_cuda_and_names_its_command(quick_run):
    data, md, _ = quick_run
    rows = data["parts"]["zero"]["rows"]
    assert len(rows) == 9
    assert all(r["status"].startswith("skipped: no CUDA device") and r["value"] is None for r in rows)
    assert any("bash benchmarks/gpu_checks_zero.sh" in n for n in data["parts"]["zero"]["notes"])
    assert md.count("skipped: no CUDA device") >= 10


def test_history_rows_of_the_run_are_valid_generic_schema_rows(quick_run):
    rows = gt.history_rows(quick_run[0]["parts"])
    assert {r["group"] for r in rows} == {"host_sync", "gct_gate", "dali"}
    clean = history.validate_rows([{**r, "suite": "gpu_throughput_quick"} for r in rows])
    assert len(clean) == len(rows) and all(_positive(r["value"]) for r in clean)
    assert any(r.get("ratio_to") == "engine step, host_sync=step" for r in clean)


# ------------------------------------------------------------------------------------------ the GPU-side logic

def test_batch_search_stops_at_the_first_out_of_memory_error(monkeypatch):
    tried = []

    def fake(levers, args, hw, batch):
        tried.append(batch)
        if batch > 16:
            return False, "out of memory"
        return True, "1.0 GiB peak"
    monkeypatch.setattr(gt, "_try_engine_batch", fake)
    best, log = gt.largest_batch([], None, (8, 8), 256, lambda _: None)
    assert best == 16 and tried == [1, 2, 4, 8, 16, 32] and log[-1] == [32, "out of memory"]
    tried.clear()
    best, _ = gt.largest_batch([], None, (8, 8), 8, lambda _: None)         # capped by --max-batch
    assert best == 8 and tried == [1, 2, 4, 8]


def test_out_of_memory_errors_are_told_apart_from_other_errors():
    assert gt.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gt.is_oom(RuntimeError("CUDA error: out of memory"))
    assert gt.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not gt.is_oom(RuntimeError("shape mismatch"))
    assert not gt.is_oom(ValueError("out of memory"))


def test_ratios_follow_the_unit_and_goals_are_judged_only_when_asked():
    goal = dict(text="x", min_speedup=3.0)
    rows = [gt.make_row("plain", 10.0, "samples/s", "higher"),
            gt.make_row("engine", 31.0, "samples/s", "higher", peer="plain", goal=goal),
            gt.make_row("slow", 29.0, "samples/s", "higher", peer="plain", goal=goal),
            gt.make_row("step", 100.0, "ms/step", "lower"),
            gt.make_row("log", 80.0, "ms/step", "lower", peer="step",
                        goal=dict(text="faster", min_speedup=1.25, strict=True)),
            gt.make_row("gpu only", 5.0, "ms/step", "lower", peer="step", status="skipped: no CUDA device",
                        goal=dict(text="y", min_speedup=1.0))]
    gt.add_ratios(rows)
    by = {r["name"]: r for r in rows}
    assert by["engine"]["speedup"] == pytest.approx(3.1) and by["engine"]["goal_met"] is True
    assert by["slow"]["goal_met"] is False
    assert by["log"]["speedup"] == pytest.approx(1.25) and by["log"]["goal_met"] is False      # strict: > 1.25
    assert by["gpu only"]["value"] is None and by["gpu only"]["goal_met"] is None
    assert by["gpu only"]["goal_note"] == "skipped: no CUDA device"
    gt.add_ratios(rows, not_judged="--quick smoke run")
    assert by["engine"]["goal_met"] is None and by["engine"]["goal_note"] == "not judged: --quick smoke run"
    assert by["engine"]["speedup"] == pytest.approx(3.1)


def test_table_shows_goals_skips_and_errors():
    rows = [gt.make_row("plain", 10.0, "samples/s", "higher", spread=[9.0, 11.0]),
            gt.make_row("engine", 40.0, "samples/s", "higher", peer="plain", goal=dict(text="≥ 3x", min_speedup=3.0)),
            gt.make_row("compiled", None, "samples/s", "higher", peer="plain", status="error: RuntimeError: boom",
                        goal=dict(text="≥ 3x", min_speedup=3.0))]
    gt.add_ratios(rows)
    for r in rows:
        r["part"] = "train"
    meta = dict(date="2026-12-03 10:00", quick=False, note="a note", git={"short": "abc", "dirty": False},
                device_meta=dict(cuda=True, device="NVIDIA H200", gpu_memory_gib=139.8, gpu_count=1, cpu="x",
                                 usable_cpus=16, torch="2.x"),
                runs=[dict(date="d", parts=["train"], command="python benchmarks/gpu_throughput.py", settings_text="s")])
    md = gt.markdown(meta, {"train": dict(status="error: 1 configuration(s) failed", rows=rows, notes=["n1"],
                                          seconds=12.0)})
    assert "# Training throughput checks — NVIDIA H200" in md and "**a note**" in md
    assert "| train | engine | ≥ 3x | 4.00× | **yes** |" in md
    assert "| train | compiled | ≥ 3x |  | error: RuntimeError: boom |" in md
    assert "| train | plain | 10.00 | samples/s | 9.00–11.00 |" in md
    assert "Smoke run" not in md and "- **train**: error: 1 configuration(s) failed, 12 s\n  - n1" in md


def test_part_timeouts_parse_per_part_or_for_all():
    assert gt.parse_timeouts(None) == {}
    assert gt.parse_timeouts("600") == {"*": 600}
    assert gt.parse_timeouts("train=420, dali=150") == {"train": 420, "dali": 150}
    for bad in ("train=x", "nope=5", "dali=0"):
        with pytest.raises(ValueError):
            gt.parse_timeouts(bad)


def test_bad_options_exit_2_with_a_message(tmp_path):
    proc = _run(tmp_path, "--parts", "train,nope", timeout=60)
    assert proc.returncode == 2 and "--parts: unknown nope" in proc.stderr
    proc = _run(tmp_path, "--append", timeout=60)
    assert proc.returncode == 2 and "--append needs --out" in proc.stderr


def test_a_part_past_its_time_limit_is_killed_and_reported(tmp_path):
    prefix = tmp_path / "t"
    proc = _run(tmp_path, "--quick", "--parts", "zero", "--part-timeout", "zero=1", "--out", str(prefix), timeout=120)
    assert proc.returncode == 1
    part = json.loads(Path(f"{prefix}.json").read_text())["parts"]["zero"]
    assert part["status"].startswith("error: timed out after 1 s")
    assert "timed out after 1 s" in Path(f"{prefix}.md").read_text()
