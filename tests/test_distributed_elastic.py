"""Elastic resume: a checkpoint written by N ranks resumes on M ranks with no sample of the
interrupted epoch skipped or repeated (beyond shard()'s padding), replicated or sharded."""

import collections
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import fnlight
import fnlight.data as fd
from fnlight.train import elastic

from .conftest import finish_ranks, spawn_ranks

N = 23  # samples: divides evenly among none of 2, 3, 4 ranks


def dm(rank, world, batch=2, after_batch=False, shuffle_after=False):
    p = fd.from_tensors(torch.arange(N)) >> fd.shuffle()
    if after_batch:
        p = p >> fd.batch(batch) >> fd.shard(rank=rank, world_size=world)
    else:
        p = p >> fd.shard(rank=rank, world_size=world)
        p = (p >> fd.shuffle() if shuffle_after else p) >> fd.batch(batch)
    return fnlight.DataModule(p, seed=5)


def read(world, epoch, skip, start, stop=None, **kw):
    """The sample ids each rank reads from batch ``start`` to ``stop`` (all ranks' batches together)."""
    out = []
    for r in range(world):
        bs = list(dm(r, world, **kw).batches("train", epoch, start=start, skip=skip))
        out += [i for b in bs[:None if stop is None else stop - start] for i in b.tolist()]
    return out


@pytest.mark.parametrize("after_batch", [False, True])
def test_the_rule_for_every_n_and_m_in_1_to_4(after_batch):
    """N ranks read p batches each, M ranks resume from the translated position: every sample of the
    epoch is read once, plus at most M - 1 padding repeats at its end; the M ranks read what a fresh
    M-rank run whose epoch started at the first unread element reads."""
    kw = {"after_batch": after_batch}
    order = torch.cat(list(dm(0, 1, **kw).batches("train", 1))).tolist()  # the epoch's dealt order, one rank
    unit = 2 if after_batch else 1  # samples per dealt element
    for n in range(1, 5):
        per_rank = dm(0, n, **kw).num_batches("train")
        for p in range(1, per_rank):  # mid-epoch positions
            first = read(n, 1, 0, 0, p, **kw)
            data = elastic.record(dm(0, n, **kw), "train", 1, 0, p, n)
            assert sorted(first) == sorted(order[:data["consumed"] * unit])  # a prefix of the epoch was read
            for m in range(1, 5):
                skip, start = elastic.resume(data, p, dm(0, m, **kw), "train", m)
                rest = read(m, 1, skip, start, **kw)
                counts = collections.Counter(first + rest)
                assert set(counts) == set(range(N)), (n, m, p)
                extra = sum(counts.values()) - N
                if n == m:  # the uninterrupted run's batches, its padding included
                    assert first + rest == first + read(n, 1, 0, p, **kw)
                else:
                    assert extra <= (m - 1) * unit, (n, m, p, counts)
                    # a fresh m-rank run from element `consumed`: rank r reads order[consumed + r :: m]
                    tail = order[data["consumed"] * unit:]
                    r1 = [i for b in dm(1 % m, m, **kw).batches("train", 1, skip=skip) for i in b.tolist()]
                    dealt = [tail[j * unit:(j + 1) * unit] for j in range(-(-len(tail) // unit))]
                    want = [i for e in dealt[1 % m::m] for i in e]
                    assert r1[:len(want)] == want, (n, m, p)


def test_a_second_resume_in_the_same_epoch_translates_again():
    # 2 ranks read 2 batches, 3 ranks read 1 more, then 4 ranks finish the epoch
    first = read(2, 0, 0, 0, 2)
    a = elastic.record(dm(0, 2), "train", 0, 0, 2, 2)
    skip, start = elastic.resume(a, 2, dm(0, 3), "train", 3)
    second = read(3, 0, skip, start, start + 1)
    b = elastic.record(dm(0, 3), "train", 0, skip, start + 1, 3)
    assert b == {"world_size": 3, "skip": 8, "consumed": 14}
    skip, start = elastic.resume(b, start + 1, dm(0, 4), "train", 4)
    third = read(4, 0, skip, start)
    counts = collections.Counter(first + second + third)
    assert set(counts) == set(range(N)) and sum(counts.values()) - N <= 3


def test_a_shuffle_after_shard_cannot_be_translated_and_says_why():
    kw = {"shuffle_after": True}
    data = elastic.record(dm(0, 2, **kw), "train", 0, 0, 2, 2)
    assert "consumed" not in data
    assert elastic.resume(data, 2, dm(0, 2, **kw), "train", 2) == (0, 2)  # same world: the old position
    with pytest.raises(ValueError, match="put shard\\(\\) after every shuffle"):
        elastic.resume(data, 2, dm(0, 3, **kw), "train", 3)


def launch(out, world, *args):
    return spawn_ranks([sys.executable, "-m", "tests._elastic_fit", str(out), "--batch", "4", *args], world)


def samples(out, since=0, upto=None):
    ids = []
    for f in Path(out).glob("samples*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if row["epoch"] == 0 and (upto is None or row["step"] <= upto):
                ids += row["ids"]
    return ids


def final_params(out):
    return {k: torch.tensor(v) for k, v in json.loads((Path(out) / "final0.json").read_text())["params"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["adam", "adafactor"])
def test_sharded_two_ranks_resume_on_three_sharded_or_replicated(tmp_path, opt):
    """61 samples, batch 4: 2 ranks (ZeRO-1) stop after 3 steps; 3 ranks finish the epoch from the
    checkpoint, sharded and (from a copy of it) replicated. (adafactor, with adaptive_grad_clip: its
    factored moments are kept whole on every rank, written once.)"""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    finish_ranks(launch(a, 2, "--zero", "--opt", opt, "--max-steps", "3"))
    first = samples(a)
    assert len(first) == 3 * 2 * 4
    ck = a / "ck" / "step_000000003"  # each rank wrote its slice of the optimizer state; one record
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.json", "tensors-00001-of-00002.safetensors",
                                                    "tensors-00002-of-00002.safetensors"]
    state, meta = fnlight.load_checkpoint(ck)
    assert meta["data"] == {"world_size": 2, "skip": 0, "consumed": 24}
    moments = state.opt_state.mu if opt == "adam" else state.opt_state[1].ema
    assert all(moments[k].shape == v.shape for k, v in state.params.items())  # whole again
    if opt == "adafactor":  # the factored moments: row and column means, as written
        factored = state.opt_state[1]
        assert factored.v_row["0.weight"].shape == (6,) and factored.v_col["0.weight"].shape == (16,)
    for f in a.glob("samples*.jsonl"):
        f.unlink()
    shutil.copytree(a, b)
    finish_ranks(launch(a, 3, "--zero", "--opt", opt))
    finish_ranks(launch(b, 3, "--opt", opt))
    for out in (a, b):
        counts = collections.Counter(first + samples(out))
        assert set(counts) == set(range(61)) and sum(counts.values()) - 61 <= 2, counts
    for k, v in final_params(a).items():  # sharded vs replicated resume: equal to float rounding
        torch.testing.assert_close(v, final_params(b)[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_four_ranks_killed_resume_on_three(tmp_path):
    """kill -9 of one of 4 ranks (ZeRO-1: each writes its slice of every checkpoint) mid-epoch; the
    newest complete checkpoint resumes on 3 replicated ranks: the samples trained up to that checkpoint
    and after it cover the epoch once (+ padding)."""
    procs = launch(tmp_path, 4, "--slow", "--zero")
    deadline = time.time() + 120
    while time.time() < deadline and len(samples(tmp_path)) < 4 * 4 * 3:  # 3 steps on every rank
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGKILL)
    for p in procs:
        try:
            p.communicate(timeout=60)
        except Exception:
            p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    trained = {f.name: f.read_text() for f in tmp_path.glob("samples*.jsonl")}
    for f in tmp_path.glob("samples*.jsonl"):
        f.unlink()
    out = spawn_ranks([sys.executable, "-m", "tests._elastic_fit", str(tmp_path), "--batch", "4"], 3)
    errs = [p.communicate(timeout=180)[1] for p in out]
    assert all(p.returncode == 0 for p in out), errs
    resumed = int(re.search(r"resuming from \S*step_0*(\d+)", errs[0]).group(1))
    assert resumed >= 1
    first = []
    for text in trained.values():
        first += [i for line in text.splitlines() for row in [json.loads(line)] if row["step"] <= resumed
                  for i in row["ids"]]
    counts = collections.Counter(first + samples(tmp_path))
    assert set(counts) == set(range(61)) and sum(counts.values()) - 61 <= 2, counts
