"""shuffle, batch and shard: laws of the epoch's index plan."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd


def order(n, *stages, seed=0, epoch=0, **dm):
    p = fd.from_tensors(torch.arange(n))
    for s in stages:
        p = p >> s
    return fnlight.DataModule(p, seed=seed, prefetch=0, **dm).index_batches("train", epoch)


@given(n=st.integers(0, 200), seed=st.integers(0, 2**32), epoch=st.integers(0, 100))
def test_shuffle_is_a_permutation_determined_by_seed_and_epoch(n, seed, epoch):
    (perm,) = order(n, fd.shuffle(), fd.batch(max(n, 1)), seed=seed, epoch=epoch) or [torch.arange(0)]
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    (again,) = order(n, fd.shuffle(), fd.batch(max(n, 1)), seed=seed, epoch=epoch) or [torch.arange(0)]
    assert torch.equal(perm, again)


def test_shuffle_differs_across_epochs_and_seeds():
    a = order(100, fd.shuffle(), fd.batch(100), epoch=0)[0]
    assert not torch.equal(a, order(100, fd.shuffle(), fd.batch(100), epoch=1)[0])
    assert not torch.equal(a, order(100, fd.shuffle(), fd.batch(100), seed=1)[0])
    assert torch.equal(order(100, fd.shuffle(seed=7), fd.batch(100), seed=1)[0],
                       order(100, fd.shuffle(seed=7), fd.batch(100), seed=2)[0])


def test_shuffle_after_batch_shuffles_whole_batches():
    batches = order(10, fd.batch(3), fd.shuffle(), epoch=4)
    assert sorted(tuple(b.tolist()) for b in batches) == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]


@given(n=st.integers(0, 100), size=st.integers(1, 20), drop_last=st.booleans())
def test_batch_sizes(n, size, drop_last):
    batches = order(n, fd.batch(size, drop_last=drop_last))
    assert len(batches) == (n // size if drop_last else -(-n // size))
    assert all(len(b) == size for b in batches[:-1])
    flat = torch.cat(batches) if batches else torch.arange(0)
    assert torch.equal(flat, torch.arange(len(flat)))


@given(n=st.integers(0, 120), world=st.integers(1, 6), size=st.integers(1, 10), seed=st.integers(0, 99),
       after_batch=st.booleans())
def test_shards_partition_an_epoch_with_equal_batch_counts(n, world, size, seed, after_batch):
    def shard_of(r):
        stages = ([fd.shuffle(), fd.batch(size), fd.shard(r, world)] if after_batch
                  else [fd.shuffle(), fd.shard(r, world), fd.batch(size)])
        return order(n, *stages, seed=seed, epoch=1)

    shards = [shard_of(r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of batches
    got = torch.cat([torch.cat(s) for s in shards if s]) if any(shards) else torch.arange(0)
    counts = torch.bincount(got, minlength=n) if n else torch.zeros(0)
    assert (counts >= 1).all()  # covering
    # disjoint except the documented padding: at most world - 1 repeated elements (or batches)
    unit = 1 if not after_batch else size
    assert int((counts - 1).sum()) <= (world - 1) * unit


@given(n=st.integers(0, 120), world=st.integers(1, 6), seed=st.integers(0, 99))
def test_shard_drop_remainder_is_disjoint(n, world, seed):
    shards = [order(n, fd.shuffle(), fd.shard(r, world, drop_remainder=True), fd.batch(1000), seed=seed)
              for r in range(world)]
    got = torch.cat([torch.cat(s) for s in shards if s]) if any(shards) else torch.arange(0)
    assert got.unique().numel() == got.numel() == n - n % world


def test_shard_defaults_to_the_datamodule_rank():
    a = order(10, fd.shard(), fd.batch(10), rank=1, world_size=2)
    assert a[0].tolist() == [1, 3, 5, 7, 9]
    assert order(10, fd.shard(), fd.batch(10))[0].tolist() == list(range(10))
    # Where data goes (rank, world size) is not what it is: every rank of a run, and a run
    # resumed on another number of ranks, shares one fingerprint.
    fingerprints = {(fd.from_tensors(torch.arange(4)) >> s).fingerprint
                    for s in (fd.shard(), fd.shard(0, 2), fd.shard(1, 2), fd.shard(0, 4))}
    assert len(fingerprints) == 1
    assert (fd.from_tensors(torch.arange(4)) >> fd.shard(drop_remainder=True)).fingerprint not in fingerprints


# -- lazy index plans -----------------------------------------------------------

class _Virtual(fd.Source):
    """A source of ``n`` samples that hold nothing: sample ``i`` is ``i``."""

    name = "virtual"

    def __init__(self, n):
        self.n = n

    def load(self, ctx):
        return _Indices(self.n)

    def describe(self):
        return {"stage": self.name, "n": self.n}


class _Indices(fd.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def gather(self, idx, epoch=0):
        return idx.clone()


stage_lists = st.sampled_from([
    lambda size, r, w: [fd.shuffle(), fd.batch(size)],
    lambda size, r, w: [fd.shuffle(), fd.shard(r, w), fd.batch(size, drop_last=True)],
    lambda size, r, w: [fd.shard(r, w, drop_remainder=True), fd.shuffle(), fd.batch(size)],
    lambda size, r, w: [fd.shuffle(), fd.batch(size), fd.shard(r, w), fd.shuffle(seed=5)],
    lambda size, r, w: [fd.batch(size), fd.shuffle()],
])


@given(n=st.integers(0, 300), size=st.integers(1, 17), world=st.integers(1, 4), stages=stage_lists,
       chunk=st.sampled_from([1, 7, 64, 1 << 15]), epoch=st.integers(0, 5))
def test_a_lazy_plan_reads_the_same_in_any_order_and_chunking(n, size, world, stages, chunk, epoch):
    import fnlight.data.order as order_module

    dm = fnlight.DataModule(_Virtual(n) >> fd.Pipeline(tuple(stages(size, world - 1, world))), seed=1, prefetch=0)
    plan = dm.index_plan("train", epoch)
    saved, order_module.CHUNK_SAMPLES = order_module.CHUNK_SAMPLES, chunk
    try:
        listed = list(plan)  # iterated in chunks
    finally:
        order_module.CHUNK_SAMPLES = saved
    assert len(listed) == len(plan) == dm.num_batches("train")
    for j in {0, len(plan) // 2, len(plan) - 1} if listed else ():
        assert torch.equal(plan[j], listed[j]) and torch.equal(plan[j - len(plan)], listed[j])
        assert all(torch.equal(a, b) for a, b in zip(plan[j:], listed[j:], strict=True))  # a lazy slice
    assert all(torch.equal(a, b) for a, b in zip(plan.chunk(0, len(plan)), listed, strict=True))
    got = [b for b in dm.batches("train", epoch)]  # the batches are the plan's indices, gathered
    assert all(torch.equal(a, b) for a, b in zip(got, listed, strict=True))
    if listed:
        with pytest.raises(IndexError, match="out of range"):
            plan[len(plan)]


def test_the_plan_of_10_billion_samples_costs_nothing_until_read():
    """Building the plan, the first batch and a batch near the end take milliseconds
    and no memory (a materialized order of 10**10 would take 80 GB)."""
    import time

    n = 10**10
    dm = fnlight.DataModule(_Virtual(n) >> fd.shuffle() >> fd.shard(1, 3) >> fd.batch(256), seed=0, prefetch=0)
    t0 = time.perf_counter()
    first = next(iter(dm.batches("train", epoch=7)))
    far = next(iter(dm.batches("train", epoch=7, start=dm.num_batches("train") - 2)))  # resume near the end
    assert time.perf_counter() - t0 < 2.0
    per_rank = -(-n // 3)  # the epoch padded to a multiple of 3, dealt out
    assert dm.num_batches("train") == -(-per_rank // 256)
    assert first.shape == far.shape == (256,) and first.unique().numel() == 256
    assert int(first.min()) >= 0 and int(first.max()) < n
    # rank 1 of 3 reads positions 1, 4, 7, ... of the shuffled epoch: the same as a shard of a plain shuffle
    whole = fnlight.DataModule(_Virtual(n) >> fd.shuffle() >> fd.batch(3 * 256), seed=0, prefetch=0)
    assert torch.equal(first, whole.index_plan("train", 7)[0][1::3])


def test_index_plan_is_lazy_and_index_batches_lists_it():
    dm = fnlight.DataModule(fd.from_tensors(torch.arange(50)) >> fd.shuffle() >> fd.batch(8), prefetch=0)
    plan = dm.index_plan("train", 3)
    assert isinstance(plan, fd.order.BatchOrder) and len(plan) == 7
    listed = dm.index_batches("train", 3)
    assert isinstance(listed, list) and all(torch.equal(a, b) for a, b in zip(plan, listed, strict=True))
    assert torch.equal(torch.sort(torch.cat(listed)).values, torch.arange(50))
    # shuffle's permutation is index_shuffle of the stage key, folded with the epoch
    from fnlight.data.stage import Where

    key = fd.Context(seed=0).stage_key(Where("shuffle", 0, fd.Pipeline(())), "train")
    expected = fnlight.random.index_shuffle(fnlight.random.fold_in(key, 3), torch.arange(50), 50)
    assert torch.equal(torch.cat(listed), expected)
