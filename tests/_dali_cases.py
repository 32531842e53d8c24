"""Checks shared by the DALI reader tests (tests/test_dali_*.py)."""
from data_pipelines.sampler import ShardedSampler


def assert_eval_shards_see_every_sample_once(ds, source_cls) -> None:
    """Two evaluation ranks through make_batches(..., "dali") on a 7-sample dataset, batches of 2: the reader's DALI
    source is used, rank 0 gets 2 + 2 samples, rank 1 gets 2 + 1, and every index comes exactly once."""
    from data_pipelines.loaders import make_batches
    seen = []
    for rank in range(2):
        sampler = ShardedSampler(len(ds), rank, 2, shuffle=False, drop_last=False, batch_size=2)
        loader = make_batches(ds, 2, sampler, "dali")
        assert isinstance(loader.source, source_cls)
        batches = list(loader)
        assert [b.size for b in batches] == ([2, 2] if rank == 0 else [2, 1])   # 7 samples: 4 + 3
        seen += [m["index"] for b in batches for m in b.meta]
    assert sorted(seen) == list(range(len(ds)))
