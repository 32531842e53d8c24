"""benchmarks/train_levers.py --quick runs the plain loop and the engine's step with levers on a tiny MultiHipPoseNet and
writes a table whose ratios are the measured times' ratios (the committed CPU table is made by the same code)."""
import json
import subprocess
import sys

from _dist_utils import REPO


def test_train_levers_quick_writes_consistent_figures(tmp_path):
    out = tmp_path / "levers"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/train_levers.py"), "--quick", "--runs", "1",
                           "--steps", "1", "--warmup", "1", "--configs", "plain,engine,all", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    per_step = {name: v[0] for name, v in data["seconds_per_step"].items()}
    assert set(per_step) == {"plain", "engine", "all"} and all(0 < v < 60 for v in per_step.values())
    rows = {r["name"]: r for r in data["rows"]}
    # history rows in samples/s (batch 2 in --quick), so a ratio to the plain loop reads as a speed-up
    assert rows["all"]["ratio_to"] == "plain" and rows["all"]["value"] == 2 / per_step["all"]
    md = out.with_suffix(".md").read_text()
    # the "x plain loop" column is plain's time over each configuration's
    assert f"| all | {per_step['all']:.3f} |" in md
    assert f"{per_step['plain'] / per_step['all']:.2f}×" in md.split("| all |")[1].splitlines()[0]
