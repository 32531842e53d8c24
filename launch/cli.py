"""`medpose`: train, evaluate, predict, make data, run the demo.

Multi-process training uses the same entry point under torchrun:
    torchrun --nproc_per_node=2 -m launch.cli train --config hip_demo
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

EPILOG = """examples:
  medpose demo                                     train + evaluate MultiHipPoseNet on the synthetic phantom
  medpose train --config hip_demo train.max_steps=200 optim.lr=3e-4
  medpose train --config hip_demo --resume auto    continue the run in log.run_dir from its latest checkpoint
  torchrun --nproc_per_node=2 -m launch.cli train --config hip_demo   (DDP, gloo on CPU / nccl on GPU)
  medpose eval --checkpoint runs/hip_demo/checkpoints/best.pt
  medpose predict --checkpoint runs/hip_demo/checkpoints/best.pt img1.png scan.json --out preds/
  medpose data synth-hip --out data/phantom -n 100
"""


def resolve_config_path(name: str | None) -> Path | None:
    """A file path, or the name of a bundled config in launch/configs (with or without .yaml)."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise SystemExit(f"medpose: config '{name}' is neither a file nor a bundled config ({known})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medpose", description=__doc__.split("\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (single process, or DDP under torchrun)",
                       description="Train from a YAML run config plus dotted overrides (section.key=value).")
    t.add_argument("--config", "-c", default="hip_demo", help="YAML file or bundled config name (default: hip_demo)")
    t.add_argument("--resume", metavar="PATH|auto",
                   help="checkpoint file, run directory, or 'auto' (latest checkpoint of log.run_dir)")
    t.add_argument("--no-test", action="store_true", help="skip the held-out test report at the end")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=500 optim.lr=3e-4")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a data split and write a report",
                       description="Evaluate a checkpoint; the config defaults to the one stored in the checkpoint.")
    e.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    e.add_argument("--config", "-c", help="YAML run config (default: the checkpoint's own resolved config)")
    e.add_argument("--split", default="test", choices=["test", "val", "train"])
    e.add_argument("--out", help="output directory (default: <checkpoint dir>/../eval_<split>)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("predict", help="predict masks, landmarks and Graf angles for images",
                       description="Writes an overlay PNG per input and predictions.csv (landmarks in original "
                                   "pixels, alpha/beta, Graf type).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files (PNG/JPEG) or labelme JSON files")
    p.add_argument("--out", required=True, help="output directory")

    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    s = dsub.add_parser("synth-hip", help="generate the synthetic hip-ultrasound phantom (labelme JSON + PNG)")
    s.add_argument("--out", required=True)
    s.add_argument("-n", type=int, default=240, help="number of images (default 240)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--type2-ratio", type=float, default=0.35, help="fraction of Graf type II hips")
    s.add_argument("--english-labels", action="store_true", help="English label names instead of the published ones")

    m = sub.add_parser("demo", help="the main job: phantom data → train MultiHipPoseNet → held-out report",
                       description="Generates the phantom, trains with launch/configs/hip_demo.yaml and writes "
                                   "report.json, curves and overlays into the run directory.")
    m.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return ap


def _cmd_train(args) -> int:
    from engine.config import load_config
    from engine.run import train
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    result = train(cfg, resume=args.resume, final_test=not args.no_test)
    return 0 if result else 1


def _cmd_eval(args) -> int:
    from engine.checkpoint import load_checkpoint_file
    from engine.config import load_config
    from engine.run import evaluate_checkpoint
    ckpt_path = Path(args.checkpoint)
    if args.config:
        cfg = load_config(resolve_config_path(args.config), args.overrides)
    else:
        client = load_checkpoint_file(ckpt_path).get("client", {})
        if "config" not in client:
            raise SystemExit(f"medpose eval: {ckpt_path} carries no config; pass --config")
        cfg = load_config(None, args.overrides, base=client["config"])
    out = Path(args.out) if args.out else ckpt_path.resolve().parent.parent / f"eval_{args.split}"
    evaluate_checkpoint(cfg, ckpt_path, out, split=args.split)
    return 0


def _cmd_predict(args) -> int:
    from engine.predict import predict_files
    rows = predict_files(args.checkpoint, [Path(p) for p in args.inputs], Path(args.out))
    print(f"wrote {len(rows)} predictions to {Path(args.out) / 'predictions.csv'}")
    return 0


def _cmd_data(args) -> int:
    from data_pipelines.synth_hip import generate_hip_dataset
    paths = generate_hip_dataset(args.out, args.n, seed=args.seed, type2_ratio=args.type2_ratio,
                                 english_labels=args.english_labels, progress=True)
    print(f"wrote {len(paths)} labelme files to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    import time

    from engine.config import load_config
    from engine.run import train
    t0 = time.time()
    cfg = load_config(CONFIG_DIR / "hip_demo.yaml", args.overrides)
    result = train(cfg)
    run_dir = Path(result["run_dir"])
    print(f"\nDemo finished in {(time.time() - t0) / 60:.1f} min. Run directory: {run_dir}")
    print(f"  report      {run_dir / 'report.json'}\n  figures     {run_dir / 'figures'}\n"
          f"  checkpoints {run_dir / 'checkpoints'}\n  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # torch-geometric's import calls torch.jit.script, which torch >= 2.10 deprecates: noise for every command
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from engine.config import ConfigError
    from data_pipelines.errors import DataError
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "data": _cmd_data,
                "demo": _cmd_demo}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"medpose {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
