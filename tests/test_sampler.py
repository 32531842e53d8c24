import pytest

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
    assert len(s) == 8 and s.batches_per_epoch() == 2   # the batches left in the epoch from `start`


def _take(world: int, start: int, batches: int, n: int = 48, batch: int = 3, epoch: int = 2) -> list[list[int]]:
    """What each of `world` ranks takes in `batches` batches from the global position `start`."""
    out = []
    for r in range(world):
        s = ShardedSampler(n, r, world, shuffle=True, seed=7, batch_size=batch)
        s.set_epoch(epoch)
        s.set_start(start)
        out.append(s.shard()[: batches * batch] if batches >= 0 else s.shard())
    return out


def test_global_position_is_the_permutation_prefix():
    """After c batches on each of W ranks, the consumed samples are exactly the permutation's first c*b*W."""
    order = ShardedSampler(48, 0, 2, seed=7, batch_size=3)
    order.set_epoch(2)
    perm = order.order()
    taken = _take(2, 0, 5)
    assert sorted(sum(taken, [])) == sorted(perm[:30])
    assert order.global_offset(5) == 30


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_resume_with_another_world_size_uses_every_sample_once(before, after):
    n, batch = 48, 3
    first = _take(before, 0, 2)                     # 2 batches per rank, then the world size changes
    start = ShardedSampler(n, 0, before, seed=7, batch_size=batch).global_offset(2)
    rest = _take(after, start, -1)                  # the rest of the epoch on the new ranks
    seen = sum(first, []) + sum(rest, [])
    assert len(seen) == len(set(seen)), "a sample was used twice"
    assert len({len(r) for r in rest}) == 1, "ranks must take the same number of samples"
    assert n - len(seen) < after * batch            # only a tail smaller than one batch per rank is left
    # same world size: the new sampler's shards equal the uninterrupted run's rest
    if before == after:
        assert rest == [r[2 * batch:] for r in _take(before, 0, -1)]


def test_same_world_resume_equals_the_uninterrupted_shard():
    for world in (1, 2, 3):
        whole = _take(world, 0, -1)
        start = ShardedSampler(48, 0, world, seed=7, batch_size=3).global_offset(4)
        assert _take(world, start, -1) == [w[12:] for w in whole]
