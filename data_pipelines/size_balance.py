"""Size-balanced training sets (data.size_balance): repeat the training samples whose object size is rare.

A sample's object size is the spread of its labelled landmarks (root-mean-square distance from their centroid) or,
without two landmarks, the square root of its mask polygons' area; in mm where the sample's pixel spacing is known,
else in pixels. The training samples are binned on log size (`bins` equal-width bins between the smallest and the
largest training size) and a sample in bin b is repeated

    round(min(max_repeat, (n_common / n_b) ** power))   times (at least once),

n_b being the bin's training samples and n_common the most populated bin's. power 0 turns it off, 1 evens the bins
out up to max_repeat, 0.5 is the square-root rule. The repeats go into the split's `train_oversampled` list (the
same place as a reader's stratum oversampling, multiplied with it), so sampling, sharding, resume and the DALI
path see an ordinary, longer training set, and splits.json records what was repeated.

Why: on HC18 the smallest (early-pregnancy) heads are about one training image in ten, and the test images the
fetal-head recipe gets worst are such heads, over-segmented into the tissue around the skull.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

from data_pipelines.errors import OptionError
from data_pipelines.records import Record

log = logging.getLogger("medpose")


def _polygon_area(points: np.ndarray) -> float:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def object_size(rec: Record) -> tuple[float, str] | None:
    """(size, unit) of the sample's object (module docstring); None when it has neither two labelled landmarks nor
    mask polygons."""
    scale, unit = 1.0, "px"
    if rec.spacing_mm is not None and np.all(np.isfinite(rec.spacing_mm)) and np.all(np.asarray(rec.spacing_mm) > 0):
        scale, unit = float(np.sqrt(np.prod(np.asarray(rec.spacing_mm, dtype=np.float64)))), "mm"
    pts = np.asarray(rec.kpts_px_K2, dtype=np.float64)[np.asarray(rec.kpts_visible_K, dtype=bool)]
    if len(pts) >= 2:
        spread = float(np.sqrt(np.mean(np.sum((pts - pts.mean(0)) ** 2, axis=1))))
        if spread > 0:
            return spread * scale, unit
    if rec.mask is not None and rec.mask.polygons:
        area = sum(_polygon_area(p) for c, p in rec.mask.polygons if c > 0)
        if area > 0:
            return math.sqrt(area) * scale, unit
    return None


def size_repeats(sizes: Sequence[float], power: float, max_repeat: int, bins: int = 8) -> tuple[list[int], dict]:
    """Repeat count of each size (module docstring) and a summary {edges, counts, repeats} per bin."""
    s = np.log(np.asarray(sizes, dtype=np.float64))
    if len(s) == 0:
        return [], {"edges": [], "counts": [], "repeats": []}
    lo, hi = float(s.min()), float(s.max())
    if hi - lo < 1e-9 or power <= 0:
        return [1] * len(s), {"edges": [math.exp(lo), math.exp(hi)], "counts": [len(s)], "repeats": [1]}
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    common = counts.max()
    rep_bin = [max(1, int(round(min(max_repeat, (common / c) ** power)))) if c else 0 for c in counts]
    return [rep_bin[b] for b in which], {"edges": [float(math.exp(e)) for e in edges],
                                         "counts": [int(c) for c in counts], "repeats": rep_bin}


def balance_by_size(train_ids: Sequence[str], records: Mapping[str, Record], power: float, max_repeat: int,
                    where: str, bins: int = 8) -> list[str]:
    """`train_ids` (a split's train_oversampled list, repeats allowed) with each sample repeated by its size bin's
    count; power 0 returns it unchanged. A training sample without a measurable size is an error naming it."""
    if power <= 0:
        return list(train_ids)
    unique = list(dict.fromkeys(train_ids))
    sizes, units = [], set()
    for i in unique:
        got = object_size(records[i])
        if got is None:
            r = records[i]
            raise OptionError(f"data.size_balance: sample '{i}' ({r.where}{' ' + r.entry if r.entry else ''}) has "
                              f"neither two labelled landmarks nor mask polygons to measure its object size; set "
                              f"data.size_balance=0 for this dataset")
        sizes.append(got[0])
        units.add(got[1])
    unit = units.pop() if len(units) == 1 else "mm or px (mixed spacing)"
    reps, summary = size_repeats(sizes, power, max_repeat, bins)
    rep_of = dict(zip(unique, reps))
    out = [i for i in train_ids for _ in range(rep_of[i])]
    e, parts = summary["edges"], []
    for b, (c, r) in enumerate(zip(summary["counts"], summary["repeats"])):
        if c:
            parts.append(f"{e[b]:.3g}-{e[b + 1]:.3g}: {c} x{r}")
    log.info("data.size_balance=%g (%s): object size (%s) bins %s; %d -> %d training samples", power, where, unit,
             ", ".join(parts), len(train_ids), len(out))
    return out
