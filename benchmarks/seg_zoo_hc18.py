"""A handful of zoo models trained briefly on the real HC18 subset (../shared/data/hc18), side by side in one run:
held-out foreground Dice (and with background), mIoU, HD95, parameter count and training throughput (issue 7).

    python benchmarks/seg_zoo_hc18.py --out benchmarks/results/seg_zoo_hc18_cpu_DATE [--steps 300] [--quick]

Every model trains with launch/configs/seg_zoo.yaml on the real data (data.synthetic=false), the same steps, batch,
input size, loss (0.8 ce + 0.2 IoU), Adam and poly LR; widths are set so each run fits a CPU (listed in the table).
Throughput = training samples per second averaged over the logged steps after the first (which pays the warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> model.args (CPU-sized where the default is large)
MODELS = {
    "unet": {"base": 32},
    "unet_pp": {"base": 16},
    "attention_unet": {"base": 32},
    "deeplabv3plus": {},
    "u2net_small": {},
    # added in the 2026-12-03 run (benchmarks/results/seg_zoo_hc18_new_cpu_20261203.md)
    "tmunet": {"backbone": "resnet18", "embed_dim": 64, "heads": 4, "patch_widths": [16, 32], "dec_widths": [32, 16]},
    "bcdunet": {"base": 16},
}


def run_one(name: str, args: dict, root: Path, out: Path, steps: int, hw: tuple[int, int], batch: int) -> dict:
    import torch

    from engine.config import load_config
    from engine.run import train
    cfg = load_config(REPO / "launch" / "configs" / "seg_zoo.yaml", [
        f"data.root={root}", "data.synthetic=false", f"data.input_hw=[{hw[0]}, {hw[1]}]", "data.num_workers=1",
        f"model.name={name}", "model.args=" + json.dumps({"num_classes": 2, **args}),
        f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.eval_every={steps}",
        f"train.ckpt_every={steps}", "train.log_every=10", "optim.lr=1e-3", "log.progress=false",
        "log.tensorboard=false", "log.overlays=4", f"log.run_dir={out / name}"])
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    rep = json.loads((Path(result["run_dir"]) / "report.json").read_text())
    rows = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in rows if r["split"] == "train" and "samples_per_s" in r][1:]
    from models.seg import build_seg_model
    params = sum(p.numel() for p in build_seg_model(name, num_classes=2, **args).parameters())
    return {"model": name, "args": args, "params": params, "dice": rep["dice"], "dice_with_bg": rep["dice_with_bg"],
            "miou": rep["miou"], "miou_with_bg": rep["miou_with_bg"], "hd95_mm": rep["hd95_mm"],
            "samples_per_s": sum(sps) / len(sps) if sps else float("nan"), "wall_s": wall,
            "test_images": rep["figures"]["num_images"], "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "hc18"), help="the real HC18 subset")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hw", type=int, nargs=2, default=(128, 192))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="2 models, 4 steps (a smoke run)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if not (root / "annotations.csv").is_file():
        ap.error(f"--root {root}: no HC18 subset there (annotations.csv missing)")
    names = a.models.split(",")
    for n in names:
        if n not in MODELS:
            ap.error(f"--models: {n!r} is not one of {', '.join(MODELS)}")
    if a.quick:
        names, a.steps = names[:2], 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        print(f"== {n}", flush=True)
        rows.append(run_one(n, MODELS[n], root, out / "runs", a.steps, tuple(a.hw), a.batch))
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| model | model.args | parameters | Dice (fg) | Dice (with bg) | mIoU (fg) | mIoU (with bg) | "
             f"HD95 mm | train samples/s | wall |", "|---|---|---|---|---|---|---|---|---|---|"]
    def f(v, digits=3):
        return "n/a" if v is None or v != v else f"{v:.{digits}f}"
    for r in rows:
        lines.append(f"| {r['model']} | `{json.dumps(r['args'])}` | {r['params'] / 1e6:.2f} M | {f(r['dice'])} | "
                     f"{f(r['dice_with_bg'])} | {f(r['miou'])} | {f(r['miou_with_bg'])} | {f(r['hd95_mm'], 2)} | "
                     f"{f(r['samples_per_s'], 1)} | {r['wall_s'] / 60:.1f} min |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
