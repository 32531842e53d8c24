"""benchmarks/recipes.py --quick: hand, planned, + flip and + 2-fold rows on a tiny synthetic segmentation set, the
committed table's code path; the figures in recipes.json are the rows' report.json figures, and a rerun resumes."""
import json
import subprocess
import sys

from _dist_utils import REPO


def _run(out):
    return subprocess.run([sys.executable, str(REPO / "benchmarks/recipes.py"), "--out", str(out), "--datasets",
                           "segmentation", "--quick"], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_recipes_quick_rows_match_their_reports(tmp_path):
    out = tmp_path / "rec"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "recipes.json").read_text())["segmentation"]
    assert [r["row"] for r in rows] == ["hand", "planned", "+flip", "+2-fold"]
    base = out / "segmentation"
    for r, report in zip(rows, ["hand/run", "planned/run", "planned_flip/eval", "planned_5fold/run/ensemble_test"]):
        figs = json.loads((base / report / "report.json").read_text())["figures"]
        assert r["figures"]["dice"] == figs["dice"]
    folds = json.loads((base / "planned_5fold" / "run" / "folds.json").read_text())
    assert len(folds["folds"]) == 2
    ens = json.loads((base / "planned_5fold" / "run" / "ensemble_test" / "report.json").read_text())
    assert ens["run"]["ensemble_size"] == 2
    md = (out / "recipes.md").read_text()
    assert md.count("| segmentation |") == 4
    # resumable: a second launch reruns nothing and writes the same table
    before = (base / "hand" / "result.json").stat().st_mtime
    assert _run(out).returncode == 0
    assert (base / "hand" / "result.json").stat().st_mtime == before
    assert json.loads((out / "recipes.json").read_text())["segmentation"] == rows
