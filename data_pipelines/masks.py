"""Class-id masks from annotations: polygons rasterised with the pixel-centre rule, and uncompressed COCO RLEs.

Convention (data_pipelines/batch.py): a pixel belongs to a polygon when its centre lies inside it (even-odd rule,
half-open on the right/bottom edges so that two polygons sharing an edge never both claim a pixel) - a polygon with
corners (0.5, 0.5) and (3.5, 2.5) covers exactly the 3 x 2 pixels of rows 1-2, columns 1-3. Readers (labelme, COCO),
the dataset and the generators share this one rasteriser.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np



def polygon_mask(points_N2: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bool (H, W): pixels whose centre (x=c, y=r) lies inside the closed polygon (even-odd rule).

    Scanline form: on row r, an edge (x0,y0)-(x1,y1) crosses when min(y) <= r < max(y) (half-open, so a vertex
    is counted once); sorted crossings pair up into spans, and a span [xa, xb) covers columns ceil(xa)..ceil(xb)-1.
    """
    h, w = hw
    p = np.asarray(points_N2, dtype=np.float64).reshape(-1, 2)
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(h, dtype=np.float64)[:, None]                       # (H, 1) against (E,) edges
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    crosses = (lo <= rows) & (rows < hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
    xs = np.where(crosses, xs, np.inf)
    if xs.shape[1] % 2:
        xs = np.concatenate([xs, np.full((h, 1), np.inf)], axis=1)
    xs.sort(axis=1)                                                        # inf (no crossing) sorts last
    starts, ends = xs[:, 0::2], xs[:, 1::2]
    valid = np.isfinite(starts) & np.isfinite(ends)
    r_idx = np.nonzero(valid)[0]
    c0 = np.clip(np.ceil(starts[valid]), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(ends[valid]), 0, w).astype(np.int64)
    diff = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(diff, (r_idx, c0), 1)
    np.add.at(diff, (r_idx, c1), -1)
    return np.cumsum(diff, axis=1)[:, :w] > 0


def rasterize_polygons(polygons: list[tuple[int, np.ndarray]], hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) class-id mask; polygons are drawn sorted by class id (stable), later over earlier."""
    mask = np.zeros(hw, dtype=np.uint8)
    for cls, pts in sorted(polygons, key=lambda item: item[0]):
        mask[polygon_mask(pts, hw)] = cls
    return mask


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """bool (H, W) from an uncompressed COCO RLE: runs alternate 0 / 1 starting with 0, over the column-major
    (Fortran-order) flattening of the mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    return np.repeat(np.arange(counts.size) % 2 == 1, counts).reshape((h, w), order="F")
