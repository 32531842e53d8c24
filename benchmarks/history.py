"""Benchmark history: every recorded run becomes one JSON file under benchmarks/history/ (committed), named
`YYYYmmdd-HHMMSS_<shortcommit>_<machine-slug>.json` (UTC), holding the run's figures together with the machine, the
git commit, the date and the library versions. benchmarks/compare.py reads the folder back.

Two inputs are understood:

* pytest-benchmark's JSON (`--benchmark-json`, what `make bench` writes to .benchmarks/latest.json). Each benchmark
  gives a `mean_s` row (mean time per call in s, lower is better, spread = [min, max], plus stddev / median / rounds)
  and, when its extra_info has `samples_per_s`, a `samples_per_s` row (higher is better); in a group of several
  benchmarks each row gets `ratio_to` = the group's best member (same run). The suite is the benchmark
  file's name (`bench_heatmaps`), unless `--suite` names one for all rows.
* a generic schema that any benchmark script can write or pass to `record_rows()`:
  `{"suite": "train_levers", "notes": "optional", "rows": [{"group": str, "name": str, "value": float, "unit": str,
  "better": "higher"|"lower", "spread": [min, max] (optional), "ratio_to": "<name of a row in the same group>"
  (optional), "metric": str (optional, defaults to the unit)}]}`.

From a script:  `sys.path.insert(0, "benchmarks"); import history; history.record_rows("train_levers", rows)`.
Command line:   `python benchmarks/history.py record .benchmarks/latest.json --notes "..."`,
                `python benchmarks/history.py list`, `python benchmarks/history.py machine`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

SCHEMA = 1
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HISTORY_DIR = HERE / "history"
BETTER = ("higher", "lower")
# (key in the entry, distribution names tried in order); nvidia-dali ships under a CUDA-suffixed name
LIBRARIES = (("torch", ("torch",)), ("triton", ("triton",)), ("numba", ("numba",)),
             ("torch_geometric", ("torch-geometric", "torch_geometric")), ("deepspeed", ("deepspeed",)),
             ("nvidia-dali", ("nvidia-dali", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")))


class HistoryError(ValueError):
    """A benchmark or history file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------- machine, git, versions

def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
            value = line.split(":", 1)[1].strip()
            if value:
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def _physical_cores() -> int | None:
    cores, current = set(), {}
    for line in _read("/proc/cpuinfo").splitlines() + [""]:
        if not line.strip():
            if "core id" in current:
                cores.add((current.get("physical id", "0"), current["core id"]))
            current = {}
        elif ":" in line:
            key, value = line.split(":", 1)
            current[key.strip()] = value.strip()
    return len(cores) or None


def _ram_gb() -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", _read("/proc/meminfo"), re.M)
    if match:
        return round(int(match.group(1)) / 2**20, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_driver() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    match = re.search(r"Kernel Module\s+([\d.]+)", _read("/proc/driver/nvidia/version"))
    return match.group(1) if match else None


def _gpus() -> list[dict] | None:
    """The CUDA devices torch sees (name, memory), or None without torch or without CUDA."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch
    if not torch.cuda.is_available():
        return None
    driver = _gpu_driver()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "driver": driver})
    return gpus or None


def machine_info() -> dict:
    """This machine: CPU model, physical / logical / usable cores, RAM, and the GPUs (None without CUDA)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu_model": _cpu_model(), "physical_cores": _physical_cores(), "logical_cores": os.cpu_count(),
            "usable_cpus": usable, "ram_gb": _ram_gb(), "gpus": _gpus(),
            "os": f"{platform.system()} {platform.release()}", "hostname": platform.node()}


def git_info(repo: Path = REPO) -> dict:
    """The commit the figures were measured at and whether tracked files differed from it (None without git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
        branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "short": None, "dirty": None, "branch": None}
    return {"commit": commit, "short": commit[:8], "dirty": dirty, "branch": branch}


def library_versions() -> dict:
    """Python and the installed versions of the libraries that shape the figures (metadata only, nothing imported);
    None for a library that is not installed."""
    versions = {"python": platform.python_version()}
    for key, dists in LIBRARIES:
        versions[key] = None
        for dist in dists:
            try:
                version = _md.version(dist)
            except _md.PackageNotFoundError:
                continue
            versions[key] = version if dist == dists[0] else f"{version} ({dist})"
            break
    return versions


# ---------------------------------------------------------------- comparable machines and names

def comparable_key(machine: dict) -> tuple:
    """Two runs are comparable when this key is equal: the same CPU model, the same number of CPUs the run could use
    (affinity, falling back to logical cores), and the same GPU names in order (or both without a GPU). RAM, driver,
    versions and host name are recorded but do not split the history."""
    cpus = machine.get("usable_cpus") or machine.get("logical_cores")
    gpus = tuple(g.get("name") for g in machine.get("gpus") or ())
    return (machine.get("cpu_model"), cpus, gpus)


def describe_machine(machine: dict) -> str:
    """A short device name for tables: the GPU(s) when present, else the CPU model and CPU count."""
    gpus = machine.get("gpus") or []
    if gpus:
        names = [g.get("name", "GPU") for g in gpus]
        text = names[0] if len(set(names)) == 1 else " + ".join(names)
        return f"{len(names)} × {text}" if len(names) > 1 and len(set(names)) == 1 else text
    cpus = machine.get("usable_cpus") or machine.get("logical_cores")
    return f"{machine.get('cpu_model', 'unknown CPU')}, {cpus} CPUs (no GPU)"


def machine_slug(machine: dict) -> str:
    gpus = machine.get("gpus") or []
    if gpus:
        base = re.sub(r"\b(nvidia|geforce|tesla)\b", "", gpus[0].get("name", "gpu"), flags=re.I)
        base += f" x{len(gpus)}" if len(gpus) > 1 else ""
    else:
        cpu = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\b\d+-core processor\b", "", machine.get("cpu_model") or "cpu",
                     flags=re.I)
        base = f"{cpu} {machine.get('usable_cpus') or machine.get('logical_cores') or 0}cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return slug[:40].strip("-") or "machine"


# ---------------------------------------------------------------- reading inputs

def _load_json(path: Path) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such file") from None
    except OSError as err:
        raise HistoryError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise HistoryError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HistoryError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def validate_rows(rows, source: str = "rows") -> list[dict]:
    """Checks generic-schema rows and returns them normalised (metric defaults to the unit)."""
    if not isinstance(rows, list) or not rows:
        raise HistoryError(f"{source}: 'rows' must be a non-empty list")
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{source}: rows[{i}]"
        if not isinstance(row, dict):
            raise HistoryError(f"{where}: expected an object, got {type(row).__name__}")
        for field in ("group", "name", "unit"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise HistoryError(f"{where}: '{field}' must be a non-empty string")
        if row.get("better") not in BETTER:
            raise HistoryError(f"{where}: 'better' must be 'higher' or 'lower', got {row.get('better')!r}")
        clean = dict(row)
        clean["value"] = _number(row.get("value"), f"{where}.value")
        clean["metric"] = row.get("metric") or row["unit"]
        if not isinstance(clean["metric"], str):
            raise HistoryError(f"{where}: 'metric' must be a string")
        if row.get("spread") is not None:
            spread = row["spread"]
            if not isinstance(spread, (list, tuple)) or len(spread) != 2:
                raise HistoryError(f"{where}: 'spread' must be [min, max]")
            clean["spread"] = [_number(s, f"{where}.spread") for s in spread]
        key = (clean.get("suite"), row["group"], row["name"], clean["metric"])
        if key in seen:
            raise HistoryError(f"{where}: a second row for group {row['group']!r}, name {row['name']!r}, "
                               f"metric {clean['metric']!r}")
        seen.add(key)
        out.append(clean)
    for i, row in enumerate(out):
        peer = row.get("ratio_to")
        if peer is None:
            continue
        if not isinstance(peer, str) or peer == row["name"] or not any(
                r["name"] == peer and r["group"] == row["group"] and r.get("suite") == row.get("suite")
                and r["metric"] == row["metric"] for r in out):
            raise HistoryError(f"{source}: rows[{i}]: ratio_to {peer!r} names no other row of group "
                               f"{row['group']!r} with metric {row['metric']!r}")
    return out


def rows_from_pytest_benchmark(data: dict, source: str, suite: str | None = None) -> list[dict]:
    """Rows from pytest-benchmark's JSON: `mean_s` (lower is better) for every benchmark, and `samples_per_s`
    (higher is better) where extra_info has it."""
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise HistoryError(f"{source}: pytest-benchmark JSON without benchmarks")
    rows = []
    for i, bench in enumerate(benchmarks):
        where = f"{source}: benchmarks[{i}]"
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
            raise HistoryError(f"{where}: no 'stats' object")
        name = bench.get("name")
        if not isinstance(name, str) or not name:
            raise HistoryError(f"{where}: no 'name'")
        stats = bench["stats"]
        fullname = bench.get("fullname") or name
        row_suite = suite or Path(fullname.split("::", 1)[0]).stem or "pytest-benchmark"
        group = bench.get("group") or fullname.split("[", 1)[0]
        extra = {k: v for k, v in (bench.get("extra_info") or {}).items()}
        label = bench.get("param") or name
        rows.append({"suite": row_suite, "group": group, "name": name, "label": label, "metric": "mean_s",
                     "value": _number(stats.get("mean"), f"{where}.stats.mean"), "unit": "s", "better": "lower",
                     "spread": [_number(stats.get("min"), f"{where}.stats.min"),
                                _number(stats.get("max"), f"{where}.stats.max")],
                     "stddev": _number(stats.get("stddev", 0.0), f"{where}.stats.stddev"),
                     "median": stats.get("median"), "rounds": stats.get("rounds"), "extra_info": extra})
        if "samples_per_s" in extra:
            rows.append({"suite": row_suite, "group": group, "name": name, "label": label, "metric": "samples_per_s",
                         "value": _number(extra["samples_per_s"], f"{where}.extra_info.samples_per_s"),
                         "unit": "samples/s", "better": "higher"})
    # a group of several benchmarks: each is also set against the group's best, measured in the same run
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["suite"], row["group"], row["metric"]), []).append(row)
    for members in groups.values():
        if len(members) < 2:
            continue
        pick = min if members[0]["better"] == "lower" else max
        best = pick(members, key=lambda r: r["value"])
        for row in members:
            if row is not best:
                row["ratio_to"] = best["name"]
    return rows


def rows_from_file(path: Path, suite: str | None = None) -> tuple[list[dict], str | None]:
    """(rows, notes) from a pytest-benchmark JSON or a generic-schema JSON."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise HistoryError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "benchmarks" in data:
        return rows_from_pytest_benchmark(data, str(path), suite), None
    if "rows" in data:
        name = suite or data.get("suite")
        if not isinstance(name, str) or not name:
            raise HistoryError(f"{path}: generic schema without a 'suite' name")
        rows = validate_rows([{**r, "suite": name} if isinstance(r, dict) else r for r in data["rows"]], str(path))
        notes = data.get("notes")
        if notes is not None and not isinstance(notes, str):
            raise HistoryError(f"{path}: 'notes' must be a string")
        return rows, notes
    raise HistoryError(f"{path}: neither pytest-benchmark JSON (no 'benchmarks' list) nor the generic schema "
                       "(no 'suite' and 'rows')")


# ---------------------------------------------------------------- writing and reading the history

def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def write_entry(rows: list[dict], *, notes: str | None = None, source: str | None = None,
                history_dir: Path | str | None = None, machine: dict | None = None, git: dict | None = None,
                versions: dict | None = None, date: _dt.datetime | None = None) -> Path:
    """Stores one run's rows (already validated, each with its suite) as a new history file; machine, git, versions
    and date are measured here unless given (tests pass their own)."""
    history_dir = Path(history_dir) if history_dir is not None else HISTORY_DIR
    machine = machine if machine is not None else machine_info()
    git = git if git is not None else git_info()
    versions = versions if versions is not None else library_versions()
    date = date or _now()
    if date.tzinfo is None:
        date = date.replace(tzinfo=_dt.timezone.utc)
    date = date.astimezone(_dt.timezone.utc)
    entry = {"schema": SCHEMA, "date": date.isoformat(), "suites": sorted({r["suite"] for r in rows}),
             "machine": machine, "git": git, "versions": versions, "notes": notes or "", "source": source,
             "rows": rows}
    history_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date:%Y%m%d-%H%M%S}_{(git.get('short') or 'nogit')[:8]}_{machine_slug(machine)}"
    path, n = history_dir / f"{stem}.json", 2
    while path.exists():
        path, n = history_dir / f"{stem}-{n}.json", n + 1
    path.write_text(json.dumps(entry, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def record_rows(suite: str, rows: list[dict], notes: str | None = None, **kwargs) -> Path:
    """One call for a benchmark script: stores `rows` (generic schema) of `suite` in the history and returns the
    file. Keyword arguments as for write_entry (history_dir, machine, git, versions, date)."""
    if not isinstance(suite, str) or not suite:
        raise HistoryError("record_rows: 'suite' must be a non-empty string")
    rows = validate_rows([{**r, "suite": suite} if isinstance(r, dict) else r for r in rows], f"suite {suite}")
    return write_entry(rows, notes=notes, source=f"record_rows({suite!r})", **kwargs)


def record_file(path: Path | str, *, suite: str | None = None, notes: str | None = None, **kwargs) -> Path:
    """Stores a pytest-benchmark or generic-schema JSON file in the history; returns the new history file."""
    rows, file_notes = rows_from_file(Path(path), suite)
    notes = "; ".join(n for n in (file_notes, notes) if n) or None
    try:
        source = str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        source = str(path)
    return write_entry(rows, notes=notes, source=source, **kwargs)


def load_history(history_dir: Path | str | None = None) -> list[dict]:
    """All entries, oldest first (by date, then file name); each gets `_file`. Raises HistoryError naming a file that
    is not a valid entry."""
    history_dir = Path(history_dir) if history_dir is not None else HISTORY_DIR
    if not history_dir.is_dir():
        raise HistoryError(f"{history_dir}: no such history folder")
    entries = []
    for path in sorted(history_dir.glob("*.json")):
        entry = _load_json(path)
        if not isinstance(entry, dict):
            raise HistoryError(f"{path}: not a history entry (expected a JSON object)")
        for field, kind in (("date", str), ("machine", dict), ("rows", list)):
            if not isinstance(entry.get(field), kind):
                raise HistoryError(f"{path}: not a history entry ('{field}' missing or not a {kind.__name__})")
        try:
            entry["_date"] = _dt.datetime.fromisoformat(entry["date"])
        except ValueError:
            raise HistoryError(f"{path}: 'date' is not an ISO date: {entry['date']!r}") from None
        for i, row in enumerate(entry["rows"]):
            if not isinstance(row, dict) or not all(k in row for k in ("suite", "group", "name", "metric", "value",
                                                                       "better")):
                raise HistoryError(f"{path}: rows[{i}] lacks suite/group/name/metric/value/better")
        entry["_file"] = path
        entries.append(entry)
    entries.sort(key=lambda e: (e["_date"], e["_file"].name))
    return entries


# ---------------------------------------------------------------- command line

def _cmd_record(args) -> int:
    path = record_file(args.file, suite=args.suite, notes=args.notes, history_dir=args.history)
    entry = _load_json(path)
    print(f"recorded {len(entry['rows'])} figures of {', '.join(entry['suites'])} "
          f"({describe_machine(entry['machine'])}) in {path}")
    return 0


def _cmd_list(args) -> int:
    entries = load_history(args.history)
    if not entries:
        print(f"{args.history or HISTORY_DIR}: no entries yet")
    for e in entries:
        git = e.get("git") or {}
        commit = (git.get("short") or "no git") + (" (dirty)" if git.get("dirty") else "")
        print(f"{e['_file'].name}: {e['date']}  {', '.join(e.get('suites', []))}  {len(e['rows'])} figures  "
              f"{describe_machine(e['machine'])}  {commit}")
    return 0


def _cmd_machine(args) -> int:
    print(json.dumps({"machine": machine_info(), "git": git_info(), "versions": library_versions()}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="history.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Keep benchmark results as a history: one JSON file per run under benchmarks/history/ with the "
                    "machine (CPU model, cores, RAM, GPUs + driver), git commit (and whether the tree was dirty), "
                    "date (UTC) and library versions. benchmarks/compare.py compares the runs.",
        epilog="inputs: pytest-benchmark's --benchmark-json output (headline: mean time per call, lower is better; "
               "plus samples_per_s from extra_info, higher is better), or the generic schema\n"
               '  {"suite": "name", "rows": [{"group": ..., "name": ..., "value": 1.0, "unit": "samples/s", '
               '"better": "higher", "spread": [min, max], "ratio_to": "peer name"}], "notes": "..."}\n'
               "examples:\n"
               "  python benchmarks/history.py record .benchmarks/latest.json --notes 'idle machine'\n"
               "  python benchmarks/history.py list\n"
               "  python benchmarks/history.py machine")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--history", type=Path, default=None,
                        help="history folder (default: benchmarks/history/ next to this script)")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", parents=[common], help="store one run's results file in the history",
                         description="Store one benchmark results file (pytest-benchmark JSON or the generic "
                                     "schema) in the history, with this machine, commit, date and versions.")
    rec.add_argument("file", type=Path, help="pytest-benchmark JSON or generic-schema JSON")
    rec.add_argument("--suite", default=None,
                     help="suite name for all rows (default: the benchmark file's name for pytest-benchmark input, "
                          "the file's 'suite' for the generic schema)")
    rec.add_argument("--notes", default=None, help="free text kept with the run (e.g. 'machine busy')")
    rec.set_defaults(func=_cmd_record)
    sub.add_parser("list", parents=[common], help="list the recorded runs").set_defaults(func=_cmd_list)
    sub.add_parser("machine", help="print what would be recorded about this machine (machine, git, versions)"
                   ).set_defaults(func=_cmd_machine)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HistoryError as err:
        print(f"history.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
