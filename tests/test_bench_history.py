"""benchmarks/history.py and benchmarks/compare.py on synthetic runs: recording (generic schema and pytest-benchmark
JSON), the comparison with the previous run on a comparable machine, same-run ratios, exit status, and the README
table (idempotent, only the marked block). No benchmark runs; machine, commit and versions are injected."""
import datetime as dt
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402
import history  # noqa: E402

CPU_A = {"cpu_model": "Test CPU 9000", "physical_cores": 4, "logical_cores": 8, "usable_cpus": 8, "ram_gb": 32.0,
         "gpus": None}
CPU_B = {**CPU_A, "cpu_model": "Other CPU 100"}
CPU_A_FEWER = {**CPU_A, "usable_cpus": 2}
GPU_A = {**CPU_A, "gpus": [{"name": "NVIDIA H200", "memory_gb": 139.8, "driver": "580.1"}]}
GIT = {"commit": "a" * 40, "short": "aaaaaaaa", "dirty": False, "branch": "main"}
VERSIONS = {"python": "3.11.7", "torch": "2.14.1"}


def day(n: int) -> dt.datetime:
    return dt.datetime(2026, 1, n, 3, 4, 5, tzinfo=dt.timezone.utc)


def rec(hist, rows, n=1, machine=CPU_A, suite="train_levers", notes=None, git=GIT):
    return history.record_rows(suite, rows, notes=notes, history_dir=hist, machine=machine, git=git,
                               versions=VERSIONS, date=day(n))


def row(value, name="step", better="higher", unit="samples/s", group="g", **kw):
    return {"group": group, "name": name, "value": value, "unit": unit, "better": better, **kw}


def results_by_name(hist, threshold=0.10, suite=None):
    return {r["row"]["name"]: r for r in compare.compare(history.load_history(hist), threshold, suite)}


# ---------------------------------------------------------------- recording

def test_record_rows_writes_one_named_entry_with_machine_git_versions(tmp_path):
    path = rec(tmp_path, [row(100.0, spread=[90, 110])], notes="busy machine")
    assert path.name == "20260101-030405_aaaaaaaa_test-9000-8cpu.json"
    entry = json.loads(path.read_text())
    assert entry["date"] == "2026-01-01T03:04:05+00:00"
    assert entry["machine"] == CPU_A and entry["git"] == GIT and entry["versions"] == VERSIONS
    assert entry["suites"] == ["train_levers"] and entry["notes"] == "busy machine"
    (r,) = entry["rows"]
    assert (r["suite"], r["group"], r["name"], r["metric"], r["value"], r["unit"], r["better"], r["spread"]) == \
        ("train_levers", "g", "step", "samples/s", 100.0, "samples/s", "higher", [90.0, 110.0])
    # a second run in the same second gets its own file
    assert rec(tmp_path, [row(1.0)]).name.endswith("-2.json")
    gpu = rec(tmp_path, [row(1.0)], machine=GPU_A)
    assert gpu.name.endswith("_aaaaaaaa_h200.json")


@pytest.mark.parametrize("bad,words", [
    (row("fast"), ["rows[0]", "value"]),
    (row(1.0, better="sideways"), ["rows[0]", "better"]),
    ({"group": "g", "value": 1.0, "unit": "s", "better": "lower"}, ["rows[0]", "name"]),
    (row(1.0, spread=[1]), ["rows[0]", "spread"]),
    (row(1.0, ratio_to="nobody"), ["ratio_to", "nobody"]),
])
def test_record_rows_rejects_bad_rows_saying_what_is_wrong(tmp_path, bad, words):
    with pytest.raises(history.HistoryError) as err:
        rec(tmp_path, [bad])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not list(tmp_path.glob("*.json"))


PYTEST_BENCHMARK_JSON = {
    "machine_info": {"node": "box", "processor": "", "cpu": {"brand_raw": "Whatever"}},
    "commit_info": {"id": "b" * 40, "dirty": False},
    "benchmarks": [
        {"group": "heatmaps 128x160 K=6", "name": "test_heatmap_targets[numpy-128x160]",
         "fullname": "benchmarks/bench_fake.py::test_heatmap_targets[numpy-128x160]", "param": "numpy-128x160",
         "params": {"impl": "numpy"}, "extra_info": {"device": "CPU (x86_64)", "cpu_threads": 2},
         "options": {"timer": "perf_counter"},
         "stats": {"min": 5.0e-5, "max": 4.0e-3, "mean": 1.5e-4, "stddev": 4.0e-4, "rounds": 1687, "median": 9.0e-5,
                   "iqr": 1e-5, "q1": 8e-5, "q3": 9e-5, "ops": 6666.7, "total": 0.25, "iterations": 1,
                   "data": [1.5e-4] * 3}},
        {"group": "heatmaps 128x160 K=6", "name": "test_heatmap_targets[numba-128x160]",
         "fullname": "benchmarks/bench_fake.py::test_heatmap_targets[numba-128x160]", "param": "numba-128x160",
         "params": {"impl": "numba"}, "extra_info": {"device": "CPU (x86_64)", "cpu_threads": 2},
         "options": {"timer": "perf_counter"},
         "stats": {"min": 9.0e-6, "max": 6.5e-3, "mean": 3.0e-5, "stddev": 1.7e-4, "rounds": 4000, "median": 1.2e-5,
                   "iqr": 1e-6, "q1": 1e-5, "q3": 1.1e-5, "ops": 33333.3, "total": 0.12, "iterations": 1}},
        {"group": "loader 128x160", "name": "test_loader_throughput[w0-cached]",
         "fullname": "benchmarks/bench_fake.py::test_loader_throughput[w0-cached]", "param": "w0-cached",
         "extra_info": {"samples_per_round": 64, "samples_per_s": 256.0},
         "stats": {"min": 0.2, "max": 0.3, "mean": 0.25, "stddev": 0.05, "rounds": 3, "median": 0.25}},
    ],
    "datetime": "2026-01-01T00:00:00", "version": "5.3.1",
}


def test_pytest_benchmark_json_is_ingested_with_the_right_values(tmp_path):
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(PYTEST_BENCHMARK_JSON))
    hist = tmp_path / "hist"
    path = history.record_file(src, notes="by hand", history_dir=hist, machine=CPU_A, git=GIT, versions=VERSIONS,
                               date=day(1))
    entry = json.loads(path.read_text())
    assert entry["suites"] == ["bench_fake"] and entry["notes"] == "by hand"
    rows = {(r["name"], r["metric"]): r for r in entry["rows"]}
    assert set(rows) == {("test_heatmap_targets[numpy-128x160]", "mean_s"), ("test_heatmap_targets[numba-128x160]",
                         "mean_s"), ("test_loader_throughput[w0-cached]", "mean_s"),
                         ("test_loader_throughput[w0-cached]", "samples_per_s")}
    numpy = rows["test_heatmap_targets[numpy-128x160]", "mean_s"]
    assert (numpy["value"], numpy["spread"], numpy["stddev"], numpy["rounds"], numpy["unit"], numpy["better"]) == \
        (1.5e-4, [5.0e-5, 4.0e-3], 4.0e-4, 1687, "s", "lower")
    assert numpy["group"] == "heatmaps 128x160 K=6" and numpy["label"] == "numpy-128x160"
    assert numpy["extra_info"] == {"device": "CPU (x86_64)", "cpu_threads": 2}
    # the group's best (numba, the shortest mean) is the peer of the others; the raw timings are not stored
    assert numpy["ratio_to"] == "test_heatmap_targets[numba-128x160]"
    assert "ratio_to" not in rows["test_heatmap_targets[numba-128x160]", "mean_s"]
    assert "data" not in json.dumps(entry["rows"])
    sps = rows["test_loader_throughput[w0-cached]", "samples_per_s"]
    assert (sps["value"], sps["unit"], sps["better"]) == (256.0, "samples/s", "higher") and "ratio_to" not in sps
    res = results_by_name(hist)
    assert res["test_heatmap_targets[numpy-128x160]"]["ratio"] == (pytest.approx(5.0), "numba-128x160")
    # --suite renames all rows
    path = history.record_file(src, suite="heatmaps", history_dir=hist, machine=CPU_A, git=GIT, versions=VERSIONS,
                               date=day(2))
    assert {r["suite"] for r in json.loads(path.read_text())["rows"]} == {"heatmaps"}


def test_generic_schema_file_via_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(history, "machine_info", lambda: CPU_A)
    monkeypatch.setattr(history, "git_info", lambda repo=history.REPO: GIT)
    monkeypatch.setattr(history, "library_versions", lambda: VERSIONS)
    src = tmp_path / "levers.json"
    src.write_text(json.dumps({"suite": "train_levers", "notes": "from a script",
                               "rows": [row(100.0, name="eager"), row(180.0, name="compiled", ratio_to="eager")]}))
    hist = tmp_path / "hist"
    assert history.main(["record", str(src), "--history", str(hist), "--notes", "cli"]) == 0
    assert "recorded 2 figures of train_levers" in capsys.readouterr().out
    (path,) = hist.glob("*.json")
    entry = json.loads(path.read_text())
    assert entry["notes"] == "from a script; cli" and entry["machine"] == CPU_A
    assert [(r["name"], r["value"], r.get("ratio_to")) for r in entry["rows"]] == \
        [("eager", 100.0, None), ("compiled", 180.0, "eager")]


@pytest.mark.parametrize("content,words", [
    ("{not json", ["malformed JSON", "line 1"]),
    ("[1, 2]", ["expected a JSON object"]),
    ('{"something": 1}', ["neither pytest-benchmark JSON", "generic schema"]),
    ('{"benchmarks": [{"name": "x", "stats": {"mean": "slow", "min": 1, "max": 2}}]}', ["benchmarks[0]", "mean"]),
    ('{"rows": [{"group": "g", "name": "n", "value": 1, "unit": "s", "better": "lower"}]}', ["suite"]),
])
def test_record_file_errors_name_the_file_and_the_problem(tmp_path, capsys, content, words):
    src = tmp_path / "results.json"
    src.write_text(content)
    assert history.main(["record", str(src), "--history", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and all(w in err for w in words), err
    assert history.main(["record", str(tmp_path / "missing.json"), "--history", str(tmp_path / "h")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err


def test_machine_info_and_versions_on_this_machine_have_the_documented_fields():
    info = history.machine_info()
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["logical_cores"] >= 1 and info["usable_cpus"] >= 1 and info["ram_gb"] > 0
    assert info["gpus"] is None or all({"name", "memory_gb", "driver"} <= set(g) for g in info["gpus"])
    versions = history.library_versions()
    assert set(versions) == {"python", "torch", "triton", "numba", "torch_geometric", "deepspeed", "nvidia-dali"}
    assert versions["python"].count(".") == 2 and versions["torch"]


# ---------------------------------------------------------------- comparison

@pytest.mark.parametrize("better,before,after,dropped", [
    ("higher", 100.0, 85.0, True),     # 15 % fewer samples/s
    ("higher", 100.0, 95.0, False),    # 5 %: noise
    ("higher", 100.0, 130.0, False),   # faster
    ("lower", 1.0, 1.15, True),        # 15 % longer time
    ("lower", 1.0, 1.05, False),
    ("lower", 1.0, 0.85, False),       # shorter time is better, not a drop
])
def test_drop_beyond_the_threshold_in_the_direction_of_better(tmp_path, better, before, after, dropped):
    unit = "samples/s" if better == "higher" else "s"
    rec(tmp_path, [row(before, better=better, unit=unit)], n=1)
    rec(tmp_path, [row(after, better=better, unit=unit)], n=2)
    res = results_by_name(tmp_path)["step"]
    assert res["prev_row"]["value"] == before and res["row"]["value"] == after
    assert res["dropped"] is dropped
    assert res["worse"] == pytest.approx((before - after) / before if better == "higher" else (after - before) / before)
    text = compare.render_comparison(list(results_by_name(tmp_path).values()), 0.10)
    assert ("DROP: worse by 15.0 %" in text) is dropped
    assert ("1 dropped by more than 10 %" in text) is dropped
    # a looser threshold lets the 15 % through
    assert results_by_name(tmp_path, threshold=0.2)["step"]["dropped"] is False


def test_previous_run_on_a_non_comparable_machine_is_ignored(tmp_path):
    rec(tmp_path, [row(100.0)], n=1, machine=CPU_A)
    rec(tmp_path, [row(20.0)], n=2, machine=CPU_B)          # another CPU: a "drop" that is not one
    rec(tmp_path, [row(20.0)], n=3, machine=CPU_A_FEWER)    # same CPU model, fewer CPUs
    rec(tmp_path, [row(20.0)], n=4, machine=GPU_A)          # same CPU, but with a GPU
    rec(tmp_path, [row(96.0)], n=5, machine=CPU_A)
    res = results_by_name(tmp_path)["step"]
    assert res["prev_entry"]["date"].startswith("2026-01-01") and res["prev_row"]["value"] == 100.0
    assert not res["dropped"]
    # the latest run on a machine seen once has nothing to compare with
    rec(tmp_path, [row(5.0)], n=6, machine={**CPU_B, "cpu_model": "New CPU"})
    res = results_by_name(tmp_path)["step"]
    assert res["prev_row"] is None and res["dropped"] is False
    text = compare.render_comparison([res], 0.10)
    assert compare.NO_PREVIOUS in text and "New CPU, 8 CPUs (no GPU)" in text
    assert history.comparable_key(GPU_A) != history.comparable_key(CPU_A)
    assert history.comparable_key({**CPU_A, "ram_gb": 1.0, "hostname": "x"}) == history.comparable_key(CPU_A)


def test_latest_figure_per_benchmark_and_suite_filter(tmp_path):
    rec(tmp_path, [row(100.0, name="a"), row(50.0, name="b")], n=1)
    rec(tmp_path, [row(80.0, name="a")], n=2)                      # b was not run this time
    rec(tmp_path, [row(1.0, name="x", unit="s", better="lower")], n=3, suite="other")
    res = results_by_name(tmp_path)
    assert res["a"]["dropped"] and res["a"]["prev_row"]["value"] == 100.0
    assert res["b"]["row"]["value"] == 50.0 and res["b"]["prev_row"] is None   # its latest is run 1
    assert res["x"]["prev_row"] is None
    assert set(results_by_name(tmp_path, suite="other")) == {"x"}


def test_ratio_to_a_peer_is_the_one_measured_in_the_same_run(tmp_path):
    rec(tmp_path, [row(100.0, name="eager"), row(150.0, name="compiled", ratio_to="eager")], n=1)
    rec(tmp_path, [row(100.0, name="eager"), row(180.0, name="compiled", ratio_to="eager")], n=2)
    res = results_by_name(tmp_path)
    assert res["compiled"]["ratio"] == (pytest.approx(1.8), "eager")
    assert res["eager"]["ratio"] is None and res["eager"]["is_peer"]
    text = compare.render_comparison(list(res.values()), 0.10)
    line = next(x for x in text.splitlines() if "| compiled |" in x)
    assert "1.8× eager" in line and "180 samples/s" in line and "150 samples/s (2026-01-01)" in line
    assert "+20.0 %" in line and "better by 20.0 %" in line
    assert "peer (1×)" in next(x for x in text.splitlines() if "| eager |" in x)


def test_exit_status(tmp_path, capsys):
    hist = str(tmp_path)
    rec(tmp_path, [row(100.0)], n=1)
    rec(tmp_path, [row(95.0)], n=2)
    assert compare.main(["--history", hist]) == 0
    rec(tmp_path, [row(80.0)], n=3)
    assert compare.main(["--history", hist]) == 1
    out = capsys.readouterr().out
    assert "DROP: worse by 15.8 %" in out and "train_levers/g/step/samples/s" in out
    assert compare.main(["--history", hist, "--no-fail"]) == 0
    assert compare.main(["--history", hist, "--threshold", "0.2"]) == 0
    capsys.readouterr()
    (tmp_path / "broken.json").write_text('{"date": "2026-01-09", "rows": []}')
    assert compare.main(["--history", hist]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "machine" in err
    assert compare.main(["--history", str(tmp_path / "nowhere")]) == 2
    assert "no such history folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare.main(["--history", str(empty)]) == 0
    assert "no benchmark figures recorded yet" in capsys.readouterr().out


# ---------------------------------------------------------------- README table

README = """# Project

Intro text.

## Performance

<!-- perf-table:start -->
stale table
<!-- perf-table:end -->

Text after the table.
"""


def test_readme_table_is_regenerated_idempotently_and_only_inside_the_markers(tmp_path, capsys):
    hist = tmp_path / "hist"
    rec(hist, [row(100.0, name="eager"), row(180.0, name="compiled", ratio_to="eager")], n=1, notes="busy")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(PYTEST_BENCHMARK_JSON))
    history.record_file(src, history_dir=hist, machine=GPU_A, git={**GIT, "short": "bbbbbbbb", "dirty": True},
                        versions=VERSIONS, date=day(3))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert compare.main(["--history", str(hist), "--readme", str(readme)]) == 0
    assert "performance table updated" in capsys.readouterr().out
    first = readme.read_text()
    head, block = first.split("<!-- perf-table:start -->")
    block, tail = block.split("<!-- perf-table:end -->")
    assert head == README.split("<!-- perf-table:start -->")[0]
    assert tail == README.split("<!-- perf-table:end -->")[1]
    assert "stale table" not in block
    lines = block.splitlines()
    assert "| train_levers | g: compiled | 180 samples/s (1.8× eager) | Test CPU 9000, 8 CPUs (no GPU) [1] | " \
           "2026-01-01, aaaaaaaa |" in lines
    assert "| train_levers | g: eager | 100 samples/s | Test CPU 9000, 8 CPUs (no GPU) [1] | 2026-01-01, aaaaaaaa |" \
        in lines
    # pytest-benchmark: one line per group, ratios to the group's best; samples/s where reported
    assert "| bench_fake | heatmaps 128x160 K=6 | numpy 150 µs (5× numba) · numba 30 µs | " \
           "NVIDIA H200 | 2026-01-03, bbbbbbbb (dirty) |" in lines
    assert "| bench_fake | loader 128x160 | w0-cached 256 samples/s | NVIDIA H200 | 2026-01-03, bbbbbbbb (dirty) |" \
        in lines
    assert "[1] busy" in lines
    assert compare.main(["--history", str(hist), "--readme", str(readme)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert readme.read_text() == first
    # the latest run of a suite replaces its rows; other suites keep theirs
    rec(hist, [row(90.0, name="eager")], n=4)
    compare.main(["--history", str(hist), "--readme", str(readme)])
    text = readme.read_text()
    assert "g: eager | 90 samples/s" in text and "compiled" not in text and "bench_fake" in text


def test_short_labels_drop_the_parameters_a_group_shares():
    rows = [{"name": f"t[{x}]", "label": x} for x in ("numpy-128x160", "numba-128x160", "torch-128x160")]
    assert compare.short_labels(rows) == {"t[numpy-128x160]": "numpy", "t[numba-128x160]": "numba",
                                          "t[torch-128x160]": "torch"}
    rows = [{"name": x, "label": x} for x in ("w0-cached", "w2-cached", "w2-decode")]
    assert compare.short_labels(rows) == {x: x for x in ("w0-cached", "w2-cached", "w2-decode")}
    assert compare.short_labels([{"name": "a-b", "label": "a-b"}]) == {"a-b": "a-b"}


def test_readme_rows_are_capped_and_markers_are_required(tmp_path, capsys):
    hist = tmp_path / "hist"
    rec(hist, [row(float(i + 1), name=f"r{i}") for i in range(30)], n=1)
    table = compare.readme_table(history.load_history(hist), max_rows=10)
    body = [x for x in table.splitlines() if x.startswith("| train_levers")]
    assert len(body) == 10 and "| … | 20 more rows | `python benchmarks/compare.py` |  |  |" in table
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    assert compare.main(["--history", str(hist), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert str(readme) in err and "perf-table:start" in err
    assert readme.read_text() == "# no markers here\n"


def test_help_explains_both_commands(capsys):
    for main, words in ((history.main, ["record", "generic schema", "pytest-benchmark"]),
                        (compare.main, ["comparable machine", "--readme", "exit status"])):
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), out
