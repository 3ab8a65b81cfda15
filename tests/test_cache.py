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


# -- damaged cache files are rebuilt ---------------------------------------------------------------------------------


def _disk_dm(tmp_path):
    return fnlight.DataModule(pipeline(where="disk"), root=tmp_path, prefetch=0)


def _train_file(tmp_path):
    [f] = [p for p in (tmp_path / "cache").rglob("train.safetensors")]
    return f


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "empty", "no_checksum"])
def test_a_damaged_disk_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    import json
    import struct

    dm = _disk_dm(tmp_path)
    want = [list(dm.batches("train", e)) for e in range(2)]
    f = _train_file(tmp_path)
    raw = f.read_bytes()
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "bit_flip":  # still a valid safetensors file: only the checksum can tell
        raw = raw[:-5] + bytes([raw[-5] ^ 0x10]) + raw[-4:]
    elif damage == "empty":
        raw = b""
    else:  # a cache file written before checksums
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        del header["__metadata__"]["fnlight_sha256"]
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        raw = struct.pack("<Q", len(head)) + head + raw[8 + n:]
    f.write_bytes(raw)
    pipelines.CALLS["n"] = 0
    dm = _disk_dm(tmp_path)
    assert tree_equal([list(dm.batches("train", e)) for e in range(2)], want)
    assert pipelines.CALLS["n"] == 1  # the damaged split was rebuilt, the other read
    [msg] = [r.getMessage() for r in caplog.records if r.name == "fnlight"]
    assert f"the cache file {f} is damaged" in msg and "rebuilding it" in msg
    caplog.clear()
    pipelines.CALLS["n"] = 0
    assert tree_equal([list(_disk_dm(tmp_path).batches("train", e)) for e in range(2)], want)
    assert pipelines.CALLS["n"] == 0 and not caplog.records  # and the rebuilt file is good


def test_a_cache_file_that_stays_damaged_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    cache_module = sys.modules["fnlight.data.cache"]  # (fnlight.data.cache is the stage function)
    _disk_dm(tmp_path).prepare()
    f = _train_file(tmp_path)
    f.write_bytes(b"junk")
    write = cache_module._write_atomic

    def bad_disk(path, data):  # a disk that corrupts what is written
        write(path, data)
        path.write_bytes(path.read_bytes()[:-1])

    monkeypatch.setattr(cache_module, "_write_atomic", bad_disk)
    with pytest.raises(cache_module.CacheError, match=f"{f} is damaged even after being rebuilt"):
        list(_disk_dm(tmp_path).batches("train", 0))


def test_a_loaded_cache_does_not_depend_on_its_file(tmp_path):
    dm = _disk_dm(tmp_path)
    dm.prepare()
    first = list(dm.batches("train", 0))
    f = _train_file(tmp_path)
    size = f.stat().st_size
    with open(f, "r+b") as out:
        out.write(b"\0" * size)
    f.unlink()
    assert tree_equal(list(dm.batches("train", 0)), first)


def test_a_full_disk_while_caching_names_the_file(tmp_path):
    from .faults import small_disk

    big = (fd.from_tensors(torch.zeros(300_000, 4), torch.zeros(300_000)) >> fd.split({"train": 1.0})
           >> fd.cache("disk") >> fd.batch(8))
    with small_disk(tmp_path, "2m") as disk:
        with pytest.raises(OSError, match=r"train.safetensors") as e:
            fnlight.DataModule(big, root=disk, prefetch=0).prepare()
        assert e.value.errno == 28
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
