from data_pipelines.sampler import ShardedSampler


def test_training_shards_are_disjoint_equal_and_reproducible():
    shards = [ShardedSampler(23, r, 3, shuffle=True, seed=5, drop_last=True, batch_size=2) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    idx = [s.shard() for s in shards]
    assert all(len(i) == 6 for i in idx)  # 23 // 3 = 7, trimmed to whole batches of 2
    flat = sum(idx, [])
    assert len(set(flat)) == len(flat)
    again = ShardedSampler(23, 1, 3, shuffle=True, seed=5, drop_last=True, batch_size=2)
    again.set_epoch(4)
    assert again.shard() == idx[1]
    again.set_epoch(5)
    assert again.shard() != idx[1]


def test_eval_shards_cover_every_sample_exactly_once():
    idx = [ShardedSampler(10, r, 4, shuffle=False, drop_last=False).shard() for r in range(4)]
    assert sorted(sum(idx, [])) == list(range(10))
    assert [len(i) for i in idx] == [3, 3, 2, 2]


def test_start_offset_skips_consumed_indices():
    s = ShardedSampler(12, 0, 1, shuffle=True, seed=1, batch_size=4)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:]
    assert len(s) == 8 and s.batches_per_epoch() == 3
