"""A dataset's fingerprint (`medpose plan`, launch/plan.py): the figures a training plan is derived from, read by the
same reader training uses (data_pipelines/build.py: reader_for), in the ORIGINAL images' pixels.

    fingerprint_dataset(data_cfg) -> Fingerprint(report: JSON-able dict, per-image arrays for the planner)

What it measures (all medians over images unless said):
  counts       samples, patients (Record.patient_id, else one per sample), samples the reader skipped, given splits;
  image size   median H, W and aspect H/W (per image), min / max, megapixels;
  spacing      mm per pixel (x, y): median over the images whose spacing is known, and how many are not;
  landmarks    per landmark: how often labelled, mean position relative to the image, spread (SD of its position in
               px, as a fraction of the image side, and in mm); the nearest-neighbour distance (each labelled landmark
               to the nearest other labelled landmark of the same image: median, 10th percentile, minimum, in px and
               mm, and the landmark pair that is closest most often) - what keeps neighbouring heatmaps apart; the
               landmarks' extent (bounding box of an image's labelled landmarks as a fraction of its W and H);
  orientation  per-image rotation of the object: of the landmark shape against the Procrustes mean shape (rotation
               only, the landmarks labelled in >= 90 % of the images), or, where the landmark labels follow a
               position rule (data.point_order, e.g. HC18's axis ends) or only masks are given, the principal axis
               of the landmarks / the mask's foreground (an axis: angles modulo 180 deg); spread = the 95th percentile
               of the absolute deviation from the circular mean;
  object size  from the landmarks: centroid size (RMS distance of the common landmarks from their centroid); from
               the masks: the square root of the foreground area; in px and mm, and its 5th / 95th percentile over
               the median;
  masks        every mask is decoded (a progress bar for many images): per class the mean foreground fraction of the
               image (class balance), the images it occurs in, and its median area and equivalent diameter
               (2 sqrt(area / pi)) in px and mm, and the share of those images where the class is one 8-connected
               region (`single_region_share`: the planner's rule for keeping only the largest predicted region).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from data_pipelines.build import reader_for
from data_pipelines.errors import DataError
from data_pipelines.records import DataInfo, Record

COMMON_LANDMARK_FRAC = 0.9      # landmarks labelled in at least this fraction of the images form the "shape"
PROGRESS_MIN = 20               # show a progress bar from this many masks on


@dataclass
class Fingerprint:
    """The report (JSON-able, fingerprint.json) and the per-image figures the planner rescales to its input size."""
    report: dict[str, Any]
    info: DataInfo
    hw_N2: np.ndarray                       # int (N, 2) original (H, W)
    spacing_N2: np.ndarray                  # float (N, 2) mm per px (x, y); NaN unknown
    kpts_NK2: np.ndarray                    # float (N, K, 2) original px
    vis_NK: np.ndarray                      # bool (N, K)
    sizes: dict[str, tuple[np.ndarray, str]]                # "landmarks" / "mask" -> (size px (N,), NaN: none; how)
    orientations: dict[str, tuple[np.ndarray, str, bool]]   # "landmarks" / "mask" -> (deg (N,), how, axial)
    resize: str                             # the reader's resize rule (letterbox | stretch)
    records: list[Record] = field(default_factory=list)     # as the reader gave them (skip_bad)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split_source: str = "split fields"


# ------------------------------------------------------------------------------------------------ geometry helpers
def nearest_neighbour_distances(kpts_K2: np.ndarray, vis_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance of each labelled landmark to the nearest other labelled landmark of the same image, the index of that
    neighbour), both over the labelled landmarks in order; empty when fewer than two are labelled."""
    idx = np.flatnonzero(vis_K)
    if len(idx) < 2:
        return np.zeros(0), np.zeros(0, dtype=int)
    p = np.asarray(kpts_K2, dtype=np.float64)[idx]
    d = np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])
    np.fill_diagonal(d, np.inf)
    j = d.argmin(axis=1)
    return d[np.arange(len(idx)), j], idx[j]


def map_points(m_33: np.ndarray, pts_K2: np.ndarray) -> np.ndarray:
    """Points through a homogeneous 3x3 matrix (data_pipelines/batch.py convention)."""
    pts = np.asarray(pts_K2, dtype=np.float64)
    return pts @ m_33[:2, :2].T + m_33[:2, 2]


def input_matrices(hw_N2: np.ndarray, input_hw: Sequence[int], resize: str) -> list[np.ndarray]:
    """Original -> network-input matrices of every image (letterbox or stretch, before augmentation)."""
    from data_pipelines.dataset import input_matrix
    dst = (int(input_hw[0]), int(input_hw[1]))
    return [input_matrix((int(h), int(w)), dst, resize) for h, w in hw_N2]


def pooled_nn_distances(kpts_NK2: np.ndarray, vis_NK: np.ndarray, matrices: Sequence[np.ndarray] | None = None
                        ) -> np.ndarray:
    """Every image's nearest-neighbour distances (nearest_neighbour_distances), pooled; in the frame the per-image
    `matrices` map to (e.g. the network input), else in original px."""
    out = []
    for i in range(len(kpts_NK2)):
        pts = kpts_NK2[i] if matrices is None else map_points(matrices[i], kpts_NK2[i])
        out.append(nearest_neighbour_distances(pts, vis_NK[i])[0])
    return np.concatenate(out) if out else np.zeros(0)


def matrix_scale(m_33: np.ndarray) -> float:
    """The isotropic scale of a 2-D linear map (sqrt |det|): how a length grows on average."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(m_33, dtype=np.float64)[:2, :2]))))


def circular_spread_deg(angles_deg: np.ndarray, axial: bool = False, q: float = 95.0) -> tuple[float, float]:
    """(circular mean, q-th percentile of |angle - mean|) in degrees; axial angles have period 180."""
    a = np.asarray(angles_deg, dtype=np.float64)
    a = a[np.isfinite(a)]
    if not len(a):
        return math.nan, math.nan
    k = 2.0 if axial else 1.0
    rad = np.radians(a) * k
    mean = math.atan2(np.sin(rad).mean(), np.cos(rad).mean())
    dev = np.abs(np.angle(np.exp(1j * (rad - mean)))) / k
    return float(np.degrees(mean / k)), float(np.degrees(np.percentile(dev, q)))


def procrustes_angles_deg(shapes_NM2: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Rotation (deg, counter-clockwise in the image's x-right / y-down frame seen as y-up) of each shape against the
    generalised-Procrustes mean shape (translation and scale removed; rotation only, no reflection)."""
    x = np.asarray(shapes_NM2, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
    x = x / np.where(norm > 0, norm, 1.0)
    mean = x[0]
    angles = np.zeros(len(x))
    for _ in range(iterations):
        num = (mean[None, :, 0] * x[:, :, 1] - mean[None, :, 1] * x[:, :, 0]).sum(axis=1)
        den = (mean[None, :, 0] * x[:, :, 0] + mean[None, :, 1] * x[:, :, 1]).sum(axis=1)
        angles = np.arctan2(num, den)                       # rotation taking the mean onto each shape
        c, s = np.cos(-angles), np.sin(-angles)
        aligned = np.stack([c[:, None] * x[:, :, 0] - s[:, None] * x[:, :, 1],
                            s[:, None] * x[:, :, 0] + c[:, None] * x[:, :, 1]], axis=-1)
        new = aligned.mean(axis=0)
        mean = new / max(float(np.sqrt((new ** 2).sum())), 1e-12)
    return np.degrees(angles)


def principal_axis_deg(pts_M2: np.ndarray, weights_M: np.ndarray | None = None) -> float:
    """Orientation (deg, in [0, 180)) of the principal axis of a point set (or weighted pixels); NaN when round."""
    p = np.asarray(pts_M2, dtype=np.float64)
    if len(p) < 2:
        return math.nan
    w = np.ones(len(p)) if weights_M is None else np.asarray(weights_M, dtype=np.float64)
    c = (p * w[:, None]).sum(axis=0) / w.sum()
    d = p - c
    cov = (d * w[:, None]).T @ d / w.sum()
    evals, evecs = np.linalg.eigh(cov)
    if evals[1] <= 0 or evals[0] / evals[1] > 0.95:          # (nearly) round: no defined axis
        return math.nan
    v = evecs[:, 1]
    return float(np.degrees(math.atan2(v[1], v[0])) % 180.0)


def _q(values, q: float) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return round(float(np.percentile(v, q)), 4) if len(v) else None


def _r(value, nd: int = 4):
    return None if value is None or not np.isfinite(value) else round(float(value), nd)


# --------------------------------------------------------------------------------------------------- the fingerprint
_EIGHT = np.ones((3, 3), dtype=bool)


def _mask_stats(records: Sequence[Record], info: DataInfo, progress: bool) -> tuple[dict[str, Any], np.ndarray,
                                                                                       np.ndarray]:
    """Per-class figures (module docstring) and per image: sqrt(foreground area) and the foreground's axis."""
    from data_pipelines.dataset import decode_mask
    names = list(info.class_names)
    c = len(names)
    frac = np.zeros((len(records), c))
    area = np.zeros((len(records), c))
    regions = np.zeros((len(records), c), dtype=np.int64)       # 8-connected regions per class and image
    fg_size = np.full(len(records), np.nan)
    fg_axis = np.full(len(records), np.nan)
    it = range(len(records))
    if progress and len(records) >= PROGRESS_MIN:
        from tqdm import tqdm
        it = tqdm(it, desc="fingerprint: masks", unit="img")
    for i in it:
        rec = records[i]
        if rec.mask is None:
            frac[i] = np.nan
            continue
        m = decode_mask(rec.mask, rec.hw, rec.where)
        counts = np.bincount(m.ravel(), minlength=c)[:c].astype(np.float64)
        area[i] = counts
        frac[i] = counts / m.size
        for k in np.flatnonzero(counts[1:]) + 1:
            regions[i, k] = ndimage.label(m == k, structure=_EIGHT)[1]
        fg = m > 0
        n_fg = int(fg.sum())
        if n_fg:
            fg_size[i] = math.sqrt(n_fg)
            ys, xs = np.nonzero(fg)
            step = max(1, n_fg // 20000)                         # a subsample is plenty for the axis
            fg_axis[i] = principal_axis_deg(np.stack([xs[::step], ys[::step]], axis=1))
    sp = np.array([math.sqrt(r.spacing_mm[0] * r.spacing_mm[1]) if r.spacing_mm is not None else np.nan
                   for r in records])
    classes = {}
    for k, name in enumerate(names):
        present = area[:, k] > 0
        diam = 2.0 * np.sqrt(area[present, k] / math.pi)
        classes[name] = {
            "fraction_mean": _r(np.nanmean(frac[:, k]), 5),
            "images_with": int(present.sum()),
            "median_area_px": _r(np.median(area[present, k]), 1) if present.any() else None,
            "median_diameter_px": _r(np.median(diam), 2) if present.any() else None,
            "median_diameter_mm": _r(np.nanmedian(diam * sp[present]), 3)
            if present.any() and np.isfinite(sp[present]).any() else None,
            "single_region_share": _r(np.mean(regions[present, k] == 1), 4) if present.any() and k else None}
    fg_frac = np.nansum(frac[:, 1:], axis=1)
    stats = {"classes": classes, "foreground_fraction_mean": _r(np.nanmean(fg_frac), 5),
             "background_to_foreground": _r(np.nanmean(frac[:, 0]) / max(np.nanmean(fg_frac), 1e-12), 2),
             "smallest_class": min(names[1:], key=lambda n: classes[n]["fraction_mean"] or 0.0) if c > 1 else None}
    return stats, fg_size, fg_axis


def _landmark_stats(records: Sequence[Record], info: DataInfo, hw: np.ndarray, sp: np.ndarray,
                    kpts: np.ndarray, vis: np.ndarray) -> dict[str, Any]:
    names = list(info.kpt_names)
    per = []
    for k, name in enumerate(names):
        v = vis[:, k]
        entry: dict[str, Any] = {"name": name, "labelled": int(v.sum())}
        if v.any():
            p = kpts[v, k]
            rel = p / hw[v][:, ::-1]                              # x / W, y / H
            entry["mean_rel_xy"] = [round(float(a), 4) for a in rel.mean(axis=0)]
            entry["sd_px_xy"] = [round(float(a), 2) for a in p.std(axis=0)]
            entry["sd_rel_xy"] = [round(float(a), 4) for a in rel.std(axis=0)]
            spv = sp[v]
            if np.isfinite(spv).all():
                entry["sd_mm_xy"] = [round(float(a), 3) for a in (p * spv).std(axis=0)]
        per.append(entry)
    nn_px, nn_mm, pairs, ext_w, ext_h = [], [], Counter(), [], []
    for i in range(len(records)):
        d, j = nearest_neighbour_distances(kpts[i], vis[i])
        if len(d):
            nn_px.append(d)
            idx = np.flatnonzero(vis[i])
            # mm: the pair's offset scaled per axis
            off = kpts[i, idx] - kpts[i, j]
            nn_mm.append(np.hypot(off[:, 0] * sp[i, 0], off[:, 1] * sp[i, 1]))
            closest = int(np.argmin(d))
            pairs[tuple(sorted((names[idx[closest]], names[j[closest]])))] += 1
        if vis[i].sum() >= 2:
            p = kpts[i, vis[i]]
            ext_w.append((p[:, 0].max() - p[:, 0].min()) / hw[i, 1])
            ext_h.append((p[:, 1].max() - p[:, 1].min()) / hw[i, 0])
    px = np.concatenate(nn_px) if nn_px else np.zeros(0)
    mm = np.concatenate(nn_mm) if nn_mm else np.zeros(0)
    lm: dict[str, Any] = {"names": names, "count": len(names),
                          "labelled_per_image": [int(vis.sum(1).min()), int(vis.sum(1).max())] if len(vis) else [0, 0],
                          "per_landmark": per}
    if len(px):
        lm["nn_distance_px"] = {"median": _r(np.median(px), 3), "p10": _q(px, 10), "min": _r(px.min(), 3)}
        lm["nn_distance_mm"] = ({"median": _r(np.nanmedian(mm), 4), "p10": _q(mm, 10), "min": _r(np.nanmin(mm), 4)}
                                if np.isfinite(mm).any() else None)
        (a, b), n = pairs.most_common(1)[0]
        lm["closest_pair"] = {"names": [a, b], "images": n}
        lm["extent_rel"] = {"median_w": _r(np.median(ext_w)), "median_h": _r(np.median(ext_h)),
                            "max_w": _r(np.max(ext_w)), "max_h": _r(np.max(ext_h))}
        allp = kpts[vis]
        rel = allp / np.repeat(hw[:, ::-1][:, None, :], kpts.shape[1], axis=1)[vis]
        lm["union_rel"] = {"x": [_r(rel[:, 0].min()), _r(rel[:, 0].max())],
                           "y": [_r(rel[:, 1].min()), _r(rel[:, 1].max())]}
    return lm


def read_for_fingerprint(data_cfg):
    """(reader, checked options, ReadResult) of data_cfg.root read as data_cfg.format, every sample with skip_bad
    (the bad ones counted, as `medpose data inspect` does); DataError naming the folder when it holds no data."""
    reader, opts = reader_for(data_cfg)
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    if not reader.has_data(root, opts):
        raise DataError(root, reader.missing_message(root, opts))
    result = reader.read(root, opts, data_cfg, True)
    if not result.records:
        raise DataError(root, f"no usable samples ({len(result.skipped)} skipped)")
    return reader, opts, result


def fingerprint_dataset(data_cfg, progress: bool = True) -> Fingerprint:
    """The fingerprint (module docstring) of data_cfg.root read as data_cfg.format."""
    reader, opts, result = read_for_fingerprint(data_cfg)
    records, info = result.records, result.info
    n, k = len(records), info.num_keypoints
    hw = np.array([r.hw for r in records], dtype=np.int64)
    sp = np.array([r.spacing_mm if r.spacing_mm is not None else (np.nan, np.nan) for r in records], dtype=np.float64)
    kpts = np.stack([np.asarray(r.kpts_px_K2, dtype=np.float64) for r in records]) if k else np.zeros((n, 0, 2))
    vis = np.stack([np.asarray(r.kpts_visible_K, dtype=bool) for r in records]) if k else np.zeros((n, 0), bool)
    aspect = hw[:, 0] / hw[:, 1]
    known = np.isfinite(sp).all(axis=1)
    pre = reader.preprocess(opts, data_cfg, info)
    report: dict[str, Any] = {
        "root": str(data_cfg.root), "format": data_cfg.format, "samples": n,
        "patients": len({r.patient_id or r.id for r in records}), "skipped": len(result.skipped),
        "splits_given": dict(Counter(r.split for r in records if r.split)) or None,
        "channels": info.channels, "resize": pre.resize,
        "image_size": {"median_hw": [float(np.median(hw[:, 0])), float(np.median(hw[:, 1]))],
                       "median_aspect_hw": round(float(np.median(aspect)), 4),
                       "height": [int(hw[:, 0].min()), int(hw[:, 0].max())],
                       "width": [int(hw[:, 1].min()), int(hw[:, 1].max())],
                       "distinct": len(set(map(tuple, hw.tolist()))),
                       "megapixels_median": round(float(np.median(hw[:, 0] * hw[:, 1])) / 1e6, 4)},
        "spacing_mm": {"known": int(known.sum()), "unknown": int(n - known.sum()),
                       "median_xy": [round(float(v), 6) for v in np.median(sp[known], axis=0)] if known.any() else None,
                       "range_xy": [[round(float(v), 6) for v in sp[known].min(axis=0)],
                                    [round(float(v), 6) for v in sp[known].max(axis=0)]] if known.any() else None},
        "flip_pairs": [[info.kpt_names[a], info.kpt_names[b]] for a, b in info.flip_pairs],
        "point_order": info.point_order,
    }
    if k:
        report["landmarks"] = _landmark_stats(records, info, hw, sp, kpts, vis)
    mask_size = mask_axis = None
    if info.class_names and any(r.mask is not None for r in records):
        report["masks"], mask_size, mask_axis = _mask_stats(records, info, progress)

    # object size and orientation (module docstring), from the landmarks and from the masks where each exists
    sizes: dict[str, tuple[np.ndarray, str]] = {}
    orients: dict[str, tuple[np.ndarray, str, bool]] = {}
    common = np.flatnonzero(vis.mean(axis=0) >= COMMON_LANDMARK_FRAC) if k else np.zeros(0, dtype=int)
    full = vis[:, common].all(axis=1) if len(common) else np.zeros(n, bool)
    if len(common) >= 2 and full.sum() >= 2:
        pts = kpts[full][:, common]
        cen = pts - pts.mean(axis=1, keepdims=True)
        size = np.full(n, np.nan)
        size[full] = np.sqrt((cen ** 2).sum(axis=2).mean(axis=1))
        sizes["landmarks"] = (size, f"centroid size of the {len(common)} landmarks labelled in >= 90 % of the images")
        orient = np.full(n, np.nan)
        if len(common) >= 3 and not info.point_order:
            orient[full] = procrustes_angles_deg(pts)
            orients["landmarks"] = (orient, f"Procrustes rotation of the {len(common)}-landmark shape", False)
        else:
            orient[full] = [principal_axis_deg(p) for p in pts]
            orients["landmarks"] = (orient, "principal axis of the landmarks", True)
    if mask_size is not None and np.isfinite(mask_size).any():
        sizes["mask"] = (mask_size, "sqrt(foreground area)")
        orients["mask"] = (mask_axis, "principal axis of the foreground", True)
    sp_iso = np.sqrt(sp[:, 0] * sp[:, 1])
    report["object_size"] = {}
    for key, (size, source) in sizes.items():
        med = float(np.nanmedian(size))
        report["object_size"][key] = {
            "source": source, "median_px": _r(med, 2),
            "median_mm": _r(np.nanmedian(size * sp_iso), 3) if np.isfinite(size * sp_iso).any() else None,
            "p05_over_median": _r(np.nanpercentile(size, 5) / med, 3),
            "p95_over_median": _r(np.nanpercentile(size, 95) / med, 3)}
    report["orientation"] = {}
    for key, (orient, source, axial) in list(orients.items()):
        if not np.isfinite(orient).any():
            del orients[key]
            continue
        mean, spread = circular_spread_deg(orient, axial)
        report["orientation"][key] = {"source": source, "axial": axial, "images": int(np.isfinite(orient).sum()),
                                      "mean_deg": _r(mean, 2), "spread_p95_deg": _r(spread, 2)}
    return Fingerprint(report, info, hw, sp, kpts, vis, sizes, orients, pre.resize, list(records),
                       list(result.skipped), result.split_source)
