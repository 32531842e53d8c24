"""Intervertebral-disc labelling on sagittal spine MRI (stacked hourglass, docs/systems/spine_disc_hourglass.md).

The figures (DTT, FNR, FPR, PCK, matched MRE) are engine/tasks/spine_disc/metrics.py's, definitions there; this module
fits the skeleton prior the decoder uses, draws the figures (engine/tasks/spine_disc/plots.py) and writes predict rows.

Post-processing (eval.task_args.postprocess): "skeleton" chooses one candidate per channel against the mean skeleton
(models/skeleton.py); "look_once" classifies all candidates at once with a trained point classifier
(models/look_once.py, eval.task_args.look_once_checkpoint = the look_once.pt of `medpose train --config
spine_look_once`). Both start from the same heatmap candidates and give the same kind of prediction (positions and
presence per disc channel), scored by the same accumulator. These are task options rather than model.args because
model.args are the network builder's arguments (checked against its signature) and the post-processing belongs to
the task's decoder, whatever network produced the heatmaps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..base import Task, figure_formatter
from . import plots as plots_spine
from .metrics import SpineDiscAccumulator

OVERLAY_GRID_COUNT = 6
POSTPROCESS = ("skeleton", "look_once")


class SpineDiscTask(Task):
    """Disc labelling: metrics in .metrics, a skeleton prior fitted on the training labels for decoding."""

    name = "spine_disc"
    default_format = "nifti"
    headline = ("dtt_mm", "fnr_pct", "fpr_pct", "pck", "landmark_mre_mm")
    best_metric = "dtt_mm"
    best_mode = "min"
    shown = ("loss", "dtt_mm", "fnr_pct", "fpr_pct", "pck")

    def __init__(self, fn_si_mm: float = 7.0, fp_si_mm: float = 10.0, pck_thr: float = 0.5,
                 pck_width_div: float = 10.0, rel_threshold: float = 0.5, abs_threshold: float = 0.1,
                 postprocess: str = "skeleton", look_once_checkpoint: str = "", look_once_threshold: float = 0.5):
        from engine.config import ConfigError
        self.metric_args = dict(fn_si_mm=fn_si_mm, fp_si_mm=fp_si_mm, pck_thr=pck_thr, pck_width_div=pck_width_div)
        SpineDiscAccumulator(**self.metric_args)         # validate the options now, not at the first evaluation
        self.rel_threshold, self.abs_threshold = float(rel_threshold), float(abs_threshold)
        self.prior = None                                # models.skeleton.SkeletonPrior after fit()
        if postprocess not in POSTPROCESS:
            raise ConfigError(f"eval.task_args.postprocess: {postprocess!r} is not one of {', '.join(POSTPROCESS)}")
        if postprocess == "look_once" and not look_once_checkpoint:
            raise ConfigError("eval.task_args.look_once_checkpoint: postprocess=look_once needs the classifier's "
                              "look_once.pt (from `medpose train --config spine_look_once`)")
        if postprocess == "look_once" and not Path(look_once_checkpoint).is_file():
            raise ConfigError(f"eval.task_args.look_once_checkpoint: {look_once_checkpoint}: no such file (the "
                              f"look_once.pt written by `medpose train --config spine_look_once`)")
        if not 0.0 < look_once_threshold < 1.0:
            raise ConfigError(f"eval.task_args.look_once_threshold: {look_once_threshold} must lie in (0, 1)")
        self.postprocess, self.look_once_checkpoint = postprocess, str(look_once_checkpoint)
        self.look_once_threshold = float(look_once_threshold)
        self._classifier = None

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

    def classifier(self):
        """The look-once classifier (loaded once, weights only; a missing or foreign file is a CheckpointError)."""
        if self._classifier is None:
            from .look_once import load_look_once
            self._classifier = load_look_once(self.look_once_checkpoint)
        return self._classifier

    def decoder(self, cfg) -> Callable[[dict], dict]:
        from models.skeleton import decode_discs
        method = "softargmax" if cfg.model.decode == "softargmax" else "argmax"
        prior, peak, rel, absolute = self.prior, float(cfg.data.heatmap_peak), self.rel_threshold, self.abs_threshold
        if self.postprocess == "look_once":
            from models.look_once import decode_look_once
            classifier, thr = self.classifier(), self.look_once_threshold

            def decode_lo(outputs: dict) -> dict:
                kpts, present = decode_look_once(outputs["heatmap_BKHW"].detach(), classifier, method=method,
                                                 rel_threshold=rel, abs_threshold=absolute, peak=peak, threshold=thr)
                return {"kpts_px_BK2": kpts, "kpt_present_BK": present}
            return decode_lo

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
