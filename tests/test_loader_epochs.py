"""One training loader across epochs (data_pipelines/loaders.training_batches, sampler.EpochSpan): the same batches,
in the same order, with the same augmentations, as a loader made per epoch; its workers start once."""
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from data_pipelines.loaders import training_batches
from data_pipelines.sampler import EpochSpan, ShardedSampler


def test_epoch_span_is_the_per_epoch_shards_back_to_back():
    for rank, world, start in ((0, 1, 0), (0, 1, 10), (1, 3, 7), (2, 3, 22)):
        base = ShardedSampler(23, rank, world, shuffle=True, seed=5, drop_last=True, batch_size=2)
        want = []
        for epoch, st in ((4, start), (5, 0), (6, 0)):
            s = ShardedSampler(23, rank, world, shuffle=True, seed=5, drop_last=True, batch_size=2)
            s.set_epoch(epoch)
            s.set_start(st)
            want += [(i, epoch) for i in s.shard()]
        it = iter(EpochSpan(base, 4, start))
        assert [next(it) for _ in range(len(want))] == want


def test_epoch_span_needs_whole_batches():
    with pytest.raises(ValueError, match="drop_last"):
        EpochSpan(ShardedSampler(10, drop_last=False), 0)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    from engine.config import load_config
    from engine.run import build_data, make_strategy
    root = tmp_path_factory.mktemp("hc18")
    generate_hc18_dataset(root / "data", 24, seed=2, image_hw=(60, 80))
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "launch/configs/hc18_unet.yaml",
                      [f"data.root={root / 'data'}", "data.input_hw=[32,64]", "data.num_folds=4"])
    data = build_data(cfg, root / "run", make_strategy(cfg))
    assert data["train"].augment is not None
    return data["train"]


def _take(ds, n, epoch, start, spanning, workers, init=None):
    s = ShardedSampler(len(ds), shuffle=True, seed=3, drop_last=True, batch_size=4)
    out = []
    gen = training_batches(ds, 4, s, epoch, start, "torch", workers, spanning=spanning, worker_init_fn=init)
    for e, b in gen:
        out.append((e, [m["id"] for m in b.meta], torch.cat([b.image_BCHW.flatten(), b.mask_BHW.flatten().float(),
                                                            b.kpts_px_BK2.flatten()])))
        if len(out) == n:
            break
    gen.close()
    return out, s


@pytest.mark.parametrize("where", ["begin", "mid", "end"])   # epoch 1 from its start, mid-way, or used up
def test_spanning_loader_gives_the_per_epoch_batches(train_set, where):
    per = len(train_set) // 4                      # batches per epoch
    assert per >= 2
    start = {"begin": 0, "mid": 4, "end": per * 4}[where]
    n = 2 * per + 1                                # past two epoch boundaries
    ref, s_ref = _take(train_set, n, 1, start, spanning=False, workers=0)
    got, s_got = _take(train_set, n, 1, start, spanning=True, workers=2)
    assert [(e, ids) for e, ids, _ in got] == [(e, ids) for e, ids, _ in ref]
    epochs = [e for e, _, _ in got]
    first = 2 if where == "end" else 1
    assert epochs[0] == first and sorted(set(epochs)) == [first, first + 1, first + 2]
    assert epochs.count(first) == (per if where == "end" else per - start // 4)
    for (_, _, a), (_, _, b) in zip(got, ref):
        assert torch.equal(a, b)                   # the same augmentation draws: (seed, epoch, index)
    assert s_got.epoch == s_ref.epoch == first + 2  # the sampler is left at the last epoch begun


def _count_start(path, worker_id):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_spanning_loader_starts_its_workers_once(train_set, tmp_path):
    n = len(train_set) // 4 * 3                    # three whole epochs
    for spanning, want in ((True, 2), (False, 6)):
        log = tmp_path / f"starts_{spanning}.txt"
        _take(train_set, n, 0, 0, spanning=spanning, workers=2, init=partial(_count_start, log))
        assert len(log.read_text().split()) == want
