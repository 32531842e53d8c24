"""Compares the latest benchmark figures in benchmarks/history/ with the previous run on a comparable machine, and
regenerates the README's performance table.

Per figure (suite / group / name / metric) the latest recorded value is set against the most recent earlier run on
a *comparable machine*: the same CPU model, the same number of usable CPUs and the same GPU names (or both without a
GPU; history.comparable_key). RAM, driver and library versions are recorded but do not split the history. A figure
that got worse by more than --threshold (default 10 %) in the direction of its `better` is a drop: for "higher"
figures value < previous × (1 - threshold), for "lower" figures (times) value > previous × (1 + threshold).
Where the figure has a peer in the same group (`ratio_to`; for pytest-benchmark groups the group's best member), the
ratio measured side by side in the same run is printed too: absolute figures are only meaningful with the device
named, ratios from one run travel better.

Exit status: 0 when nothing dropped (or with --no-fail, or in --readme mode), 1 when a figure dropped, 2 for an
unusable history or README (the message names the file and the problem).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import history  # noqa: E402  (the sibling module, also when run as a script)
from history import HistoryError  # noqa: E402

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
NO_PREVIOUS = "no previous run on a comparable machine"
MAX_README_ROWS = 25


# ---------------------------------------------------------------- formatting

def _sig(x: float, digits: int = 3) -> str:
    if x == 0:
        return "0"
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        return f"{float(mantissa):g}e{int(exp)}"
    return text


def fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale or name == "ns":
                return f"{_sig(value / scale)} {name}"
    return f"{_sig(value)} {unit}".rstrip()


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio >= 100 else f"{_sig(ratio, 3)}×"


def _label(row: dict) -> str:
    return row.get("label") or row["name"]


def short_labels(rows: list[dict]) -> dict[str, str]:
    """name -> label without the '-'-separated parameter parts all members share ('numpy-128x160', 'numba-128x160'
    in the group 'heatmaps 128x160' become 'numpy', 'numba')."""
    parts = {r["name"]: _label(r).split("-") for r in rows}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    short = {name: "-".join(x for x in p if x not in common) for name, p in parts.items()}
    if "" in short.values() or len(set(short.values())) < len(short):
        return {r["name"]: _label(r) for r in rows}
    return short


def _run_line(entry: dict) -> str:
    git = entry.get("git") or {}
    commit = (git.get("short") or "no git") + (", dirty tree" if git.get("dirty") else "")
    notes = f"; notes: {entry['notes']}" if entry.get("notes") else ""
    return (f"{entry['_file'].name}: {entry['date']}, commit {commit}, "
            f"{history.describe_machine(entry['machine'])}{notes}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------- comparison

def row_key(row: dict) -> tuple:
    return (row["suite"], row["group"], row["name"], row["metric"])


def same_run_ratio(entry: dict, row: dict) -> tuple[float, str] | None:
    """(this figure / its peer's figure, peer label) measured in the same run, or None without a peer."""
    peer_name = row.get("ratio_to")
    if not peer_name:
        return None
    for peer in entry["rows"]:
        if (peer["suite"], peer["group"], peer["name"], peer["metric"]) == (
                row["suite"], row["group"], peer_name, row["metric"]) and peer["value"]:
            return row["value"] / peer["value"], _label(peer)
    return None


def worse_by(value: float, previous: float, better: str) -> float:
    """How much worse `value` is than `previous`, as a fraction of `previous` (negative: better)."""
    if previous == 0:
        return 0.0
    change = (value - previous) / abs(previous)
    return -change if better == "higher" else change


def compare(entries: list[dict], threshold: float = 0.10, suite: str | None = None) -> list[dict]:
    """One result per figure of the latest run containing it: the entry, the row, the previous comparable entry and
    row (or None), `worse` (fraction), `dropped` (bool) and the same-run ratio."""
    latest: dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        for row in entry["rows"]:
            if suite is None or row["suite"] == suite:
                latest[row_key(row)] = i
    results = []
    for key, i in latest.items():
        entry = entries[i]
        row = next(r for r in entry["rows"] if row_key(r) == key)
        machine = history.comparable_key(entry["machine"])
        prev_entry = prev_row = None
        for earlier in reversed(entries[:i]):
            if history.comparable_key(earlier["machine"]) != machine:
                continue
            prev_row = next((r for r in earlier["rows"] if row_key(r) == key), None)
            if prev_row is not None:
                prev_entry = earlier
                break
        worse = worse_by(row["value"], prev_row["value"], row["better"]) if prev_row else None
        is_peer = any(r.get("ratio_to") == row["name"] and row_key(r)[:2] == key[:2] and r["metric"] == key[3]
                      for r in entry["rows"])
        results.append({"entry": entry, "row": row, "prev_entry": prev_entry, "prev_row": prev_row, "worse": worse,
                        "dropped": worse is not None and worse > threshold, "ratio": same_run_ratio(entry, row),
                        "is_peer": is_peer, "order": (i, key[0], key[1], entry["rows"].index(row))})
    results.sort(key=lambda r: r["order"])
    return results


def render_comparison(results: list[dict], threshold: float) -> str:
    if not results:
        return "no benchmark figures recorded yet (run `make bench`)"
    out, current = [], None
    body: list[list[str]] = []

    def flush():
        if body:
            out.extend(_table(["suite", "group", "name", "metric", "latest", "previous (comparable machine)",
                               "change", "ratio, same run", "verdict"], body))
            out.append("")
            body.clear()

    for res in results:
        if res["entry"] is not current:
            flush()
            current = res["entry"]
            out.append(f"Run {_run_line(current)}")
            out.append("")
        row, prev = res["row"], res["prev_row"]
        unit = row.get("unit", "")
        ratio = (f"{fmt_ratio(res['ratio'][0])} {res['ratio'][1]}" if res["ratio"]
                 else "peer (1×)" if res["is_peer"] else "")
        if prev is None:
            previous, change, verdict = "—", "—", NO_PREVIOUS
        else:
            previous = f"{fmt_value(prev['value'], prev.get('unit', unit))} ({res['prev_entry']['date'][:10]})"
            rel = (row["value"] - prev["value"]) / abs(prev["value"]) if prev["value"] else 0.0
            change = f"{rel * 100:+.1f} %"
            if res["dropped"]:
                verdict = f"DROP: worse by {res['worse'] * 100:.1f} %"
            elif res["worse"] < -threshold:
                verdict = f"better by {-res['worse'] * 100:.1f} %"
            else:
                verdict = "ok"
        body.append([row["suite"], row["group"], _label(row), f"{row['metric']} ({row['better']} is better)",
                     fmt_value(row["value"], unit), previous, change, ratio, verdict])
    flush()
    dropped = [r for r in results if r["dropped"]]
    compared = sum(r["prev_row"] is not None for r in results)
    out.append(f"{len(results)} figures, {compared} with a previous run on a comparable machine, "
               f"{len(dropped)} dropped by more than {threshold * 100:g} %"
               + (": " + ", ".join(f"{r['row']['suite']}/{r['row']['group']}/{_label(r['row'])}/"
                                   f"{r['row']['metric']}" for r in dropped) if dropped else ""))
    return "\n".join(out)


# ---------------------------------------------------------------- README table

def _latest_per_suite(entries: list[dict], suite: str | None) -> list[tuple[str, dict]]:
    latest: dict[str, dict] = {}
    for entry in entries:
        for name in {r["suite"] for r in entry["rows"]}:
            if suite is None or name == suite:
                latest[name] = entry
    return sorted(latest.items())


def readme_table(entries: list[dict], suite: str | None = None, max_rows: int = MAX_README_ROWS) -> str:
    """The markdown between the perf-table markers: the latest run of each suite, one line per benchmark group
    (pytest-benchmark) or per row (generic schema), with the device, date and commit of each figure."""
    lines = textwrap.wrap(
        "Generated by `python benchmarks/compare.py --readme README.md` from the latest run of each suite in "
        "`benchmarks/history/`. Ratios are measured side by side in the same run (figure / peer); absolute figures "
        "hold only for the device named. pytest-benchmark suites show the mean time per call, or samples/s where "
        "the benchmark reports it.", 118, break_on_hyphens=False) + [""]
    per_suite = _latest_per_suite(entries, suite)
    if not per_suite:
        return "\n".join(lines + ["No benchmark runs recorded yet: run `make bench`."])
    notes: dict[str, int] = {}
    table: list[list[str]] = []
    for name, entry in per_suite:
        note = ""
        if entry.get("notes"):
            notes.setdefault(entry["notes"], len(notes) + 1)
            note = f" [{notes[entry['notes']]}]"
        git = entry.get("git") or {}
        when = f"{entry['date'][:10]}, {git.get('short') or 'no git'}" + (" (dirty)" if git.get("dirty") else "")
        device = history.describe_machine(entry["machine"]) + note
        rows = [r for r in entry["rows"] if r["suite"] == name]
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["group"], []).append(row)
        for group, members in groups.items():
            pytest_style = all("label" in r and r["metric"] in ("mean_s", "samples_per_s") for r in members)
            if pytest_style:
                metrics = {r["metric"] for r in members}
                names = {r["name"] for r in members}
                metric = "samples_per_s" if "samples_per_s" in metrics and len(
                    [r for r in members if r["metric"] == "samples_per_s"]) == len(names) else "mean_s"
                shown = [r for r in members if r["metric"] == metric]
                labels, cells = short_labels(shown), []
                for r in shown:
                    ratio = same_run_ratio(entry, r)
                    cells.append(f"{labels[r['name']]} {fmt_value(r['value'], r.get('unit', ''))}"
                                 + (f" ({fmt_ratio(ratio[0])} {labels[r['ratio_to']]})" if ratio else ""))
                table.append([name, group, " · ".join(cells), device, when])
            else:
                for r in members:
                    ratio = same_run_ratio(entry, r)
                    figure = fmt_value(r["value"], r.get("unit", "")) + (
                        f" ({fmt_ratio(ratio[0])} {ratio[1]})" if ratio else "")
                    table.append([name, f"{group}: {r['name']}", figure, device, when])
    extra = len(table) - max_rows
    if extra > 0:
        table = table[:max_rows] + [["…", f"{extra} more rows", "`python benchmarks/compare.py`", "", ""]]
    lines += _table(["suite", "benchmark", "figures (ratio to the peer, same run)", "device", "date, commit"], table)
    if notes:
        lines.append("")
        lines += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> bool:
    """Replaces the text between the perf-table markers with `table`; True when the file changed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise HistoryError(f"{path}: cannot read ({err.strerror})") from None
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise HistoryError(f"{path}: needs exactly one '{START}' followed by one '{END}' line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table}\n{END}{tail}"
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


# ---------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare each benchmark figure of the latest run with the previous run on a comparable machine "
                    "(same CPU model, same number of usable CPUs, same GPU names or both without a GPU), flag drops "
                    "larger than --threshold in the direction of the figure's `better`, and print the ratio to the "
                    "figure's peer measured in the same run. --readme rewrites the README's performance table "
                    f"between the {START} and {END} markers instead.",
        epilog="exit status: 0 nothing dropped (always with --no-fail or --readme); 1 a figure dropped; 2 an unusable "
               "history file or README.\n"
               "examples:\n"
               "  python benchmarks/compare.py                      # all suites, 10 % threshold\n"
               "  python benchmarks/compare.py --suite bench_data --threshold 0.2\n"
               "  python benchmarks/compare.py --readme README.md   # regenerate the README table")
    parser.add_argument("--history", type=Path, default=history.HISTORY_DIR,
                        help="history folder written by history.py (default: benchmarks/history/)")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="relative drop that counts as a regression (default 0.10 = 10 %%)")
    parser.add_argument("--suite", default=None, help="only this suite (e.g. bench_heatmaps, train_levers)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a figure dropped")
    parser.add_argument("--readme", type=Path, default=None, metavar="README",
                        help="regenerate the performance table in this file (between the markers) and exit")
    parser.add_argument("--max-rows", type=int, default=MAX_README_ROWS,
                        help=f"most table rows written by --readme (default {MAX_README_ROWS})")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 10:
        parser.error(f"--threshold must be a fraction such as 0.10, got {args.threshold}")
    try:
        entries = history.load_history(args.history)
        if args.readme is not None:
            changed = update_readme(args.readme, readme_table(entries, args.suite, args.max_rows))
            print(f"{args.readme}: performance table {'updated' if changed else 'already up to date'}")
            return 0
        results = compare(entries, args.threshold, args.suite)
    except HistoryError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    print(render_comparison(results, args.threshold))
    return 1 if any(r["dropped"] for r in results) and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
