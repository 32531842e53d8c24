"""Issue 18's accuracy table: per dataset, the hand-written (bundled) config vs the planned one (`medpose plan`), then
the planned model with flip-test averaging, then a 5-fold ensemble of the planned config - each on the same
held-out test split, scored in the original image frame, with its training time.

    python benchmarks/recipes.py --out DIR                         # every dataset (hours on a 2-core CPU)
    python benchmarks/recipes.py --out DIR --datasets hc18,hip_us  # some of them
    python benchmarks/recipes.py --out DIR --quick                 # a few minutes: tiny sets, a few steps

Datasets: hc18 (the real HC18 subset in ../shared/data/hc18 when present; skipped otherwise) and the synthetic set of
every task, generated into DIR/data by the bundled configs. Rows per dataset:
  hand      the bundled config as shipped, at --steps for the synthetic sets (its own max_steps for hc18);
  planned   `medpose plan DATA --task T --budget-min M` with M = the hand row's training minutes, so both rows get the
            same CPU budget (--budget-min overrides M, --no-probe plans from the planner's throughput table: on
            a busy machine the probe times slow steps); trained as planned;
  +flip     the planned row's best checkpoint evaluated with eval.flip_test=true;
  +5-fold   `medpose train --config plan.yaml --folds all` with data.num_folds=5, each fold given all the planned
            steps on the plan's validation schedule (--fold-steps full, as nnU-Net does: five times the cost) or 1/5
            of them (--fold-steps equal: the ensemble costs one planned run), evaluated as the average of the five
            best checkpoints, with the flip test where the model trains on mirrored images; --folds 1 leaves the
            row out.
  out-of-fold  (fetal-head sets) each fold model scored on its own validation images, pooled: the folds' validation
            splits partition the non-test images, so the HC bias is estimated on all of them, not the test split alone.
The flip rows need data.flip_p > 0 in the plan (left/right pairs in the data); without, the +flip row says "n/a".
Beside each row's figures, its per-image error minus the hand row's on the same test images, with a 95 % bootstrap
interval over the images (test-set noise only; the run-to-run spread of training is not in it): a row is better than
the hand-written config only where that interval lies below 0.
Every row's folder keeps its config, report.json and metrics.jsonl; a row whose result.json exists is not rerun, so
the script resumes after an interruption. The table goes to DIR/recipes.md and DIR/recipes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.cli import main  # noqa: E402
from launch.plan import eval_interval  # noqa: E402

HC18_ROOT = ROOT.parent / "shared" / "data" / "hc18"

# dataset -> (task, bundled config, data overrides, figures shown: (report key, label, digits))
DATASETS: dict[str, dict] = {
    "hc18": dict(task="fetal_head", config="hc18_unet", data={"root": str(HC18_ROOT), "synthetic": False},
                 keys=[("seg_dice", "Dice", 4), ("hc_mae_mm", "HC MAE mm", 2), ("hc_bias_mm", "HC bias mm", 2)],
                 paired=("HC abs err mm", lambda r: abs(r["hc_err_mm"])), real=True,
                 signed=("HC error mm", lambda r: r["hc_err_mm"])),
    "fetal_head_synth": dict(task="fetal_head", config="hc18_unet", data={"synthetic": True, "synth_n": 80},
                             keys=[("seg_dice", "Dice", 4), ("hc_mae_mm", "HC MAE mm", 2),
                                   ("hc_bias_mm", "HC bias mm", 2)],
                             paired=("HC abs err mm", lambda r: abs(r["hc_err_mm"])),
                             signed=("HC error mm", lambda r: r["hc_err_mm"])),
    "hip_us": dict(task="hip_us", config="hip_demo", data={},
                   keys=[("seg_miou", "mIoU", 3), ("alpha_mae_deg", "alpha MAE deg", 2),
                         ("landmark_mre_px", "MRE px", 2)],
                   paired=("1 - mean fg Dice", lambda r: 1.0 - _mean([v for k, v in r["dice"].items()
                                                                     if k != "background"]))),
    "hip_xray": dict(task="hip_xray", config="xray_demo", data={},
                     keys=[("landmark_mre_px", "MRE px", 2), ("ai_mae_deg", "AI MAE deg", 2)],
                     paired=("MRE px", lambda r: r["mre_px"])),
    "spine_disc": dict(task="spine_disc", config="spine_demo", data={},
                       keys=[("dtt_mm", "DTT mm", 2), ("fnr_pct", "FNR %", 1)],
                       paired=("DTT mm", lambda r: _mean(r["dtt_mm"]))),
    "landmarks": dict(task="landmarks", config="landmarks", data={"synthetic": True},
                      keys=[("landmark_mre_mm", "MRE mm", 2), ("landmark_median_mm", "median mm", 2)],
                      paired=("MRE mm", lambda r: r["mre_mm"])),
    "segmentation": dict(task="segmentation", config="seg_zoo", data={},
                         keys=[("dice", "Dice", 4), ("hd95_mm", "HD95 mm", 2)],
                         paired=("1 - Dice", lambda r: 1.0 - r["dice"])),
}


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else math.nan


# row -> its per-image file under the dataset's folder
PER_IMAGE = {"hand": "hand/run", "planned": "planned/run", "+flip": "planned_flip/eval",
             "+k-fold": "planned_5fold/run/ensemble_test"}


def paired_vs_hand(base: Path, row: str, error, n_boot: int = 5000, seed: int = 0) -> dict | None:
    """The row's per-image error minus the hand row's on the same test images (lower is better): the mean difference
    and its 95 % bootstrap interval over images - test-set noise only, not the run-to-run spread of training."""
    key = "+k-fold" if row.startswith("+") and row.endswith("-fold") else row
    files = [base / PER_IMAGE[key] / "per_image.jsonl", base / PER_IMAGE["hand"] / "per_image.jsonl"]
    if row == "hand" or not all(f.is_file() for f in files):
        return None
    a, h = ({(r := json.loads(line))["id"]: error(r) for line in f.read_text().splitlines() if line.strip()}
            for f in files)
    ids = [i for i in sorted(set(a) & set(h)) if math.isfinite(a[i]) and math.isfinite(h[i])]
    if len(ids) < 2:
        return None
    return mean_ci([a[i] - h[i] for i in ids], n_boot, seed)


def _boot_ci95(d: np.ndarray, stat, n_boot: int, seed: int) -> list[float]:
    """95 % bootstrap interval of stat(resample, axis=1) over n_boot resamples of d."""
    boot = stat(d[np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))], axis=1)
    return [float(x) for x in np.percentile(boot, [2.5, 97.5])]


def mean_ci(values, n_boot: int = 5000, seed: int = 0) -> dict:
    """{"mean", "ci95": 95 % bootstrap interval of the mean, "n", "sd"} of the values."""
    d = np.asarray(values, dtype=float)
    return {"mean": float(d.mean()), "ci95": _boot_ci95(d, np.mean, n_boot, seed), "n": len(d),
            "sd": float(d.std(ddof=1))}


def pooled_out_of_fold(folder: Path, signed, n_boot: int = 5000, seed: int = 0) -> dict | None:
    """Every fold_<k>/per_image.jsonl under `folder` (each fold model scored on its own validation images, which it
    never trained on) pooled: mean_ci of the signed per-image error, its median with a bootstrap interval (a bias
    that a few gross failures do not move), its mean absolute value and per-fold means. The k validation splits
    partition the images outside the test split, so each of them is scored once, by a model that did not see it: a
    larger sample for a bias than the test split alone (nnU-Net's cross-validation summary)."""
    per_fold, values = {}, []
    for f in sorted(folder.glob("fold_*/per_image.jsonl")):
        errs = [e for line in f.read_text().splitlines() if line.strip()
                if math.isfinite(e := float(signed(json.loads(line))))]
        per_fold[f.parent.name] = {"n": len(errs), "mean": float(np.mean(errs)) if errs else math.nan}
        values += errs
    if len(values) < 2:
        return None
    v = np.asarray(values)
    return dict(mean_ci(v, n_boot, seed), mean_abs=float(np.mean(np.abs(v))), median=float(np.median(v)),
                median_ci95=_boot_ci95(v, np.median, n_boot, seed), folds=per_fold)


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    code = main(argv)
    if code not in (0, None):
        raise SystemExit(f"medpose {' '.join(argv)} failed ({code})")
    return time.perf_counter() - t0


def _figures(report: Path, keys) -> dict:
    rep = json.loads(report.read_text())
    figs = rep.get("figures", rep)
    return {k: figs.get(k, rep.get(k)) for k, _, _ in keys}


def _train_minutes(run: Path) -> float:
    """The run's training wall time (report.json run.wall_time_s: the training loop with its validation passes, not
    data generation or the test report)."""
    rep = json.loads((run / "report.json").read_text())
    return float(rep.get("run", {}).get("wall_time_s", math.nan)) / 60.0


def _done(row_dir: Path) -> dict | None:
    f = row_dir / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _save(row_dir: Path, result: dict) -> dict:
    row_dir.mkdir(parents=True, exist_ok=True)
    (row_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_dataset(name: str, spec: dict, out: Path, args) -> list[dict]:
    base = out / name
    data_root = spec["data"].get("root") or str(out / "data" / name)
    data_over = [f"data.root={data_root}", *(f"data.{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}"
                                             for k, v in spec["data"].items() if k != "root")]
    steps = [] if spec.get("real") and not args.quick else [f"train.max_steps={args.steps}",
                                                             f"train.eval_every={max(args.steps // 2, 1)}",
                                                             f"train.ckpt_every={max(args.steps // 2, 1)}"]
    quick = ["data.synth_n=24"] if args.quick and not spec.get("real") else []
    common = ["log.progress=false", "log.overlays=0", f"train.seed={args.seed}"]
    rows = []

    # hand-written
    d = base / "hand"
    res = _done(d)
    if res is None:
        wall = _run(["train", "--config", spec["config"], f"log.run_dir={d / 'run'}", *data_over, *quick, *steps,
                     *common])
        res = _save(d, dict(row="hand", config=spec["config"], wall_s=wall, train_min=_train_minutes(d / "run"),
                            figures=_figures(d / "run" / "report.json", spec["keys"])))
    rows.append(res)
    budget = args.budget_min or res.get("train_min") or (res.get("wall_s") or 0.0) / 60.0
    if not (budget and math.isfinite(budget)):
        raise SystemExit(f"{name}: the hand row records no training time; give --budget-min")

    # planned
    d = base / "planned"
    plan = d / "plan.yaml"
    res = _done(d)
    if res is None:
        t0 = time.perf_counter()
        _run(["plan", data_root, "--task", spec["task"], "--out", str(plan), "--budget-min", f"{budget:.2f}",
              *(["--no-probe"] if args.quick or args.no_probe else [])])
        plan_s = time.perf_counter() - t0
        wall = _run(["train", "--config", str(plan), f"log.run_dir={d / 'run'}", *quick,
                     *(steps if args.quick else []), *common])
        res = _save(d, dict(row="planned", config=str(plan), plan_s=plan_s, wall_s=wall, budget_min=budget,
                            probe=not (args.quick or args.no_probe),
                            train_min=_train_minutes(d / "run"),
                            figures=_figures(d / "run" / "report.json", spec["keys"])))
    rows.append(res)
    planned_cfg = yaml.safe_load((d / "run" / "config.yaml").read_text())
    planned_steps = int(planned_cfg["train"]["max_steps"])
    flips = float(planned_cfg["data"].get("flip_p") or 0.0) > 0     # the flip test needs a model trained on mirrors

    # + flip test
    d2 = base / "planned_flip"
    res = _done(d2)
    if res is None and not flips:
        res = _save(d2, dict(row="+flip", wall_s=None, train_min=None, figures={k: None for k, _, _ in spec["keys"]},
                             note="not applicable: the planned model is trained without mirrored images "
                                  "(data.flip_p=0: no left/right landmark pairs)"))
    elif res is None:
        ckpt = d / "run" / "checkpoints" / "best.pt"
        if not ckpt.is_file():
            ckpt = d / "run" / "checkpoints" / "last.pt"
        wall = _run(["eval", "--checkpoint", str(ckpt), "--split", "test", "--out", str(d2 / "eval"),
                     "eval.flip_test=true", "log.overlays=0"])
        res = _save(d2, dict(row="+flip", wall_s=wall, train_min=rows[-1]["train_min"],
                             figures=_figures(d2 / "eval" / "report.json", spec["keys"])))
    rows.append(res)

    # + 5-fold ensemble (with the flip test)
    d3 = base / "planned_5fold"
    res = _done(d3)
    if res is None and args.folds > 1:
        fold_steps = planned_steps if args.fold_steps == "full" else max(planned_steps // args.folds, 2)
        every = eval_interval(fold_steps)              # the plan's schedule (the planner's EVALUATIONS per run)
        schedule = [] if fold_steps == planned_steps and not args.quick else [
            f"train.max_steps={fold_steps}", f"train.eval_every={every}", f"train.ckpt_every={every}"]
        wall = _run(["train", "--config", str(plan), "--folds", "all", f"data.num_folds={args.folds}",
                     f"log.run_dir={d3 / 'run'}", *schedule, f"eval.flip_test={str(flips).lower()}", *quick,
                     *common])
        folds = json.loads((d3 / "run" / "folds.json").read_text())
        minutes = [float(f.get("train_wall_time_s") or math.nan) / 60.0 for f in folds["folds"]]
        res = _save(d3, dict(row=f"+{args.folds}-fold", wall_s=wall, train_min=float(sum(minutes)),
                             fold_steps=fold_steps, fold_budget=args.fold_steps,
                             figures=_figures(d3 / "run" / "ensemble_test" / "report.json", spec["keys"])))
    if res is not None:
        rows.append(res)
        if spec.get("signed"):
            rows.append(out_of_fold(base, spec, res))
    return rows


def out_of_fold(base: Path, spec: dict, fold_row: dict) -> dict:
    """The k-fold row's members, each evaluated on its own validation split (`medpose eval --split val`, the
    checkpoint's own eval settings), pooled by pooled_out_of_fold into the "out-of-fold" row."""
    d4 = base / "out_of_fold"
    res = _done(d4)
    if res is not None:
        return res
    folds = json.loads((base / "planned_5fold" / "run" / "folds.json").read_text())["folds"]
    for k in range(len(folds)):
        run = base / "planned_5fold" / "run" / f"fold_{k}" / "checkpoints"
        ckpt = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
        if not (d4 / f"fold_{k}" / "per_image.jsonl").is_file():
            _run(["eval", "--checkpoint", str(ckpt), "--split", "val", "--out", str(d4 / f"fold_{k}"),
                  "log.overlays=0"])
    label, signed = spec["signed"]
    pooled = pooled_out_of_fold(d4, signed)
    return _save(d4, dict(row="out-of-fold", wall_s=None, train_min=fold_row.get("train_min"),
                          figures={k: None for k, _, _ in spec["keys"]}, error=label, pooled=pooled,
                          note=f"each of the {len(folds)} fold models on its own validation images: {label} "
                               + (f"mean {pooled['mean']:+.2f} [{pooled['ci95'][0]:+.2f}, {pooled['ci95'][1]:+.2f}], "
                                  f"median {pooled['median']:+.2f} [{pooled['median_ci95'][0]:+.2f}, "
                                  f"{pooled['median_ci95'][1]:+.2f}], SD {pooled['sd']:.2f}, mean abs "
                                  f"{pooled['mean_abs']:.2f} (n={pooled['n']})"
                                  if pooled else "no per-image files")))


def _fmt(v, digits: int) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def write_table(out: Path, results: dict[str, list[dict]]) -> Path:
    lines = ["| dataset | row | figures | per-image error vs hand (paired, 95 % CI) | train min | wall min |",
             "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        keys = DATASETS[name]["keys"]
        label, error = DATASETS[name]["paired"]
        for r in rows:
            measured = any(r["figures"].get(k) is not None for k, _, _ in keys)
            figs = ", ".join(f"{lab} {_fmt(r['figures'].get(k), dg)}" for k, lab, dg in keys)
            if not measured and r.get("note"):
                figs = r["note"]
            pv = paired_vs_hand(out / name, r["row"], error) if measured else None
            r["paired_vs_hand"] = None if pv is None else dict(pv, error=label)
            pcol = "" if pv is None else (f"{label} {pv['mean']:+.3g} [{pv['ci95'][0]:+.3g}, {pv['ci95'][1]:+.3g}]"
                                          f" (n={pv['n']})")
            lines.append(f"| {name} | {r['row']} | {figs} | {pcol} | {_fmt(r.get('train_min'), 1)} | "
                         f"{_fmt(r['wall_s'] / 60.0 if r.get('wall_s') is not None else None, 1)} |")
    md = out / "recipes.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "recipes.json").write_text(json.dumps(results, indent=2))
    return md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--steps", type=int, default=200, help="training steps of the synthetic sets' hand row")
    p.add_argument("--folds", type=int, default=5, help="folds of the ensemble row (1: no ensemble row)")
    p.add_argument("--fold-steps", choices=["equal", "full"], default="full",
                   help="each fold's steps: the planned run's (full, nnU-Net) or 1/folds of them (equal budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-min", type=float, default=0.0,
                   help="the planned row's budget (default: the hand row's training minutes as measured)")
    p.add_argument("--no-probe", action="store_true",
                   help="plan from the planner's throughput table instead of a timed probe (a busy machine "
                        "times slow)")
    p.add_argument("--quick", action="store_true", help="tiny sets and a few steps (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.folds = 2, 2
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad:
        p.error(f"--datasets: unknown {', '.join(bad)} (choose from {', '.join(DATASETS)})")
    args.names = names
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.names:
        spec = DATASETS[name]
        if spec.get("real") and not Path(spec["data"]["root"]).is_dir():
            print(f"skipping {name}: {spec['data']['root']} is not present")
            continue
        results[name] = run_dataset(name, spec, args.out, args)
        print(write_table(args.out, results).read_text())
    return results


if __name__ == "__main__":
    run()
