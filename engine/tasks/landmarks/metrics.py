"""Landmark errors, one implementation for every task: MRE, SD, median, SDR, outliers and PCK, in px and mm.

Per image, in the ORIGINAL image frame (engine/tasks/base.py): predicted points (K, 2), truth points (K, 2), truth
visibility (K,), optionally the prediction's presence (K,) (the decoder's own decision, e.g. spine decoding calls a
disc absent) and confidence (K,), the spacing (sx, sy) in mm per pixel (NaN or <= 0 when unknown) and the image size
(H, W) (NaN when unknown). A landmark is SCORED where it is visible in the truth and present in the prediction; a
visible landmark the prediction calls absent is MISSED (`landmark_missed`) and enters no error figure: MRE, SDR and
PCK are over scored landmarks (a task that must punish abstention counts misses itself, as spine_disc's PCK does).

Figures (radial error e = |pred - true| in px; in mm e = sqrt((dx sx)^2 + (dy sy)^2)):
    landmark_mre_px, landmark_sd_px, landmark_median_px   mean, sample SD (n - 1) and median of e
    landmark_mre_mm, landmark_sd_mm, landmark_median_mm   the same over images whose spacing is finite and > 0
                                                          (NaN when no image has one)
    landmark_mre_px_<k>, landmark_mre_mm_<k>              per landmark, 1-based (k = 1 is the first landmark)
    landmark_abs_dx_px, landmark_abs_dy_px                mean |dx|, |dy| (which axis the error lies along)
    landmark_mre_pct_diag                                 mean of 100 e / hypot(H, W) over images of known size
    sdr_<r>mm or sdr_<r>px                                % of scored landmarks with e <= r (r written with %g).
                                                          sdr_unit "auto": mm when every image with a scored
                                                          landmark has a known spacing, else px; "mm" / "px" force
                                                          the unit (mm then counts images with a spacing only)
    landmark_outlier_pct                                  % with e > the largest radius, in the SDR's unit (so
                                                          100 - the last SDR figure)
    pck                                                   fraction of scored landmarks with e_px <= pck_thr x ref
                                                          (a fraction like spine_disc's `pck`, the same key)
    num_images, num_landmarks_scored, landmark_missed
PCK reference `pck_ref`: "bbox", the diagonal of the visible truth landmarks' bounding box (the object's own scale,
which suits any landmark set; undefined with fewer than two distinct visible points), "image", the image diagonal,
or a pair of landmarks (names or 0-based indices): their distance in the truth (e.g. the outer eye corners), defined
when both are visible. Images without a defined reference are left out of PCK. The default pck_thr = 0.05 of the
bbox diagonal is 5 mm on a 100 mm structure: of the order of the 2-4 mm SDR radii clinicians use for landmarks, and
strict enough not to saturate near 100 % for good models as the 0.1-0.2 of human-pose PCK would.

Median from a histogram kept as sums, so it reduces across ranks like everything else: log-spaced bins of 0.1 %
relative width (edges 1e-3 x 1.001^i) from 1e-3 to 1e5 (px, resp. mm), plus an underflow bin [0, 1e-3) and an
overflow bin from 1e5 up. The middle rank(s) are found in the cumulative counts and placed by linear interpolation
inside their bin (its c values at the centres of c equal sub-intervals), so each lies in the bin of the true ranked
value: |estimate - median| <= 0.1 % of the median for errors in [1e-3, 1e5], < 1e-3 absolute below; errors beyond
1e5 read as 1e5. SD comes from sums of squares (sqrt((S2 - S1^2 / n) / (n - 1))).
Everything is a float64 sum or count (engine/metrics.py: ranks all-reduce SUM, never per-rank means).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from engine.metrics import SummedState, radius_tag, ratio, to_numpy

_WHERE = "engine/tasks/landmarks/metrics.py"
HIST_LO, HIST_HI, HIST_STEP = 1e-3, 1e5, 1.001
_NUM_LOG_BINS = int(math.ceil(math.log(HIST_HI / HIST_LO) / math.log(HIST_STEP)))
# bin 0 = [0, edges[0]), bin i = [edges[i-1], edges[i]) for i = 1..N, bin N+1 = [edges[N], inf)
HIST_EDGES = HIST_LO * HIST_STEP ** np.arange(_NUM_LOG_BINS + 1, dtype=np.float64)
NUM_HIST_BINS = HIST_EDGES.size + 1
SDR_UNITS = ("auto", "mm", "px")


# ------------------------------------------------------------------------------------------------- median helpers
def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Counts (NUM_HIST_BINS,) float64 of non-negative values in the log-spaced bins (module docstring)."""
    idx = np.searchsorted(HIST_EDGES, np.asarray(values, dtype=np.float64).ravel(), side="right")
    return np.bincount(idx, minlength=NUM_HIST_BINS).astype(np.float64)


def _value_at_rank(cum: np.ndarray, counts: np.ndarray, rank: float) -> float:
    j = int(np.searchsorted(cum, rank, side="left"))       # first bin whose cumulative count reaches the rank
    before = float(cum[j - 1]) if j > 0 else 0.0
    if j >= NUM_HIST_BINS - 1:                             # overflow: no upper edge to interpolate towards
        return float(HIST_EDGES[-1])
    lo = 0.0 if j == 0 else float(HIST_EDGES[j - 1])
    hi = float(HIST_EDGES[j])
    return lo + (hi - lo) * (rank - before - 0.5) / float(counts[j])


def histogram_median(counts: np.ndarray) -> float:
    """Median from bin counts: the middle rank (odd n) or the mean of the two middle ranks (even n), each placed
    by linear interpolation inside its bin; NaN for no values."""
    c = np.asarray(counts, dtype=np.float64)
    n = float(c.sum())
    if n <= 0:
        return float("nan")
    cum = np.cumsum(c)
    if int(round(n)) % 2:
        return _value_at_rank(cum, c, (n + 1) / 2)
    return 0.5 * (_value_at_rank(cum, c, n / 2) + _value_at_rank(cum, c, n / 2 + 1))


def _sd(s1: float, s2: float, n: float) -> float:
    """Sample SD from the sum and the sum of squares; NaN below two values."""
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else float("nan")


def check_pck_ref(pck_ref: Any) -> None:
    """pck_ref must be "bbox", "image" or two landmarks (names or 0-based indices); raises ValueError otherwise."""
    if isinstance(pck_ref, str):
        if pck_ref not in ("bbox", "image"):
            raise ValueError(f"{_WHERE}: pck_ref must be 'bbox', 'image' or a pair of landmarks, got {pck_ref!r}")
        return
    if not isinstance(pck_ref, Sequence) or len(pck_ref) != 2 or not all(
            isinstance(r, (str, int, np.integer)) and not isinstance(r, bool) for r in pck_ref):
        raise ValueError(f"{_WHERE}: pck_ref must be 'bbox', 'image' or a pair of landmark names / 0-based indices, "
                         f"got {pck_ref!r}")


def resolve_pck_ref(pck_ref: Any, kpt_names: Sequence[str]) -> tuple[int, int] | None:
    """None for "bbox" / "image"; the pair's 0-based indices into kpt_names otherwise."""
    check_pck_ref(pck_ref)
    if isinstance(pck_ref, str):
        return None
    names = list(kpt_names)
    missing = [r for r in pck_ref if isinstance(r, str) and r not in names]
    if missing:
        raise ValueError(f"{_WHERE}: pck_ref landmark(s) {missing} not among the landmark names {names}")
    a, b = (names.index(r) if isinstance(r, str) else int(r) for r in pck_ref)
    if a == b or not (0 <= a < len(names) and 0 <= b < len(names)):
        raise ValueError(f"{_WHERE}: pck_ref {list(pck_ref)} must be two different landmarks of the {len(names)}")
    return a, b


# ----------------------------------------------------------------------------------------------------- accumulator
class LandmarkMetrics(SummedState):
    """Landmark sums of one evaluation: `update` (a batch, returns per-image record fields) or `update_sample`
    (one image, records kept here); `state()` / `load_state()` for the cross-rank SUM; `compute()`."""
    where = _WHERE

    def __init__(self, num_keypoints: int, kpt_names: Sequence[str] | None = None,
                 sdr_radii: Sequence[float] = (2.0, 2.5, 3.0, 4.0), sdr_unit: str = "auto", pck_ref: Any = "bbox",
                 pck_thr: float = 0.05, keep_records: bool = True):
        K = int(num_keypoints)
        radii = tuple(float(r) for r in sdr_radii)
        if K < 1:
            raise ValueError(f"{_WHERE}: num_keypoints must be >= 1, got {num_keypoints}")
        if sdr_unit not in SDR_UNITS or not all(math.isfinite(r) and r > 0 for r in radii):
            raise ValueError(f"{_WHERE}: sdr_unit must be one of {SDR_UNITS} and sdr_radii positive; got {sdr_unit!r}, "
                             f"{list(sdr_radii)}")
        if not (math.isfinite(pck_thr) and pck_thr > 0):
            raise ValueError(f"{_WHERE}: pck_thr must be a positive fraction of the reference distance, got {pck_thr}")
        self.num_keypoints, self.sdr_radii, self.sdr_unit = K, radii, sdr_unit
        self.kpt_names = list(kpt_names) if kpt_names else [f"L{k + 1}" for k in range(K)]
        if len(self.kpt_names) != K:
            raise ValueError(f"{_WHERE}: {len(self.kpt_names)} landmark names for {K} landmarks")
        self.pck_ref, self.pck_thr = pck_ref, float(pck_thr)
        self.pck_pair = resolve_pck_ref(pck_ref, self.kpt_names)
        self.keep_records = keep_records
        self.records: list[dict[str, Any]] = []
        R, N = len(radii), NUM_HIST_BINS
        shapes = {"count_K": K, "missed_K": K, "err_px_sum_K": K, "err_px_sq_K": K, "abs_dx_sum_K": K,
                  "abs_dy_sum_K": K, "pct_diag_sum_K": K, "pct_diag_count_K": K, "mm_count_K": K,
                  "err_mm_sum_K": K, "err_mm_sq_K": K, "sdr_hits_px_R": R, "sdr_hits_mm_R": R,
                  "images_without_spacing_1": 1, "pck_hits_count_2": 2, "hist_px_N": N, "hist_mm_N": N,
                  "num_images_1": 1}
        self._state = {k: torch.zeros(n, dtype=torch.float64) for k, n in shapes.items()}

    # ------------------------------------------------------------------------------------------------------ inputs
    def _inputs(self, pred_BK2, true_BK2, visible_BK, spacing_B2, hw_B2, present_BK, score_BK, ids):
        p = to_numpy(pred_BK2, "pred_BK2", np.float64)
        t = to_numpy(true_BK2, "true_BK2", np.float64)
        vis = to_numpy(visible_BK, "visible_BK", bool)
        B, K = (p.shape[0] if p.ndim == 3 else -1), self.num_keypoints
        names = list(ids) if ids is not None else [f"#{b}" for b in range(max(B, 0))]
        if p.shape != (B, K, 2) or t.shape != p.shape or vis.shape != (B, K) or len(names) != B:
            raise ValueError(f"{_WHERE}: samples {names}: want pred/true (B, {K}, 2) and visible (B, {K}) for "
                             f"{len(names)} ids; got {p.shape}, {t.shape}, {vis.shape}")
        pres = np.ones((B, K), bool) if present_BK is None else to_numpy(present_BK, "present_BK", bool)
        score = None if score_BK is None else to_numpy(score_BK, "score_BK", np.float64)
        spacing = np.full((B, 2), np.nan) if spacing_B2 is None else to_numpy(spacing_B2, "spacing_B2", np.float64)
        hw = np.full((B, 2), np.nan) if hw_B2 is None else to_numpy(hw_B2, "hw_B2", np.float64)
        for what, arr, shape in (("present", pres, (B, K)), ("score", score, (B, K)), ("spacing", spacing, (B, 2)),
                                 ("image size", hw, (B, 2))):
            if arr is not None and arr.shape != shape:
                raise ValueError(f"{_WHERE}: samples {names}: {what} has shape {arr.shape}, expected {shape}")
        for b in range(B):
            bad_t = np.flatnonzero(vis[b] & ~np.isfinite(t[b]).all(1))
            bad_p = np.flatnonzero(vis[b] & pres[b] & ~np.isfinite(p[b]).all(1))
            if bad_t.size or bad_p.size:
                which = "truth" if bad_t.size else "prediction"
                raise ValueError(f"{_WHERE}: sample {names[b]}: non-finite {which} coordinates at visible landmarks "
                                 f"{(bad_t if bad_t.size else bad_p).tolist()} (0-based)")
        return p, t, vis, pres, spacing, hw, score

    def _pck_reference(self, t: np.ndarray, vis: np.ndarray, diag_B: np.ndarray) -> np.ndarray:
        """Per-image PCK reference distance in px (NaN where undefined)."""
        if self.pck_ref == "image":
            return diag_B
        if self.pck_pair is not None:
            a, b = self.pck_pair
            both = vis[:, a] & vis[:, b]
            return np.where(both, np.hypot(*(t[:, a] - t[:, b]).T), np.nan)
        ref = np.full(len(t), np.nan)
        for i in range(len(t)):
            pts = t[i][vis[i]]
            if len(pts) >= 2:
                ref[i] = math.hypot(*np.ptp(pts, axis=0))
        return ref

    # ------------------------------------------------------------------------------------------------------ update
    def update(self, pred_BK2, true_BK2, visible_BK, spacing_B2=None, hw_B2=None, present_BK=None, score_BK=None,
               ids: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Add a batch: points (B, K, 2) in original pixels, visibility / presence / confidence (B, K), spacing
        (B, 2) mm/px (x, y; NaN = unknown), image sizes (B, 2) (H, W; NaN = unknown). Returns each image's record
        fields (kpt_err_px / _mm with NaN where not scored, mre_px / _mm / _pct_diag, points, scores)."""
        p, t, vis, pres, spacing, hw, score = self._inputs(pred_BK2, true_BK2, visible_BK, spacing_B2, hw_B2,
                                                           present_BK, score_BK, ids)
        scored, missed = vis & pres, vis & ~pres
        d = np.where(scored[..., None], p - t, 0.0)       # zeros where not scored keep every sum clean
        e_px = np.hypot(d[..., 0], d[..., 1])
        mm_ok_B = np.isfinite(spacing).all(1) & (spacing > 0).all(1)
        sp = np.where(mm_ok_B[:, None], spacing, 0.0)
        e_mm = np.hypot(d[..., 0] * sp[:, None, 0], d[..., 1] * sp[:, None, 1])
        mm_scored = scored & mm_ok_B[:, None]
        # math.hypot per image: the value the hip X-ray task has always divided by
        diag_B = np.array([math.hypot(h, w) if np.isfinite([h, w]).all() and h > 0 and w > 0 else math.nan
                           for h, w in hw])
        pct_ok = scored & np.isfinite(diag_B)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            pct = np.where(pct_ok, 100.0 * e_px / diag_B[:, None], 0.0)
        for key, value in (("count_K", scored), ("missed_K", missed), ("err_px_sum_K", e_px),
                           ("err_px_sq_K", e_px * e_px), ("abs_dx_sum_K", np.abs(d[..., 0])),
                           ("abs_dy_sum_K", np.abs(d[..., 1])), ("pct_diag_sum_K", pct), ("pct_diag_count_K", pct_ok),
                           ("mm_count_K", mm_scored), ("err_mm_sum_K", e_mm), ("err_mm_sq_K", e_mm * e_mm)):
            self._add(key, np.asarray(value, dtype=np.float64).sum(0))
        self._add("sdr_hits_px_R", [(e_px[scored] <= r).sum() for r in self.sdr_radii])
        self._add("sdr_hits_mm_R", [(e_mm[mm_scored] <= r).sum() for r in self.sdr_radii])
        self._add("images_without_spacing_1", [(scored.any(1) & ~mm_ok_B).sum()])
        ref_B = self._pck_reference(t, vis, diag_B)
        pck_ok = scored & (np.isfinite(ref_B) & (ref_B > 0))[:, None]
        with np.errstate(invalid="ignore"):
            hits = pck_ok & (e_px <= self.pck_thr * ref_B[:, None])
        self._add("pck_hits_count_2", [hits.sum(), pck_ok.sum()])
        self._add("hist_px_N", histogram_counts(e_px[scored]))
        self._add("hist_mm_N", histogram_counts(e_mm[mm_scored]))
        self._add("num_images_1", [len(p)])
        return [self._record(b, p, t, vis, pres, mm_scored, e_px, e_mm, diag_B, score) for b in range(len(p))]

    @staticmethod
    def _record(b, p, t, vis, pres, mm_scored, e_px, e_mm, diag_B, score) -> dict[str, Any]:
        scored = vis & pres
        n, n_mm, s_px = scored[b].sum(), mm_scored[b].sum(), e_px[b].sum()
        nan = float("nan")
        rec = {"kpt_err_px": np.where(scored[b], e_px[b], np.nan).tolist(),
               "kpt_err_mm": np.where(mm_scored[b], e_mm[b], np.nan).tolist(),
               "mre_px": float(s_px / n) if n else nan,
               "mre_mm": float(e_mm[b].sum() / n_mm) if n_mm else nan,
               "mre_pct_diag": float(100.0 * s_px / n / diag_B[b]) if n and math.isfinite(diag_B[b]) else nan,
               "kpts_pred_px": np.where(pres[b][:, None], p[b], np.nan).round(3).tolist(),
               "kpts_true_px": np.where(vis[b][:, None], t[b], np.nan).tolist(),
               "num_scored": int(n), "num_missed": int((vis[b] & ~pres[b]).sum())}
        if score is not None:
            rec["kpt_score"] = np.round(score[b], 4).tolist()
        return rec

    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """One image as engine/evaluate.py hands it over: pred (kpts_px_K2, kpt_present_K?, kpt_score_K?) and orig
        (kpts_px_K2, kpts_visible_K, spacing_mm_2, image_HW3 or meta["orig_hw"]) in the original frame. The record
        (with id) is kept in `records` and returned."""
        sid = meta.get("id", orig.get("id"))
        image = orig.get("image_HW3")
        hw = np.asarray(image).shape[:2] if image is not None else meta.get("orig_hw") or (math.nan, math.nan)
        spacing = orig.get("spacing_mm_2")
        vis = orig.get("kpts_visible_K")
        true = to_numpy(orig["kpts_px_K2"], "kpts_px_K2", np.float64)
        rec = self.update(
            to_numpy(pred["kpts_px_K2"], "kpts_px_K2", np.float64)[None], true[None],
            (np.ones(len(true), bool) if vis is None else to_numpy(vis, "kpts_visible_K", bool))[None],
            None if spacing is None else to_numpy(spacing, "spacing_mm_2", np.float64).reshape(1, 2),
            np.asarray(hw, dtype=np.float64).reshape(1, 2),
            None if pred.get("kpt_present_K") is None else to_numpy(pred["kpt_present_K"], "kpt_present_K", bool)[None],
            None if pred.get("kpt_score_K") is None else to_numpy(pred["kpt_score_K"], "kpt_score_K", np.float64)[None],
            ids=[sid])[0]
        rec = {"id": sid, "index": int(meta.get("index", -1)), **rec}
        if self.keep_records:
            self.records.append(rec)
        return rec

    # ----------------------------------------------------------------------------------------------------- compute
    def sdr_unit_of(self, s: dict[str, np.ndarray]) -> str:
        """The SDR's unit for these (reduced) sums: the forced one, or mm unless an image with a scored landmark
        had no spacing."""
        if self.sdr_unit != "auto":
            return self.sdr_unit
        return "px" if s["images_without_spacing_1"][0] > 0 else "mm"

    def compute(self) -> dict[str, float]:
        """Figures from the (reduced) sums (module docstring); NaN where a figure has nothing to average."""
        s = {k: v.numpy() for k, v in self._state.items()}
        n, n_mm = s["count_K"].sum(), s["mm_count_K"].sum()
        out = {"landmark_mre_px": ratio(s["err_px_sum_K"].sum(), n),
               "landmark_sd_px": _sd(s["err_px_sum_K"].sum(), s["err_px_sq_K"].sum(), n),
               "landmark_median_px": histogram_median(s["hist_px_N"]),
               "landmark_mre_mm": ratio(s["err_mm_sum_K"].sum(), n_mm),
               "landmark_sd_mm": _sd(s["err_mm_sum_K"].sum(), s["err_mm_sq_K"].sum(), n_mm),
               "landmark_median_mm": histogram_median(s["hist_mm_N"]),
               "landmark_mre_pct_diag": ratio(s["pct_diag_sum_K"].sum(), s["pct_diag_count_K"].sum()),
               "landmark_abs_dx_px": ratio(s["abs_dx_sum_K"].sum(), n),
               "landmark_abs_dy_px": ratio(s["abs_dy_sum_K"].sum(), n)}
        for k in range(self.num_keypoints):
            out[f"landmark_mre_px_{k + 1}"] = ratio(s["err_px_sum_K"][k], s["count_K"][k])
        for k in range(self.num_keypoints):
            out[f"landmark_mre_mm_{k + 1}"] = ratio(s["err_mm_sum_K"][k], s["mm_count_K"][k])
        unit = self.sdr_unit_of(s)
        hits, den = s[f"sdr_hits_{unit}_R"], (n_mm if unit == "mm" else n)
        out.update({f"sdr_{radius_tag(r)}{unit}": ratio(hits[i], den, 100.0) for i, r in enumerate(self.sdr_radii)})
        last = int(np.argmax(self.sdr_radii)) if self.sdr_radii else None
        out["landmark_outlier_pct"] = ratio(den - hits[last], den, 100.0) if last is not None else float("nan")
        out["pck"] = ratio(*s["pck_hits_count_2"])
        out.update(num_images=float(s["num_images_1"][0]), num_landmarks_scored=float(n),
                   landmark_missed=float(s["missed_K"].sum()))
        return out
