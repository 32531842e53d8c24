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


def test_paired_difference_against_the_hand_row(tmp_path):
    """The per-image error of a row minus the hand row's, matched by image id (ids in another order, one image only
    in one file), with a bootstrap interval that holds the mean and shrinks to it when every difference is equal."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipes

    base = tmp_path / "hc18"
    rng = __import__("numpy").random.default_rng(0)
    hand = {f"im{i}": float(e) for i, e in enumerate(rng.normal(0.5, 2.0, 40))}
    delta = {k: 0.3 + 0.05 * (i % 3 - 1) for i, k in enumerate(hand)}      # 0.25, 0.3 or 0.35 per image
    for row, errs in (("hand/run", hand), ("planned/run", {k: hand[k] + delta[k] for k in reversed(list(hand))}
                                           | {"only_here": 99.0})):
        (base / row).mkdir(parents=True)
        (base / row / "per_image.jsonl").write_text(
            "\n".join(json.dumps({"id": k, "hc_err_mm": v}) for k, v in errs.items()) + "\n")
    err = recipes.DATASETS["hc18"]["paired"][1]
    pv = recipes.paired_vs_hand(base, "planned", lambda r: r["hc_err_mm"])
    expect = sum(delta.values()) / len(delta)
    assert pv["n"] == 40 and abs(pv["mean"] - expect) < 1e-12
    assert pv["ci95"][0] < expect < pv["ci95"][1] and pv["ci95"][1] - pv["ci95"][0] < 0.05
    assert recipes.paired_vs_hand(base, "hand", err) is None                          # no row against itself
    assert recipes.paired_vs_hand(base, "+flip", err) is None                         # no per-image file
    same = recipes.paired_vs_hand(base, "planned", lambda r: 0.0)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert err({"hc_err_mm": -2.5}) == 2.5                                            # absolute HC error


def test_out_of_fold_errors_pool_every_fold(tmp_path):
    """pooled_out_of_fold: every fold's validation images pooled (a non-finite error dropped), the mean, SD and mean
    absolute value of the signed errors, each fold's own mean, the median, and bootstrap intervals around both."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipes

    folds = {"fold_0": [1.0, -2.0, 3.0], "fold_1": [0.5, float("nan"), -0.5], "fold_2": [2.0, 2.0]}
    for name, errs in folds.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_image.jsonl").write_text(
            "\n".join(json.dumps({"id": f"{name}_{i}", "hc_err_mm": e}) for i, e in enumerate(errs)) + "\n")
    got = recipes.pooled_out_of_fold(tmp_path, recipes.DATASETS["hc18"]["signed"][1])
    values = [1.0, -2.0, 3.0, 0.5, -0.5, 2.0, 2.0]
    mean = sum(values) / 7
    assert got["n"] == 7 and abs(got["mean"] - mean) < 1e-12
    assert abs(got["mean_abs"] - sum(map(abs, values)) / 7) < 1e-12
    assert abs(got["sd"] - (sum((v - mean) ** 2 for v in values) / 6) ** 0.5) < 1e-12
    assert got["folds"] == {"fold_0": {"n": 3, "mean": 2 / 3}, "fold_1": {"n": 2, "mean": 0.0},
                            "fold_2": {"n": 2, "mean": 2.0}}
    assert got["ci95"][0] < mean < got["ci95"][1] and got["ci95"][1] - got["ci95"][0] < 2 * 1.96 * got["sd"]
    assert got["median"] == 1.0 and got["median_ci95"][0] <= 1.0 <= got["median_ci95"][1]
    assert got["median_ci95"][0] >= -2.0 and got["median_ci95"][1] <= 3.0           # medians of resampled values
    assert recipes.pooled_out_of_fold(tmp_path / "none", lambda r: r["hc_err_mm"]) is None
