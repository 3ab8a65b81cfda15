"""save_checkpoint / load_checkpoint: safetensors + JSON, atomic, verified, never unpickled."""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.optim as fo
from fnlight.train.checkpoint import AsyncCheckpointer, CheckpointError, CorruptCheckpointError
from fnlight.tree import tree_equal

from .models import data, loss_fn, mlp

ROOT = Path(__file__).resolve().parents[1]


def xxh128sum(path: Path) -> str:
    """What a checkpoint records for a file: what ``xxh128sum`` prints (XXH3 128-bit)."""
    import xxhash

    return "xxh128:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()


def signed(doc):
    """``doc`` with a matching ``doc_sha256``: a crafted checkpoint, not a damaged one."""
    from fnlight.train.checkpoint_files import doc_checksum

    return {**doc, "doc_sha256": doc_checksum(doc)}


def trained(opt=None, steps=3, **model_kw):
    model = mlp(bn=True, dropout=0.2, **model_kw)
    opt = opt or fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(fo.warmup_cosine(1e-2, 2, 10), amsgrad=True))
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = fnlight.TrainState.create(model, opt, seed=4)
    x, y = data(16 * steps)
    for i in range(steps):
        state, _ = step(state, (x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]))
    return model, opt, step, state


@pytest.mark.parametrize("opt", [None, fo.sgd(0.1, momentum=0.9, nesterov=True), fo.adam(1e-3, fused=False)],
                         ids=["adamw-chain", "sgd", "adam"])
def test_roundtrip_is_bitwise(tmp_path, opt):
    _, _, _, state = trained(opt)
    fnlight.save_checkpoint(tmp_path / "ck", state, meta={"epoch": 2, "position": 5, "callbacks": [{"wait": 1}]})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint.json", "tensors.safetensors"]
    loaded, meta = fnlight.load_checkpoint(tmp_path / "ck", like=state)
    assert tree_equal(loaded, state)
    assert meta["epoch"] == 2 and meta["callbacks"] == [{"wait": 1}] and meta["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directories left


def test_resuming_from_a_checkpoint_continues_bitwise(tmp_path):
    model, opt, step, _ = trained(steps=0)
    x, y = data(96)
    batches = [(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]) for i in range(6)]
    state = fnlight.TrainState.create(model, opt, seed=4)
    straight = state
    for b in batches:
        straight, _ = step(straight, b)
    for b in batches[:3]:
        state, _ = step(state, b)
    fnlight.save_checkpoint(tmp_path / "mid", state)
    state, _ = fnlight.load_checkpoint(tmp_path / "mid", like=state)
    for b in batches[3:]:
        state, _ = step(state, b)
    assert tree_equal(state, straight)


def test_overwriting_is_atomic_and_keeps_one_checkpoint(tmp_path):
    _, _, step, state = trained()
    fnlight.save_checkpoint(tmp_path / "last", state)
    newer, _ = step(state, (data(16)[0], data(16)[1]))
    fnlight.save_checkpoint(tmp_path / "last", newer)
    assert tree_equal(fnlight.load_checkpoint(tmp_path / "last")[0], newer)
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


class Evil:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["EVIL_MARKER"])),))


def test_a_checkpoint_with_a_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (tmp_path / "ck" / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"refusing to load .*optimizer\.pt.*no pickles"):
        fnlight.load_checkpoint(tmp_path / "ck")
    assert not marker.exists()
    pickle.loads((tmp_path / "ck" / "optimizer.pt").read_bytes())  # the payload is real: it does run when unpickled
    assert marker.exists()


def test_a_corrupted_tensor_file_fails_its_checksum(tmp_path):
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    f = tmp_path / "ck" / "tensors.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted: its xxh128 is"):
        fnlight.load_checkpoint(tmp_path / "ck")


def test_like_reports_every_difference(tmp_path):
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    model7 = mlp(bn=True, din=7)  # first layer 16x7 instead of 16x6
    other = fnlight.TrainState.create(model7, fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(1e-2, amsgrad=True)))
    other = other.replace(params={**other.params, "extra": torch.zeros(1)},
                          buffers={k: v.double() if v.is_floating_point() else v for k, v in other.buffers.items()})
    with pytest.raises(CheckpointError) as e:
        fnlight.load_checkpoint(tmp_path / "ck", like=other)
    msg = str(e.value)
    assert "params/0.weight/: shape (16, 6) in the checkpoint, (16, 7) expected" in msg
    assert "missing ['extra']" in msg and "dtype torch.float32 in the checkpoint, torch.float64 expected" in msg


def test_a_different_pipeline_is_an_error_unless_allowed(tmp_path):
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state, meta={"pipeline": {"fingerprint": "a" * 64}})
    with pytest.raises(CheckpointError, match="different data"):
        fnlight.load_checkpoint(tmp_path / "ck", pipeline_fingerprint="b" * 64)
    fnlight.load_checkpoint(tmp_path / "ck", pipeline_fingerprint="b" * 64, allow_pipeline_change=True)
    fnlight.load_checkpoint(tmp_path / "ck", pipeline_fingerprint="a" * 64)


def test_unsaveable_values_and_missing_directories_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot save a object"):
        fnlight.save_checkpoint(tmp_path / "x", {"w": torch.zeros(1), "thing": object()})
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        fnlight.load_checkpoint(tmp_path / "nope")


WRITER = r"""
import sys, torch, fnlight
from fnlight.train import checkpoint_files
from fnlight.train.checkpoint import AsyncCheckpointer
path, mode = sys.argv[1], sys.argv[2]
checkpoint_files.SHARD_BYTES = 1 << 21  # 4 shards, written in parallel: a kill can land between them
big = {f"w{k}": torch.zeros(500_000) for k in range(4)}
writer = AsyncCheckpointer()
i = 0
while True:
    i += 1
    for w in big.values():
        w.fill_(i)
    if mode == "async":  # the loop goes on while the write happens; the print comes once it is on disk
        writer.save(path, big, meta={"i": i}, then=lambda p, i=i: print(i, flush=True))
    else:
        fnlight.save_checkpoint(path, big, meta={"i": i})
        print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_writes_never_leaves_a_half_written_checkpoint(tmp_path, mode):
    killed_mid_write = []
    for attempt in range(6):
        target = tmp_path / f"ck{attempt}"
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(target), mode], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline()  # at least one checkpoint is complete
        time.sleep(0.05 + 0.1 * attempt)  # then kill it at some point of a later write
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        state, meta = fnlight.load_checkpoint(target)  # old or new, always whole
        assert len(list(target.glob("tensors-*-of-00004.safetensors"))) == 4
        assert all(torch.equal(w, torch.full((500_000,), float(meta["i"]))) for w in state.values())
        # inside a save: writing the files (a .tmp- directory is left) or replacing the previous checkpoint
        # (its .old- directory is left); the fsyncs of both take most of a save's time under load
        killed_mid_write.append(any(p.name.startswith((f".ck{attempt}.tmp-", f".ck{attempt}.old-"))
                                    for p in tmp_path.iterdir()))
    assert any(killed_mid_write)  # the kill did land inside a save at least once


def test_async_saves_what_the_state_was_when_save_returned(tmp_path):
    state = {"w": torch.zeros(3_000_000), "step": torch.tensor(1)}
    with AsyncCheckpointer() as writer:
        for i in range(3):
            writer.save(tmp_path / f"ck{i}", state, meta={"i": i})
            state["w"].fill_(i + 1)  # in place, while the write is (likely) still going on
            state["step"].add_(1)
    for i in range(3):
        got, meta = fnlight.load_checkpoint(tmp_path / f"ck{i}")
        assert meta["i"] == i and torch.equal(got["w"], torch.full((3_000_000,), float(i)))
        assert int(got["step"]) == i + 1
    assert not [t for t in threading.enumerate() if t.name.startswith("fnlight-checkpoint")]  # closed


def test_async_write_errors_surface(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    writer = AsyncCheckpointer()
    writer.save(tmp_path / "file" / "ck", {"w": torch.ones(3)})  # returns: the write fails in the background
    with pytest.raises(OSError):
        writer.wait()
    writer.save(tmp_path / "ok", {"w": torch.ones(3)})  # the writer is still usable
    writer.close()
    assert torch.equal(fnlight.load_checkpoint(tmp_path / "ok")[0]["w"], torch.ones(3))


def test_the_tensor_file_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    from fnlight.train import _safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f64": torch.randn(2, 2, generator=g).double(), "i64": torch.tensor(-3), "empty": torch.zeros(0, 4),
               "bool": torch.tensor([True, False, True]), "u8": torch.arange(5, dtype=torch.uint8),
               "f16": torch.randn(1, generator=g).half(), "i32": torch.arange(3, dtype=torch.int32)}
    digest = _safetensors.write(tmp_path / "t.safetensors", tensors)
    assert digest == xxh128sum(tmp_path / "t.safetensors")
    sha = _safetensors.write(tmp_path / "s.safetensors", tensors, _safetensors.SHA256)  # what manifests record
    assert sha == hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()
    theirs = load_file(tmp_path / "t.safetensors")  # the reference reader agrees
    raw, digest2 = _safetensors.read(tmp_path / "t.safetensors")
    ours = _safetensors.parse(raw)
    assert digest2 == digest
    for got in (theirs, ours):
        assert set(got) == set(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    # and ours reads what the reference writer wrote
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "ref.safetensors")
    ref = _safetensors.parse(_safetensors.read(tmp_path / "ref.safetensors")[0])
    assert all(torch.equal(ref[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("damage", ["short", "header_len", "not_json", "offsets", "dtype"])
def test_a_malformed_tensor_file_with_a_matching_checksum_is_refused(tmp_path, damage):
    """Even when the checksum matches (a crafted checkpoint), bad offsets never become tensors."""
    import json
    import struct

    fnlight.save_checkpoint(tmp_path / "ck", {"w": torch.ones(4), "b": torch.zeros(2)})
    tf, meta = tmp_path / "ck" / "tensors.safetensors", tmp_path / "ck" / "checkpoint.json"
    raw = tf.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if damage == "short":
        raw = raw[:5]
    elif damage == "header_len":
        raw = struct.pack("<Q", 10**9) + raw[8:]
    elif damage == "not_json":
        raw = raw[:8] + b"{" * n + raw[8 + n:]
    else:
        first = next(iter(header.values()))
        if damage == "offsets":
            first["data_offsets"] = [0, 10**6]
        else:
            first["dtype"] = "PICKLE"
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        raw = struct.pack("<Q", len(head)) + head + raw[8 + n:]
    tf.write_bytes(raw)
    doc = json.loads(meta.read_text())
    doc["tensor_files"]["tensors.safetensors"] = xxh128sum(tf)
    meta.write_text(json.dumps(signed(doc)))
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        fnlight.load_checkpoint(tmp_path / "ck")


def test_a_large_state_is_sharded_and_every_shard_is_checked(tmp_path, monkeypatch):
    """Above SHARD_BYTES the tensors go into several standard safetensors files, each with its checksum."""
    import json

    from safetensors.torch import load_file

    from fnlight.train import checkpoint_files as checkpoint

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 600)  # the state below is ~3 KB: 5 shards
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    doc = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    files = doc["tensor_files"]
    n = len(files)
    assert doc["version"] == 3 and "tensors_sha256" not in doc
    assert n > 2 and sorted(files) == [f"tensors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([*files, "checkpoint.json"])
    names = []
    for name, checksum in files.items():  # each shard: what xxh128sum prints, and readable by safetensors itself
        assert xxh128sum(tmp_path / "ck" / name) == checksum
        names += load_file(tmp_path / "ck" / name)
    assert len(names) == len(set(names)) == len(fnlight.tree.tree_leaves(state))  # a partition of the tensors
    loaded, _ = fnlight.load_checkpoint(tmp_path / "ck", like=state)
    assert tree_equal(loaded, state)

    second = tmp_path / "ck" / f"tensors-00002-of-{n:05d}.safetensors"
    raw = second.read_bytes()
    second.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match=f"{second.name} is corrupted: its xxh128 is"):
        fnlight.load_checkpoint(tmp_path / "ck")
    second.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"incomplete: {second.name} missing"):
        fnlight.load_checkpoint(tmp_path / "ck")
    second.write_bytes(raw)
    fnlight.load_checkpoint(tmp_path / "ck")
    stray = tmp_path / "ck" / f"tensors-00009-of-{n + 5:05d}.safetensors"
    stray.write_bytes(raw)
    with pytest.raises(CheckpointError, match="not among the tensor files"):
        fnlight.load_checkpoint(tmp_path / "ck")
    stray.unlink()
    doc["tensor_files"] = {"../../elsewhere.safetensors": "0" * 64}  # names come from the JSON: never a path
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(signed(doc)))
    with pytest.raises(CorruptCheckpointError, match="no valid list of tensor files"):
        fnlight.load_checkpoint(tmp_path / "ck")


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=40), shard=st.integers(1, 3000))
def test_sharding_is_an_ordered_partition_into_at_most_max_shards(sizes, shard):
    from fnlight.train import checkpoint_files as checkpoint

    tensors = {f"t{i}": torch.empty(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    old = checkpoint.SHARD_BYTES
    checkpoint.SHARD_BYTES = shard
    try:
        files = checkpoint.shards(tensors)
    finally:
        checkpoint.SHARD_BYTES = old
    assert [k for g in files.values() for k in g] == list(tensors)  # every tensor once, in order
    assert 1 <= len(files) <= checkpoint.MAX_SHARDS and (all(files.values()) or not tensors)
    if len(files) == 1:
        assert list(files) == ["tensors.safetensors"]


def test_checkpoints_of_format_versions_1_and_2_still_load_and_are_verified(tmp_path):
    """Checkpoints written before XXH128 (format 1: one file and ``tensors_sha256``; format 2: shards and
    their sha256s in ``tensor_files``) load as before, each file checked against its sha256."""
    import json

    from fnlight.train import checkpoint_files as checkpoint

    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "one", state)
    old = checkpoint.SHARD_BYTES
    checkpoint.SHARD_BYTES = 600
    try:
        fnlight.save_checkpoint(tmp_path / "sharded", state)
    finally:
        checkpoint.SHARD_BYTES = old
    for name, version in (("one", 1), ("sharded", 2)):
        meta = tmp_path / name / "checkpoint.json"
        doc = json.loads(meta.read_text())
        assert doc["version"] == 3 and all(v.startswith("xxh128:") for v in doc["tensor_files"].values())
        shas = {f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest() for f in doc.pop("tensor_files")}
        doc.pop("doc_sha256")
        doc = {**doc, "version": version, **({"tensors_sha256": shas["tensors.safetensors"]} if version == 1
                                             else {"tensor_files": shas})}
        meta.write_text(json.dumps(signed(doc)))  # what the previous release wrote
        assert tree_equal(fnlight.load_checkpoint(tmp_path / name, like=state)[0], state)
        first = sorted(shas)[0]
        (tmp_path / name / first).write_bytes((tmp_path / name / first).read_bytes()[:-1] + b"\0")
        with pytest.raises(CorruptCheckpointError, match=f"{first} is corrupted: its sha256 is"):
            fnlight.load_checkpoint(tmp_path / name)
    doc["tensor_files"] = {f: "xxh128:" + "0" * 32 for f in shas}  # a version 2 record holds sha256s only
    meta.write_text(json.dumps(signed(doc)))
    with pytest.raises(CorruptCheckpointError, match="no valid list of tensor files"):
        fnlight.load_checkpoint(tmp_path / "sharded")
    doc["version"] = 99  # from a future fnlight
    meta.write_text(json.dumps(signed(doc)))
    with pytest.raises(CheckpointError, match="not a fnlight checkpoint of version 1 to 3 .*version 99"):
        fnlight.load_checkpoint(tmp_path / "sharded")


EXITING_WRITER = r"""
import sys, time, torch
from fnlight.train import checkpoint_files
from fnlight.train.checkpoint import AsyncCheckpointer
checkpoint_files.SHARD_BYTES = 1 << 20  # 4 shards
shards = checkpoint_files.shards
def late_shards(tensors):  # the write starts once the main thread has ended
    time.sleep(0.5)
    return shards(tensors)
checkpoint_files.shards = late_shards
writer = AsyncCheckpointer()
writer.save(sys.argv[1], {f"w{k}": torch.full((300_000,), float(k)) for k in range(4)})
# no wait() or close(): the program ends before the write starts
"""


def test_an_async_write_in_flight_when_the_program_ends_still_completes(tmp_path):
    """The interpreter waits for the writer thread; the shards are written by plain threads,
    which (unlike an executor's) still start while the interpreter shuts down."""
    out = subprocess.run([sys.executable, "-c", EXITING_WRITER, str(tmp_path / "ck")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    state, _ = fnlight.load_checkpoint(tmp_path / "ck")
    assert len(list((tmp_path / "ck").glob("tensors-*-of-00004.safetensors"))) == 4
    assert all(torch.equal(state[f"w{k}"], torch.full((300_000,), float(k))) for k in range(4))


def test_two_shards_holding_one_tensor_is_a_corrupt_checkpoint(tmp_path, monkeypatch):
    """A crafted shard that repeats a tensor of another one (with matching checksums) is refused, not merged."""
    import json

    import xxhash
    from safetensors.torch import load_file, save_file

    from fnlight.train import checkpoint_files as checkpoint

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 600)
    _, _, _, state = trained()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    meta = tmp_path / "ck" / "checkpoint.json"
    doc = json.loads(meta.read_text())
    first, second = sorted(doc["tensor_files"])[:2]
    tensors = load_file(tmp_path / "ck" / second)
    name, t = next(iter(load_file(tmp_path / "ck" / first).items()))
    save_file({**tensors, name: t}, tmp_path / "ck" / second)
    doc["tensor_files"][second] = "xxh128:" + xxhash.xxh3_128((tmp_path / "ck" / second).read_bytes()).hexdigest()
    doc.pop("doc_sha256")
    meta.write_text(json.dumps(signed(doc)))
    with pytest.raises(CorruptCheckpointError, match=f"{second} repeats tensors of another shard: \\['{name}'\\]"):
        fnlight.load_checkpoint(tmp_path / "ck")
