"""A fault campaign: a real training job (hip_demo sized down) SIGKILLed N times at random moments, restarted each time
with `--resume auto`, then compared with the same job run without interruption.

    python benchmarks/chaos.py --out DIR                          # single process, 20 kills
    python benchmarks/chaos.py --out DIR --strategy ddp           # 2 ranks (torchrun, gloo), 20 kills
    python benchmarks/chaos.py --out DIR --strategy zero2 --kills 5
    python benchmarks/chaos.py --out DIR --all                    # the three above, one table (the committed one)

Kinds of kill, in a seeded shuffled rotation:
  random  SIGKILL of the training process (under torchrun: of one rank, chosen at random) at a random moment within
          two checkpoint intervals after the life has resumed from its checkpoint (the first life: after its first
          checkpoint): during a step, the data loading, logging, a checkpoint write or an evaluation;
  save    inside a checkpoint write, the rank's share on disk but not published (engine/faults.py's in-save hook);
  eval    inside the evaluation of an evaluation step, its checkpoint written before (MEDPOSE_FAULT_KILL_IN_EVAL);
  worker  SIGKILL of one of a rank's DataLoader worker processes at such a moment (the rank then fails; a worker that
          had already delivered its epoch's last batches dies unnoticed, and the kill is retried on a later one).
Checks: every restart loaded a checkpoint (its log says "resumed from"); the final weights equal the uninterrupted
run's bit for bit; metrics.jsonl equals it (every train and val row, every figure except samples/s, which is a
timing); no temporary checkpoint files or orphan DeepSpeed shard folders remain.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = {"single": (1, ()), "ddp": (2, ()),
              "zero2": (2, ("dist.strategy=deepspeed", "dist.deepspeed.zero_stage=2"))}
TIMING_KEYS = {"samples_per_s"}


@dataclass
class Job:
    strategy: str = "single"
    steps: int = 120
    ckpt_every: int = 5
    eval_every: int = 20
    num_workers: int = 1

    def args(self, data: Path, run_dir: Path) -> list[str]:
        return ["--config", "hip_demo", "--no-test",
                "data.synth_n=40", "data.synth_image_hw=[96, 128]", "data.input_hw=[64, 96]", "data.sigma_px=1.5",
                f"data.num_workers={self.num_workers}", "data.num_folds=4",
                "model.args={expert_depth: 18, width: 16, num_experts: 2, gn_groups: 8, decoder_norm: gn}",
                "model.criterion_args={balance: fixed}", "train.batch_size=2", "log.progress=false",
                "log.tensorboard=false", "log.overlays=0", "train.log_every=1", f"train.max_steps={self.steps}",
                f"train.ckpt_every={self.ckpt_every}", f"train.eval_every={self.eval_every}", "train.keep_last=2",
                f"data.root={data}", f"log.run_dir={run_dir}", *STRATEGIES[self.strategy][1]]


@dataclass
class Life:
    kind: str                     # the kill planned for this life ("none": run to the end)
    where: str = ""
    rc: int | None = None
    resumed_from: str | None = None
    resumed_step: int | None = None
    last_logged_step: int = 0
    killed: bool = False
    seconds: float = 0.0


@dataclass
class Campaign:
    strategy: str
    kills_asked: int
    lives: list[Life] = field(default_factory=list)
    reference_s: float = 0.0
    result: dict = field(default_factory=dict)


def _env(job: Job, extra: dict[str, str] | None = None) -> dict[str, str]:
    nproc = STRATEGIES[job.strategy][0]
    env = dict(os.environ, NPROC=str(nproc), CORES=str(os.cpu_count() or 2), MAX_RESTARTS="0",
               NUMBA_THREADING_LAYER="workqueue", MPLBACKEND="Agg", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in ("MEDPOSE_FAULT_KILL_AT_STEP", "MEDPOSE_FAULT_KILL_IN_SAVE", "MEDPOSE_FAULT_KILL_IN_EVAL",
              "MEDPOSE_FAULT_RANK"):
        env.pop(k, None)
    if nproc == 1:
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 2)
    env.update(extra or {})
    return env


def _command(job: Job, data: Path, run_dir: Path) -> list[str]:
    if STRATEGIES[job.strategy][0] == 1:
        return [sys.executable, "-m", "launch.cli", "train", "--resume", "auto", *job.args(data, run_dir)]
    return ["bash", str(ROOT / "launch" / "torchrun_single.sh"), *job.args(data, run_dir)]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:      # a line cut by the kill
            pass
    return out


def _last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in _rows(run_dir) if r.get("split") == "train"]
    return max(steps, default=0)


def _ranks(proc: subprocess.Popen, nproc: int) -> list[psutil.Process]:
    """The training processes: the launched python itself, or torchrun's rank children (the launcher script execs
    torchrun, so `proc` is torchrun; DataLoader workers are the ranks' own children)."""
    try:
        me = psutil.Process(proc.pid)
        if nproc == 1:
            return [me]
        return [c for c in me.children() if "launch.cli" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _workers(rank: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in rank.children() if c.is_running()]
    except psutil.Error:
        return []


def _run_life(job: Job, data: Path, run_dir: Path, life: Life, rng: random.Random, timing: dict) -> Life:
    nproc = STRATEGIES[job.strategy][0]
    start_step = _last_step(run_dir)
    env_extra: dict[str, str] = {}
    if life.kind in ("save", "eval"):
        every = job.ckpt_every if life.kind == "save" else job.eval_every
        target = (start_step // every + 1 + rng.randrange(2)) * every
        if target >= job.steps:
            life.kind = "random"
        else:
            rank = rng.randrange(nproc)
            # The fault hook fires once per marker file (so that torchrun's own restarts get past it); a target step
            # an earlier life already killed at must fire again here.
            for marker in run_dir.glob(".fault_injected_*"):
                marker.unlink()
            env_extra = {("MEDPOSE_FAULT_KILL_IN_SAVE" if life.kind == "save" else "MEDPOSE_FAULT_KILL_IN_EVAL"):
                         str(target), "MEDPOSE_FAULT_RANK": str(rank)}
            life.where = (f"checkpoint write of step {target}" if life.kind == "save" else
                          f"evaluation of step {target}") + (f", rank {rank}" if nproc > 1 else "")
    log = run_dir.parent / f"{run_dir.name}_life{timing['life']:02d}.log"
    t0, t_wall = time.perf_counter(), time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(job, data, run_dir), env=_env(job, env_extra), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        if life.kind in ("random", "worker"):
            # The moment is random within the training itself: a restart is first allowed to load its checkpoint
            # (its log says "resumed from"), the first life to write one, so that every kill interrupts training
            # and every restart is a resume. Then a uniform delay of up to two checkpoint intervals.
            had_ckpt = (run_dir / "checkpoints" / "latest").exists()
            t_ready = _wait_ready(proc, run_dir, log, had_ckpt)
            delay = rng.uniform(0.0, 2 * job.ckpt_every * timing["step"])
            while proc.poll() is None and time.perf_counter() - t_ready < delay:
                time.sleep(0.02)
            # A worker's kill is fatal while its rank still waits for batches from it; one that has already
            # delivered its epoch's last batches (prefetched) dies unnoticed, the loader shuts it down and the run goes
            # on unchanged. Such a kill is retried on a later worker (at most 3 tries) and the note says so.
            absorbed = 0
            for _attempt in range(3 if life.kind == "worker" else 1):
                victim = _pick_victim(proc, nproc, life.kind, rng)
                if victim is None:
                    break
                step = _last_step(run_dir)
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
                life.killed = True
                kind = "DataLoader worker" if life.kind == "worker" else "training process"
                life.where = (f"{kind} after step {step} ({time.perf_counter() - t0:.1f} s after the start"
                              f"{', ' + ('checkpoint being written' if _writing(run_dir, t_wall) else 'mid-step') if life.kind == 'random' else ''})")
                if life.kind != "worker":
                    break
                t_kill = time.perf_counter()
                while proc.poll() is None and time.perf_counter() - t_kill < max(15.0, 8 * timing["step"]):
                    time.sleep(0.05)
                if proc.poll() is not None:
                    break
                absorbed += 1
            if absorbed and proc.poll() is None:
                life.where += (f"; none of {absorbed} worker kills stopped the run (each landed after the worker's "
                               f"last batch of its epoch)")
            elif absorbed:
                life.where += (f"; {absorbed} earlier worker kill(s) landed after the worker's last batch of its "
                               f"epoch and changed nothing")
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    life.rc = proc.returncode
    life.seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    m = re.search(r"resumed from (\S+) at step (\d+)", text)
    if m:
        life.resumed_from, life.resumed_step = Path(m.group(1)).name, int(m.group(2))
    if life.kind in ("save", "eval") and any(run_dir.glob(f".fault_injected_{life.kind}*")):
        marker = sorted(run_dir.glob(f".fault_injected_{life.kind}*"), key=lambda q: q.stat().st_mtime)[-1]
        life.killed = marker.stat().st_mtime >= time.time() - life.seconds - 1
    life.last_logged_step = _last_step(run_dir)
    return life


def _pick_victim(proc: subprocess.Popen, nproc: int, kind: str, rng: random.Random) -> psutil.Process | None:
    """The process to kill: one rank at random ("random"), or a DataLoader worker of a rank chosen at random
    ("worker"; the first rank with a live worker from there on). None if the job ends first (or within 20 s none
    is found)."""
    deadline = time.perf_counter() + 20
    while proc.poll() is None and time.perf_counter() < deadline:
        ranks = _ranks(proc, nproc)
        if len(ranks) == nproc:
            first = rng.randrange(nproc)
            if kind == "random":
                return ranks[first]
            for r in ranks[first:] + ranks[:first]:
                workers = [w for w in _workers(r) if _alive(w)]
                if workers:
                    return workers[0]
        time.sleep(0.05)
    return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _writing(run_dir: Path, since: float) -> bool:
    """A checkpoint write of this life in progress: a temporary file newer than the life's start (one left by an
    earlier life's killed write is removed by the resume, but may still be there)."""
    for q in (run_dir / "checkpoints").glob(".*.tmp"):
        try:
            if q.stat().st_mtime >= since:
                return True
        except OSError:
            pass
    return False


def _wait_ready(proc: subprocess.Popen, run_dir: Path, log: Path, had_ckpt: bool) -> float:
    """Wait until the life trains from a checkpoint: its log says "resumed from" (a restart), or the run has written
    its first checkpoint (the first life). Returns that moment (perf_counter)."""
    latest = run_dir / "checkpoints" / "latest"
    while proc.poll() is None:
        if had_ckpt and "resumed from" in log.read_text(errors="replace"):
            break
        if not had_ckpt and latest.exists():
            break
        time.sleep(0.05)
    return time.perf_counter()


def reference(job: Job, data: Path, run_dir: Path) -> dict:
    """The uninterrupted run; its time to the first step and its time per step time the kills."""
    t0 = time.perf_counter()
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_command(job, data, run_dir), env=_env(job), cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)
        first = None
        while proc.poll() is None:
            if first is None and _last_step(run_dir) >= 1:
                first = time.perf_counter() - t0
            time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (rc {proc.returncode}):\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    total = time.perf_counter() - t0
    first = first or total / 2
    return {"startup": first, "step": max(total - first, 1e-3) / job.steps, "total": total}


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from engine.checkpoint import find_latest, load_checkpoint_file
    ckpt = load_checkpoint_file(find_latest(run_dir / "checkpoints"))
    return ckpt["model"]


def _leftovers(run_dir: Path) -> list[str]:
    ck = run_dir / "checkpoints"
    left = [p.name for p in ck.glob(".*.tmp")] + [p.name for p in run_dir.glob("*.tmp")]
    shards = ck / "deepspeed"
    if shards.is_dir():
        from engine.checkpoint import load_checkpoint_file
        used = set()
        for p in list(ck.glob("ckpt_step*.pt")) + list(ck.glob("best.pt")):
            ds = load_checkpoint_file(p).get("deepspeed") or {}
            used.add(ds.get("tag"))
        left += [f"deepspeed/{d.name}" for d in shards.iterdir() if d.is_dir() and d.name not in used]
    return left


def compare(run_dir: Path, ref_dir: Path) -> dict:
    a, b = _model_state(run_dir), _model_state(ref_dir)
    weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    rows, ref_rows = strip(_rows(run_dir)), strip(_rows(ref_dir))
    train = [r for r in rows if r["split"] == "train"]
    ref_train = [r for r in ref_rows if r["split"] == "train"]
    first_diff = next((r["step"] for r, q in zip(rows, ref_rows) if r != q), None)
    return {"weights_equal": weights_equal, "metrics_equal": rows == ref_rows,
            "losses_equal": [r["loss"] for r in train] == [r["loss"] for r in ref_train],
            "train_rows": len(train), "val_rows": sum(r["split"] == "val" for r in rows),
            "first_differing_step": first_diff, "leftovers": _leftovers(run_dir)}


def campaign(out: Path, strategy: str, kills: int, seed: int = 0, steps: int | None = None) -> Campaign:
    from data_pipelines.synthetic.hip import generate_hip_dataset
    job = Job(strategy=strategy, steps=steps or max(60, 10 * kills))
    data = out / "phantom"
    if not (data / "dataset.json").exists() and not any(data.glob("*.json")):
        generate_hip_dataset(data, 40, seed=3, image_hw=(96, 128))
    ref_dir, run_dir = out / f"{strategy}_uninterrupted", out / f"{strategy}_killed"
    for d in (ref_dir, run_dir):
        if d.exists():
            import shutil
            shutil.rmtree(d)
    timing = reference(job, data, ref_dir)
    camp = Campaign(strategy, kills, reference_s=timing["total"])
    rng = random.Random(seed)
    plan = [("random", "save", "random", "eval", "worker")[i % 5] for i in range(kills)]
    rng.shuffle(plan)
    plan += ["none"]
    i = 0
    while i < len(plan) and len(camp.lives) < len(plan) + 10:
        timing["life"] = len(camp.lives)
        life = _run_life(job, data, run_dir, Life(plan[i]), rng, timing)
        camp.lives.append(life)
        print(f"[{strategy}] life {len(camp.lives) - 1}: {life.kind:6s} rc={life.rc} killed={life.killed} "
              f"resumed={life.resumed_from} steps {life.resumed_step}->{life.last_logged_step} {life.where}",
              flush=True)
        if life.rc == 0:
            break                               # the job finished (planned or not: the remaining kills are lost)
        if life.killed or life.kind == "none":
            i += 1
        failures = [lf for lf in camp.lives[-3:] if lf.rc not in (0, None) and not lf.killed]
        if len(failures) == 3:
            raise RuntimeError(f"[{strategy}] three failures in a row without a kill; see the last life's log in "
                               f"{out}")
    camp.result = compare(run_dir, ref_dir)
    return camp


def summarize(camp: Campaign) -> dict:
    kills = [lf for lf in camp.lives if lf.killed]
    restarts = camp.lives[1:]
    loaded = [lf for lf in restarts if lf.resumed_from]
    lost = [max(prev.last_logged_step - nxt.resumed_step, 0) for prev, nxt in zip(camp.lives, camp.lives[1:])
            if nxt.resumed_step is not None]
    return {"strategy": camp.strategy, "kills": len(kills), "kills_asked": camp.kills_asked,
            "by_kind": {k: sum(lf.kind == k for lf in kills) for k in ("random", "save", "eval", "worker")},
            "restarts": len(restarts), "restarts_loading": len(loaded),
            "unplanned_failures": sum(1 for lf in camp.lives if lf.rc not in (0, None) and not lf.killed),
            "lost_steps_total": sum(lost), "lost_steps_max": max(lost, default=0),
            "finished": bool(camp.lives) and camp.lives[-1].rc == 0, **camp.result}


def table(camps: list[Campaign]) -> str:
    lines = ["| strategy | kills (random / save / eval / worker) | restarts loading a checkpoint | lost steps "
             "(total, max) | final weights equal | metrics.jsonl equal | leftovers |", "|---|---|---|---|---|---|---|"]
    for c in camps:
        s = summarize(c)
        k = s["by_kind"]
        lines.append(f"| {s['strategy']} | {s['kills']} ({k['random']} / {k['save']} / {k['eval']} / {k['worker']}) "
                     f"| {s['restarts_loading']} of {s['restarts']} | {s['lost_steps_total']}, {s['lost_steps_max']} "
                     f"| {'yes' if s['weights_equal'] else 'NO'} | {'yes' if s['metrics_equal'] else 'NO'} | "
                     f"{', '.join(s['leftovers']) or 'none'} |")
    lines += ["", "| strategy | life | kill | where it landed | resumed from | steps redone |", "|---|---|---|---|---|---|"]
    for c in camps:
        for i, (lf, nxt) in enumerate(zip(c.lives, c.lives[1:] + [None])):
            redo = (max(lf.last_logged_step - nxt.resumed_step, 0) if nxt is not None and nxt.resumed_step is not None
                    else "")
            lines.append(f"| {c.strategy} | {i} | {lf.kind if lf.killed else ('none (finished)' if lf.rc == 0 else f'none, rc {lf.rc}')} "
                         f"| {lf.where} | {lf.resumed_from or '-'} | {redo} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (phantom, runs, per-life logs, chaos.json, chaos.md)")
    ap.add_argument("--strategy", choices=list(STRATEGIES), default="single")
    ap.add_argument("--kills", type=int, default=20, help="kills per campaign (default 20; zero2 under --all: 5)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default max(60, 10 x kills))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="single and ddp with --kills, zero2 with 5")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("single", args.kills), ("ddp", args.kills), ("zero2", 5)] if args.all else [(args.strategy, args.kills)]
    camps = [campaign(out, s, k, args.seed, args.steps) for s, k in runs]
    text = table(camps)
    print(text)
    (out / "chaos.md").write_text(text + "\n")
    (out / "chaos.json").write_text(json.dumps({"campaigns": [{"summary": summarize(c), "lives": [asdict(lf) for lf in c.lives],
                                                               "reference_s": c.reference_s} for c in camps]}, indent=1))
    ok = all(summarize(c)["weights_equal"] and summarize(c)["metrics_equal"] and not summarize(c)["leftovers"]
             and summarize(c)["restarts_loading"] == summarize(c)["restarts"]
             and summarize(c)["kills"] == summarize(c)["kills_asked"] for c in camps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
