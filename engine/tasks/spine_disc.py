"""Intervertebral-disc labelling on sagittal spine MRI (stacked hourglass, SEEDS.md §3).

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
- landmark_mre_mm / _px: channel-matched distance over pairs with a visible truth and a present prediction.

The accumulator holds sums and counts only (engine/metrics.py: ranks all-reduce SUM, never per-rank means).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engine import plots_spine

from engine.metrics import SummedState

from .base import Task, figure_formatter

_WHERE = "engine/tasks/spine_disc.py"
OVERLAY_GRID_COUNT = 6


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
                  "mre_mm_sum_K": K, "mre_px_sum_K": K, "mre_count_K": K, "pck_hits_K": K, "pck_den_K": K,
                  "num_images_1": 1}
        self._state = {k: torch.zeros(n, dtype=torch.float64) for k, n in shapes.items()}

    # -------------------------------------------------------------------------------------------- cross-rank state

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
        d = p - t
        err_mm = np.where(matched, np.hypot(d[:, 0] * sx, d[:, 1] * sy), np.nan)
        err_px = np.where(matched, np.hypot(d[:, 0], d[:, 1]), np.nan)
        hit = matched & (err_px / (width_px / self.pck_width_div) < self.pck_thr)
        self._add_sample(vis=vis, pres=pres, dtt=dtt, fn=fn, fp=fp, matched=matched, err_mm=err_mm, err_px=err_px, hit=hit)
        if self.keep_records:
            self.records.append({
                "id": meta.get("id"), "orig_hw": [int(hw[0]), int(hw[1])], "spacing_mm": [float(sx), float(sy)],
                "true_px": _list(t, vis), "pred_px": _list(p, pres), "dtt_mm": _list(dtt, vis & np.isfinite(dtt)),
                "err_mm": _list(err_mm, matched), "fn": [bool(fn[k]) if vis[k] else None for k in range(K)],
                "fp": [bool(fp[k]) if pres[k] else None for k in range(K)], "num_true": int(vis.sum()),
                "num_pred": int(pres.sum()), "num_fn": int(fn.sum()), "num_fp": int(fp.sum())})

    def _add_sample(self, vis, pres, dtt, fn, fp, matched, err_mm, err_px, hit) -> None:
        s = self._state
        for key, value in (("true_K", vis), ("fn_K", fn), ("dtt_mm_sum_K", np.nan_to_num(dtt)),
                           ("dtt_count_K", np.isfinite(dtt)), ("pred_K", pres), ("fp_K", fp),
                           ("mre_mm_sum_K", np.nan_to_num(err_mm)), ("mre_px_sum_K", np.nan_to_num(err_px)),
                           ("mre_count_K", matched), ("pck_hits_K", hit), ("pck_den_K", vis)):
            s[key] += torch.from_numpy(np.asarray(value, dtype=np.float64))
        s["num_images_1"] += 1.0

    # ----------------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, float]:
        s = {k: v.numpy() for k, v in self._state.items()}
        out = {"dtt_mm": _ratio(s["dtt_mm_sum_K"].sum(), s["dtt_count_K"].sum()),
               "fnr_pct": _ratio(s["fn_K"].sum(), s["true_K"].sum(), 100.0),
               "fpr_pct": _ratio(s["fp_K"].sum(), s["pred_K"].sum(), 100.0),
               "pck": _ratio(s["pck_hits_K"].sum(), s["pck_den_K"].sum()),
               "landmark_mre_mm": _ratio(s["mre_mm_sum_K"].sum(), s["mre_count_K"].sum()),
               "landmark_mre_px": _ratio(s["mre_px_sum_K"].sum(), s["mre_count_K"].sum()),
               "num_true_discs": float(s["true_K"].sum()), "num_predictions": float(s["pred_K"].sum()),
               "num_fn": float(s["fn_K"].sum()), "num_fp": float(s["fp_K"].sum()),
               "dtt_undefined": float(s["true_K"].sum() - s["dtt_count_K"].sum()),
               "num_images": float(s["num_images_1"][0])}
        for k in range(self.num_keypoints):    # per-disc keys are 1-based channels (dtt_mm_1 = first channel)
            out[f"dtt_mm_{k + 1}"] = _ratio(s["dtt_mm_sum_K"][k], s["dtt_count_K"][k])
            out[f"fnr_pct_{k + 1}"] = _ratio(s["fn_K"][k], s["true_K"][k], 100.0)
        return out


class SpineDiscTask(Task):
    """Disc labelling: metrics above, a skeleton prior fitted on the training labels for decoding."""

    name = "spine_disc"
    default_format = "nifti"
    headline = ("dtt_mm", "fnr_pct", "fpr_pct", "pck", "landmark_mre_mm")
    best_metric = "dtt_mm"
    best_mode = "min"
    shown = ("loss", "dtt_mm", "fnr_pct", "fpr_pct", "pck")

    def __init__(self, fn_si_mm: float = 7.0, fp_si_mm: float = 10.0, pck_thr: float = 0.5,
                 pck_width_div: float = 10.0, rel_threshold: float = 0.5, abs_threshold: float = 0.1):
        self.metric_args = dict(fn_si_mm=fn_si_mm, fp_si_mm=fp_si_mm, pck_thr=pck_thr, pck_width_div=pck_width_div)
        SpineDiscAccumulator(**self.metric_args)         # validate the options now, not at the first evaluation
        self.rel_threshold, self.abs_threshold = float(rel_threshold), float(abs_threshold)
        self.prior = None                                # models.skeleton.SkeletonPrior after fit()

    def accumulator(self, cfg, data: dict[str, Any]) -> SpineDiscAccumulator:
        return SpineDiscAccumulator(num_keypoints=len(data["kpt_names"]), **self.metric_args)

    # ----------------------------------------------------------------------------------------- skeleton prior
    def fit_prior(self, train_dataset) -> None:
        """Fit the mean disc skeleton (models.skeleton.fit_skeleton) on the training split's original-frame labels;
        decoder() then uses it."""
        if hasattr(train_dataset, "keypoints_original"):
            kpts, vis = train_dataset.keypoints_original()
        else:
            origs = [train_dataset.original(i) for i in range(len(train_dataset))]
            kpts = np.stack([np.asarray(o["kpts_px_K2"], dtype=np.float32) for o in origs])
            vis = np.stack([np.asarray(o["kpts_visible_K"], dtype=bool) for o in origs])
        self._set_prior(np.asarray(kpts, dtype=np.float32), np.asarray(vis, dtype=bool))

    def _set_prior(self, kpts_NK2: np.ndarray, visible_NK: np.ndarray) -> None:
        from models.skeleton import fit_skeleton
        self.prior = fit_skeleton(kpts_NK2, visible_NK)

    def fit(self, train_dataset) -> None:
        self.fit_prior(train_dataset)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.prior is None else {"skeleton": self.prior.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("skeleton") is not None:
            from models.skeleton import SkeletonPrior
            self.prior = SkeletonPrior.from_dict(state["skeleton"])

    def decoder(self, cfg) -> Callable[[dict], dict]:
        from models.skeleton import decode_discs
        method = "softargmax" if cfg.model.decode == "softargmax" else "argmax"
        prior, peak, rel, absolute = self.prior, float(cfg.data.heatmap_peak), self.rel_threshold, self.abs_threshold

        def decode(outputs: dict) -> dict:
            kpts, present = decode_discs(outputs["heatmap_BKHW"].detach(), prior, method=method, rel_threshold=rel,
                                         abs_threshold=absolute, peak=peak)
            return {"kpts_px_BK2": kpts, "kpt_present_BK": present}
        return decode

    # ----------------------------------------------------------------------------------------------- outputs
    def write_figures(self, out_dir: Path, figures: dict[str, float], records: list[dict[str, Any]], cfg,
                      model, dataset, decode: Callable) -> list[Path]:
        out_dir = Path(out_dir)
        names = _names(dataset, records, figures)
        K = len(names)
        written = [plots_spine.plot_dtt_per_disc([figures.get(f"dtt_mm_{k + 1}", float("nan")) for k in range(K)],
                                                 names, out_dir / "dtt_per_disc.png")]
        if records:
            counts = {key: np.zeros(K) for key in ("fn", "true", "fp", "pred")}
            for r in records:
                counts["fn"] += [bool(x) for x in r["fn"]]          # None (no true disc) counts as False
                counts["true"] += [v is not None for v in r["true_px"]]
                counts["fp"] += [bool(x) for x in r["fp"]]
                counts["pred"] += [v is not None for v in r["pred_px"]]
            written.append(plots_spine.plot_fn_fp_summary(counts["fn"], counts["true"], counts["fp"], counts["pred"],
                                                          names, out_dir / "fn_fp_summary.png"))
            items = _grid_items(records[:OVERLAY_GRID_COUNT], dataset)
            if items:
                written.append(plots_spine.plot_overlay_grid(items, out_dir / "sagittal_overlays.png", names))
        return written

    def summary_lines(self, figures: dict[str, float]) -> list[str]:
        f = figure_formatter(figures)
        return [f" discs     DTT {f('dtt_mm', ' mm')}   FNR {f('fnr_pct', ' %')}   FPR {f('fpr_pct', ' %')}   "
                f"PCK {f('pck')}",
                f" matched   MRE {f('landmark_mre_mm', ' mm')} = {f('landmark_mre_px', ' px')}   "
                f"true discs {f('num_true_discs', digits=6)}   predictions {f('num_predictions', digits=6)}"]

    def predict_row(self, pred: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        """Per disc: x, y in original pixels and mm (from the top-left pixel centre of the sagittal view; x = A-P,
        y = S-I) and whether it was predicted."""
        kpts = np.asarray(pred["kpts_px_K2"], dtype=np.float64).reshape(-1, 2)
        present = pred.get("kpt_present_K")
        pres = np.ones(len(kpts), bool) if present is None else np.asarray(present, dtype=bool).reshape(-1)
        names = item.get("kpt_names") or [f"disc{k + 1}" for k in range(len(kpts))]
        sx, sy = (float(v) for v in np.asarray(item["spacing_mm_2"], dtype=np.float64).reshape(2))
        row: dict[str, Any] = {"num_discs": int(pres.sum())}
        for k, (x, y) in enumerate(kpts):
            ok = bool(pres[k])
            row[f"{names[k]}_present"] = ok
            row[f"{names[k]}_x"] = round(float(x), 2) if ok else None
            row[f"{names[k]}_y"] = round(float(y), 2) if ok else None
            row[f"{names[k]}_x_mm"] = round(float(x) * sx, 2) if ok else None
            row[f"{names[k]}_y_mm"] = round(float(y) * sy, 2) if ok else None
        return row

    def draw_prediction(self, image_HW3: np.ndarray, pred: dict[str, Any], truth: dict[str, Any] | None,
                        out_path: Path, title: str = "") -> Path:
        return plots_spine.plot_disc_overlay(
            image_HW3, pred["kpts_px_K2"], pred.get("kpt_present_K"), out_path,
            true_K2=None if truth is None else truth.get("kpts_px_K2"),
            true_visible_K=None if truth is None else truth.get("kpts_visible_K"),
            names=None if truth is None else truth.get("kpt_names"),
            spacing_mm_2=None if truth is None else truth.get("spacing_mm_2"), title=title)


def _names(dataset, records: Sequence[dict], figures: dict[str, float]) -> list[str]:
    names = getattr(dataset, "kpt_names", None)
    if names:
        return list(names)
    k = len(records[0]["true_px"]) if records else sum(1 for key in figures if key.startswith("dtt_mm_"))
    return [f"disc{i + 1}" for i in range(k)]


def _grid_items(records: Sequence[dict], dataset) -> list[dict[str, Any]]:
    """Overlay items for the records' images (looked up in the dataset by id); truth and prediction come from the
    records, so no second forward pass is needed."""
    index = {dataset.sample_id(i): i for i in range(len(dataset))} if hasattr(dataset, "sample_id") else {}
    items = []
    for r in records:
        if r.get("id") not in index:
            continue
        orig = dataset.original(index[r["id"]])
        items.append({"image_HW3": orig["image_HW3"], "spacing_mm_2": r["spacing_mm"], "title": str(r["id"]),
                      "pred_K2": [p if p is not None else [np.nan, np.nan] for p in r["pred_px"]],
                      "pred_present_K": [p is not None for p in r["pred_px"]],
                      "true_K2": [t if t is not None else [np.nan, np.nan] for t in r["true_px"]],
                      "true_visible_K": [t is not None for t in r["true_px"]]})
    return items
