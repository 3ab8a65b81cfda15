import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight.random as fr

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_golden_values_never_change():
    # These numbers are part of the reproducibility contract: a run seeded
    # today must draw the same values in every future version.
    k = fr.key(0)
    assert k.dtype == torch.int64 and k.shape == ()
    assert int(k) == -7696910208926366575
    assert fr.bits(k, 3).tolist() == [3530509189011295430, 1493062179390899025, 2339531335687438191]
    golden = [float.fromhex(h) for h in ("0x1.1533180000000p-2", "0x1.521a880000000p-3", "0x1.16fede0000000p-1")]
    assert fr.uniform(k, (3,)).tolist() == golden
    assert fr.permutation(k, 6).tolist() == [4, 1, 2, 0, 3, 5]
    assert fr.randint(fr.key(1), (5,), 0, 10).tolist() == [1, 8, 6, 4, 3]
    assert fr.index_shuffle(k, torch.arange(10), 10).tolist() == [6, 1, 4, 3, 9, 8, 2, 0, 5, 7]


@given(seed=st.integers(0, 2**64 - 1), data=st.lists(int64s, min_size=1, max_size=20))
def test_fold_in_vectorizes_exactly(seed, data):
    k = fr.key(seed)
    many = fr.fold_in(k, torch.tensor(data))
    one_by_one = torch.stack([fr.fold_in(k, d) for d in data])
    assert torch.equal(many, one_by_one)


@given(seed=st.integers(0, 2**32), n=st.integers(1, 8))
def test_batched_keys_give_the_per_key_values(seed, n):
    keys = fr.split(fr.key(seed), n)
    for sampler in (lambda k: fr.uniform(k, (3,)), lambda k: fr.normal(k, (2,)),
                    lambda k: fr.randint(k, (4,), -5, 5), lambda k: fr.bernoulli(k, 0.3, (5,)),
                    lambda k: fr.permutation(k, 7), lambda k: fr.split(k, 3).movedim(0, -1),
                    lambda k: fr.fold_in(k, 11)):
        batched = sampler(keys)
        assert torch.equal(batched, torch.stack([sampler(k) for k in keys]))


def test_vmap_gives_the_same_values_as_a_loop():
    keys = fr.fold_in(fr.key(3), torch.arange(16))

    def draw(k):
        return fr.uniform(fr.fold_in(k, 5), (4,)) + fr.normal(k, (4,))

    assert torch.equal(torch.func.vmap(draw)(keys), torch.stack([draw(k) for k in keys]))


def test_deterministic_across_processes():
    code = ("import fnlight.random as fr, torch; k = fr.fold_in(fr.key(42), 7);"
            "print(fr.uniform(k, (5,)).tolist(), fr.permutation(k, 10).tolist(), int(fr.split(k)[1]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    k = fr.fold_in(fr.key(42), 7)
    here = f"{fr.uniform(k, (5,)).tolist()} {fr.permutation(k, 10).tolist()} {int(fr.split(k)[1])}\n"
    assert runs[0] == runs[1] == here


def test_uniform_statistics():
    u = fr.uniform(fr.key(0), (200_000,), dtype=torch.float64)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    # chi-square over 100 equal bins: 99 degrees of freedom; p < 1e-4 is ~ 150.
    counts = torch.bincount((u * 100).long(), minlength=100).double()
    chi2 = ((counts - 2000.0) ** 2 / 2000.0).sum().item()
    assert chi2 < 150, chi2


def test_uniform_range_and_low_precision_dtypes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        u = fr.uniform(fr.key(1), (10_000,), dtype=dtype)
        assert u.dtype == dtype and (u >= 0).all() and (u < 1).all()
    v = fr.uniform(fr.key(1), (10_000,), minval=-2.0, maxval=3.0)
    assert v.min() >= -2 and v.max() < 3 and abs(v.mean().item() - 0.5) < 0.1


def test_normal_statistics():
    z = fr.normal(fr.key(5), (200_000,), dtype=torch.float64)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.005
    assert torch.isfinite(z).all()


@given(seed=st.integers(0, 2**32), p=st.floats(-0.5, 1.5))
def test_bernoulli_is_uniform_below_p(seed, p):
    k = fr.fold_in(fr.key(seed), torch.arange(64))
    assert torch.equal(fr.bernoulli(k, p), fr.uniform(k, (), dtype=torch.float64) < p)
    assert torch.equal(fr.bernoulli(k, torch.tensor(p, dtype=torch.float64)), fr.bernoulli(k, p))


def test_bernoulli_randint_permutation():
    b = fr.bernoulli(fr.key(2), 0.3, (100_000,))
    assert b.dtype == torch.bool and abs(b.double().mean().item() - 0.3) < 0.01
    r = fr.randint(fr.key(2), (100_000,), -3, 7)
    assert r.min() == -3 and r.max() == 6
    counts = torch.bincount(r + 3).double()
    assert ((counts - 10_000) ** 2 / 10_000).sum() < 40  # 9 dof
    for n in (0, 1, 2, 1000):
        assert torch.equal(torch.sort(fr.permutation(fr.key(n), n)).values, torch.arange(n))
    x = torch.arange(10) * 3
    assert sorted(fr.permutation(fr.key(0), x).tolist()) == x.tolist()


@given(seed=st.integers(0, 2**64 - 1), n=st.integers(0, 3000))
def test_index_shuffle_is_a_bijection_computable_one_index_at_a_time(seed, n):
    k = fr.key(seed)
    perm = fr.index_shuffle(k, torch.arange(n), n)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    if n:
        some = torch.tensor([n - 1, 0, n // 2, n - 1])  # any positions, in any order, repeated
        assert torch.equal(fr.index_shuffle(k, some, n), perm[some])
        assert int(fr.index_shuffle(k, n // 3, n)) == int(perm[n // 3])  # a plain int: a 0-d result


@pytest.mark.slow
def test_index_shuffle_mixes_well():
    # Where element j lands over 4000 keys is uniform (chi-square, 9 dof; the 99.99% quantile is 33.7) ...
    n, keys = 10, fr.fold_in(fr.key(0), torch.arange(4000))
    first = torch.stack([fr.index_shuffle(keys[e], torch.arange(n), n) for e in range(4000)])
    for j in range(n):
        counts = torch.bincount(first[:, j], minlength=n).double()
        assert ((counts - 400) ** 2 / 400).sum() < 34
    # ... and neighbours are sent far apart and independently (n = 10**6: |p(i) - p(i + 1)| averages n / 3).
    n = 10**6
    perm = fr.index_shuffle(fr.key(1), torch.arange(100_000), n).double()
    assert abs((perm[1:] - perm[:-1]).abs().mean().item() / n - 1 / 3) < 0.01
    assert abs(torch.corrcoef(torch.stack([perm[:-1], perm[1:]]))[0, 1].item()) < 0.015
    assert abs(torch.corrcoef(torch.stack([perm, torch.arange(100_000.0)]))[0, 1].item()) < 0.015


def test_index_shuffle_errors():
    with pytest.raises(IndexError, match=r"in \[0, 5\)"):
        fr.index_shuffle(fr.key(0), torch.tensor([5]), 5)
    with pytest.raises(IndexError):
        fr.index_shuffle(fr.key(0), -1, 5)
    with pytest.raises(ValueError, match="0 <= n"):
        fr.index_shuffle(fr.key(0), 0, -1)
    with pytest.raises(ValueError, match="one key"):
        fr.index_shuffle(fr.split(fr.key(0)), 0, 5)
    with pytest.raises(TypeError, match="key"):
        fr.index_shuffle(torch.tensor(0.5), 0, 5)


def test_split_keys_are_uncorrelated():
    a, b = fr.split(fr.key(0))
    ua, ub = fr.uniform(a, (100_000,), torch.float64), fr.uniform(b, (100_000,), torch.float64)
    corr = torch.corrcoef(torch.stack([ua, ub]))[0, 1].item()
    assert abs(corr) < 0.015
    # Neighbouring fold_in keys (sample i and i+1) are uncorrelated too.
    keys = fr.fold_in(fr.key(0), torch.arange(100_001))
    u = fr.uniform(keys, (), torch.float64)
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.015
    # Distinct inputs give distinct keys (no collisions among 100k).
    assert keys.unique().numel() == keys.numel()


def test_operations_use_separate_streams():
    k = fr.key(9)
    values = {int(fr.fold_in(k, 0)), int(fr.split(k, 1)[0]), int(fr.bits(k, 1)[0]), int(k)}
    assert len(values) == 4


def test_key_checks_and_errors():
    assert int(fr.key(2**64)) == int(fr.key(0))  # seeds are taken modulo 2**64
    with pytest.raises(TypeError, match="key"):
        fr.uniform(torch.tensor(1.0), (2,))
    with pytest.raises(TypeError, match="int seed"):
        fr.key(1.5)
    with pytest.raises(TypeError, match="integer"):
        fr.fold_in(fr.key(0), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        fr.randint(fr.key(0), (1,), 5, 5)
    with pytest.raises(ValueError):
        fr.split(fr.key(0), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_same_values_on_cuda():
    k = fr.key(7)
    kc = k.cuda()
    assert torch.equal(fr.fold_in(kc, torch.arange(100, device="cuda")).cpu(), fr.fold_in(k, torch.arange(100)))
    assert torch.equal(fr.uniform(kc, (1000,)).cpu(), fr.uniform(k, (1000,)))
    assert torch.equal(fr.permutation(kc, 1000).cpu(), fr.permutation(k, 1000))
    assert torch.equal(fr.index_shuffle(kc, torch.arange(1000, device="cuda"), 1000).cpu(),
                       fr.index_shuffle(k, torch.arange(1000), 1000))
    assert torch.equal(fr.randint(kc, (100,), 0, 7).cpu(), fr.randint(k, (100,), 0, 7))
    assert torch.allclose(fr.normal(kc, (1000,)).cpu(), fr.normal(k, (1000,)), rtol=0, atol=1e-6)
    assert math.isfinite(fr.normal(kc, (10,)).sum().item())
