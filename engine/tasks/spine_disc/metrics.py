"""Disc-labelling accumulator (sagittal spine MRI, docs/systems/spine_disc_hourglass.md).

Metrics, in millimetres of the ORIGINAL 2-D sagittal frame (data_pipelines/readers/nifti.py: x = anterior -> posterior
columns, y = superior -> inferior rows; distance = sqrt((dx sx)^2 + (dy sy)^2) with spacing (sx, sy) mm/px).
Only predictions whose `kpt_present_K` is True count (an absent channel is "not predicted"):

- DTT (distance to target): for each true disc, the distance to the NEAREST prediction of any channel; a true disc
  in an image without any prediction has no DTT (counted in `dtt_undefined`, and it is a false negative).
- false negative: a true disc with no prediction within `fn_si_mm` (7 mm) along the superior-inferior axis
  (|dy| sy <= 7 mm is "within"); FNR = FN / true discs x 100.
- false positive: a prediction farther than `fp_si_mm` (10 mm) along S-I from every true disc (|dy| sy > 10 mm);
  FPR = FP / predictions x 100.
- PCK (published checkpoint criterion): a channel-matched pair is correct when its pixel distance / (W / 10) <
  0.5, W = original image width in pixels; the denominator is every visible true disc (an absent prediction is a
  miss). A fraction in [0, 1].
- landmark_mre_mm / _px: channel-matched distance over pairs with a visible truth and a present prediction, with
  the other generic landmark figures (engine/tasks/landmarks/metrics.py: SD, median, per-disc MRE, SDR in mm,
  `landmark_missed` = visible discs predicted absent). This task's `pck` is the checkpoint criterion above, not the
  generic bbox PCK.

The accumulator holds sums and counts only (engine/metrics.py: ranks all-reduce SUM, never per-rank means).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.metrics import SummedState

from ..landmarks.metrics import LandmarkMetrics

_WHERE = "engine/tasks/spine_disc/metrics.py"


def _ratio(num: float, den: float, scale: float = 1.0) -> float:
    return float(scale * num / den) if den > 0 else float("nan")


def _list(values: np.ndarray, ok: np.ndarray) -> list:
    """JSON-able per-channel list (floats or [x, y] pairs) with None where `ok` is False."""
    return [np.asarray(values[k]).tolist() if ok[k] else None for k in range(len(ok))]


class SpineDiscAccumulator(SummedState):
    """Per-sample update in the original frame; `state()` sums (all-reduce SUM), `compute()` the figures."""
    where = _WHERE

    def __init__(self, num_keypoints: int = 11, fn_si_mm: float = 7.0, fp_si_mm: float = 10.0,
                 pck_thr: float = 0.5, pck_width_div: float = 10.0, keep_records: bool = True):
        if num_keypoints < 1 or fn_si_mm < 0 or fp_si_mm < 0 or pck_thr <= 0 or pck_width_div <= 0:
            raise ValueError(f"{_WHERE}: need num_keypoints >= 1, fn/fp distances >= 0 and positive PCK settings; "
                             f"got {num_keypoints}, {fn_si_mm}, {fp_si_mm}, {pck_thr}, {pck_width_div}")
        self.num_keypoints, self.fn_si_mm, self.fp_si_mm = int(num_keypoints), float(fn_si_mm), float(fp_si_mm)
        self.pck_thr, self.pck_width_div, self.keep_records = float(pck_thr), float(pck_width_div), keep_records
        self.records: list[dict[str, Any]] = []
        K = self.num_keypoints
        shapes = {"true_K": K, "fn_K": K, "dtt_mm_sum_K": K, "dtt_count_K": K, "pred_K": K, "fp_K": K,
                  "pck_hits_K": K, "pck_den_K": K, "num_images_1": 1}
        self._state = {k: torch.zeros(n, dtype=torch.float64) for k, n in shapes.items()}
        self.landmarks = LandmarkMetrics(K, keep_records=False)
        self._parts = {"landmarks": self.landmarks}

    # ------------------------------------------------------------------------------------------------------ update
    def _inputs(self, pred: dict[str, Any], orig: dict[str, Any]):
        K = self.num_keypoints
        p = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        t = np.asarray(orig["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        vis = np.asarray(orig["kpts_visible_K"], dtype=bool).reshape(-1)
        present = pred.get("kpt_present_K")
        pres = np.ones(len(p), bool) if present is None else np.asarray(present, dtype=bool).reshape(-1)
        if not (len(p) == len(t) == len(vis) == len(pres) == K):
            raise ValueError(f"{_WHERE}: expected {K} discs; got pred {len(p)}, present {len(pres)}, truth {len(t)}, "
                             f"visible {len(vis)}")
        spacing = np.asarray(orig["spacing_mm_2"], dtype=np.float64).reshape(-1)
        if spacing.shape != (2,) or not np.all(spacing > 0):
            raise ValueError(f"{_WHERE}: spacing_mm_2 must be 2 positive mm/px values, got {spacing.tolist()}")
        for name, pts, ok in (("prediction", p, pres), ("truth", t, vis)):
            if not np.isfinite(pts[ok]).all():
                raise ValueError(f"{_WHERE}: non-finite {name} coordinates at present discs")
        return p, t, vis, pres, spacing

    def update_sample(self, pred: dict[str, Any], orig: dict[str, Any], meta: dict[str, Any]) -> None:
        """Add one image: pred in the original frame (kpts_px_K2, optional kpt_present_K), orig = dataset.original(i)
        (kpts_px_K2, kpts_visible_K, spacing_mm_2, image_HW3 for the width), meta (id, optional orig_hw)."""
        p, t, vis, pres, (sx, sy) = self._inputs(pred, orig)
        hw = meta.get("orig_hw") or np.asarray(orig["image_HW3"]).shape[:2]
        width_px = float(hw[1])
        ti, pi = np.flatnonzero(vis), np.flatnonzero(pres)
        d_TP2 = p[pi][None, :, :] - t[ti][:, None, :]                       # (true, pred, 2) pixels
        dist_mm_TP = np.hypot(d_TP2[..., 0] * sx, d_TP2[..., 1] * sy)
        dy_mm_TP = np.abs(d_TP2[..., 1]) * sy
        K = self.num_keypoints
        dtt = np.full(K, np.nan)
        fn, fp = np.zeros(K, bool), np.zeros(K, bool)
        if pi.size:
            dtt[ti] = dist_mm_TP.min(axis=1)
        fn[ti] = ~(dy_mm_TP <= self.fn_si_mm).any(axis=1) if pi.size else True
        fp[pi] = ~(dy_mm_TP <= self.fp_si_mm).any(axis=0) if ti.size else True
        matched = vis & pres
        score = pred.get("kpt_score_K")
        lm = self.landmarks.update(p[None], t[None], vis[None], [[sx, sy]], np.asarray([hw], dtype=np.float64),
                                   pres[None], None if score is None else np.asarray(score, np.float64)[None],
                                   ids=[meta.get("id")])[0]
        err_px, err_mm = np.asarray(lm["kpt_err_px"]), np.asarray(lm["kpt_err_mm"])  # NaN where not matched
        hit = matched & (err_px / (width_px / self.pck_width_div) < self.pck_thr)
        self._add_sample(vis=vis, pres=pres, dtt=dtt, fn=fn, fp=fp, hit=hit)
        if self.keep_records:
            self.records.append({
                "id": meta.get("id"), "orig_hw": [int(hw[0]), int(hw[1])], "spacing_mm": [float(sx), float(sy)],
                "true_px": _list(t, vis), "pred_px": _list(p, pres), "dtt_mm": _list(dtt, vis & np.isfinite(dtt)),
                "err_mm": _list(err_mm, matched), "fn": [bool(fn[k]) if vis[k] else None for k in range(K)],
                "fp": [bool(fp[k]) if pres[k] else None for k in range(K)], "num_true": int(vis.sum()),
                "num_pred": int(pres.sum()), "num_fn": int(fn.sum()), "num_fp": int(fp.sum()), **lm})

    def _add_sample(self, vis, pres, dtt, fn, fp, hit) -> None:
        s = self._state
        for key, value in (("true_K", vis), ("fn_K", fn), ("dtt_mm_sum_K", np.nan_to_num(dtt)),
                           ("dtt_count_K", np.isfinite(dtt)), ("pred_K", pres), ("fp_K", fp),
                           ("pck_hits_K", hit), ("pck_den_K", vis)):
            s[key] += torch.from_numpy(np.asarray(value, dtype=np.float64))
        s["num_images_1"] += 1.0

    # ----------------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        s = {k: v.numpy() for k, v in self._state.items()}
        lm = self.landmarks.compute()
        out = {"dtt_mm": _ratio(s["dtt_mm_sum_K"].sum(), s["dtt_count_K"].sum()),
               "fnr_pct": _ratio(s["fn_K"].sum(), s["true_K"].sum(), 100.0),
               "fpr_pct": _ratio(s["fp_K"].sum(), s["pred_K"].sum(), 100.0),
               "pck": _ratio(s["pck_hits_K"].sum(), s["pck_den_K"].sum()),
               "landmark_mre_mm": lm["landmark_mre_mm"], "landmark_mre_px": lm["landmark_mre_px"],
               "num_true_discs": float(s["true_K"].sum()), "num_predictions": float(s["pred_K"].sum()),
               "num_fn": float(s["fn_K"].sum()), "num_fp": float(s["fp_K"].sum()),
               "dtt_undefined": float(s["true_K"].sum() - s["dtt_count_K"].sum()),
               "num_images": float(s["num_images_1"][0])}
        for k in range(self.num_keypoints):    # per-disc keys are 1-based channels (dtt_mm_1 = first channel)
            out[f"dtt_mm_{k + 1}"] = _ratio(s["dtt_mm_sum_K"][k], s["dtt_count_K"][k])
            out[f"fnr_pct_{k + 1}"] = _ratio(s["fn_K"][k], s["true_K"][k], 100.0)
        out.update({k: v for k, v in lm.items() if k not in out})     # the generic rest; `pck` stays this task's
        return out
