"""read_tokens and windows: language-model samples from raw token files."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd


def write(path: Path, tokens, dtype="uint16") -> Path:
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def rss_mb() -> tuple[float, float]:
    """This process's resident memory now (Linux): all of it, and the anonymous part
    (the rest is file pages, such as a memory map's, which the kernel reclaims at will)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["RssAnon"].split()[0]) / 1024


def test_windows_are_shifted_int64_blocks_read_from_the_file(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    f = write(tmp_path / "train.bin", tokens)
    dm = fnlight.DataModule(fd.read_tokens(f) >> fd.windows(16) >> fd.batch(8), prefetch=0)
    n = (1000 - 16 - 1) // 16 + 1
    assert len(dm.dataset("train")) == n and dm.num_batches("train") == -(-n // 8)
    x, y = next(iter(dm.batches("train")))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    for i in range(8):
        assert x[i].tolist() == tokens[i * 16:i * 16 + 16].tolist()
        assert y[i].tolist() == tokens[i * 16 + 1:i * 16 + 17].tolist()
    xi, yi = dm.dataset("train")[n - 1]  # the last whole window: one item, the same values
    assert xi.tolist() == tokens[(n - 1) * 16:n * 16].tolist() and yi[-1] == tokens[n * 16]
    tok = fd.read_tokens(f).load(fd.Context())
    assert tok[5].dtype == torch.int64 and int(tok[5]) == tokens[5] and len(tok) == 1000


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "uint32", "int32", "int64"])
def test_every_token_dtype(tmp_path, dtype):
    tokens = np.arange(0, 120, dtype=dtype) * (3 if np.iinfo(dtype).max > 1000 else 1)
    f = write(tmp_path / "t.bin", tokens, dtype)
    ds = (fd.read_tokens(f, dtype=dtype) >> fd.windows(10, stride=7)).build(fd.Context())["train"].dataset
    x, y = ds[torch.tensor([2])]
    assert x[0].tolist() == tokens[14:24].astype(np.int64).tolist() and y[0].tolist() == tokens[15:25].tolist()


@given(n=st.integers(1, 300), block=st.integers(1, 40), stride=st.one_of(st.none(), st.integers(1, 50)))
def test_window_count_law(n, block, stride):
    p = fd.from_tensors(torch.arange(n) * 2) >> fd.windows(block, stride)
    s = block if stride is None else stride
    if n < block + 1:
        with pytest.raises(ValueError, match=f"at least {block + 1} tokens"):
            p.build(fd.Context())
        return
    ds = p.build(fd.Context())["train"].dataset
    assert len(ds) == (n - block - 1) // s + 1
    x, y = ds.gather(torch.arange(len(ds)))
    starts = torch.arange(len(ds)) * s
    assert torch.equal(x, (starts[:, None] + torch.arange(block)) * 2)  # window i starts at token i * stride
    assert torch.equal(y, x + 2)  # y is x shifted by one token
    assert int(starts[-1]) + block + 1 <= n < int(starts[-1]) + s + block + 1  # the last whole window


def test_named_split_files_and_windows_before_split(tmp_path):
    tr, va = write(tmp_path / "train.bin", range(500)), write(tmp_path / "val.bin", range(1000, 1100))
    dm = fnlight.DataModule(fd.read_tokens(train=tr, val=va) >> fd.windows(9) >> fd.shuffle() >> fd.batch(4))
    assert dm.split_names == ["train", "val"]
    assert len(dm.dataset("train")) == (500 - 10) // 9 + 1 and len(dm.dataset("val")) == (100 - 10) // 9 + 1
    assert all(int(x.min()) >= 1000 for x, _ in dm.batches("val"))
    # windows before split(): whole windows are split, disjoint and covering
    p = fd.read_tokens(tr) >> fd.windows(9) >> fd.split({"train": 0.8, "val": 0.2}) >> fd.batch(1000)
    dm = fnlight.DataModule(p)
    starts = [x[:, 0] for split in ("train", "val") for x, _ in dm.batches(split)]
    assert sorted(torch.cat(starts).tolist()) == list(range(0, 9 * ((500 - 10) // 9 + 1), 9))


def test_exact_resume_and_workers_on_a_token_pipeline(tmp_path):
    f = write(tmp_path / "t.bin", np.random.default_rng(1).integers(0, 65535, 5000))
    p = fd.read_tokens(f) >> fd.windows(32, stride=5) >> fd.shuffle() >> fd.batch(16)
    dm = fnlight.DataModule(p, seed=3, prefetch=0)
    full = list(dm.batches("train", epoch=2))
    resumed = list(dm.batches("train", epoch=2, start=7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[7:], resumed, strict=True))
    with fnlight.DataModule(p, seed=3, workers=2) as dm2:
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full, dm2.batches("train", epoch=2), strict=True))
    ds = dm.dataset("train")
    ds[0]  # opens the memory map
    assert len(pickle.dumps(ds)) < 10_000  # a worker reopens the file; it is never copied


def test_fingerprint_follows_the_content_not_the_location(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65535, 3_000_000)  # 6 MB: the sampled hash, not the whole file
    fa, fb = write(tmp_path / "a" / "train.bin", tokens), write(tmp_path / "b" / "train.bin", tokens)
    fp = (fd.read_tokens(fa) >> fd.windows(64)).fingerprint
    assert fp == (fd.read_tokens(fb) >> fd.windows(64)).fingerprint  # a copy elsewhere: the same data
    assert fp != (fd.read_tokens(fa) >> fd.windows(64, stride=1)).fingerprint
    assert (fd.windows(64)).describe() == fd.windows(64, stride=64).describe()
    write(fb, np.concatenate([tokens[:-1], [7]]))  # the last token changed (the last block is sampled)
    assert (fd.read_tokens(fb) >> fd.windows(64)).fingerprint != fp
    write(fb, tokens[::-1])  # re-tokenized, same size
    assert (fd.read_tokens(fb) >> fd.windows(64)).fingerprint != fp
    assert not fd.read_tokens(fa).content_hashed
    with pytest.raises(ValueError, match="does not hash its content"):
        fnlight.DataModule(fd.read_tokens(fa) >> fd.cache("disk") >> fd.batch(4), root=tmp_path).prepare()
    small = write(tmp_path / "small.bin", range(100))
    assert fd.read_tokens(small).content_hashed  # hashed whole


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no token file at .*missing.bin"):
        fd.read_tokens(tmp_path / "missing.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"3 bytes, which is not a multiple of 2 \(the size of one uint16"):
        fd.read_tokens(odd)
    fd.read_tokens(odd, dtype="uint8")  # fine as bytes
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        fd.read_tokens(tmp_path / "empty.bin")
    with pytest.raises(IsADirectoryError, match="not a file"):
        fd.read_tokens(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        fd.read_tokens(odd, dtype="float32")
    with pytest.raises(TypeError, match="not both"):
        fd.read_tokens(odd, train=odd)
    short = write(tmp_path / "short.bin", range(10))
    with pytest.raises(ValueError, match=r"windows\(block_size=10\) needs at least 11 tokens .* has 10"):
        fnlight.DataModule(fd.read_tokens(short) >> fd.windows(10) >> fd.batch(1)).setup()
    fnlight.DataModule(fd.read_tokens(short) >> fd.windows(9) >> fd.batch(1)).setup()  # exactly one window
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int block_size"):
            fd.windows(bad)
    with pytest.raises(ValueError, match="positive int stride"):
        fd.windows(4, stride=0)
    with pytest.raises(ValueError, match="comes after split"):
        fnlight.DataModule(fd.read_tokens(short) >> fd.split({"train": 0.5, "val": 0.5}) >> fd.windows(2)
                           >> fd.batch(1)).setup()
    with pytest.raises(ValueError, match="before shuffle"):
        fnlight.DataModule(fd.read_tokens(short) >> fd.shuffle() >> fd.windows(2) >> fd.batch(1)).setup()
    with pytest.raises(ValueError, match="not single token ids"):
        fnlight.DataModule(fd.from_tensors(torch.zeros(10, 2, dtype=torch.int64)) >> fd.windows(2)
                           >> fd.batch(1)).setup()
    with pytest.raises(ValueError, match="integer token ids"):
        fnlight.DataModule(fd.from_tensors(torch.zeros(10)) >> fd.windows(2) >> fd.batch(1)).setup()
    made_before = fd.read_tokens(short) >> fd.windows(4) >> fd.batch(1)
    os.remove(short)  # the file went away after the pipeline was made
    with pytest.raises(FileNotFoundError, match="no token file"):
        fnlight.DataModule(made_before).setup()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc")
def test_a_token_file_larger_than_memory_is_never_read_whole(tmp_path):
    """A 4 GiB sparse file (2**31 uint16 tokens, no disk used): building the plan and
    iterating shuffled batches keeps resident memory far below the file's size."""
    f = tmp_path / "huge.bin"
    n = 2**31
    with open(f, "wb") as fh:
        fh.truncate(2 * n)
        for pos, value in ((0, 11), (n // 2, 22), (n - 1, 33)):  # a few known tokens; the rest are zeros
            fh.seek(2 * pos)
            fh.write(np.uint16(value).tobytes())
    base = torch.tensor(rss_mb())
    dm = fnlight.DataModule(fd.read_tokens(f) >> fd.windows(1024) >> fd.shuffle() >> fd.batch(32), seed=0)
    n_windows = (n - 1025) // 1024 + 1
    assert len(dm.dataset("train")) == n_windows and dm.num_batches("train") == -(-n_windows // 32)
    peak = torch.zeros(2)
    for i, (x, _) in enumerate(dm.batches("train", epoch=0)):
        assert x.shape == (32, 1024) and x.dtype == torch.int64
        peak = torch.maximum(peak, torch.tensor(rss_mb()) - base)
        if i == 200:
            break
    x, y = dm.dataset("train")[torch.tensor([0, (n // 2) // 1024, n_windows - 1])]
    assert int(x[0, 0]) == 11 and int(x[1, 0]) == 22 and int(y[1].sum()) == 0
    assert int(fd.read_tokens(f).load(fd.Context())[n - 1]) == 33  # the file's last token
    last = dm.index_plan("train", epoch=0)[-1]  # the epoch's last batch, computed alone
    assert last.numel() == n_windows % 32
    assert len(fnlight.DataModule(fd.read_tokens(f) >> fd.windows(1024)).fingerprint) == 64  # sampled, not read
    peak = torch.maximum(peak, torch.tensor(rss_mb()) - base)
    # 201 batches of 32 windows touch ~13,000 pages of the file (~50 MB), counted in VmRSS
    assert peak[0] < 200, f"resident memory grew by {peak[0]:.0f} MB while reading a {2 * n >> 20} MB file"
    assert peak[1] < 64, f"anonymous memory grew by {peak[1]:.0f} MB"
