"""Landmark accuracy of the bundled recipe, part by part, on data MedPose can use: the synthetic lateral
cephalograms (19 landmarks, 1200 x 1000 px, 0.1 mm/px; data_pipelines/synthetic/ceph.py) and the HC18 axis landmarks
(the real HC18 subset exported to COCO). Every figure is the held-out test split, scored in the original image frame.

    python benchmarks/landmark_accuracy.py --out DIR                  # the committed table (~1.5 h on 2 cores)
    python benchmarks/landmark_accuracy.py --out DIR --quick          # a few minutes: small set, few steps

Rows:
  ceph, CPU config     launch/configs/landmarks.yaml as shipped (the 30-minute CPU budget: data decode, training and
                       the test report, timed from the start of `medpose train`), decoded three ways from the same
                       checkpoint: integer argmax, soft-argmax, DARK (the shipped default, sub-pixel Taylor step);
  heatmap stride       landmark_unet (width 16) with its head at stride 4 / 2 / 1, a shorter equal budget each;
  flip test            trained with flips (flip_p 0.5), evaluated without and with flip-test averaging;
  HC18 axis landmarks  the real subset as COCO (`medpose data to-coco --split all`), the CPU config, plain and
                       with the flip test (the long-axis ends swap on a flip: reader_args.flip_pairs);
  unet_cpu             the CPU config's budget with landmark_unet at stride 2 in place of HRNet's stride-4 head.
The optional second-stage refinement on native-resolution crops is not part of the recipe (see the results file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.cli import main  # noqa: E402

HEAD = ("landmark_mre_px", "landmark_mre_mm", "landmark_median_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm",
        "pck")


def _figures(report_path: Path) -> dict:
    rep = json.loads(report_path.read_text())
    return {k: rep["figures"].get(k) for k in HEAD} | {"num_images": rep["figures"].get("num_images")}


def train(data: Path, fmt: str, run: Path, *overrides: str) -> float:
    """Train with the landmarks config; returns the wall time (s) of the whole `medpose train` (data, training,
    test report)."""
    t0 = time.perf_counter()
    code = main(["train", "--config", "landmarks", f"data.format={fmt}", f"data.root={data}", f"log.run_dir={run}",
                 "log.progress=false", *overrides])
    if code != 0:
        raise SystemExit(f"training {run} failed ({code})")
    return time.perf_counter() - t0


def evaluate(run: Path, name: str, *overrides: str) -> dict:
    out = run / f"eval_{name}"
    if main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "test", "--out", str(out),
             "log.overlays=0", *overrides]) != 0:
        raise SystemExit(f"evaluation {out} failed")
    return _figures(out / "report.json")


def ceph_data(out: Path, n: int, hw: tuple[int, int]) -> tuple[Path, float]:
    data = out / f"ceph{n}_{hw[0]}x{hw[1]}"
    t0 = time.perf_counter()
    if not (data / "annotations.json").is_file():
        if main(["data", "synth-ceph", "--out", str(data), "-n", str(n), "--size", f"{hw[0]}x{hw[1]}"]) != 0:
            raise SystemExit("generating the cephalograms failed")
    return data, time.perf_counter() - t0


def hc18_data(out: Path, hc18: Path) -> Path | None:
    if not (hc18 / "annotations.csv").is_file():
        print(f"no HC18 data at {hc18}: the HC18 rows are left out")
        return None
    data = out / "hc18_coco"
    if not (data / "annotations.json").is_file():
        if main(["data", "to-coco", "--config", "hc18_unet", "--split", "all", "--out", str(data),
                 f"data.root={hc18}", "data.synthetic=false"]) != 0:
            raise SystemExit("exporting HC18 to COCO failed")
    return data


def _ceph_main(ctx) -> None:
    run = ctx["out"] / "ceph_cpu_config"
    ctx["times"]["ceph_cpu_config"] = train(ctx["data"], "coco", run, *ctx["short"])
    ctx["rows"]["ceph: CPU config, DARK (shipped)"] = _figures(run / "report.json")
    ctx["rows"]["ceph: CPU config, integer argmax"] = evaluate(run, "argmax", "model.decode=argmax")
    ctx["rows"]["ceph: CPU config, soft-argmax"] = evaluate(run, "softargmax", "model.decode=softargmax")


def _unet(stride: int, width: int = 16) -> list[str]:
    return ["model.name=landmark_unet", f"model.args={{width: {width}, depth: 5, heatmap_stride: {stride}}}"]


def _ceph_unet_full(ctx) -> None:
    """The CPU config's budget (1000 steps) with landmark_unet at stride 2 instead of HRNet's stride-4 head."""
    run = ctx["out"] / "ceph_cpu_config_unet_s2"
    ctx["times"][run.name] = train(ctx["data"], "coco", run, *ctx["short"], *_unet(2))
    ctx["rows"]["ceph: CPU budget, landmark_unet stride 2, DARK"] = _figures(run / "report.json")


def _ceph_strides(ctx) -> None:
    for stride in (4, 2, 1):                # the same UNet with its head at stride 4 / 2 / 1, equal budgets
        run = ctx["out"] / f"ceph_unet_stride{stride}"
        ctx["times"][run.name] = train(ctx["data"], "coco", run, *ctx["ablation"], *_unet(stride))
        ctx["rows"][f"ceph: landmark_unet, heatmap stride {stride}, {ctx['ablation_name']}"] = \
            _figures(run / "report.json")


def _ceph_flips(ctx) -> None:
    run = ctx["out"] / "ceph_flips"
    ctx["times"][run.name] = train(ctx["data"], "coco", run, *ctx["ablation"], "data.flip_p=0.5")
    ctx["rows"]["ceph: trained with flips, no flip test"] = _figures(run / "report.json")
    ctx["rows"]["ceph: trained with flips, + flip test"] = evaluate(run, "flip_test", "eval.flip_test=true")


def _hc18(ctx) -> None:
    hc18 = hc18_data(ctx["out"], Path(ctx["args"].hc18))
    if hc18 is None:
        return
    run = ctx["out"] / "hc18_cpu_config"
    pairs = ["data.reader_args={flip_pairs: [[ofd1, ofd2]]}", "data.flip_p=0.5", "data.input_hw=[224,320]"]
    ctx["times"][run.name] = train(hc18, "coco", run, *pairs, *ctx["short"])
    ctx["rows"]["HC18 axis landmarks: CPU config"] = _figures(run / "report.json")
    ctx["rows"]["HC18 axis landmarks: + flip test"] = evaluate(run, "flip_test", "eval.flip_test=true")


STAGES = {"main": _ceph_main, "strides": _ceph_strides, "flips": _ceph_flips, "hc18": _hc18,
          "unet_cpu": _ceph_unet_full}


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    n, hw = (60, (240, 200)) if quick else (args.n, (1200, 1000))
    short = ["train.max_steps=8", "train.eval_every=4", "train.ckpt_every=4", "data.input_hw=[96,96]"] if quick else []
    ablation = [f"train.max_steps={args.ablation_steps}", f"train.eval_every={args.ablation_steps}",
                f"train.ckpt_every={args.ablation_steps}"] if not quick else short
    saved = out / "landmark_accuracy.json"
    previous = json.loads(saved.read_text()) if saved.is_file() and args.stages != list(STAGES) else {}
    ctx = {"out": out, "args": args, "short": short, "ablation": ablation, "rows": previous.get("rows", {}),
           "times": previous.get("wall_s", {}), "ablation_name": "quick" if quick else f"{args.ablation_steps} steps"}
    ctx["data"], gen_s = ceph_data(out, n, hw)
    ctx["times"].setdefault("generate", gen_s)
    for name in args.stages:
        STAGES[name](ctx)
    result = {"rows": ctx["rows"], "wall_s": ctx["times"], "quick": quick, "n": n, "image_hw": hw,
              "cpu_count": os.cpu_count()}
    saved.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def _fmt(v, unit="", digits=3):
    return "n/a" if v is None else f"{v:.{digits}g}{unit}"


def table(result: dict) -> str:
    lines = ["| run | MRE px | MRE mm | median mm | SDR 2 / 2.5 / 3 / 4 mm (%) | PCK@0.05 | test images |",
             "|---|---|---|---|---|---|---|"]
    for name, f in result["rows"].items():
        sdr = " / ".join(_fmt(f.get(k), digits=3) for k in ("sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"))
        lines.append(f"| {name} | {_fmt(f['landmark_mre_px'])} | {_fmt(f['landmark_mre_mm'])} | "
                     f"{_fmt(f['landmark_median_mm'])} | {sdr} | {_fmt(f['pck'])} | {f['num_images']} |")
    lines.append("")
    lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["wall_s"].items()))
    return "\n".join(lines)


def cli(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (data, runs, landmark_accuracy.json)")
    ap.add_argument("--n", type=int, default=900, help="synthetic cephalograms (default 900)")
    ap.add_argument("--ablation-steps", type=int, default=300, help="training steps of each ablation run")
    ap.add_argument("--hc18", default=str(ROOT.parent / "shared" / "data" / "hc18"), help="the HC18 subset")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the recipe")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES),
                    help="which parts to run (default all); a subset adds its rows to the folder's earlier results")
    run_all(ap.parse_args(argv))


if __name__ == "__main__":
    cli()
