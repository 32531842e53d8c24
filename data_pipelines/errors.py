"""The one error type every reader of the package raises: it names the file and the problem."""
from __future__ import annotations

import os
import re

# The last line of a worker traceback as torch's DataLoader formats it: "...DataError: <path>: <problem>".
_WORKER_LINE = re.compile(r"DataError: (?P<path>.+?): (?P<problem>.*)$")


class DataError(ValueError):
    """A bad input file. `DataError(path, problem)`: `str(err) == f"{path}: {problem}"`, `.path`, `.problem`.

    torch's DataLoader re-raises a worker's exception as `type(exc)(message)` with one argument (the formatted
    worker traceback); that form is accepted too, so the main process still gets a DataError, with `.path` and
    `.problem` recovered from the traceback's last line.
    """

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        if problem is None:
            message = str(path)
            last = message.strip().splitlines()[-1] if message.strip() else ""
            found = _WORKER_LINE.search(last)
            self.path = found["path"] if found else ""
            self.problem = found["problem"] if found else message
            super().__init__(message)
            return
        self.path = str(path)
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):
        # Keep both fields across pickling (multiprocessing, spawn start method).
        return (DataError, (self.path, self.problem))


class OptionError(ValueError):
    """A reader option (`data.reader_args`) that is unknown or has a bad value; the message names the option."""


def naming_file(path: str | os.PathLike, load, *args, prefix: str = ""):
    """`load(*args)`, with any failure other than a DataError re-raised as DataError(path, ...): the file is named
    whatever went wrong, also inside a DataLoader worker (where a bare traceback would hide which sample it was)."""
    try:
        return load(*args)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"{prefix}failed to load ({type(exc).__name__}: {exc})") from exc


def index_and_epoch(index: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """A Dataset index: `i` (the dataset's current epoch) or `(i, epoch)` (persistent workers)."""
    return (int(index[0]), int(index[1])) if isinstance(index, tuple) else (int(index), int(epoch))
