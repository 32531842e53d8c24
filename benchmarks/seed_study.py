"""Run-to-run spread of a training recipe, and whether a change beats it: config variants x training seeds on one
fixed test split, run side by side, then one table.

One held-out run tells little about a recipe: on the HC18 subset three seeds of one config gave HC MAE 1.75-2.56 mm
(benchmarks/results/hc18_seeds_cpu_20261204.md). This trains every (variant, seed) pair with `medpose train`, all on
the test split drawn by --split-seed (data.split_seed), so the variants' test images are the same, and writes:

- summary.md: per run its held-out figures; per variant the mean and sample SD over seeds; per variant against the
  first one (the baseline) the seed-paired difference of each figure (mean over seeds, and its range), and the
  per-image difference of --paired-key pooled over all seeds with a 95 % bootstrap interval over images;
- results.json: the same, plus every run's per-image value of --paired-key.

Usage (repository root):
    python benchmarks/seed_study.py --config hc18_unet --seeds 0 1 2 --out DIR \\
        --variant base= --variant wide_aug="data.scale_range=[0.75,1.25] data.rotation_deg=30" \\
        --set data.root=../shared/data/hc18 --parallel 2 --limit-s 2400

A variant is NAME=OVERRIDES (KEY=VALUE pairs split on spaces; NAME= alone is the config as it is). --set applies to
every run. --parallel runs that many trainings at once (on a GPU machine they share the card); --limit-s stops a
training after that many seconds (its last checkpoint is then not scored, and the run is reported as stopped). A run
whose report.json exists is not run again, so a study can be resumed or extended with more seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import mean_ci  # noqa: E402  (the sibling module, also when run as a script)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KEYS = ("seg_dice", "hc_mae_mm", "hc_bias_mm", "landmark_mre_mm")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--variant {text!r}: expected NAME=OVERRIDES (NAME of letters, digits, '_' or '-'; "
                         f"OVERRIDES may be empty), e.g. base= or wide=\"data.rotation_deg=30\"")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--variant {name}: {bad[0]!r} is not KEY=VALUE")
    return name, overrides


def run_one(args, name: str, overrides: list[str], seed: int) -> dict:
    """Train one (variant, seed) pair into OUT/name/seed_S (skipped when its report.json exists)."""
    run_dir = args.out / name / f"seed_{seed}"
    report = run_dir / "report.json"
    status = "done"
    if not report.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "launch.cli", "train", "--config", args.config, *args.set, *overrides,
               f"train.seed={seed}", f"data.split_seed={args.split_seed}", f"log.run_dir={run_dir}",
               "log.progress=false", "log.overlays=0"]
        (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "w") as log:
            try:
                code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=args.limit_s, env=os.environ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = time.perf_counter() - t0
        status = "done" if code == 0 and report.is_file() else f"failed ({code})"
        (run_dir / "status.json").write_text(json.dumps({"status": status, "wall_s": wall}))
        print(f"[{name} seed {seed}] {status} in {wall / 60:.1f} min", flush=True)
    elif (run_dir / "status.json").is_file():
        status = json.loads((run_dir / "status.json").read_text())["status"]
    return collect(run_dir, name, seed, status, args.keys, args.paired_key)


def collect(run_dir: Path, name: str, seed: int, status: str, keys, paired_key: str) -> dict:
    row = {"variant": name, "seed": seed, "status": status, "figures": {}, "per_image": {}, "train_min": math.nan}
    report = run_dir / "report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        figs = rep.get("figures", {})
        row["figures"] = {k: figs.get(k) for k in keys}
        row["train_min"] = float(rep.get("run", {}).get("wall_time_s", math.nan)) / 60.0
    per_image = run_dir / "per_image.jsonl"
    if per_image.is_file():
        for line in per_image.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                v = r.get(paired_key)
                if v is not None and math.isfinite(float(v)):
                    row["per_image"][r["id"]] = float(v)
    return row


def _num(v) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def summarise(rows: list[dict], variants: list[str], keys, paired_key: str, n_boot: int = 5000) -> dict:
    """Per-variant mean/SD over seeds, and each variant against the first on the seeds both finished."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    out = {"variants": {}, "vs_baseline": {}}
    for v in variants:
        done = [r for r in rows if r["variant"] == v and r["figures"]]
        stats = {}
        for k in keys:
            vals = np.array([_num(r["figures"].get(k)) for r in done])
            vals = vals[np.isfinite(vals)]
            stats[k] = {"n": int(len(vals)), "mean": float(vals.mean()) if len(vals) else math.nan,
                        "sd": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
                        "min": float(vals.min()) if len(vals) else math.nan,
                        "max": float(vals.max()) if len(vals) else math.nan}
        out["variants"][v] = stats
    base = variants[0]
    for v in variants[1:]:
        seeds = sorted(s for (vv, s) in by if vv == v and by[(v, s)]["figures"]
                       and (base, s) in by and by[(base, s)]["figures"])
        diffs = {}
        for k in keys:
            d = np.array([_num(by[(v, s)]["figures"].get(k)) - _num(by[(base, s)]["figures"].get(k)) for s in seeds])
            d = d[np.isfinite(d)]
            diffs[k] = {"n_seeds": int(len(d)), "mean": float(d.mean()) if len(d) else math.nan,
                        "min": float(d.min()) if len(d) else math.nan, "max": float(d.max()) if len(d) else math.nan}
        pooled = []
        for s in seeds:
            a, b = by[(v, s)]["per_image"], by[(base, s)]["per_image"]
            pooled += [abs(a[i]) - abs(b[i]) for i in sorted(set(a) & set(b))]
        diffs[f"abs {paired_key} per image"] = mean_ci(pooled, n_boot) if len(pooled) > 1 else None
        out["vs_baseline"][v] = dict(seeds=seeds, **diffs)
    return out


def _f(v, digits: int = 3, sign: bool = False) -> str:
    v = _num(v)
    return "n/a" if not math.isfinite(v) else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}")


def render(rows: list[dict], summary: dict, variants: list[str], overrides: dict, keys, paired_key: str,
           header: str) -> str:
    lines = [f"# Seed study: {header}", "", "| variant | overrides |", "|---|---|"]
    lines += [f"| {v} | `{' '.join(overrides[v]) or '(the config as given)'}` |" for v in variants]
    lines += ["", "## Every run (held-out test split)", "",
              "| variant | seed | status | " + " | ".join(keys) + " | train min |",
              "|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in sorted(rows, key=lambda r: (variants.index(r["variant"]), r["seed"])):
        lines.append(f"| {r['variant']} | {r['seed']} | {r['status']} | "
                     + " | ".join(_f(r["figures"].get(k), 4 if "dice" in k else 2) for k in keys)
                     + f" | {_f(r['train_min'], 1)} |")
    lines += ["", "## Per variant over seeds: mean (SD) [min, max]", "",
              "| variant | runs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for v in variants:
        st = summary["variants"][v]
        n = max(s["n"] for s in st.values()) if st else 0
        cells = [f"{_f(s['mean'], 4 if 'dice' in k else 2)} ({_f(s['sd'], 4 if 'dice' in k else 2)}) "
                 f"[{_f(s['min'], 4 if 'dice' in k else 2)}, {_f(s['max'], 4 if 'dice' in k else 2)}]"
                 for k, s in st.items()]
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + " |")
    if len(variants) > 1:
        lines += ["", f"## Against {variants[0]} on the same seeds (variant - {variants[0]})", "",
                  "| variant | seeds | " + " | ".join(keys) + f" | abs {paired_key} per image, pooled: mean [95 % CI] |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for v in variants[1:]:
            d = summary["vs_baseline"][v]
            cells = [f"{_f(d[k]['mean'], 4 if 'dice' in k else 2, True)} "
                     f"[{_f(d[k]['min'], 4 if 'dice' in k else 2, True)}, {_f(d[k]['max'], 4 if 'dice' in k else 2, True)}]"
                     for k in keys]
            p = d[f"abs {paired_key} per image"]
            pc = "n/a" if p is None else (f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] "
                                          f"(n={p['n']})")
            lines.append(f"| {v} | {len(d['seeds'])} | " + " | ".join(cells) + f" | {pc} |")
        lines += ["", "Seed-paired columns: mean of the per-seed differences [smallest, largest]. The pooled "
                  "per-image interval is over test images only (it treats the seeds' images as independent), so "
                  "it understates the run-to-run spread; read it beside the per-seed range."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="bundled config name or YAML path, as for medpose train")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (train.seed)")
    p.add_argument("--split-seed", type=int, default=0, help="data.split_seed: one test split for every run")
    p.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES; the first is the baseline "
                   "(default: one variant, base=, the config as given)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="study folder (resumable)")
    p.add_argument("--parallel", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--limit-s", type=float, default=None, help="stop a training after this many seconds")
    p.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="report.json figures to tabulate")
    p.add_argument("--paired-key", default="hc_err_mm",
                   help="per_image.jsonl field compared image by image, as an absolute value (default hc_err_mm)")
    p.add_argument("--title", default=None, help="heading of summary.md (default: the config and the machine)")
    args = p.parse_args(argv)
    for s in args.set:
        if "=" not in s:
            p.error(f"--set {s!r} is not KEY=VALUE")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    parsed = [parse_variant(v) for v in (args.variant or ["base="])]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant: names repeat ({', '.join(names)})")
    overrides = dict(parsed)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, overrides[n], s) for s in args.seeds for n in names]   # seed-major: early seeds pair up first
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda j: run_one(args, *j), jobs))
    summary = summarise(rows, names, args.keys, args.paired_key)
    header = args.title or f"{args.config}, seeds {' '.join(map(str, args.seeds))}, split seed {args.split_seed}"
    text = render(rows, summary, names, overrides, args.keys, args.paired_key, header)
    (args.out / "summary.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"config": args.config, "set": args.set,
                                                       "split_seed": args.split_seed, "variants": overrides,
                                                       "runs": rows, "summary": summary}, indent=1))
    print(text)
    return 0 if all(r["figures"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
