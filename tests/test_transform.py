import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd
import fnlight.random as fr
from fnlight.tree import tree_equal

from . import pipelines


def per_sample(ds, idx, epoch):
    """The reference: every element computed alone."""
    items = [ds.item(int(i), epoch) for i in idx]
    return fd.dataset.stack_samples(items, "reference")


def brightness(x, key):
    return x * fr.uniform(key, (), minval=0.8, maxval=1.2)


def brightness_batched(x, keys):
    return x * fr.uniform(keys, (), minval=0.8, maxval=1.2)[:, None, None]


def needs_loop(sample):
    # data-dependent Python control flow: vmap cannot trace it, the loop fallback runs it
    x, y = sample
    return (x * 2, y) if float(x.sum()) > 3 else (x, y)


@given(seed=st.integers(0, 2**32), epoch=st.integers(0, 5),
       idx=st.lists(st.integers(0, 39), min_size=1, max_size=12))
def test_batched_equals_per_sample(seed, epoch, idx):
    x, y = pipelines.data()
    p = (fd.from_tensors(x, y) >> fd.transform(pipelines.noisy) >> fd.transform(needs_loop)
         >> fd.transform(lambda s: (pipelines.hflip(s[0], fr.key(0)), s[1])) >> fd.batch(4))
    ds = p.build(fd.Context(seed=seed))["train"].dataset
    idx = torch.tensor(idx)
    assert tree_equal(ds.gather(idx, epoch), per_sample(ds, idx, epoch))


@given(seed=st.integers(0, 1000), epoch=st.integers(0, 3))
def test_batched_true_function_equals_per_sample_function(seed, epoch):
    x = pipelines.data()[0]
    a = fd.DataModule(fd.from_tensors(x) >> fd.transform(brightness) >> fd.batch(7), seed=seed, prefetch=0)
    b = fd.DataModule(fd.from_tensors(x) >> fd.transform(brightness_batched, batched=True) >> fd.batch(7),
                      seed=seed, prefetch=0)
    assert tree_equal(list(a.batches("train", epoch)), list(b.batches("train", epoch)))


def test_transform_before_or_after_batch_is_the_same():
    x = pipelines.data()[0]
    before = fd.from_tensors(x) >> fd.transform(pipelines.hflip) >> fd.shuffle() >> fd.batch(8)
    after = fd.from_tensors(x) >> fd.shuffle() >> fd.batch(8) >> fd.transform(pipelines.hflip)
    a, b = (fnlight.DataModule(p, seed=3, prefetch=0) for p in (before, after))
    assert tree_equal(list(a.batches("train", 2)), list(b.batches("train", 2)))


def test_random_transforms_depend_on_seed_epoch_and_index_only():
    x = torch.ones(64, 4)
    dm = fnlight.DataModule(fd.from_tensors(x) >> fd.transform(brightness) >> fd.batch(64), seed=0, prefetch=0)
    e0, e0_again, e1 = (next(iter(dm.batches("train", e))) for e in (0, 0, 1))
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)
    assert len(e0[:, 0].unique()) == 64  # every sample has its own draw
    other_seed = next(iter(dm.replace(seed=1).batches("train", 0)))
    assert not torch.equal(e0, other_seed)
    # the key of sample i in epoch e is fold_in(fold_in(stage_key, e), i)
    two = fd.from_tensors(x) >> fd.transform(brightness) >> fd.transform(brightness) >> fd.batch(64)
    b = next(iter(fnlight.DataModule(two, prefetch=0).batches("train", 0)))
    assert not torch.allclose(b, e0 * e0)  # two random stages draw independently


def test_on_restricts_a_transform_to_named_splits():
    x = torch.ones(20, 2)
    p = (fd.from_tensors(x) >> fd.split({"train": 0.5, "val": 0.5})
         >> fd.transform(pipelines.scale_by(3.0), on="train") >> fd.batch(10))
    dm = fnlight.DataModule(p, prefetch=0)
    assert (next(iter(dm.batches("train"))) == 3).all()
    assert (next(iter(dm.batches("val"))) == 1).all()


def test_global_rng_use_is_refused_with_advice():
    def jitter(x):
        return x + torch.rand(())

    dm = fnlight.DataModule(fd.from_tensors(torch.zeros(8)) >> fd.transform(jitter) >> fd.batch(4), prefetch=0)
    with pytest.raises(fd.TransformError, match="global random generator.*fnlight.random"):
        next(iter(dm.batches("train")))


def test_inconsistent_output_shapes_are_a_clear_error():
    def ragged(x):
        return x[: int(x[0]) + 1]  # data-dependent length

    x = torch.arange(8.0)[:, None].repeat(1, 8)
    dm = fnlight.DataModule(fd.from_tensors(x) >> fd.transform(ragged) >> fd.batch(4), prefetch=0)
    with pytest.raises(fd.ShapeError, match=r"transform\(.*ragged\).*inconsistent shapes.*sample 0 has shape \(1,\)"):
        next(iter(dm.batches("train")))


def test_batched_function_must_keep_the_batch_size():
    dm = fnlight.DataModule(fd.from_tensors(torch.zeros(8, 2)) >> fd.transform(lambda b: b[:1], batched=True)
                            >> fd.batch(4), prefetch=0)
    with pytest.raises(fd.TransformError, match="leading dimension 4"):
        next(iter(dm.batches("train")))


def test_random_is_detected_from_the_signature():
    assert fd.transform(pipelines.hflip).random and not fd.transform(pipelines.normalize).random
    assert not fd.transform(torch.neg).random
    assert fd.transform(pipelines.normalize, random=True).random
    with pytest.raises(TypeError):
        fd.transform(3)
