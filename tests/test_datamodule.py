import multiprocessing
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd
from fnlight.tree import register_node, tree_equal

from . import pipelines
from .conftest import cuda


def digits_pipeline(batch_size=32):
    return (fd.digits() >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, stratify_by=1)
            >> fd.transform(lambda s: (s[0] / 16.0, s[1]))
            >> fd.transform(lambda s, k: (pipelines.hflip(s[0].reshape(8, 8), k).reshape(64), s[1]), on="train")
            >> fd.shuffle() >> fd.batch(batch_size))


@pytest.fixture(scope="module")
def dm():
    with fnlight.DataModule(digits_pipeline(), seed=0, prefetch=2) as dm:
        yield dm


def test_digits_datamodule(dm):
    assert dm.split_names == ["train", "val", "test"]
    assert dm.num_batches("train") == -(-len(dm.dataset("train")) // 32)
    assert sum(len(dm.dataset(s)) for s in dm.split_names) == 1797
    x, y = next(iter(dm.batches("train")))
    assert x.shape == (32, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.max()) <= 1.0
    assert dm.split_for("fit") == "train" and dm.split_for("validate") == "val"
    assert dm.plan("fit") is dm.plan("train")  # a stage name is an alias of its split


@given(epoch=st.integers(0, 3), data=st.data())
def test_resuming_at_any_position_yields_the_remaining_batches(dm, epoch, data):
    full = list(dm.batches("train", epoch))
    start = data.draw(st.integers(0, len(full)))
    assert tree_equal(list(dm.batches("train", epoch, start=start)), full[start:])


def test_batches_are_a_function_of_epoch_only(dm):
    a, b, c = (list(dm.batches("train", e)) for e in (2, 2, 3))
    assert tree_equal(a, b) and not tree_equal(a, c)
    unshuffled = [list(dm.batches("val", e)) for e in (0, 5)]
    assert tree_equal(*unshuffled)


@pytest.mark.parametrize("workers, prefetch", [(0, 2), (0, None), (1, 2), (3, 1)])
def test_results_do_not_depend_on_workers_or_prefetch(dm, workers, prefetch):
    reference = list(dm.replace(prefetch=0).batches("train", 1))
    other = dm.replace(workers=workers, prefetch=prefetch)
    assert tree_equal(list(other.batches("train", 1)), reference)
    assert tree_equal(list(other.batches("train", 1, start=3)), reference[3:])


def test_prefetch_defaults_to_off_on_the_cpu(dm):
    it = dm.replace(prefetch=None).batches("train")
    next(it)
    assert not _threads()


def _threads():
    return [t for t in threading.enumerate() if t.name == "fnlight-prefetch"]


def test_prefetch_thread_is_released_on_break_and_close(dm):
    for _ in dm.batches("train"):
        break
    assert not _threads()
    it = dm.batches("train")
    next(it)
    assert _threads()
    dm.close()
    assert not _threads()
    with dm.batches("train") as it:
        next(it)
    assert not _threads()


def test_worker_processes_are_released(dm):
    wdm = dm.replace(workers=2)
    for _ in wdm.batches("train"):
        break
    assert not multiprocessing.active_children()
    it = wdm.batches("train")
    next(it)
    assert len(multiprocessing.active_children()) == 2
    wdm.close()
    assert not multiprocessing.active_children()
    list(wdm.batches("val"))  # exhausted
    assert not multiprocessing.active_children()


def explode(x):
    if float(x.sum()) > 60:
        raise RuntimeError("bad sample")
    return x


@pytest.mark.parametrize("workers, prefetch", [(0, 0), (0, 2), (2, 2)])
def test_errors_reach_the_consumer(workers, prefetch):
    p = fd.from_tensors(torch.arange(200.0)[:, None]) >> fd.transform(explode) >> fd.batch(50)
    dm = fnlight.DataModule(p, workers=workers, prefetch=prefetch)
    it = dm.batches("train")
    next(it)
    with pytest.raises(RuntimeError, match="bad sample"):
        next(it)
    time.sleep(0.05)
    assert not _threads() and not multiprocessing.active_children()


def test_a_dead_worker_is_reported(dm):
    import os
    import signal

    it = dm.replace(workers=1, prefetch=1).batches("train")
    next(it)
    (proc,) = it._procs
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(fd.WorkerError, match="died unexpectedly"):
        for _ in it:
            pass
    assert not multiprocessing.active_children()


def test_start_out_of_range_and_unknown_split(dm):
    n = dm.num_batches("val")
    assert list(dm.batches("val", start=n)) == []
    with pytest.raises(ValueError, match="out of range"):
        dm.batches("val", start=n + 1)
    with pytest.raises(KeyError, match="no split named 'tset'"):
        dm.batches("tset")


def test_from_datasets_like_lightning():
    tds = torch.utils.data.TensorDataset(torch.arange(20.0)[:, None], torch.arange(20))
    dm = fnlight.DataModule.from_datasets(train=tds, val=tds, batch_size=8, prefetch=0)
    assert dm.split_names == ["train", "val"] and dm.num_batches("train") == 3
    train = torch.cat([y for _, y in dm.batches("train", 0)])
    val = torch.cat([y for _, y in dm.batches("val", 0)])
    assert not torch.equal(train, torch.arange(20)) and torch.equal(torch.sort(train).values, torch.arange(20))
    assert torch.equal(val, torch.arange(20))


def test_collate_receives_samples():
    def pad(samples):
        longest = max(len(s) for s in samples)
        return torch.stack([torch.nn.functional.pad(s, (0, longest - len(s))) for s in samples])

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.ones(i + 1)

    dm = fnlight.DataModule(fd.from_torch(Ragged()) >> fd.batch(2, collate=pad), prefetch=0)
    assert [tuple(b.shape) for b in dm.batches("train")] == [(2, 2), (2, 4), (1, 5)]
    with pytest.raises(fd.ShapeError, match="collate"):
        list(fnlight.DataModule(fd.from_torch(Ragged()) >> fd.batch(2), prefetch=0).batches("train"))


class Pair:
    def __init__(self, image, label):
        self.image, self.label = image, label


register_node(Pair, lambda p: ((p.image, p.label), None), lambda _, c: Pair(*c))


def test_custom_batch_types_flow_through_to_device():
    dm = fnlight.DataModule(fd.from_tensors(torch.zeros(6, 2), torch.arange(6)) >> fd.batch(3)
                            >> fd.transform(lambda b: Pair(*b), batched=True) >> fd.to_device("meta"),
                            prefetch=0)
    b = next(iter(dm.batches("train")))
    assert isinstance(b, Pair) and b.image.device.type == "meta" and b.label.device.type == "meta"


def test_stages_after_to_device_run_on_the_device():
    seen = []

    def record(b):
        seen.append(b.device.type)
        return b

    p = (fd.from_tensors(torch.zeros(4, 2)) >> fd.batch(2) >> fd.transform(record, batched=True)
         >> fd.to_device("meta") >> fd.transform(record, batched=True))
    list(fnlight.DataModule(p, prefetch=0).batches("train"))
    assert seen == ["cpu", "meta", "cpu", "meta"]


@cuda
def test_to_device_cuda_with_workers(dm):
    p = digits_pipeline() >> fd.to_device()
    ref = list(fnlight.DataModule(p, prefetch=0).batches("train", 0))
    got = list(fnlight.DataModule(p, workers=2).batches("train", 0))
    assert got[0][0].is_cuda and tree_equal(got, ref)


def test_prepare_without_side_effects_is_a_no_op(dm):
    dm.prepare()  # digits are bundled: nothing to download
    assert len(dm.describe()["pipeline"]["stages"]) == 6


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable(x):
    if float(x.sum()) > 60:
        raise Unpicklable()
    return x


@pytest.mark.timeout(60)
def test_an_unpicklable_worker_error_is_reported_not_hung():
    p = fd.from_tensors(torch.arange(200.0)[:, None]) >> fd.transform(raise_unpicklable) >> fd.batch(50)
    it = fnlight.DataModule(p, workers=1).batches("train")
    next(it)
    with pytest.raises(fd.WorkerError, match="(?s)could not be sent.*Unpicklable"):
        next(it)
    assert not multiprocessing.active_children()


def slow(x):
    time.sleep(0.3)
    return x


@pytest.mark.timeout(60)
def test_close_from_another_thread_ends_a_waiting_consumer():
    dm = fnlight.DataModule(fd.from_tensors(torch.zeros(40, 1)) >> fd.transform(slow, batched=True) >> fd.batch(4),
                            prefetch=1)
    it = dm.batches("train")
    timer = threading.Timer(0.1, dm.close)
    timer.start()
    got = list(it)  # ends (early) instead of waiting forever
    timer.join()
    assert len(got) < 10 and not _threads()


def test_the_plan_follows_the_rank_known_at_use(monkeypatch):
    p = fd.from_tensors(torch.arange(8)) >> fd.shard() >> fd.batch(8)
    dm = fnlight.DataModule(p)
    assert dm.index_batches("train")[0].tolist() == list(range(8))
    from fnlight.data import datamodule

    monkeypatch.setattr(datamodule.distributed, "rank", lambda: 1)
    monkeypatch.setattr(datamodule.distributed, "world_size", lambda: 2)
    assert dm.index_batches("train")[0].tolist() == [1, 3, 5, 7]  # distributed started after first use


def noise(x, key):
    return x + fnlight.random.uniform(key, x.shape)


def test_random_transforms_after_to_device_get_keys_there():
    p = fd.from_tensors(torch.zeros(8, 3)) >> fd.batch(4) >> fd.to_device("meta") >> fd.transform(noise)
    b = next(iter(fnlight.DataModule(p, prefetch=0).batches("train")))
    assert b.device.type == "meta" and b.shape == (4, 3)


W = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))


def project(x):
    return W @ x


def test_vectorize_false_makes_values_independent_of_the_batch():
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    ds = fnlight.DataModule(fd.from_tensors(x) >> fd.transform(project, vectorize=False) >> fd.batch(64)).dataset(
        "train")
    idx = torch.arange(64)
    assert tree_equal(ds.gather(idx), torch.stack([ds.item(i) for i in range(64)]))
    assert tree_equal(ds.gather(idx[:7]), ds.gather(idx)[:7])
