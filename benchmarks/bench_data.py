"""Data loading samples/s: HipDataset with augmentation through a DataLoader, 0 / 1 / 2 workers, cached or decoding."""
import collections
import itertools

import pytest
from torch.utils.data import DataLoader

from data_pipelines.batch import collate_samples
from data_pipelines.readers.labelme_reader import HipDataset
from data_pipelines.synthetic.hip import generate_hip_dataset
from data_pipelines.transforms import AugmentParams

N_BATCHES, BATCH = 8, 8


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_phantom")
    return generate_hip_dataset(root, 64, seed=0)


@pytest.mark.parametrize("input_hw", [(128, 160), (384, 512)], ids=["128x160", "384x512"])
@pytest.mark.parametrize("workers,cached", [(0, True), (1, True), (2, True), (2, False)],
                         ids=["w0-cached", "w1-cached", "w2-cached", "w2-decode"])
def test_loader_throughput(benchmark, record, phantom, input_hw, workers, cached):
    benchmark.group = f"loader {input_hw[0]}x{input_hw[1]} (decode+augment+heatmaps)"
    sigma = 2.0 * input_hw[1] / 160
    ds = HipDataset(phantom, input_hw=input_hw, augment=AugmentParams(), sigma_px=sigma, cache_decoded=cached)

    def run():
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate_samples)
        collections.deque(itertools.islice(loader, N_BATCHES), maxlen=0)  # consume without keeping

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    record(samples_per_round=N_BATCHES * BATCH,
           samples_per_s=N_BATCHES * BATCH / benchmark.stats.stats.mean)
