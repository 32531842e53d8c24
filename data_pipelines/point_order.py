"""Point-order rules: labels that are a function of where the points lie, re-imposed after every warp.

Some annotation conventions name points by their position rather than by anatomy. HC18's ellipse-axis ends are one:
ofd1 is the long-axis end with the smaller x (ties: smaller y), bpd1 the short-axis end with the smaller y (ties:
smaller x). A horizontal flip or a rotation can move one end past the other, so after augmentation the dataset
re-orders the warped points by the rule (`DataInfo.point_order` names it); the label of a channel is then always a
function of the image the network sees. Rules are chosen by name from POINT_ORDER_RULES.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def axis_order(kpts_42: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Index permutation (4,) that puts points into the README order: ofd1 = smaller x (ties within eps: smaller y),
    bpd1 = smaller y (ties: smaller x)."""
    k = np.asarray(kpts_42, dtype=np.float64).reshape(4, 2)
    perm = np.arange(4)
    for first, primary in ((0, 0), (2, 1)):
        p, q = k[first], k[first + 1]
        d = q[primary] - p[primary]
        swap = d < -eps if abs(d) > eps else q[1 - primary] < p[1 - primary]
        if swap:
            perm[[first, first + 1]] = perm[[first + 1, first]]
    return perm


def order_axis_points(kpts_42: np.ndarray, visible_4: np.ndarray | None = None):
    """Points (and visibility, when given) re-ordered by the README's rule (`axis_order`)."""
    perm = axis_order(kpts_42)
    pts = np.asarray(kpts_42)[perm]
    return pts if visible_4 is None else (pts, np.asarray(visible_4)[perm])



# DataInfo.point_order -> rule(points (K, 2), visibility (K,)) -> (points, visibility) re-ordered
POINT_ORDER_RULES: dict[str, Callable] = {"hc18_axis": order_axis_points}
