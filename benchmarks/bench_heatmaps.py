"""Gaussian heatmap targets: numba vs the numpy reference vs torch, at the shapes the hip task uses."""
import numpy as np
import pytest
import torch

from data_pipelines.heatmaps import render_heatmaps_numba, render_heatmaps_numpy
from models.codecs import render_heatmaps_torch

SHAPES = [((128, 160), 2.0), ((384, 512), 7.0)]


def _points(hw, k=6, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform([0, 0], [hw[1] - 1, hw[0] - 1], size=(k, 2)).astype(np.float32)
    return pts, np.ones(k, bool)


@pytest.mark.parametrize("hw,sigma", SHAPES, ids=["128x160", "384x512"])
@pytest.mark.parametrize("impl", ["numpy", "numba", "torch"])
def test_heatmap_targets(benchmark, record, hw, sigma, impl):
    benchmark.group = f"heatmaps {hw[0]}x{hw[1]} K=6"
    pts, vis = _points(hw)
    if impl == "numpy":
        fn = lambda: render_heatmaps_numpy(pts, vis, hw, sigma)  # noqa: E731
    elif impl == "numba":
        render_heatmaps_numba(pts, vis, hw, sigma)  # compile outside the timing
        fn = lambda: render_heatmaps_numba(pts, vis, hw, sigma)  # noqa: E731
    else:
        tp, tv = torch.from_numpy(pts)[None], torch.from_numpy(vis)[None]
        fn = lambda: render_heatmaps_torch(tp, tv, hw, sigma)  # noqa: E731
    out = benchmark(fn)
    record(samples_per_call=1)
    assert np.asarray(out).max() > 200  # a peak of ~255 was rendered
