"""shuffle, batch and shard: laws of the epoch's index plan."""

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
