import pytest
import torch

import fnlight
import fnlight.data as fd
from fnlight.tree import tree_equal

# The call counter lives in another module: a global dict read here would be part of the
# function's description, and it changes with every call.
from . import pipelines


def expensive(batch):
    pipelines.CALLS["n"] += 1
    x, y = batch
    return {"x": x * 2, "y": (y, y + 1)}


def pipeline(factor=1.0, where="memory"):
    x = torch.arange(30.0)[:, None] * factor
    return (fd.from_tensors(x, torch.arange(30)) >> fd.split({"train": 0.8, "val": 0.2})
            >> fd.transform(expensive, batched=True) >> fd.cache(where) >> fd.shuffle() >> fd.batch(8))


def test_memory_cache_runs_the_stages_before_it_once():
    pipelines.CALLS["n"] = 0
    dm = fnlight.DataModule(pipeline(), prefetch=0)
    first = [list(dm.batches("train", e)) for e in range(3)]
    assert pipelines.CALLS["n"] == 2  # one materialization per split, none per batch
    uncached = fnlight.DataModule(fd.Pipeline(tuple(s for s in pipeline().stages if s.name != "cache")),
                                  prefetch=0)
    assert tree_equal(first, [list(uncached.batches("train", e)) for e in range(3)])


def test_disk_cache_is_keyed_by_the_fingerprint(tmp_path):
    pipelines.CALLS["n"] = 0
    dm = fnlight.DataModule(pipeline(where="disk"), root=tmp_path, prefetch=0)
    dm.prepare()
    assert pipelines.CALLS["n"] == 2
    prefix = dm.pipeline.prefix(3).fingerprint  # the stages before cache()
    files = sorted(p.name for p in (tmp_path / "cache" / prefix).iterdir() if p.suffix == ".safetensors")
    assert files == ["train.safetensors", "val.safetensors"]
    assert not list((tmp_path / "cache" / prefix).glob("*.tmp"))
    a = list(dm.batches("train", 1))
    fresh = fnlight.DataModule(pipeline(where="disk"), root=tmp_path, prefetch=0)  # a new process would do this
    assert tree_equal(list(fresh.batches("train", 1)), a)
    assert pipelines.CALLS["n"] == 2  # read back, not recomputed
    other = fnlight.DataModule(pipeline(factor=2.0, where="disk"), root=tmp_path, prefetch=0)
    list(other.batches("train", 1))
    assert pipelines.CALLS["n"] == 4  # a changed hyperparameter never reuses the old cache
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_disk_cache_refuses_sources_without_a_content_hash(tmp_path):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((2,), float(i))

    p = fd.from_torch(Rows()) >> fd.cache("disk") >> fd.batch(2)
    with pytest.raises(ValueError, match="does not hash its content"):
        fnlight.DataModule(p, root=tmp_path).setup()
    list(fnlight.DataModule(fd.from_torch(Rows()) >> fd.cache() >> fd.batch(2)).batches("train"))  # memory is fine
    named = fd.from_torch(Rows(), fingerprint="rows-v1") >> fd.cache("disk") >> fd.batch(2)
    assert len(list(fnlight.DataModule(named, root=tmp_path).batches("train"))) == 2


def test_cache_argument_is_checked():
    with pytest.raises(ValueError, match="'memory' or 'disk'"):
        fd.cache("ram")
