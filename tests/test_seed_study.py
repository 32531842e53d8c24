"""benchmarks/seed_study.py: variants x seeds on one test split. Runs whose report.json exists are not trained again,
so the summary is tested on made-up runs with known figures."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_study  # noqa: E402

FIG = {("base", 0): (0.97, 2.0, 0.5), ("base", 1): (0.96, 3.0, 1.5),
       ("wide", 0): (0.98, 1.5, 0.0), ("wide", 1): (0.95, 3.5, 2.0)}
ERR = {("base", 0): {"a": 1.0, "b": -2.0}, ("base", 1): {"a": 3.0, "b": 1.0},
       ("wide", 0): {"a": 0.5, "b": -1.0}, ("wide", 1): {"a": 4.0, "b": 1.0}}


def _fake_runs(out: Path):
    for (v, s), (dice, mae, bias) in FIG.items():
        d = out / v / f"seed_{s}"
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"figures": {"seg_dice": dice, "hc_mae_mm": mae,
                                                               "hc_bias_mm": bias, "landmark_mre_mm": None},
                                                   "run": {"wall_time_s": 600.0}}))
        (d / "per_image.jsonl").write_text("".join(json.dumps({"id": i, "hc_err_mm": e}) + "\n"
                                                   for i, e in ERR[(v, s)].items()))


def test_summary_of_finished_runs(tmp_path, capsys):
    _fake_runs(tmp_path)
    code = seed_study.main(["--config", "hc18_unet", "--seeds", "0", "1", "--out", str(tmp_path),
                            "--variant", "base=", "--variant", "wide=data.rotation_deg=30"])
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    base = res["summary"]["variants"]["base"]
    assert base["hc_mae_mm"]["mean"] == pytest.approx(2.5)
    assert base["hc_mae_mm"]["sd"] == pytest.approx(math.sqrt(0.5))
    assert base["seg_dice"]["min"] == pytest.approx(0.96)
    vs = res["summary"]["vs_baseline"]["wide"]
    assert vs["seeds"] == [0, 1]
    assert vs["hc_mae_mm"]["mean"] == pytest.approx(0.0)       # -0.5 and +0.5
    assert (vs["hc_mae_mm"]["min"], vs["hc_mae_mm"]["max"]) == (pytest.approx(-0.5), pytest.approx(0.5))
    assert vs["hc_bias_mm"]["mean"] == pytest.approx(0.0)
    pooled = vs["abs hc_err_mm per image"]
    assert pooled["n"] == 4 and pooled["mean"] == pytest.approx((-0.5 - 1.0 + 1.0 + 0.0) / 4)
    assert vs["landmark_mre_mm"]["n_seeds"] == 0               # undefined figures stay out
    text = (tmp_path / "summary.md").read_text()
    assert "| wide | `data.rotation_deg=30` |" in text
    assert "| base | 2 | 0.9650 (0.0071) [0.9600, 0.9700] | 2.50 (0.71) [2.00, 3.00]" in text
    assert "| wide | 1 | 0.9500 |" not in text and "| wide | 1 | done | 0.9500 | 3.50 | 2.00 | n/a | 10.0 |" in text


def test_variant_and_set_errors_are_named(tmp_path):
    with pytest.raises(SystemExit, match="NAME=OVERRIDES"):
        seed_study.parse_variant("no_equals")
    with pytest.raises(SystemExit, match="'data.rotation_deg' is not KEY=VALUE"):
        seed_study.parse_variant("x=data.rotation_deg")
    assert seed_study.parse_variant('w=data.scale_range=[0.7,1.2] "log.name=a b"') == \
        ("w", ["data.scale_range=[0.7,1.2]", "log.name=a b"])
    with pytest.raises(SystemExit, match="names repeat"):
        seed_study.main(["--config", "c", "--out", str(tmp_path), "--variant", "a=", "--variant", "a="])
