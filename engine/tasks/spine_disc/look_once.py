"""Training and loading of the "look once" candidate classifier (models/look_once.py) for spine_disc.

`medpose train --config spine_look_once` (model.name = look_once) comes here instead of the engine's trainer: the
trainer is built around image batches from a reader, a model forward on images and the task's image-level metrics,
while this classifier learns from small point sets generated on the fly from label coordinates. A dedicated loop of
a few dozen lines (Adam, NLL over the real points, a fixed validation set) is simpler than adapting the trainer to a
second kind of data.

Training sets: for a random training-split image, its visible disc labels (original pixels, randomly rotated by up to
data.rotation_deg and mirrored with data.flip_p) plus 1..max_false synthetic false candidates
(models.look_once.synthetic_candidates). With model.args.candidates_from = an hourglass checkpoint, the candidates
that hourglass finds on the (unaugmented) training images are added: a candidate within `match_frac` disc intervals of
a visible disc is true, any other false; half of each batch is then drawn from them.

The checkpoint (`look_once.pt` in the run directory, plain tensors and containers): {"kind": "look_once",
"weights", "args": builder arguments, "metrics": validation accuracy / AUC, "config"}; SpineDiscTask loads it with
`load_look_once` for eval.task_args.postprocess = look_once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from engine.config import Config, ConfigError

LOG = logging.getLogger("medpose")
WHERE = "engine/tasks/spine_disc/look_once.py"
MODEL_NAME = "look_once"
CKPT_KIND = "look_once"


@dataclasses.dataclass
class LookOnceArgs:
    """model.args of model.name = look_once."""
    num_points: int = 20
    """Candidate points per set (N); fewer are padded and masked, more keep the N highest-scoring."""
    attention: bool = True
    """The relational attention sigmoid(Linear(N, N)(Conv1d(2->1)(points)))."""
    width_div: int = 1
    """Divides every layer width (1 = the published classifier)."""
    max_false: int = 14
    """Synthetic false candidates per training set: uniform in 1..max_false."""
    candidates_from: str = ""
    """An hourglass checkpoint: also train on the candidates it finds on the training images."""
    match_frac: float = 0.3
    """With candidates_from: a candidate within this many disc intervals of a visible disc is a true one."""
    val_sets: int = 400
    """Fixed validation point sets (from the validation split's labels) for the accuracy / AUC."""


def look_once_args(cfg: Config) -> LookOnceArgs:
    fields = {f.name for f in dataclasses.fields(LookOnceArgs)}
    unknown = sorted(set(cfg.model.args) - fields)
    if unknown:
        raise ConfigError(f"model.args: unknown key '{unknown[0]}' for model '{MODEL_NAME}' (valid: "
                          f"{', '.join(sorted(fields))})")
    args = LookOnceArgs(**cfg.model.args)
    if args.num_points < 2 or args.max_false < 1 or args.val_sets < 1 or not 0 < args.match_frac < 1:
        raise ConfigError(f"model.args: look_once needs num_points >= 2, max_false >= 1, val_sets >= 1 and "
                          f"0 < match_frac < 1; got {dataclasses.asdict(args)}")
    if args.candidates_from and not Path(args.candidates_from).is_file():
        raise ConfigError(f"model.args.candidates_from: {args.candidates_from}: no such hourglass checkpoint file")
    return args


def load_look_once(path: str | Path, device: torch.device | None = None):
    """The classifier stored by `medpose train --config spine_look_once` (weights-only load), in eval mode."""
    from models.look_once import build_look_once
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: look-once classifier checkpoint not found (train one with "
                              f"`medpose train --config spine_look_once`; it writes look_once.pt in its run directory)")
    ckpt = safe_torch_load(path, "look-once classifier checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CKPT_KIND or "weights" not in ckpt:
        raise CheckpointError(f"{path}: not a look-once classifier checkpoint (expected the look_once.pt written by "
                              f"`medpose train --config spine_look_once`)")
    model = build_look_once(**ckpt.get("args", {}))
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the classifier {ckpt.get('args')}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device or torch.device("cpu")).eval()


# ------------------------------------------------------------------------------------------------ point sets
def _augment(kpts_K2: np.ndarray, rng: np.random.Generator, rotation_deg: float, flip_p: float) -> np.ndarray:
    """Labels rotated about their centre and mirrored left-right (the classifier sees normalised points, so only
    the shape changes matter)."""
    pts = np.asarray(kpts_K2, dtype=np.float64)
    c = np.nanmean(pts, axis=0)
    a = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = (pts - c) @ rot.T
    if rng.random() < flip_p:
        out[:, 0] = -out[:, 0]
    return out + c


def encode_set(xy: np.ndarray, chan: np.ndarray, score: np.ndarray, is_true: np.ndarray, num_points: int):
    """(points_N2, mask_N, labels_N) of one candidate set, or None when its candidates give no frame."""
    from models.look_once import candidate_frame, point_set
    frame = candidate_frame(xy, chan, score)
    if frame is None:
        return None
    pts, mask, index = point_set(xy, score, frame, num_points)
    labels = np.zeros(num_points, dtype=np.int64)
    labels[mask] = is_true[index[mask]]
    return pts, mask, labels


def synthetic_set(kpts_K2, visible_K, rng: np.random.Generator, args: LookOnceArgs, rotation_deg: float = 0.0,
                  flip_p: float = 0.0):
    from models.look_once import synthetic_candidates
    kpts = _augment(kpts_K2, rng, rotation_deg, flip_p) if (rotation_deg or flip_p) else kpts_K2
    cand = synthetic_candidates(kpts, visible_K, int(rng.integers(1, args.max_false + 1)), rng)
    return encode_set(*cand, args.num_points)


def hourglass_candidate_sets(checkpoint: str | Path, data_root: str, match_frac: float) -> list[tuple]:
    """(xy, chan, score, is_true) of the candidates a trained hourglass finds on its training split's images (no
    augmentation), truth from the labels in the network-input frame."""
    from data_pipelines.dataset import subset_by_ids
    from engine.run import build_data, load_for_inference, make_strategy
    from models.skeleton import heatmap_candidates
    from models.look_once import flatten_candidates
    model, hcfg, task, _ = load_for_inference(checkpoint)
    if hcfg.data.task != "spine_disc":
        raise ConfigError(f"model.args.candidates_from: {checkpoint} is a '{hcfg.data.task}' checkpoint, not a "
                          f"spine_disc one")
    hcfg = dataclasses.replace(hcfg, data=dataclasses.replace(hcfg.data, root=data_root, num_workers=0))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(hcfg, Path(tmp), make_strategy(hcfg), split="runs")
    train = data["train"]
    plain = subset_by_ids(train, [r.id for r in train.records], None)
    sets = []
    peak = float(hcfg.data.heatmap_peak)
    with torch.no_grad():
        for i in range(len(plain)):
            item = plain[i]
            heat = model(item["image_CHW"][None].float())["heatmap_BKHW"][0].numpy()
            cands = heatmap_candidates(heat, task.rel_threshold, task.abs_threshold, peak=peak)
            xy, chan, score = flatten_candidates(cands)
            kp = item["kpts_px_K2"].numpy().astype(np.float64)
            vis = item["kpts_visible_K"].numpy().astype(bool)
            t = kp[vis]
            if len(xy) == 0 or len(t) < 2:
                continue
            interval = float(np.median(np.linalg.norm(np.diff(t, axis=0), axis=1) / np.diff(np.flatnonzero(vis))))
            d = np.linalg.norm(xy[:, None] - t[None], axis=2).min(axis=1)
            sets.append((xy, chan, score, d < match_frac * interval))
    return sets


def _batch(sets: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([s[0] for s in sets])), torch.from_numpy(np.stack([s[1] for s in sets])),
            torch.from_numpy(np.stack([s[2] for s in sets])))


def auc_score(prob: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random true > a random false), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(prob)
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def evaluate_sets(model, sets: list[tuple]) -> dict[str, float]:
    """Accuracy (argmax) and AUC of P(true) over the real points of `sets`."""
    model.eval()
    pts, mask, lab = _batch(sets)
    prob = model(pts, mask)["log_probs_BN2"][..., 1].exp()
    m = mask.numpy()
    p, y = prob.numpy()[m], lab.numpy()[m].astype(bool)
    return {"accuracy": float(((p > 0.5) == y).mean()), "auc": auc_score(p, y), "points": int(m.sum())}


def train_look_once(cfg: Config) -> Path:
    """Train the classifier from the config (module docstring); returns the checkpoint path."""
    from engine.run import build_data, make_strategy
    from models.look_once import build_look_once, masked_nll, precise_bn
    args = look_once_args(cfg)
    if cfg.data.task != "spine_disc":
        raise ConfigError(f"data.task: the look_once classifier labels spine discs (data.task=spine_disc), got "
                          f"'{cfg.data.task}'")
    data_cfg = dataclasses.replace(cfg.data, format="nifti" if cfg.data.format == "auto" else cfg.data.format)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    run_dir = Path(cfg.log.run_dir) if cfg.log.run_dir else Path(cfg.log.runs_root) / cfg.log.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg, run_dir, make_strategy(cfg), split="runs")
    kpts, vis = data["train"].keypoints_original()
    vkpts, vvis = data["val"].keypoints_original()
    ok = vis.sum(axis=1) >= 2
    if not ok.any():
        raise ConfigError(f"data.root: {cfg.data.root}: no training image has 2 or more labelled discs")
    kpts, vis = kpts[ok], vis[ok]
    rng = np.random.default_rng(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    hg_sets: list[tuple] = []
    if args.candidates_from:
        raw = hourglass_candidate_sets(args.candidates_from, cfg.data.root, args.match_frac)
        hg_sets = [s for s in (encode_set(*r, args.num_points) for r in raw) if s is not None]
        LOG.info("look_once: %d candidate sets from %s (%d candidates, %d true)", len(hg_sets), args.candidates_from,
                 sum(len(r[0]) for r in raw), sum(int(r[3].sum()) for r in raw))
    vsrc = (vkpts, vvis) if (vvis.sum(axis=1) >= 2).any() else (kpts, vis)
    vrng = np.random.default_rng(cfg.train.seed + 1)
    vidx = np.flatnonzero(vsrc[1].sum(axis=1) >= 2)
    val_sets = [s for s in (synthetic_set(vsrc[0][i], vsrc[1][i], vrng, args)
                            for i in vrng.choice(vidx, size=args.val_sets)) if s is not None]
    model = build_look_once(args.num_points, args.attention, args.width_div)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train.max_steps, cfg.optim.lr * cfg.optim.min_lr_ratio)
    log_path = run_dir / "look_once_train.jsonl"
    t0 = time.perf_counter()
    with open(log_path, "w") as log_f:
        for step in range(1, cfg.train.max_steps + 1):
            model.train()
            batch: list[tuple] = []
            while len(batch) < cfg.train.batch_size:
                if hg_sets and rng.random() < 0.5:
                    batch.append(hg_sets[int(rng.integers(len(hg_sets)))])
                    continue
                i = int(rng.integers(len(kpts)))
                s = synthetic_set(kpts[i], vis[i], rng, args, cfg.data.rotation_deg, cfg.data.flip_p)
                if s is not None:
                    batch.append(s)
            pts, mask, lab = _batch(batch)
            loss = masked_nll(model(pts, mask)["log_probs_BN2"], lab, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                log_f.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")
                log_f.flush()
    bn_batches = []
    for _ in range(8):                       # BatchNorm statistics of the final weights (models.look_once.precise_bn)
        sets = [synthetic_set(kpts[i], vis[i], rng, args) for i in rng.integers(len(kpts), size=64)]
        sets = [s for s in sets if s is not None] + ([hg_sets[int(j)] for j in rng.integers(len(hg_sets), size=32)]
                                                     if hg_sets else [])
        bn_batches.append(_batch(sets)[:2])
    precise_bn(model, bn_batches)
    metrics = evaluate_sets(model, val_sets)
    if hg_sets:
        metrics.update({f"hourglass_{k}": v for k, v in evaluate_sets(model, hg_sets).items()})
    metrics["train_seconds"] = time.perf_counter() - t0
    path = run_dir / "look_once.pt"
    atomic_torch_save({"kind": CKPT_KIND, "weights": model.state_dict(),
                       "args": {"num_points": args.num_points, "attention": args.attention,
                                "width_div": args.width_div},
                       "metrics": metrics, "config": cfg.to_dict()}, path)
    (run_dir / "look_once_metrics.json").write_text(json.dumps(metrics, indent=1))
    LOG.info("look_once: validation accuracy %.3f, AUC %.3f over %d points; %s", metrics["accuracy"],
             metrics["auc"], metrics["points"], path)
    print(f"look-once classifier: {path} (validation accuracy {metrics['accuracy']:.3f}, AUC {metrics['auc']:.3f})")
    return path
