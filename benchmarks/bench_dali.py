"""Hip batches per second: the torch path (grid_sample warps, numba or no heatmap targets) vs DALI warps (CPU-only
pipeline, data_pipelines/dali/hip.py), side by side, batch 8, in this process (no DataLoader workers), at the
published 384x512 input and the demo's 128x160. Originals are cached decoded (cache_decoded=True), so the DALI
loader takes the pixels from the host (decode="host") and applies the intensity draws and the warps; the DALI column
has no heatmaps (they are rendered on the device). Decode included, every loader, GPU: benchmarks/loader_bench.py."""
import importlib.util

import pytest

from data_pipelines.batch import collate_samples
from data_pipelines.readers.labelme_reader import HipDataset
from data_pipelines.sampler import ShardedSampler
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

BATCH = 8
SIZES = {"384x512": (384, 512), "128x160": (128, 160)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return generate_hip_dataset(tmp_path_factory.mktemp("hip"), 16, seed=0)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", ["torch+numba-targets", "torch", "dali-cpu"])
def test_hip_batches(benchmark, record, files, size, provider):
    if provider == "dali-cpu" and importlib.util.find_spec("nvidia.dali") is None:
        pytest.skip("nvidia-dali-cuda130 is not installed")
    benchmark.group = f"hip batches {size}, batch {BATCH}"
    impl = "numba" if provider == "torch+numba-targets" else "none"
    ds = HipDataset(files, input_hw=SIZES[size], augment=AugmentParams(flip_p=0.5), heatmap_impl=impl,
                    cache_decoded=True)
    sampler = ShardedSampler(len(ds), shuffle=True, drop_last=True, batch_size=BATCH)
    if provider == "dali-cpu":
        from data_pipelines.dali.source import dali_batches
        loader = dali_batches(ds, BATCH, sampler, num_threads=2)
        run = lambda: list(loader)  # noqa: E731
    else:
        def run():
            idx = list(sampler)
            return [collate_samples([ds[i] for i in idx[s:s + BATCH]]) for s in range(0, len(idx), BATCH)]
    batches = benchmark(run)
    record(samples_per_call=len(batches) * BATCH)
    assert len(batches) == 2 and batches[0].image_BCHW.shape[-2:] == SIZES[size]
