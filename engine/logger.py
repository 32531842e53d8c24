"""Run logging on rank 0: metrics.jsonl (one JSON object per line), TensorBoard events, a progress bar."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

LOG = logging.getLogger("medpose")


def setup_console_logging(rank: int, run_dir: Path | None = None) -> None:
    """INFO on rank 0, WARNING elsewhere; a copy in run_dir/train.log on rank 0."""
    root = logging.getLogger("medpose")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


def _drop_rows_after(path: Path, step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop rows a crashed run wrote past that point, so
    metrics.jsonl holds each step once."""
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class RunLogger:
    """Writes only on the main rank; other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, progress: bool = True,
                 total_steps: int = 0, initial_step: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            _drop_rows_after(path, initial_step)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def has_row(self, step: int, split: str) -> bool:
        """Whether metrics.jsonl holds a `split` row for `step` (rank 0; False on the other ranks)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.enabled or not path.is_file():
            return False
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("step") == step and row.get("split") == split:
                    return True
        return False

    def progress(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)

    def write(self, text: str) -> None:
        """Print above the progress bar without breaking it."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def log_failure(exc: BaseException) -> Path | None:
    """The full traceback of `exc`, its cause chain included, into the run's train.log (the file handlers of the
    "medpose" logger, i.e. rank 0's) and not on the console; returns that file, or None when there is none. Once per
    exception: a second call returns the same path, also kept as `exc.traceback_log` (the CLI's one-line error
    says where the traceback is)."""
    if getattr(exc, "traceback_log", None) is not None:
        return exc.traceback_log
    files = [h for h in LOG.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return None
    record = LOG.makeRecord(LOG.name, logging.ERROR, __file__, 0, "failed: %s: %s", (type(exc).__name__, exc),
                            (type(exc), exc, exc.__traceback__))
    for handler in files:
        handler.handle(record)
    exc.traceback_log = Path(files[0].baseFilename)
    return exc.traceback_log
