"""Checkpoints under faults and hostile input: nothing lost, nothing misread.

Real files, FIFOs, symlinks, a size-limited tmpfs, concurrent processes, crafted JSON and safetensors headers.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.optim as fo
from fnlight.train import checkpoint_files
from fnlight.train.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CorruptCheckpointError,
    find_resumable,
    step_dir,
)
from fnlight.train.checkpoint_files import doc_checksum
from fnlight.tree import tree_equal

from .faults import fnlight_threads, small_disk
from .models import mlp

ROOT = Path(__file__).resolve().parents[1]


def small_state():
    model = mlp(bn=True)
    return fnlight.TrainState.create(model, fo.adam(1e-3), seed=1)


def signed(doc):
    return {**doc, "doc_sha256": doc_checksum(doc)}


def rewrite_doc(ck: Path, change) -> None:
    """Change checkpoint.json as a crafted (validly signed) file would."""
    doc = json.loads((ck / "checkpoint.json").read_text())
    change(doc)
    (ck / "checkpoint.json").write_text(json.dumps(signed(doc)))


@pytest.fixture(autouse=True)
def no_alarm():
    """A load that hangs (a FIFO read) fails the test instead of hanging the suite."""
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("timed out: a load hung"))
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- saving never removes what it did not write ------------------------------------------------------------------


def test_saving_onto_a_run_directory_is_refused_and_nothing_is_removed(tmp_path):
    state = small_state()
    run = tmp_path / "run"
    fnlight.save_checkpoint(step_dir(run, 1), state)
    (run / "notes.txt").write_text("weeks of work")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"run: it is a directory that is not a fnlight checkpoint "
                                              r"\(it holds notes.txt, step_000000001/\)"):
        fnlight.save_checkpoint(run, state)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (run / "notes.txt").read_text() == "weeks of work"
    fnlight.load_checkpoint(step_dir(run, 1), like=state)
    writer = AsyncCheckpointer()
    with pytest.raises(CheckpointError, match="not a fnlight checkpoint"):
        writer.save(run, state)  # at once, not from the background
    (tmp_path / "later").mkdir()
    writer.save(tmp_path / "later", state)
    (tmp_path / "later" / "notes.txt").write_text("written while the save was queued")
    with contextlib.suppress(CheckpointError):  # refused when the write starts after the note
        writer.wait()
    writer.close()
    assert (tmp_path / "later" / "notes.txt").read_text() == "written while the save was queued"
    shutil.rmtree(tmp_path / "later")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_saving_onto_a_file_or_a_symlink_is_refused(tmp_path):
    state = small_state()
    f = tmp_path / "model.pt"
    f.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="a file is there and a checkpoint is a directory"):
        fnlight.save_checkpoint(f, state)
    assert f.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    fnlight.save_checkpoint(tmp_path / "real", state)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CheckpointError, match="it is a symlink"):
        fnlight.save_checkpoint(tmp_path / "link", state)
    assert (tmp_path / "link").is_symlink()
    # a tensor-file name that is a directory is not a checkpoint file either
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tensors.safetensors").mkdir()
    (tmp_path / "odd" / "tensors.safetensors" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match=r"holds tensors.safetensors/"):
        fnlight.save_checkpoint(tmp_path / "odd", state)
    assert (tmp_path / "odd" / "tensors.safetensors" / "keep").exists()


def test_an_empty_directory_or_a_damaged_checkpoint_is_replaced(tmp_path):
    state = small_state()
    (tmp_path / "empty").mkdir()
    fnlight.save_checkpoint(tmp_path / "empty", state)
    assert tree_equal(fnlight.load_checkpoint(tmp_path / "empty")[0], state)
    (tmp_path / "empty" / "tensors.safetensors").write_bytes(b"damaged")
    fnlight.save_checkpoint(tmp_path / "empty", state)  # a damaged checkpoint is still a checkpoint
    assert tree_equal(fnlight.load_checkpoint(tmp_path / "empty")[0], state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# -- every malformed checkpoint is a checkpoint error ------------------------------------------------------------


def _deep_structure(doc):
    node = {"tensor": "params/0.weight"}
    for _ in range(300):  # deeper than any state, not deeper than Python's JSON reader goes
        node = {"list": [node]}
    doc["structure"] = node


def _raw_json(ck: Path, raw: bytes) -> None:
    (ck / "checkpoint.json").write_bytes(raw)


DOC_DAMAGE = {
    "non_utf8": (lambda ck: _raw_json(ck, (ck / "checkpoint.json").read_bytes().replace(b'"meta"', b'"m\xffta"', 1)),
                 "checkpoint.json is not valid JSON"),
    "a_list": (lambda ck: _raw_json(ck, b"[1, 2, 3]"), "checkpoint.json is corrupted: a list"),
    "deep_json": (lambda ck: _raw_json(ck, b"[" * 200_000 + b"]" * 200_000), "checkpoint.json is not valid JSON"),
    "empty": (lambda ck: _raw_json(ck, b""), "checkpoint.json is not valid JSON"),
    "no_structure": (lambda ck: rewrite_doc(ck, lambda d: d.pop("structure")), "needs a structure"),
    "missing_tensor": (lambda ck: rewrite_doc(ck, lambda d: d["structure"]["TrainState"]["params"]["dict"].update(
        {"ghost": {"tensor": "params/ghost"}})), "names the tensor 'params/ghost', which no tensor file holds"),
    "deep_structure": (lambda ck: rewrite_doc(ck, _deep_structure), "nests"),
    "unknown_kind": (lambda ck: rewrite_doc(ck, lambda d: d.update(structure={"pickle": "os.system"})),
                     "unknown kind of node 'pickle'"),
    "bad_fields": (lambda ck: rewrite_doc(ck, lambda d: d["structure"]["TrainState"].pop("key")),
                   "TrainState without exactly the fields"),
    "meta_not_object": (lambda ck: rewrite_doc(ck, lambda d: d.update(meta=[1])), "meta must be an object"),
    "step_not_int": (lambda ck: rewrite_doc(ck, lambda d: d.update(step="3")), "step an integer"),
    "tensor_twice": (lambda ck: rewrite_doc(ck, lambda d: d["structure"]["TrainState"]["params"]["dict"].update(
        {"again": {"tensor": "params/0.weight"}})), "a second time"),
    "files_not_dict": (lambda ck: rewrite_doc(ck, lambda d: d.update(tensor_files=["x"])),
                       "no valid list of tensor files"),
}


@pytest.mark.parametrize("damage", sorted(DOC_DAMAGE))
def test_a_malformed_checkpoint_json_is_a_corrupt_checkpoint_error(tmp_path, damage):
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, small_state())
    do, message = DOC_DAMAGE[damage]
    do(ck)
    with pytest.raises(CorruptCheckpointError, match=message) as e:
        fnlight.load_checkpoint(ck)
    assert "checkpoint.json" in str(e.value) or str(ck) in str(e.value)


def _deep_header(raw: bytes) -> bytes:
    head = b"[" * 100_000 + b"]" * 100_000
    return struct.pack("<Q", len(head)) + head


def _header_with(raw: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + raw[8 + n:]


HEADER_DAMAGE = {
    "deep_brackets": _deep_header,
    "dtype_a_list": lambda raw: _header_with(raw, lambda h: next(v for k, v in h.items() if k != "__metadata__")
                                             .update(dtype=["F32"])),
    "not_utf8": lambda raw: raw[:8] + b"\xff" + raw[9:],
    "huge_header_length": lambda raw: struct.pack("<Q", 2**63) + raw[8:],
    "a_string": lambda raw: struct.pack("<Q", 8) + b'"abcde" ',
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_a_crafted_safetensors_header_is_a_corrupt_checkpoint_error(tmp_path, damage):
    import xxhash

    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, small_state())
    raw = HEADER_DAMAGE[damage]((ck / "tensors.safetensors").read_bytes())
    (ck / "tensors.safetensors").write_bytes(raw)
    checksum = "xxh128:" + xxhash.xxh3_128(raw).hexdigest()
    rewrite_doc(ck, lambda d: d["tensor_files"].update({"tensors.safetensors": checksum}))
    with pytest.raises(CorruptCheckpointError, match="tensors.safetensors is not a valid safetensors file"):
        fnlight.load_checkpoint(ck)


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling_symlink", "missing", "truncated", "symlink_loop"])
def test_a_tensor_file_that_is_not_a_regular_file_is_a_clear_error(tmp_path, kind):
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, small_state())
    f = ck / "tensors.safetensors"
    expected = {"fifo": "is a FIFO \\(named pipe\\), not a regular file",
                "directory": "is a directory, not a regular file",
                "dangling_symlink": "is a dangling symlink .*git-annex or DVC",
                "missing": "incomplete: tensors.safetensors missing",
                "truncated": "is corrupted: its xxh128 is",
                "symlink_loop": "cannot open .*tensors.safetensors: Too many levels of symbolic links"}[kind]
    if kind == "truncated":
        os.truncate(f, f.stat().st_size // 2)
    else:
        f.unlink()
        if kind == "fifo":
            os.mkfifo(f)
        elif kind == "directory":
            f.mkdir()
        elif kind == "dangling_symlink":
            f.symlink_to(tmp_path / ".git" / "annex" / "objects" / "ab" / "SHA256E-s1--0")
        elif kind == "symlink_loop":
            f.symlink_to(f)
    t0 = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match=expected):
        fnlight.load_checkpoint(ck)
    assert time.monotonic() - t0 < 5  # no hang, no retry loop
    found = find_resumable(tmp_path)  # not a Trainer directory: nothing to find, nothing raised
    assert found.path is None and not found.skipped


def test_a_fifo_in_place_of_checkpoint_json_does_not_hang(tmp_path):
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, small_state())
    (ck / "checkpoint.json").unlink()
    os.mkfifo(ck / "checkpoint.json")
    with pytest.raises(CorruptCheckpointError, match="checkpoint.json is a FIFO"):
        fnlight.load_checkpoint(ck)


def test_symlinks_to_regular_files_load_and_are_verified(tmp_path):
    """What DVC leaves: every file a symlink into its cache."""
    state = small_state()
    ck, cache = tmp_path / "ck", tmp_path / "cache"
    fnlight.save_checkpoint(ck, state)
    cache.mkdir()
    for f in list(ck.iterdir()):
        f.rename(cache / f.name)
        f.symlink_to(cache / f.name)
    assert tree_equal(fnlight.load_checkpoint(ck, like=state)[0], state)
    raw = bytearray((cache / "tensors.safetensors").read_bytes())
    raw[-1] ^= 1
    (cache / "tensors.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="tensors.safetensors is corrupted"):
        fnlight.load_checkpoint(ck)


# -- checkpoint.json is itself verified ---------------------------------------------------------------------------


def test_a_flipped_digit_in_checkpoint_json_is_caught(tmp_path):
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, small_state(), meta={"epoch": 3, "position": 12})
    text = (ck / "checkpoint.json").read_text()
    for old, new in (('"position": 12', '"position": 13'), ('"step": 0', '"step": 1'),
                     ('"epoch": 3', '"epoch": 2')):
        assert old in text
        (ck / "checkpoint.json").write_text(text.replace(old, new, 1))
        with pytest.raises(CorruptCheckpointError, match="checkpoint.json is corrupted: its sha256 is"):
            fnlight.load_checkpoint(ck)
    (ck / "checkpoint.json").write_text(text)
    fnlight.load_checkpoint(ck)


@settings(max_examples=40, deadline=None)
@given(bit=st.integers(0, 1 << 30))
def test_any_single_bit_flip_in_checkpoint_json_is_caught_or_changes_nothing(tmp_path_factory, bit):
    ck = tmp_path_factory.mktemp("flip") / "ck"
    state = small_state()
    fnlight.save_checkpoint(ck, state, meta={"epoch": 1, "position": 7, "note": "é"})
    want = fnlight.load_checkpoint(ck)
    raw = bytearray((ck / "checkpoint.json").read_bytes())
    bit %= len(raw) * 8
    raw[bit // 8] ^= 1 << (bit % 8)
    (ck / "checkpoint.json").write_bytes(bytes(raw))
    try:
        got = fnlight.load_checkpoint(ck)
    except CorruptCheckpointError:
        return
    assert tree_equal(got[0], want[0]) and got[1] == want[1]  # e.g. "\u00e9" -> "\u00E9": the same document


def test_a_checkpoint_json_without_checksum_from_an_older_release_loads(tmp_path):
    ck = tmp_path / "ck"
    state = small_state()
    fnlight.save_checkpoint(ck, state)
    doc = json.loads((ck / "checkpoint.json").read_text())
    del doc["doc_sha256"]
    (ck / "checkpoint.json").write_text(json.dumps(doc))
    assert tree_equal(fnlight.load_checkpoint(ck)[0], state)
    doc["doc_sha255"] = doc_checksum(doc)  # a flipped bit in the key's name is not an older release
    (ck / "checkpoint.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="no doc_sha256 but unknown fields"):
        fnlight.load_checkpoint(ck)


# -- names never collide -------------------------------------------------------------------------------------------


def same(a, b) -> bool:
    """Exactly equal trees: node types, keys (with their types and order), tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bytes(checkpoint_files._safetensors._bytes_of(a.contiguous()))
                == bytes(checkpoint_files._safetensors._bytes_of(b.contiguous())))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return [(type(k), k) for k in a] == [(type(k), k) for k in b] and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b and type(a) is type(b)


def test_colliding_paths_keep_both_values(tmp_path):
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    for tree in ({"a/b": a, "a": {"b": b}}, {1: a, "1": b}, {"%2F": a, "/": b}, {"__metadata__": a, "x": b},
                 {"a": [a, {"0": b, 0: c}], "a/0": d}, collections.OrderedDict([("z", a), ("y", b)])):
        fnlight.save_checkpoint(tmp_path / "ck", tree)
        got, _ = fnlight.load_checkpoint(tmp_path / "ck")
        assert same(got, tree), tree


def tensors():
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
              torch.bool, torch.complex64]
    return st.builds(
        lambda dtype, shape, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100)
        .to(dtype),
        st.sampled_from(dtypes), st.lists(st.integers(0, 3), max_size=3), st.integers(0, 2**16))


keys = st.one_of(st.text(alphabet="ab/%_1 .é", max_size=5), st.integers(-3, 3), st.just("__metadata__"))
leaves = st.one_of(tensors(), st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=4))
trees = st.recursive(leaves, lambda kids: st.one_of(
    st.dictionaries(keys, kids, max_size=4), st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.text(alphabet="ab/", max_size=3), kids, max_size=3).map(collections.OrderedDict)),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(tree=trees)
def test_any_tree_of_tensors_with_str_and_int_keys_round_trips_bitwise(tmp_path_factory, tree):
    ck = tmp_path_factory.mktemp("rt") / "ck"
    fnlight.save_checkpoint(ck, tree)
    got, _ = fnlight.load_checkpoint(ck)
    assert same(got, tree)


@pytest.mark.parametrize("tree, message", [
    ({1.5: torch.zeros(1)}, "keys must be str or int, found float"),
    ({True: torch.zeros(1)}, "keys must be str or int, found bool"),
    ({("a", 1): torch.zeros(1)}, "keys must be str or int, found tuple"),
    (collections.defaultdict(list, a=torch.zeros(1)), "cannot save a defaultdict"),
    ({"s": {1, 2}}, "cannot save a set at s"),
])
def test_trees_that_cannot_round_trip_are_refused_before_writing(tmp_path, tree, message):
    with pytest.raises(CheckpointError, match=message):
        fnlight.save_checkpoint(tmp_path / "ck", tree)
    assert not list(tmp_path.iterdir())


# -- a loaded state does not depend on the files -------------------------------------------------------------------


def test_a_loaded_state_survives_overwriting_and_truncating_its_files(tmp_path):
    state = small_state()
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, state)
    loaded, _ = fnlight.load_checkpoint(ck)
    f = ck / "tensors.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as out:  # in place, as `cp other ck/tensors.safetensors` does
        out.write(b"\0" * size)
    assert tree_equal(loaded, state)
    os.truncate(f, 0)  # a memory map of it would now raise SIGBUS on access
    assert tree_equal(loaded, state)
    loaded.params["0.weight"].add_(1)  # and the tensors are writable
    assert not torch.equal(loaded.params["0.weight"], state.params["0.weight"])


# -- readers see whole checkpoints; writers race without crashing --------------------------------------------------

RACE_WRITER = r"""
import sys, time, torch
from fnlight.train import checkpoint_files
import fnlight
checkpoint_files.SHARD_BYTES = 1 << 12  # 4 shards
import os
path, tag, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
end, i = time.monotonic() + 120, 0
while time.monotonic() < end and not os.path.exists(stop):
    i += 1
    v = float(tag * 1_000_000 + i)
    fnlight.save_checkpoint(path, {f"w{k}": torch.full((1024,), v) for k in range(4)}, meta={"v": v})
print(i, flush=True)
"""


@pytest.mark.slow
def test_loads_racing_two_writers_never_see_a_mix_or_a_false_error(tmp_path):
    ck = tmp_path / "ck"
    fnlight.save_checkpoint(ck, {f"w{k}": torch.full((1024,), -1.0) for k in range(4)}, meta={"v": -1.0})
    stop = tmp_path.parent / f"{tmp_path.name}.stop"
    writers = [subprocess.Popen([sys.executable, "-c", RACE_WRITER, str(ck), str(tag), str(stop)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in (1, 2)]
    loads, seen = 0, set()
    try:
        time.sleep(3)  # both writers are running
        while all(w.poll() is None for w in writers) and loads < 2000:
            state, meta = fnlight.load_checkpoint(ck)  # any error fails the test
            assert all(torch.equal(t, torch.full((1024,), meta["v"])) for t in state.values()), meta
            loads += 1
            seen.add(meta["v"])
    finally:
        stop.touch()
        outs = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], "\n".join(err[-3000:] for _, err in outs)
    assert loads >= 1000 and len(seen) > 10, (loads, len(seen))
    assert min(int(out) for out, _ in outs) > 10  # both wrote many times, neither crashed on the rename race
    fnlight.load_checkpoint(ck)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no .old- or .tmp- directory left


# -- out of space --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "sharded"])
def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_previous_checkpoint(tmp_path, mode, monkeypatch):
    if mode == "sharded":
        monkeypatch.setattr(checkpoint_files, "SHARD_BYTES", 1 << 19)
    small = {"w": torch.arange(1000.0)}
    big = {"w": torch.arange(1000.0), "big": torch.ones(1 << 20)}  # 4 MiB: more than the disk
    with small_disk(tmp_path) as disk:
        ck = disk / "run" / "ck"
        fnlight.save_checkpoint(ck, small)
        if mode == "async":
            writer = AsyncCheckpointer()
            writer.save(ck, big)
            with pytest.raises(OSError) as e:
                writer.wait()
            writer.close()
        else:
            with pytest.raises(OSError) as e:
                fnlight.save_checkpoint(ck, big)
        assert e.value.errno == errno.ENOSPC and str(ck) in str(e.value), e.value
        assert torch.equal(fnlight.load_checkpoint(ck)[0]["w"], small["w"])  # the previous one, intact
        assert sorted(p.name for p in ck.parent.iterdir()) == ["ck"]  # no temporary directory left
        assert fnlight_threads() == []
        fnlight.save_checkpoint(ck, {"w": torch.zeros(3)})  # the space is free again
        assert torch.equal(fnlight.load_checkpoint(ck)[0]["w"], torch.zeros(3))


# -- the Trainer's fallback works for every kind of damage --------------------------------------------------------

TRAINER_DAMAGE = {
    "json_bit_flip": lambda ck: (ck / "checkpoint.json").write_text(
        (ck / "checkpoint.json").read_text().replace('"position": ', '"position": 1', 1)),
    "json_not_utf8": lambda ck: (ck / "checkpoint.json").write_bytes(b"\xff\xfe"),
    "json_a_list": lambda ck: (ck / "checkpoint.json").write_text("[]"),
    "json_missing": lambda ck: (ck / "checkpoint.json").unlink(),
    "tensors_truncated": lambda ck: os.truncate(ck / "tensors.safetensors", 100),
    "tensors_fifo": lambda ck: ((ck / "tensors.safetensors").unlink(), os.mkfifo(ck / "tensors.safetensors")),
    "tensors_dangling": lambda ck: ((ck / "tensors.safetensors").unlink(),
                                    (ck / "tensors.safetensors").symlink_to(ck / "nowhere")),
    "stray_file": lambda ck: (ck / "optimizer.pt").write_bytes(b"pickle"),
}


@pytest.mark.parametrize("damage", sorted(TRAINER_DAMAGE))
def test_find_resumable_skips_every_kind_of_damage_to_the_previous_checkpoint(tmp_path, damage):
    state = small_state()
    for step in (1, 2, 3):
        fnlight.save_checkpoint(step_dir(tmp_path, step), state.replace(step=torch.tensor(step)),
                                meta={"epoch": 0, "position": step})
    TRAINER_DAMAGE[damage](step_dir(tmp_path, 3))
    found = find_resumable(tmp_path, like=state)
    assert found.path == step_dir(tmp_path, 2) and int(found.state.step) == 2 and found.meta["position"] == 2
    [(path, reason)] = found.skipped
    assert path == step_dir(tmp_path, 3) and "\n" not in reason
    line = found.message()
    assert line.startswith(f"skipped the damaged checkpoint {step_dir(tmp_path, 3)} (")
    assert line.endswith(f"; resuming from {step_dir(tmp_path, 2)}") and "\n" not in line


def test_find_resumable_raises_what_an_older_checkpoint_would_not_fix(tmp_path):
    state = small_state()
    fnlight.save_checkpoint(step_dir(tmp_path, 1), state, meta={"pipeline": {"fingerprint": "a" * 64}})
    with pytest.raises(CheckpointError, match="different data"):
        find_resumable(tmp_path, like=state, pipeline_fingerprint="b" * 64)
    other = fnlight.TrainState.create(mlp(din=7), fo.adam(1e-3))
    with pytest.raises(CheckpointError, match="does not match the expected state"):
        find_resumable(tmp_path, like=other)
    os.truncate(step_dir(tmp_path, 1) / "tensors.safetensors", 0)
    found = find_resumable(tmp_path, like=state)
    assert found.path is None and "no older checkpoint loads: starting from the given state" in found.message()


def test_the_trainer_resumes_past_a_flipped_bit_in_checkpoint_json(tmp_path, caplog):
    from .models import resume_setup

    dm, state, step, eval_step = resume_setup()

    def trainer(**kw):
        return fnlight.Trainer(max_epochs=2, run_dir=tmp_path / "run", ckpt_dir=tmp_path / "ck", loggers=(), **kw)

    full = fnlight.Trainer(max_epochs=2, run_dir=tmp_path / "full", loggers=()).fit(state, step, dm, eval_step)
    trainer(max_steps=7, ckpt_every_n_steps=3).fit(state, step, dm, eval_step)
    newest = step_dir(tmp_path / "ck", 7)
    text = (newest / "checkpoint.json").read_text()
    assert '"step": 7' in text
    (newest / "checkpoint.json").write_text(text.replace('"step": 7', '"step": 6', 1))
    resumed = trainer(ckpt_every_n_steps=3).fit(state, step, dm, eval_step)
    assert tree_equal(resumed.state, full.state)
    [line] = [r.getMessage() for r in caplog.records if r.name == "fnlight"]
    assert line.startswith(f"skipped the damaged checkpoint {newest} ({newest / 'checkpoint.json'} is corrupted")
    assert line.endswith(f"resuming from {step_dir(tmp_path / 'ck', 6)} (step 6, epoch 1, batch 1)")


def test_an_overwrite_killed_between_its_renames_loads_the_previous_checkpoint(tmp_path, caplog):
    state = small_state()
    fnlight.save_checkpoint(tmp_path / "ck", state)
    (tmp_path / "ck").rename(tmp_path / ".ck.old-0123")  # what the writer had done when it was killed
    loaded, _ = fnlight.load_checkpoint(tmp_path / "ck", like=state)
    assert tree_equal(loaded, state)
    assert any("loaded the previous checkpoint" in r.getMessage() and ".ck.old-0123" in r.getMessage()
               for r in caplog.records if r.name == "fnlight")
    fnlight.save_checkpoint(tmp_path / "ck", state)  # the next save puts a checkpoint in place
    assert (tmp_path / "ck" / "checkpoint.json").is_file()
