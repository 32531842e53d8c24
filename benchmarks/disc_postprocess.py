"""Disc post-processing on the synthetic spine set: the skeleton search (models/skeleton.py) against the look-once
candidate classifier (models/look_once.py), timed against the number of false candidates and scored with the same
spine_disc metrics (engine/tasks/spine_disc/metrics.py: DTT, FNR, FPR).

    python benchmarks/disc_postprocess.py --data ROOT --classifier LOOK_ONCE.pt [--hourglass CKPT] --out FILE.md

Parts:
  1. time per image vs false candidates (1, 10, 100): every test-split image's true discs plus n synthetic false
     candidates (models.look_once.synthetic_candidates: Gaussian around the discs, rejected near a disc or another
     false point), given to
       - MedPose's skeleton search (select_candidates: similarity hypotheses from candidate pairs, polynomial),
       - the exhaustive combination search the published post-processing runs (every choice of one candidate or
         none per channel, each scored by the least-squares similarity fit to the mean skeleton), stopped at
         --cap seconds per image and reported as "> cap" when it does not finish,
       - the look-once classifier (one forward pass of N = 20 points + the labelling);
     and the DTT / FNR / FPR each gives on those candidates;
  2. with --hourglass: a trained spine_disc checkpoint evaluated on the test split by the engine's own evaluation
     (engine.run.evaluate_checkpoint) twice, eval.task_args.postprocess = skeleton and = look_once: the same network
     predictions, the same metrics code.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED = ("published (Spine Generic): look once T1 1.2 mm / 0.7 % / 0 %, T2 1.28 mm / 0.9 % / 0 %; hourglass + "
             "attention with the search T1 1.32 mm / 0.32 % / 0.0 %, T2 1.31 mm / 1.2 % / 0.6 %; classifier accuracy "
             "0.959, AUC 0.955, 2.5-3 ms per image; search tree 0.03 s (1 false point) to 319 s (100)")


def exhaustive_search(cands, prior, cap_s: float) -> tuple[list[int] | None, int, int]:
    """Every combination of one candidate or none per channel known to the prior (at least two kept), scored with
    select_candidates' objective on the least-squares similarity from the prior's points to the kept candidates
    (residuals in prior units). Returns (choice or None when stopped at the cap, combinations
    evaluated, combinations in all)."""
    from models.skeleton import _similarity
    known = prior.known_K
    chans = [k for k in range(len(cands)) if known[k]]
    m = prior.offsets_K2[:, 0] + 1j * prior.offsets_K2[:, 1]
    options = [range(-1, len(cands[k])) for k in chans]
    # the objective of select_candidates: (d / sigma_k)^2 per kept disc, 4 x the best score for a dropped channel
    sigma = np.maximum(np.nan_to_num(prior.spread_K, nan=0.05), 0.05)
    absent = {k: 4.0 * min(max(cands[k][0][2], 0.0), 1.0) if cands[k] else 0.0 for k in chans}
    total = int(np.prod([len(o) for o in options], dtype=np.float64))
    best, best_cost, n = None, np.inf, 0
    t0 = time.perf_counter()
    for combo in itertools.product(*options):
        n += 1
        if n % 2048 == 0 and time.perf_counter() - t0 > cap_s:
            return None, n, total
        kept = [(k, c) for k, c in zip(chans, combo) if c >= 0]
        if len(kept) < 2:
            continue
        z = np.array([cands[k][c][0] + 1j * cands[k][c][1] for k, c in kept])
        src = m[[k for k, _ in kept]]
        a, b = _similarity(src, z)
        if abs(a) < 1e-9:
            continue
        resid = np.abs(a * src + b - z) / abs(a)
        cost = float(np.sum((resid / sigma[[k for k, _ in kept]]) ** 2))
        cost += sum(absent[k] for k, c in zip(chans, combo) if c < 0)
        if cost < best_cost:
            best, best_cost = [-1] * len(cands), cost
            for k, c in kept:
                best[k] = c
    return best, n, total


def _score(acc_cls, kpts_K2, present_K, orig) -> None:
    acc_cls.update_sample({"kpts_px_K2": np.nan_to_num(kpts_K2), "kpt_present_K": present_K}, orig, {})


def synthetic_part(data_root: str, classifier_path: str, n_false_list, cap_s: float, max_images: int, seed: int):
    from engine.config import load_config
    from engine.run import build_data, make_strategy, resolve_config
    from engine.tasks.spine_disc.look_once import load_look_once
    from engine.tasks.spine_disc.metrics import SpineDiscAccumulator
    from models.look_once import look_once_select, synthetic_candidates, to_channel_lists
    from models.skeleton import fit_skeleton, select_candidates
    cfg = resolve_config(load_config(ROOT / "launch/configs/spine_demo.yaml", [f"data.root={data_root}",
                                                                                 "data.num_workers=0"]))
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(cfg, Path(tmp), make_strategy(cfg))
    prior = fit_skeleton(*data["train"].keypoints_original())
    clf = load_look_once(classifier_path)
    test = data["test"]
    origs = [test.original(i) for i in range(len(test))][:max_images]
    rng = np.random.default_rng(seed)
    rows = []
    for n_false in n_false_list:
        accs = {name: SpineDiscAccumulator(num_keypoints=len(origs[0]["kpts_px_K2"]))
                for name in ("skeleton", "exhaustive", "look_once")}
        times = {name: [] for name in accs}
        capped = 0
        done_exh = 0
        for orig in origs:
            xy, ch, sc, _ = synthetic_candidates(orig["kpts_px_K2"], orig["kpts_visible_K"], n_false, rng)
            cands = to_channel_lists(xy, ch, sc, len(orig["kpts_px_K2"]))
            k = len(cands)
            t0 = time.perf_counter()
            choice = select_candidates(cands, prior)
            times["skeleton"].append(time.perf_counter() - t0)
            kp, pres = np.full((k, 2), np.nan), np.zeros(k, bool)
            for c, j in enumerate(choice):
                if j >= 0:
                    kp[c], pres[c] = cands[c][j][:2], True
            _score(accs["skeleton"], kp, pres, orig)
            t0 = time.perf_counter()
            kpl, presl = look_once_select([cands], clf)
            times["look_once"].append(time.perf_counter() - t0)
            _score(accs["look_once"], kpl[0], presl[0], orig)
            t0 = time.perf_counter()
            best, _, total = exhaustive_search(cands, prior, cap_s)
            times["exhaustive"].append(time.perf_counter() - t0)
            if best is None:
                capped += 1
                continue
            done_exh += 1
            kp, pres = np.full((k, 2), np.nan), np.zeros(k, bool)
            for c, j in enumerate(best):
                if j >= 0:
                    kp[c], pres[c] = cands[c][j][:2], True
            _score(accs["exhaustive"], kp, pres, orig)
        for name, acc in accs.items():
            figs = acc.compute() if (name != "exhaustive" or done_exh) else {}
            t = np.asarray(times[name])
            rows.append({"n_false": n_false, "method": name, "images": len(origs),
                         "ms_mean": 1e3 * float(t.mean()), "ms_max": 1e3 * float(t.max()),
                         "capped": capped if name == "exhaustive" else 0, "scored_images":
                         done_exh if name == "exhaustive" else len(origs),
                         "dtt_mm": figs.get("dtt_mm"), "fnr_pct": figs.get("fnr_pct"), "fpr_pct": figs.get("fpr_pct")})
            print(json.dumps(rows[-1]), flush=True)
    return rows, len(data["train"]), len(origs)


def hourglass_part(hourglass: str, classifier_path: str, data_root: str) -> list[dict]:
    from engine.checkpoint import load_checkpoint_file
    from engine.config import load_config
    from engine.run import evaluate_checkpoint
    from engine.tasks.spine_disc.task import SpineDiscTask
    from models.skeleton import heatmap_candidates
    base = load_checkpoint_file(hourglass)["client"]["config"]
    rows = []
    for post in ("skeleton", "look_once"):
        args = f"eval.task_args={{postprocess: {post}" + (f", look_once_checkpoint: '{classifier_path}'}}"
                                                           if post == "look_once" else "}")
        cfg = load_config(None, [args, f"data.root={data_root}", "data.num_workers=0", "log.overlays=0"], base=base)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rep = evaluate_checkpoint(cfg, hourglass, Path(tmp), split="test")
            wall = time.perf_counter() - t0
        rows.append({"postprocess": post, "dtt_mm": rep.get("dtt_mm"), "fnr_pct": rep.get("fnr_pct"),
                     "fpr_pct": rep.get("fpr_pct"), "pck": rep.get("pck"), "eval_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    # decoder time per image on these predictions (network forward excluded)
    from engine.run import load_for_inference
    model, hcfg, task, _ = load_for_inference(hourglass)
    lo = SpineDiscTask(postprocess="look_once", look_once_checkpoint=classifier_path)
    lo.prior = task.prior
    from engine.run import build_data, make_strategy
    hcfg = dataclasses.replace(hcfg, data=dataclasses.replace(hcfg.data, root=data_root, num_workers=0))
    with tempfile.TemporaryDirectory() as tmp:
        test = build_data(hcfg, Path(tmp), make_strategy(hcfg))["test"]
    with torch.no_grad():
        heat = torch.cat([model(test[i]["image_CHW"][None].float())["heatmap_BKHW"] for i in range(len(test))])
    for name, dec in (("skeleton", task.decoder(hcfg)), ("look_once", lo.decoder(hcfg))):
        t = []
        for i in range(len(heat)):
            t0 = time.perf_counter()
            dec({"heatmap_BKHW": heat[i:i + 1]})
            t.append(time.perf_counter() - t0)
        n_cand = [sum(len(c) for c in heatmap_candidates(h.numpy(), task.rel_threshold, task.abs_threshold,
                                                          peak=float(hcfg.data.heatmap_peak))) for h in heat]
        next(r for r in rows if r["postprocess"] == name).update(
            {"decode_ms": 1e3 * float(np.mean(t)), "candidates_mean": float(np.mean(n_cand)),
             "test_images": len(heat)})
    return rows


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def write_markdown(out: Path, syn_rows, hg_rows, info: dict) -> None:
    lines = [f"# Disc post-processing: skeleton search vs look-once classifier ({info['date']}, CPU)", "",
             f"Command: `{info['command']}`", "",
             f"Machine: {info['machine']}. Synthetic spine set ({info['data']}): {info['train']} training volumes "
             f"(skeleton prior; the classifier's labels), {info['images']} test images. Classifier: "
             f"`{info['classifier_cmd']}` -> validation accuracy {info['clf_acc']}, AUC {info['clf_auc']} "
             f"(synthetic sets from the validation split's labels).", "",
             "## Time per image and accuracy vs false candidates", "",
             "Each test image's true discs plus n synthetic false candidates (Gaussian around the discs, at least "
             "0.5 disc intervals from a disc). `skeleton` = MedPose's search (similarity hypotheses from candidate "
             f"pairs, polynomial); `exhaustive` = every combination of one candidate or none per channel (the "
             f"published search), stopped at {info['cap']} s per image; `look_once` = classifier (N = 20) + labelling. "
             "DTT / FNR / FPR by the spine_disc metrics code on the chosen points.", "",
             "| false candidates | method | ms / image (mean) | ms (max) | DTT mm | FNR % | FPR % |",
             "|---|---|---|---|---|---|---|"]
    for r in syn_rows:
        if r["method"] == "exhaustive" and r["capped"]:
            ms = f"> {1e3 * info['cap']:.0f} ({r['capped']}/{r['images']} images stopped at the cap)"
            mx = "—"
            figs = ("not finished",) * 3 if not r["scored_images"] else tuple(
                f"{_f(r[key])} ({r['scored_images']} finished images)" for key in ("dtt_mm", "fnr_pct", "fpr_pct"))
        else:
            ms, mx = _f(r["ms_mean"], 3), _f(r["ms_max"], 3)
            figs = (_f(r["dtt_mm"]), _f(r["fnr_pct"]), _f(r["fpr_pct"]))
        lines.append(f"| {r['n_false']} | {r['method']} | {ms} | {mx} | {figs[0]} | {figs[1]} | {figs[2]} |")
    if hg_rows:
        lines += ["", "## On the same hourglass predictions (test split)", "",
                  f"Hourglass: `{info['hourglass_cmd']}`. `medpose eval` of that checkpoint with "
                  "eval.task_args.postprocess = skeleton and = look_once (engine.run.evaluate_checkpoint, the same "
                  "forward pass and metrics code); decode time = the decoder alone on the stored heatmaps.", "",
                  "| post-processing | DTT mm | FNR % | FPR % | PCK | decode ms / image | candidates / image |",
                  "|---|---|---|---|---|---|---|"]
        for r in hg_rows:
            lines.append(f"| {r['postprocess']} | {_f(r['dtt_mm'])} | {_f(r['fnr_pct'])} | {_f(r['fpr_pct'])} | "
                         f"{_f(r['pck'])} | {_f(r.get('decode_ms'), 2)} | {_f(r.get('candidates_mean'), 1)} |")
    lines += ["", "## Published figures beside ours", "", PUBLISHED + ".", ""]
    lines += info.get("notes", [])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="synthetic spine root (generated on first use)")
    ap.add_argument("--classifier", required=True, help="look_once.pt from `medpose train --config spine_look_once`")
    ap.add_argument("--hourglass", help="a trained spine_disc checkpoint (part 2)")
    ap.add_argument("--out", required=True, help="markdown file to write (a .json with the rows beside it)")
    ap.add_argument("--cap", type=float, default=10.0, help="seconds per image for the exhaustive search")
    ap.add_argument("--max-images", type=int, default=12)
    ap.add_argument("--false", default="1,10,100", help="numbers of false candidates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier-cmd", default="", help="how the classifier was trained (for the table)")
    ap.add_argument("--hourglass-cmd", default="", help="how the hourglass was trained (for the table)")
    ap.add_argument("--note", action="append", default=[], help="a line added under the tables")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n_false = [int(v) for v in args.false.split(",")]
    syn_rows, n_train, n_img = synthetic_part(args.data, args.classifier, n_false, args.cap, args.max_images,
                                              args.seed)
    hg_rows = hourglass_part(args.hourglass, args.classifier, args.data) if args.hourglass else []
    from engine.checkpoint import safe_torch_load
    metrics = safe_torch_load(args.classifier).get("metrics", {})
    import os
    import platform
    info = {"date": time.strftime("%Y-%m-%d"), "command": "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, 1 thread (shared with other jobs: absolute times are noisy)",
            "data": args.data, "train": n_train, "images": n_img, "cap": args.cap,
            "classifier_cmd": args.classifier_cmd or args.classifier, "hourglass_cmd": args.hourglass_cmd or
            args.hourglass, "clf_acc": _f(metrics.get("accuracy"), 3), "clf_auc": _f(metrics.get("auc"), 3),
            "notes": args.note}
    out = Path(args.out)
    write_markdown(out, syn_rows, hg_rows, info)
    out.with_suffix(".json").write_text(json.dumps({"synthetic": syn_rows, "hourglass": hg_rows, "info": info},
                                                   indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
