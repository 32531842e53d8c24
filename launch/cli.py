"""`medpose`: train, evaluate, predict, make data, run the demo.

Multi-process training uses the same entry point under torchrun:
    torchrun --nproc_per_node=2 -m launch.cli train --config hip_demo
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from launch import CONFIG_DIR, find_config

EPILOG = """examples:
  medpose demo                                     train + evaluate MultiHipPoseNet on the synthetic phantom
  medpose data inspect my_data/                    what a dataset folder holds (names, sizes, spacings, problems, sheet)
  medpose plan my_data/ --task landmarks --out my_plan.yaml   fingerprint + hardware -> a run config for them
  medpose train --config landmarks data.format=coco data.root=my_data/ log.name=mine
                                                   your landmarks: any K, names and channels taken from the data
  medpose train --config landmarks data.format=table data.root=my_hands/ "data.reader_args={table: points.csv}"
  medpose eval --checkpoint runs/mine/checkpoints/best.pt --data-root other_site/   score another dataset as a whole
  medpose predict --checkpoint runs/mine/checkpoints/best.pt other_site/images/ --out preds/   folders, globs, files
  medpose data synth-ceph --out data/ceph -n 900   19-landmark synthetic cephalograms (COCO / table / labelme)
  medpose train --config hip_demo train.max_steps=200 optim.lr=3e-4
  medpose train --config hip_demo --resume auto    continue the run in log.run_dir from its latest checkpoint
  torchrun --nproc_per_node=2 -m launch.cli train --config hip_demo   (DDP, gloo on CPU / nccl on GPU)
  torchrun --nproc_per_node=2 -m launch.cli train --config hip_demo dist.strategy=deepspeed dist.deepspeed.zero_stage=2
  launch/torchrun_single.sh, torchrun_multinode.sh, deepspeed.sh, slurm.sbatch: restarts + --resume auto
  (by hand with --max-restarts and c10d: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see README)
  medpose eval --checkpoint runs/hip_demo/checkpoints/best.pt
  medpose predict --checkpoint runs/hip_demo/checkpoints/best.pt img1.png scan.json --out preds/
  medpose data synth-hip --out data/phantom -n 100
  medpose train --config xray_demo        hip X-ray keypoints (EfficientNet-V2 regression) on a synthetic pelvis set
  medpose train --config spine_demo       stacked hourglass disc labelling on synthetic sagittal MRI (NIfTI)
  medpose train --config hc18_unet        fetal-head segmentation + HC on ../shared/data/hc18 (real HC18 subset)
  medpose train --config seg_zoo model.name=attention_unet   any of the 31 zoo networks (synthetic HC18 layout)
  medpose pretrain --config seg_zoo pretrain.steps=300   InfoNCE pre-training -> model.init_from=.../encoder.pt
  medpose export --checkpoint best.pt --format onnx --dynamic-batch --out model.onnx   (+ model.onnx.json)
  medpose predict --onnx model.onnx scans/ --out preds/   the exported network in onnxruntime, same rows
  medpose models                          every model with its parameter count; `medpose models unet_pp` one pass
  medpose data to-coco --config xray_demo --out data/xray_coco   any dataset as COCO keypoints (data.format=coco)
"""


def resolve_config_path(name: str | None) -> Path | None:
    """A file path, or the name of a bundled config in launch/configs (with or without .yaml)."""
    if name is None:
        return None
    try:
        return find_config(name)
    except ValueError as exc:
        raise SystemExit(f"medpose: config {exc}") from None


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser: options, KEY=VALUE overrides and other positionals (predict's inputs) in any order
    (`train --config X a=b --no-test c=d`). Plain argparse hands a `nargs="*"` positional only the first run of
    values and rejects the rest as unrecognized; this parses the options first, then the positionals
    (argparse's parse_known_intermixed_args). A parser with its own subcommands (`data`) parses as usual; its
    subcommands' parsers are of this class too."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._intermixing or nested:  # parse_known_intermixed_args calls back here (twice)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _Checkpoints(argparse.Action):
    """A repeatable --checkpoint: args.checkpoints lists every value given, args.checkpoint keeps the first (one
    checkpoint reads exactly as before)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = [*(getattr(namespace, "checkpoints", None) or []), values]
        namespace.checkpoints = seen
        if len(seen) == 1:
            setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medpose", description=__doc__.split("\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)

    t = sub.add_parser("train", help="train a model (single process, or DDP under torchrun)",
                       description="Train from a YAML run config plus dotted overrides (section.key=value). "
                                   "k-fold cross-validation with the folds' ensemble on the test split, as nnU-Net "
                                   "does: `medpose train --config hip_demo --folds all data.num_folds=5` (or "
                                   "--folds 0,2; --resume auto finishes the unfinished folds).")
    t.add_argument("--config", "-c", default="hip_demo", help="YAML file or bundled config name (default: hip_demo)")
    t.add_argument("--resume", metavar="PATH|auto",
                   help="checkpoint file, run directory, or 'auto' (latest checkpoint of log.run_dir)")
    t.add_argument("--resume-weights-only", action="store_true",
                   help="with --resume: take only the model weights of that checkpoint (any strategy's, consolidated "
                        "or not) and start a new run in a new directory at step 0, with a fresh optimizer, LR "
                        "schedule and data order")
    t.add_argument("--no-test", action="store_true", help="skip the held-out test report at the end (with "
                                                          "--folds: the ensemble's)")
    t.add_argument("--folds", metavar="all|K,K...",
                   help="k-fold cross-validation: train fold 0..data.num_folds-1 (all) or the listed ones in turn, "
                        "each a run in <base>/fold_<k> (base: log.run_dir, else runs_root/name), then evaluate "
                        "their ensemble on the shared test split into <base>/ensemble_test and write "
                        "<base>/folds.json; with --resume auto each unfinished fold resumes, finished ones are "
                        "skipped")
    t.add_argument("--fold-tests", action="store_true",
                   help="with --folds: also write each fold's own test report (default: only the ensemble's)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=500 optim.lr=3e-4")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a data split, or on another dataset as a whole",
                       description="Evaluate a checkpoint: report.json, per_image.jsonl, summary.txt and figures. The "
                                   "config defaults to the one stored in the checkpoint (model, task, reader, "
                                   "preprocessing); --data-root scores every image of another folder of the same "
                                   "format with it (no splitting).")
    e.add_argument("--checkpoint", required=True, action=_Checkpoints,
                   help="checkpoint file (.pt); repeat it, or name a `train --folds` base folder (its fold_<k> "
                        "runs) to evaluate the ensemble: outputs averaged per batch before decoding")
    e.add_argument("--config", "-c", help="YAML run config (default: the checkpoint's own resolved config)")
    e.add_argument("--data-root", metavar="DIR", help="another dataset folder (same data.format unless overridden); "
                                                     "implies --split all")
    e.add_argument("--split", choices=["test", "val", "train", "all"],
                   help="the run's test / val / train split, or all = every sample (default: test; all with "
                        "--data-root)")
    e.add_argument("--out", help="output directory (default: <checkpoint dir>/../eval_<split or data folder>; an "
                                "ensemble: <the members' common folder>/ensemble_<split or data folder>)")
    e.add_argument("--corrupt", action="append", metavar="KIND:LEVEL,...",
                   help="robustness: evaluate once more per level with corrupted images, e.g. salt_pepper:0.001,0.01 "
                        "(kinds: salt_pepper density, gaussian / speckle sigma, blur sigma in pixels; repeat the "
                        "option or join kinds with ';'); the table goes into report.json, robustness.md/.csv and "
                        "figures/robustness.png (sets eval.corrupt)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.format=table eval.flip_test=true")

    p = sub.add_parser("predict", help="predict landmarks (and masks, angles, grades, HC) for files and folders",
                       description="Reads each input with the checkpoint's reader and preprocessing (images of any "
                                   "kind; labelme JSON, X-ray CSV and NIfTI inputs bring their truth, drawn too), "
                                   "runs them in batches and writes predictions.csv / predictions.json - landmarks "
                                   "in the original image's pixels with a confidence each, plus the task's clinical "
                                   "measures (hip US: alpha/beta, Graf type; hip X-ray: acetabular index, IHDI "
                                   "grade; spine: disc positions; fetal head: HC in mm) - and an overlay PNG per "
                                   "input.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", action=_Checkpoints,
                     help="checkpoint file (.pt); repeat it, or name a `train --folds` base folder, to predict with "
                          "the ensemble (outputs averaged per batch before decoding)")
    src.add_argument("--onnx", metavar="MODEL", help="a `medpose export` file (ONNX, or TorchScript .pt) with its "
                                                     "sidecar MODEL.json beside it: runs in onnxruntime without the "
                                                     "training stack, same rows as --checkpoint")
    p.add_argument("inputs", nargs="+", help="image files, annotation files of the checkpoint's format, folders "
                                             "(searched recursively) or quoted glob patterns ('scans/*.png')")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
    p.add_argument("--overlays", type=int, default=None, metavar="N",
                   help="draw at most N overlay PNGs (default: one per input; 0: none)")
    p.add_argument("--skip-bad", action="store_true", help="log and list inputs that do not read instead of stopping")
    p.add_argument("--spacing-mm", type=_spacing_arg, metavar="MM[,MM]",
                   help="mm per pixel (x,y, or one value for both) of the inputs that carry no spacing of their own "
                        "(plain images; an annotation that gives one keeps it). Default: the run's data.spacing_mm, "
                        "else a dataset.json with \"spacing_mm\" beside the images, else unknown: figures in mm "
                        "(HC, errors) are left empty")

    xp = sub.add_parser("export", help="a checkpoint's network as ONNX or TorchScript, with its preprocessing "
                                      "and decoding in a sidecar JSON",
                       description="Writes the network (preprocessed image_BCHW in; the outputs decoding needs out) "
                                   "and OUT.json beside it (input size, channels, normalisation, resize rule, "
                                   "landmark names, flip pairs, spacing rule, task, output names, versions, the "
                                   "checkpoint's sha256). The export is checked against PyTorch (fp32, 1e-4). "
                                   "`medpose predict --onnx OUT` reproduces `predict --checkpoint`, ensembles "
                                   "included: several checkpoints (or a `train --folds` base folder) export as one "
                                   "graph that averages the members' outputs.")
    xp.add_argument("--checkpoint", required=True, action=_Checkpoints,
                    help="checkpoint file (.pt) or run directory; repeat it, or name a `train --folds` base folder, "
                         "to export the ensemble as one graph (the mean of the members' raw outputs)")
    xp.add_argument("--format", dest="export_format", default="onnx", metavar="FORMAT",
                    help="onnx (default) or torchscript")
    xp.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt)")
    xp.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (default: fixed)")
    xp.add_argument("--batch", type=int, default=1, help="the fixed batch size without --dynamic-batch (default 1)")
    xp.add_argument("--exporter", default="auto", choices=["auto", "legacy", "dynamo"],
                   help="ONNX exporter: auto (TorchScript-based, dynamo where that one cannot), legacy, dynamo "
                        "(needs onnxscript)")
    xp.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")

    d = sub.add_parser("data", help="dataset utilities: inspect a folder, synthetic sets, conversion to COCO")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    s = dsub.add_parser("synth-hip", help="synthetic hip-ultrasound phantom (labelme JSON + PNG)")
    s.add_argument("--type2-ratio", type=float, default=0.35, help="fraction of Graf type II hips")
    s.add_argument("--english-labels", action="store_true", help="English label names instead of the published ones")
    x = dsub.add_parser("synth-xray", help="synthetic AP pelvis X-rays (published CSV layout, 12 landmarks)")
    x.add_argument("--splits", action="store_true", help="write train/val/test folders (70/15/15) instead of one")
    dsub.add_parser("synth-spine", help="synthetic sagittal spine MRI volumes (NIfTI) with disc point labels")
    dsub.add_parser("synth-hc18", help="synthetic fetal-head ultrasound in the HC18 layout")
    g = dsub.add_parser("synth-ceph", help="synthetic lateral cephalograms: 19 landmarks, 0.1 mm/px, ~1200x1000",
                        description="A skull-in-profile phantom with the 19 landmarks of the public cephalometric "
                                    "benchmarks, written as COCO keypoints, a landmark table or labelme files; "
                                    "train on it with --config landmarks data.format=<layout> data.root=OUT.")
    g.add_argument("--layout", default="coco", choices=["coco", "table", "labelme"])
    g.add_argument("--size", default="1200x1000", help="image H x W (default 1200x1000)")
    g.add_argument("--landmarks", type=int, default=19, help="the first K of the 19 landmarks (default 19)")
    g.add_argument("--format", dest="image_format", default="png", choices=["png", "jpg"])
    for q, n in ((s, 240), (x, 200), (dsub.choices["synth-spine"], 60), (dsub.choices["synth-hc18"], 200), (g, 900)):
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("-n", "--n", type=int, default=n, help=f"number of images / subjects (default {n})")
        q.add_argument("--seed", type=int, default=0)
    i = dsub.add_parser("inspect", help="what a dataset folder holds, read as training would read it",
                        description="Counts, image sizes, channels, spacings, landmark names and how often each is "
                                    "labelled, mask classes, bad files and points outside their image (every file "
                                    "is read, bad ones counted), duplicate ids and identical image files; writes "
                                    "inspect.json and a sheet of images with their landmarks (sheet.png).")
    i.add_argument("root", help="the dataset folder")
    i.add_argument("--format", help="reader (default: detected from the folder): coco, table, labelme, hc18, "
                                    "xray_csv, nifti")
    i.add_argument("--out", help="where inspect.json and sheet.png go (default: runs/inspect_<folder name>)")
    i.add_argument("--sheet", type=int, default=12, help="images on the sheet (default 12, 0: none)")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data.* settings, e.g. "
                                                                     "\"data.reader_args={table: points.csv}\"")
    c = dsub.add_parser("to-coco", help="write a run config's dataset split as a COCO-keypoints JSON (+ images)",
                        description="Reads the dataset of --config with its own reader and writes COCO keypoints "
                                    "(the exchange format of pose tools); train on it with data.format=coco.")
    c.add_argument("--config", "-c", required=True, help="YAML file or bundled config name")
    c.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="which split of the run's splits, or all = every sample (default: train)")
    c.add_argument("--out", required=True, help="output folder (annotations.json + images/)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    pl = sub.add_parser("plan", help="fingerprint a dataset and write a run config planned for it and this machine",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Plan a run for a dataset and this machine (nnU-Net-style):\n"
                                    "  1. read DIR as training would (the reader of --format, detected when not\n"
                                    "     given) and fingerprint it: image sizes and aspect, spacing, landmark\n"
                                    "     spread and nearest-neighbour distances, orientation and size spread,\n"
                                    "     class balance (fingerprint.json beside the plan);\n"
                                    "  2. read the hardware: CPU cores, or the GPU's free memory;\n"
                                    "  3. time two training steps of the planned model (--no-probe: a table);\n"
                                    "  4. write the task's bundled config (or --base) with the planned values\n"
                                    "     overridden - data.input_hw, data.sigma_px, the model width, rotation /\n"
                                    "     flip / scale ranges, class weights, batch size, max_steps, eval_every -\n"
                                    "     each with the figure and rule behind it as a YAML comment, checked by\n"
                                    "     the engine's config loader. Train it: medpose train --config PLAN",
                        epilog="rules: launch/plan.py (module docstring)\n"
                               "example:\n  medpose plan data/ceph --task landmarks --budget-min 20 --out "
                               "runs/ceph_plan.yaml\n  medpose train --config runs/ceph_plan.yaml")
    pl.add_argument("root", metavar="DIR", help="the dataset folder")
    pl.add_argument("--task", required=True, metavar="TASK",
                    help="hip_us, hip_xray, spine_disc, landmarks, segmentation or fetal_head; the plan starts from "
                         "its bundled config (hip_demo, xray_demo, spine_demo, landmarks, seg_zoo, hc18_unet)")
    pl.add_argument("--format", help="reader (default: detected from the folder): coco, table, labelme, hc18, "
                                     "xray_csv, nifti")
    pl.add_argument("--out", help="the plan's YAML file; fingerprint.json goes beside it (default: "
                                  "runs/plan_<folder name>/plan.yaml)")
    pl.add_argument("--budget-min", type=float, default=30.0, metavar="MIN",
                    help="training time budget in minutes: sizes train.max_steps (default 30)")
    pl.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="plan for this device (default auto: cuda when available)")
    pl.add_argument("--base", metavar="CONFIG", help="start from this YAML file or bundled config instead of the "
                                                     "task's")
    pl.add_argument("--no-probe", action="store_true",
                    help="no timed training steps: batch size and steps from a table of measured throughputs")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="applied to the base config and kept as given (never re-planned), e.g. data.num_folds=3")

    from launch.models_cmd import add_parser as add_models_parser
    add_models_parser(sub)

    r = sub.add_parser("pretrain", help="contrastive self-supervised pre-training of a model's encoder",
                       description="InfoNCE against a memory bank (pretrain.bank_size keys, pretrain.dim-d, "
                                   "temperature pretrain.temperature) on two augmented views of the training "
                                   "images, features from pretrain.layer; writes OUT/encoder.pt for fine-tuning "
                                   "with model.init_from=OUT/encoder.pt.")
    r.add_argument("--config", "-c", default="seg_zoo", help="YAML file or bundled config name (default: seg_zoo)")
    r.add_argument("--out", help="output folder (default: runs/pretrain_<log.name>)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. pretrain.steps=500 model.name=unet")

    m = sub.add_parser("demo", help="the main job: phantom data → train MultiHipPoseNet → held-out report",
                       description="Generates the phantom, trains with launch/configs/hip_demo.yaml and writes "
                                   "report.json, curves and overlays into the run directory.")
    m.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return ap


def _cmd_train(args) -> int:
    from engine.config import load_config
    from engine.run import train
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if cfg.model.name == "look_once":      # spine_disc's point classifier: its own loop over label point sets
        if args.folds:
            raise SystemExit("medpose train: --folds is not supported for model.name=look_once")
        from engine.tasks.spine_disc.look_once import train_look_once
        train_look_once(cfg)
        return 0
    if args.folds:
        from engine.folds import format_summary, train_folds
        summary = train_folds(cfg, args.folds, resume=args.resume, final_test=not args.no_test,
                              fold_tests=args.fold_tests, resume_weights_only=args.resume_weights_only)
        if summary is not None:
            print(format_summary(summary))
        return 0
    result = train(cfg, resume=args.resume, final_test=not args.no_test,
                   resume_weights_only=args.resume_weights_only)
    return 0 if result else 1


def _cmd_eval(args) -> int:
    from engine.checkpoint import load_checkpoint_file
    from engine.config import load_config
    from engine.ensemble import resolve_checkpoints
    from engine.run import evaluate_checkpoint
    ckpt_path = Path(args.checkpoint)
    given = list(getattr(args, "checkpoints", None) or [args.checkpoint])
    members = resolve_checkpoints(given) if len(given) > 1 or ckpt_path.is_dir() else [ckpt_path]
    ckpt_path = members[0]                # the config, when none is given, is the (first) checkpoint's
    overrides = list(args.overrides)
    if args.data_root:
        overrides = [f"data.root={args.data_root}", "data.synthetic=false", *overrides]
    split = args.split or ("all" if args.data_root else "test")
    if args.corrupt:  # quoted, so YAML reads the spec as one string
        import json
        overrides.append("eval.corrupt=" + json.dumps(";".join(args.corrupt)))
    if args.config:
        cfg = load_config(resolve_config_path(args.config), overrides)
    else:
        client = load_checkpoint_file(ckpt_path).get("client", {})
        if "config" not in client:
            raise SystemExit(f"medpose eval: {ckpt_path} carries no config; pass --config")
        cfg = load_config(None, overrides, base=client["config"])
    name = f"eval_{Path(args.data_root).resolve().name}" if args.data_root else f"eval_{split}"
    if len(members) > 1:
        import os
        common = Path(os.path.commonpath([str(p.resolve().parent.parent) for p in members]))
        out = Path(args.out) if args.out else common / name.replace("eval_", "ensemble_", 1)
        report = evaluate_checkpoint(cfg, members, out, split=split)
    else:
        out = Path(args.out) if args.out else ckpt_path.resolve().parent.parent / name
        report = evaluate_checkpoint(cfg, ckpt_path, out, split=split)
    if report is not None:
        print(f"report: {out / 'report.json'}")
    return 0


def _spacing_arg(text: str) -> list[float]:
    """--spacing-mm 0.1 or 0.1,0.12 -> floats (checked for being positive by engine/predict.with_spacing)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or two separated by a comma (mm per pixel, x,y), got "
                                         f"{text!r}") from None


def _cmd_predict(args) -> int:
    if args.batch_size < 1:
        raise SystemExit("medpose predict: --batch-size must be >= 1")
    if args.onnx:
        from engine.onnx_predict import predict_files_exported
        rows = predict_files_exported(args.onnx, list(args.inputs), Path(args.out), batch_size=args.batch_size,
                                      overlays=args.overlays, skip_bad=args.skip_bad, progress=True,
                                      spacing_mm=args.spacing_mm)
    else:
        from engine.predict import predict_files
        given = list(getattr(args, "checkpoints", None) or [args.checkpoint])
        rows = predict_files(given if len(given) > 1 else args.checkpoint, list(args.inputs), Path(args.out),
                             batch_size=args.batch_size, overlays=args.overlays, skip_bad=args.skip_bad,
                             progress=True, spacing_mm=args.spacing_mm)
    print(f"wrote {len(rows)} predictions to {Path(args.out) / 'predictions.csv'}")
    return 0


def _cmd_export(args) -> int:
    from engine.export import export_checkpoint
    given = list(getattr(args, "checkpoints", None) or [args.checkpoint])
    side = export_checkpoint(given if len(given) > 1 else args.checkpoint, args.out, args.export_format,
                             dynamic_batch=args.dynamic_batch, batch=args.batch, exporter=args.exporter,
                             verify=not args.no_verify)
    m = side["model"]
    members = (side.get("ensemble") or {}).get("members") or []
    what = f"ensemble of {len(members)}: {', '.join(x['model'] for x in members)}" if members else m["name"]
    print(f"wrote {args.out} ({what}, {m['format']} via {m['exporter']}, outputs {', '.join(m['output_names'])}, "
          f"batch {m['batch'] or 'dynamic'}) and {args.out}.json")
    if "verified" in side:
        worst = max(v for b in side["verified"].values() if isinstance(b, dict)
                    for k, v in b.items() if k.endswith("_max_abs"))
        print(f"matches PyTorch (fp32) within {worst:.2g} at batch "
              + ", ".join(k[5:] for k in side["verified"] if k.startswith("batch")))
    return 0


def _cmd_inspect(args) -> int:
    from data_pipelines.inspect import detect_format, format_report, inspect_dataset
    from engine.config import load_config
    cfg = load_config(None, [f"data.root={args.root}", "data.synthetic=false", *args.overrides])
    fmt = args.format or detect_format(Path(args.root), cfg.data.reader_args)
    data_cfg = dataclasses.replace(cfg.data, format=fmt)
    out = Path(args.out) if args.out else Path(cfg.log.runs_root) / f"inspect_{Path(args.root).resolve().name}"
    report = inspect_dataset(data_cfg, out, sheet=args.sheet)
    print(format_report(report))
    print(f"  report: {out / 'inspect.json'}")
    return 0


def _cmd_plan(args) -> int:
    from launch.plan import format_summary, make_plan
    result = make_plan(args.root, args.task, fmt=args.format, out=args.out, budget_min=args.budget_min,
                       device=args.device, base=args.base, overrides=args.overrides, use_probe=not args.no_probe)
    print(format_summary(result))
    return 0


def _cmd_data(args) -> int:
    if args.data_command == "inspect":
        return _cmd_inspect(args)
    out = Path(args.out)
    if args.data_command == "synth-hip":
        from data_pipelines.synthetic.hip import generate_hip_dataset
        paths = generate_hip_dataset(out, args.n, seed=args.seed, type2_ratio=args.type2_ratio,
                                     english_labels=args.english_labels, progress=True)
    elif args.data_command == "synth-xray":
        from data_pipelines.synthetic.xray import generate_xray_dataset
        paths = generate_xray_dataset(out, args.n, seed=args.seed, split_fracs=(0.7, 0.15, 0.15) if args.splits
                                      else None, progress=True)
    elif args.data_command == "synth-spine":
        from data_pipelines.synthetic.spine import generate_spine_dataset
        paths = generate_spine_dataset(out, args.n, seed=args.seed, progress=True)
    elif args.data_command == "synth-hc18":
        from data_pipelines.synthetic.hc18 import generate_hc18_dataset
        generate_hc18_dataset(out, args.n, seed=args.seed, progress=True)
        paths = sorted((out / "images").glob("*.png"))
    elif args.data_command == "synth-ceph":
        from data_pipelines.synthetic.ceph import generate_ceph_dataset
        try:
            hw = tuple(int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"medpose data synth-ceph: --size must look like 1200x1000, got {args.size!r}") from None
        generate_ceph_dataset(out, args.n, seed=args.seed, image_hw=hw, num_landmarks=args.landmarks,
                              layout=args.layout, image_format=args.image_format, progress=True)
        paths = range(args.n)
    else:
        return _to_coco(args)
    print(f"wrote {len(paths)} samples to {out}")
    return 0


def _to_coco(args) -> int:
    import types

    from data_pipelines.readers.coco_export import dataset_to_coco
    from engine.config import load_config
    from engine.run import build_data, resolve_config
    cfg = resolve_config(load_config(resolve_config_path(args.config), args.overrides))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1),
                                   barrier=lambda: None)
    data = build_data(cfg, out, single, split="all" if args.split == "all" else "runs")
    path = dataset_to_coco(data[args.split], out / "annotations.json", out / "images", category_name=cfg.data.task)
    print(f"wrote {len(data[args.split])} samples of the {args.split} split to {path}")
    return 0


def _cmd_pretrain(args) -> int:
    from engine.config import load_config
    from engine.pretrain import pretrain
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    out = Path(args.out) if args.out else Path(cfg.log.runs_root) / f"pretrain_{cfg.log.name}"
    s = pretrain(cfg, out)
    print(f"InfoNCE loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} (chance {s['chance_loss']:.3f}) over "
          f"{s['steps']} steps, features from '{s['layer']}'.\nFine-tune with: medpose train --config "
          f"{args.config} model.init_from={s['encoder']}")
    return 0


def _cmd_models(args) -> int:
    from launch.models_cmd import run
    return run(args)


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
    from data_pipelines.errors import DataError, OptionError
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "data": _cmd_data,
                "demo": _cmd_demo, "models": _cmd_models, "export": _cmd_export,
                "pretrain": _cmd_pretrain, "plan": _cmd_plan}
    from engine.checkpoint import CheckpointError
    from engine.export import ExportError
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, OptionError, CheckpointError, ExportError, FileNotFoundError) as e:
        # One line on the console (a DataLoader worker's DataError carries the worker's traceback: its file and
        # problem only). The run wrote the traceback, cause chain included, into its train.log (engine.logger.
        # log_failure): say where.
        line = f"{e.path}: {e.problem}" if isinstance(e, DataError) and e.path and "\n" in str(e) else str(e)
        log = getattr(e, "traceback_log", None)
        print(f"medpose {args.command}: error: {line}" + (f" (traceback: {log})" if log else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
