"""Patient-grouped, class-stratified splits (docs/systems/hip_us_multihipposenet.md: 20 % of each class held out as a
fixed test set, stratified 5-fold CV on the rest, type II oversampled x2 in training).

A group (patient) never straddles two sides of a split: the published split was per image although patients have
1-2 images, which leaks a patient's second image into the test side. A group is stratified under its majority label
(ties broken by the label's sort order). Everything is a pure function of `seed`.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np


def _groups_by_label(ids: Sequence[str], labels: Sequence[Hashable], groups: Sequence[Hashable]):
    """{label: [(group, [ids...]), ...]} with groups in first-appearance order, each under its majority label."""
    if not len(ids) == len(labels) == len(groups):
        raise ValueError(f"splits: ids, labels, groups differ in length ({len(ids)}, {len(labels)}, {len(groups)})")
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"splits: duplicate id {dup!r}")
    members: dict[Hashable, list[str]] = defaultdict(list)
    votes: dict[Hashable, Counter] = defaultdict(Counter)
    for i, lab, grp in zip(ids, labels, groups):
        members[grp].append(i)
        votes[grp][lab] += 1
    by_label: dict[Hashable, list[tuple[Hashable, list[str]]]] = defaultdict(list)
    for grp, ms in members.items():
        top = max(votes[grp].values())
        label = sorted((lab for lab, c in votes[grp].items() if c == top), key=str)[0]
        by_label[label].append((grp, ms))
    return dict(sorted(by_label.items(), key=lambda kv: str(kv[0])))


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def holdout_split(ids: Sequence[str], labels: Sequence[Hashable], groups: Sequence[Hashable], test_frac: float = 0.2,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """(train_ids, test_ids): about `test_frac` of each label's images go to test, whole groups at a time.

    Per label, in a seeded random order, groups that fit under round(test_frac * n) are taken; if the count is
    still short, the first remaining group that brings it strictly closer is added. Ids keep their input order.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"holdout_split: test_frac must lie in (0, 1), got {test_frac}")
    rng = np.random.default_rng(seed)
    test: set[str] = set()
    for label, grps in _groups_by_label(ids, labels, groups).items():
        target = round(test_frac * sum(len(ms) for _, ms in grps))
        count, rest = 0, []
        for grp in _shuffled(grps, rng):
            if count + len(grp[1]) <= target:
                test.update(grp[1])
                count += len(grp[1])
            else:
                rest.append(grp)
        closer = next((ms for _, ms in rest if abs(count + len(ms) - target) < target - count), None)
        if closer is not None:
            test.update(closer)
    return [i for i in ids if i not in test], [i for i in ids if i in test]


def stratified_group_kfold(ids: Sequence[str], labels: Sequence[Hashable], groups: Sequence[Hashable], k: int = 5,
                           seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """k folds [(train_ids, val_ids)]: every id is in exactly one val fold, no group in two folds, and each fold's
    class ratio close to the overall one.

    Per label: groups in a seeded random order, then stably by size (largest first), each to the fold holding the
    fewest images of that label so far (ties: fewest images overall, then the lowest fold index).
    """
    if k < 2:
        raise ValueError(f"stratified_group_kfold: k must be >= 2, got {k}")
    n_groups = len(set(groups))
    if n_groups < k:
        raise ValueError(f"stratified_group_kfold: {n_groups} groups cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    totals = np.zeros(k, dtype=np.int64)
    for label, grps in _groups_by_label(ids, labels, groups).items():
        per_label = np.zeros(k, dtype=np.int64)
        for _, ms in sorted(_shuffled(grps, rng), key=lambda g: -len(g[1])):
            f = min(range(k), key=lambda j: (per_label[j], totals[j], j))
            per_label[f] += len(ms)
            totals[f] += len(ms)
            fold_of.update((i, f) for i in ms)
    return [([i for i in ids if fold_of[i] != f], [i for i in ids if fold_of[i] == f]) for f in range(k)]


def oversample(ids: Sequence[str], labels: Sequence[Hashable], factor: dict[Hashable, int] | None = None) -> list[str]:
    """Each id repeated factor[label] times (labels not in `factor`: once), repeats adjacent, input order kept."""
    factor = {"II": 2} if factor is None else factor
    if len(ids) != len(labels):
        raise ValueError(f"oversample: {len(ids)} ids but {len(labels)} labels")
    for lab, f in factor.items():
        if not isinstance(f, (int, np.integer)) or f < 1:
            raise ValueError(f"oversample: factor for {lab!r} must be an integer >= 1, got {f!r}")
    return [i for i, lab in zip(ids, labels) for _ in range(int(factor.get(lab, 1)))]


def write_splits(path: str | Path, splits: dict) -> Path:
    """Write a JSON split file (e.g. {"seed", "test", "folds": [{"train", "val"}]}); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(splits, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)      # atomic: a crash never leaves a half-written split file behind
    return path


def read_splits(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
