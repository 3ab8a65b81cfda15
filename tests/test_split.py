import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight.data as fd


def parts_of(n, parts, seed=0, **kw):
    x = torch.arange(n)
    plans = (fd.from_tensors(x, x % 3) >> fd.split(parts, seed=seed, **kw)).build(fd.Context())
    return {k: p.dataset.gather(torch.arange(len(p.dataset)))[0] for k, p in plans.items()}


fractions = st.lists(st.integers(1, 10), min_size=1, max_size=4).map(
    lambda ws: {f"p{i}": w / sum(ws) for i, w in enumerate(ws)})


@given(n=st.integers(8, 300), parts=fractions, seed=st.integers(0, 2**32))
def test_split_is_a_deterministic_partition(n, parts, seed):
    try:
        got = parts_of(n, parts, seed)
    except ValueError as e:  # only when some share is below one sample
        assert "would be empty" in str(e) and min(parts.values()) * n < 1
        return
    assert list(got) == list(parts)
    allidx = torch.cat(list(got.values()))
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))  # disjoint and covering
    for name, f in parts.items():
        assert abs(len(got[name]) - f * n) < 1  # floor or ceiling of its share
        assert torch.equal(got[name], torch.sort(got[name]).values)
    again = parts_of(n, parts, seed)
    assert all(torch.equal(got[k], again[k]) for k in got)


@given(n=st.integers(2, 200), seed=st.integers(0, 100), data=st.data())
def test_split_by_counts(n, seed, data):
    a = data.draw(st.integers(1, n - 1))
    got = parts_of(n, {"a": a, "b": n - a}, seed)
    assert len(got["a"]) == a and len(got["b"]) == n - a
    assert torch.equal(torch.sort(torch.cat([got["a"], got["b"]])).values, torch.arange(n))


def test_different_seeds_give_different_splits():
    assert not torch.equal(parts_of(100, {"a": 0.5, "b": 0.5}, 0)["a"], parts_of(100, {"a": 0.5, "b": 0.5}, 1)["a"])


@given(seed=st.integers(0, 1000), counts=st.lists(st.integers(1, 40), min_size=2, max_size=5),
       parts=fractions)
def test_stratified_split_keeps_class_proportions(seed, counts, parts):
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = torch.arange(len(labels))
    p = fd.from_tensors(x, labels) >> fd.split(parts, seed=seed, stratify_by=1)
    try:
        plans = p.build(fd.Context())
    except ValueError as e:
        assert "would be empty" in str(e)
        return
    seen = []
    unstratified = {k: len(p.dataset) for k, p in (fd.from_tensors(x, labels) >> fd.split(parts, seed=seed))
                    .build(fd.Context()).items()}
    for name, plan in plans.items():
        xs, ys = plan.dataset.gather(torch.arange(len(plan.dataset)))
        seen.append(xs)
        for k, c in enumerate(counts):
            assert abs(int((ys == k).sum()) - parts[name] * c) < 1  # within one sample per class
        assert abs(len(xs) - unstratified[name]) <= 1  # and the part sizes barely move
    assert torch.equal(torch.sort(torch.cat(seen)).values, x)


def test_stratified_part_sizes_equal_the_unstratified_ones():
    labels = torch.arange(10).repeat_interleave(15)
    p = fd.from_tensors(torch.arange(150), labels)
    strat = (p >> fd.split({"train": .8, "val": .1, "test": .1}, stratify_by=1)).build(fd.Context())
    assert {k: len(v.dataset) for k, v in strat.items()} == {"train": 120, "val": 15, "test": 15}


def test_stratify_by_key_or_function():
    labels = torch.tensor([0] * 10 + [1] * 30)
    dict_src = fd.from_tensors(x=torch.arange(40), label=labels)
    plans = (dict_src >> fd.split({"a": 0.5, "b": 0.5}, stratify_by="label")).build(fd.Context())
    ys = plans["a"].dataset.gather(torch.arange(20))["label"]
    assert int((ys == 0).sum()) == 5
    plans = (dict_src >> fd.split({"a": 0.5, "b": 0.5}, stratify_by=lambda b: b["label"])).build(fd.Context())
    assert int((plans["b"].dataset.gather(torch.arange(20))["label"] == 1).sum()) == 15


def test_split_of_a_named_split():
    src = fd.from_torch(train=torch.utils.data.TensorDataset(torch.arange(10)),
                        test=torch.utils.data.TensorDataset(torch.arange(4)))
    plans = (src >> fd.split({"train": 0.8, "val": 0.2}, of="train")).build(fd.Context())
    assert {k: len(p.dataset) for k, p in plans.items()} == {"train": 8, "val": 2, "test": 4}


@pytest.mark.parametrize("parts, match", [
    ({"a": 0.5, "b": 0.4}, "sum to 0.9, not 1"),
    ({"a": 0.7, "b": 0.7}, "not 1"),
    ({"a": -0.5, "b": 1.5}, "negative"),
    ({"a": 1.0, "b": 0.0}, "empty"),
    ({"a": 5, "b": -1}, "negative"),
    ({}, "non-empty"),
])
def test_bad_fractions_are_clear_errors(parts, match):
    with pytest.raises(ValueError, match=match):
        fd.split(parts)


def test_counts_must_match_the_dataset():
    with pytest.raises(ValueError, match="sum to 12, but the dataset has 10"):
        parts_of(10, {"a": 6, "b": 6})
    with pytest.raises(ValueError, match="'b' would be empty"):
        parts_of(10, {"a": 0.99, "b": 0.01})
