"""Training-loader throughput over several epochs: one DataLoader spanning every epoch (what the trainer does since
2026-12-04, data_pipelines/loaders.training_batches) against a new DataLoader per epoch (what it did before), side by
side in one run, on the same dataset, sampler and worker count.

Why: on the H200 the GPU recipe hc18_unet_gpu (160 training images, batch 16: 10 batches per epoch, 14 workers)
trained at 84 samples/s, because every epoch restarted all 14 workers for 10 batches
(benchmarks/results/hc18_gpu_h200_20261204.md). Only the loader is timed here (no model), so the figure is the rate
the loader can feed, and the ratio is what the per-epoch restarts cost.

    python benchmarks/loader_epochs.py                                      # synthetic HC18-layout set
    python benchmarks/loader_epochs.py --data ../shared/data/hc18 --config hc18_unet_gpu --workers 2 --epochs 4
    python benchmarks/loader_epochs.py --out benchmarks/results/loader_epochs_cpu_DATE.md

Rows: per workers value, samples/s of each way over --epochs epochs after one warm-up batch, and spanning / per-epoch.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.loaders import training_batches  # noqa: E402
from data_pipelines.sampler import ShardedSampler  # noqa: E402


def build_train_set(args, tmp: Path):
    from engine.config import load_config
    from engine.run import build_data, make_strategy
    root = args.data
    if root is None:
        from data_pipelines.synthetic.hc18 import generate_hc18_dataset
        root = tmp / "hc18"
        generate_hc18_dataset(root, args.synth_n, seed=0, image_hw=(270, 400))
    cfg_path = Path(args.config)
    if not cfg_path.is_file():
        cfg_path = REPO / "launch" / "configs" / f"{args.config}.yaml"
    cfg = load_config(cfg_path, [f"data.root={root}", *args.set])
    data = build_data(cfg, tmp / "run", make_strategy(cfg))
    return data["train"], cfg


def time_epochs(ds, batch: int, workers: int, epochs: int, spanning: bool) -> float:
    """Samples per second over `epochs` whole epochs (after the first batch, which both ways wait for alike)."""
    s = ShardedSampler(len(ds), shuffle=True, seed=0, drop_last=True, batch_size=batch)
    per = s.batches_per_epoch()
    gen = training_batches(ds, batch, s, 0, 0, "torch", workers, spanning=spanning)
    next(gen)
    t0 = time.perf_counter()
    n = 0
    for _, b in gen:
        n += b.size if isinstance(b.size, int) else b.size()
        if n >= (per * epochs - 1) * batch:
            break
    dt = time.perf_counter() - t0
    gen.close()
    return n / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="hc18_unet_gpu", help="bundled config or YAML (its data section is used)")
    p.add_argument("--data", type=Path, default=None, help="data.root (default: a synthetic HC18-layout set)")
    p.add_argument("--synth-n", type=int, default=120, help="images of the synthetic set (default 120)")
    p.add_argument("--set", action="append", default=[], help="more KEY=VALUE config overrides")
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="DataLoader workers (default 2)")
    p.add_argument("--epochs", type=int, default=4, help="epochs timed (default 4)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's train.batch_size)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ds, cfg = build_train_set(args, Path(tmp))
        batch = args.batch or cfg.train.batch_size
        per = len(ds) // batch
        lines = [f"# Training loader: one loader across epochs vs one per epoch ({args.config})", "",
                 f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; data: "
                 f"{args.data or f'synthetic HC18 layout ({args.synth_n} images)'}; {len(ds)} training samples, "
                 f"batch {batch} ({per} batches per epoch), input {list(cfg.data.input_hw)}, {args.epochs} epochs "
                 f"timed", "",
                 "| workers | per-epoch loaders samples/s | one spanning loader samples/s | spanning / per-epoch |",
                 "|---|---|---|---|"]
        for w in args.workers:
            old = time_epochs(ds, batch, w, args.epochs, spanning=False)
            new = time_epochs(ds, batch, w, args.epochs, spanning=True)
            lines.append(f"| {w} | {old:.1f} | {new:.1f} | {new / old:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
