"""Checkpoints: a directory with the state's tensors in safetensors and a JSON file.

Layout of ``<path>/``:

- ``tensors.safetensors``: every tensor of the state, named by its tree path
  (``params/0.weight``, ``opt_state/0/mu/0.weight``, ...). A state of more
  than ``SHARD_BYTES`` is split into up to ``MAX_SHARDS`` whole-tensor shards,
  ``tensors-00001-of-0000N.safetensors`` ... (each a standard safetensors
  file), so that writing, hashing and checking them runs on several cores;
- ``checkpoint.json``: the state's structure (node types and field names, so
  it is rebuilt without unpickling anything), step, key, the caller's ``meta``
  (epoch, position, callback states, pipeline fingerprint and description...),
  fnlight and torch versions, and the sha256 of each tensor file (what
  ``sha256sum`` prints for it): ``tensors_sha256`` for one file (format
  version 1, which older fnlight releases read too), ``tensor_files``
  (name -> sha256) for shards (version 2).

Writing is atomic: all files go into a temp directory next to the target,
are fsynced with the directory, and the directory is renamed into place; a
reader sees the old checkpoint or the new one, never a half-written one.
Loading never unpickles: a directory holding any other file is refused, and a
tensor file whose sha256 differs from the recorded one is an error.

Why shards: one sha256 stream runs at about 1.4 GB/s, which made checking a
large checkpoint slower than ``torch.load`` reading it; shards are hashed in
parallel (and each shard while it is written), one thread per shard up to the
number of cores.

Example:
    >>> fnlight.save_checkpoint("runs/a/step_100", state, meta={"epoch": 3})
    >>> state2, meta = fnlight.load_checkpoint("runs/a/step_100", like=state)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import threading
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .. import optim as _optim
from .._io import fsync
from . import _safetensors
from .state import TrainState

FORMAT = "fnlight-checkpoint"
# Version 1: one ``tensors.safetensors`` and its ``tensors_sha256``; what is still written when the state fits
# one file, so that older fnlight releases read it. Version 2: shards, listed in ``tensor_files``.
VERSION = 2
TENSORS, META = "tensors.safetensors", "checkpoint.json"
SHARD_BYTES = 1 << 27  # 128 MiB: above this a state is sharded, so files are written and hashed in parallel
MAX_SHARDS = 16  # ...into at most this many files (bigger shards beyond 2 GiB)
_TENSOR_FILE = re.compile(r"tensors(-[0-9]{5}-of-[0-9]{5})?\.safetensors")

#: Named tuples a checkpoint may contain (optimizer states); looked up by name, never imported from the file.
NAMED_TUPLES: dict[str, type] = {
    cls.__name__: cls
    for cls in _optim.STATE_TYPES
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, unsafe, or does not match what it should."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's files are missing, unreadable or fail their checksum."""


def register_named_tuple(cls: type) -> type:
    """Allow a custom optimizer-state NamedTuple in checkpoints. Example: ``register_named_tuple(MyState)``."""
    NAMED_TUPLES[cls.__name__] = cls
    return cls


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Where the Trainer keeps the checkpoint of ``step``: ``<ckpt_dir>/step_<step:09d>``."""
    return Path(ckpt_dir) / f"step_{int(step):09d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The Trainer's ``step_<n>`` checkpoint directories in ``ckpt_dir``, oldest first."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# -- structure <-> JSON ---------------------------------------------------------

def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node
        return {"tensor": path}
    if isinstance(node, TrainState):
        return {"TrainState": {f: _encode(getattr(node, f), f"{path}{f}/", tensors)
                               for f in ("params", "buffers", "opt_state", "step", "key")}}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        name = type(node).__name__
        if NAMED_TUPLES.get(name) is not type(node):
            raise CheckpointError(f"cannot save a {name}: register it with "
                                  "fnlight.train.checkpoint.register_named_tuple")
        return {"namedtuple": name, "fields": {f: _encode(getattr(node, f), f"{path}{f}/", tensors)
                                              for f in node._fields}}
    if isinstance(node, dict):
        return {"dict": {str(k): _encode(v, f"{path}{k}/", tensors) for k, v in node.items()}}
    if isinstance(node, (tuple, list)):
        return {type(node).__name__: [_encode(v, f"{path}{i}/", tensors) for i, v in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise CheckpointError(f"cannot save a {type(node).__name__} at {path or '<root>'}: a state holds tensors, "
                          "containers of them, and plain numbers or strings")


def _decode(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "namedtuple" in spec:
        kind, body = "namedtuple", spec
    else:
        (kind, body), = spec.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "value":
        return body
    if kind == "TrainState":
        return TrainState(**{f: _decode(v, tensors) for f, v in body.items()})
    if kind == "namedtuple":
        cls = NAMED_TUPLES.get(body["namedtuple"])
        if cls is None:
            raise CheckpointError(f"the checkpoint holds an unknown {body['namedtuple']}; register it with "
                                  "fnlight.train.checkpoint.register_named_tuple")
        return cls(**{f: _decode(v, tensors) for f, v in body["fields"].items()})
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    if kind in ("tuple", "list"):
        items = [_decode(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"unknown node {kind!r} in the checkpoint's structure")


# -- saving -------------------------------------------------------------------

def _prepare(state: Any, meta: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state's tensors by name, and the JSON document (but the tensor files' sha256s; ``_write``
    sets those, and the version: 1 for one file, 2 for shards)."""
    from .. import __version__

    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {
        "format": FORMAT, "structure": _encode(state, "", tensors),
        "meta": json.loads(json.dumps(meta or {})),  # JSON-able now (and a copy), not at load time
        "versions": {"fnlight": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if isinstance(state, TrainState):
        doc["step"], doc["key"] = int(state.step), int(state.key)
    return tensors, doc


def _each(fn: Callable[[str], Any], names: list[str]) -> list[Any]:
    """``[fn(name) for name in names]``, on up to one thread per usable core.

    Plain threads, not a ThreadPoolExecutor: an executor refuses new work once the
    interpreter is shutting down, and a write that an AsyncCheckpointer started just
    before the program ended must still complete (as a one-file write always did).
    """
    if len(names) == 1:
        return [fn(names[0])]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    results: list[Any] = [None] * len(names)
    errors: list[BaseException] = []
    todo = iter(range(len(names)))
    lock = threading.Lock()

    def work() -> None:
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(names[i])
            except BaseException as e:  # re-raised below, in the caller's thread
                errors.append(e)

    threads = [threading.Thread(target=work, name="fnlight-shard") for _ in range(min(len(names), cores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _shards(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split ``tensors`` (in order, whole tensors) into files of roughly equal size: file name -> tensors.

    Depends only on the tensors' sizes, not on the machine, so the same state always gives the same files.
    """
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    n = min(MAX_SHARDS, max(1, math.ceil(sum(sizes) / SHARD_BYTES)))
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    start, per_shard = 0, max(1, sum(sizes) / n)
    for (name, t), size in zip(tensors.items(), sizes, strict=True):
        groups[min(n - 1, int(start / per_shard))][name] = t  # the shard where this tensor's bytes begin
        start += size
    groups = [g for g in groups if g] or [{}]  # a huge tensor can leave a shard empty
    if len(groups) == 1:
        return {TENSORS: groups[0]}
    return {f"tensors-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def _write(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Write host tensors and ``doc`` atomically to ``path`` (temp directory, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        files = _shards(tensors)
        # each file is hashed while it is written (see _safetensors.write)
        hashes = _each(lambda name: _safetensors.write(tmp / name, files[name]), list(files))
        if list(files) == [TENSORS]:
            doc = {"format": FORMAT, "version": 1, **doc, "tensors_sha256": hashes[0]}
        else:
            doc = {"format": FORMAT, "version": 2, **doc, "tensor_files": dict(zip(files, hashes, strict=True))}
        with open(tmp / META, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync(tmp)
        old = None
        if path.exists():  # move the old one aside: the rename below cannot replace a directory
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
        os.rename(tmp, path)
        fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, state: Any, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (a TrainState or any tree of tensors) and JSON-able ``meta`` to the directory ``path``.

    Atomic: a reader sees the previous checkpoint at ``path`` (if any) or this one, never a part.
    See :class:`AsyncCheckpointer` to write in the background.

    Example:
        >>> save_checkpoint("runs/a/step_100", state, meta={"epoch": 3, "position": 12})
    """
    tensors, doc = _prepare(state, meta)
    return _write(Path(path), {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, doc)


class AsyncCheckpointer:
    """Saves checkpoints in a background thread: ``save`` blocks only while the
    state's tensors are copied to host memory, then the file is written (and
    fsynced, and renamed into place) while training goes on.

    At most one write is in flight: a ``save`` first waits for the previous one.
    The host copies go into staging buffers reused from one save to the next
    (pinned memory for CUDA tensors), so after the first save they cost a copy,
    not an allocation; they hold one copy of the state in host memory. A write
    that fails raises its error from the next ``save``, ``wait`` or ``close``.
    Killing the process mid-write leaves the previous checkpoints intact (the
    write is atomic, as with :func:`save_checkpoint`).

    Example:
        >>> with AsyncCheckpointer() as ckpt:
        ...     for step in range(1000):
        ...         state, _ = train_step(state, next(batches))
        ...         if step % 100 == 0:
        ...             ckpt.save(f"runs/a/step_{step}", state)   # returns after the host copy
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnlight-checkpoint")
        self._pending: Future[Any] | None = None
        self._staging: dict[str, torch.Tensor] = {}

    def _stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        staging, on_cuda = {}, False
        for name, t in tensors.items():
            buf = self._staging.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                pin = t.is_cuda and torch.cuda.is_available()
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            on_cuda |= t.is_cuda
            staging[name] = buf
        if on_cuda:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
        self._staging = staging
        return staging

    def save(self, path: str | os.PathLike, state: Any, *, meta: dict[str, Any] | None = None,
             then: Callable[[Path], Any] | None = None) -> None:
        """Copy ``state`` to host memory now and write it to ``path`` in the background;
        ``then(path)`` runs in the background after the write (e.g. pruning old checkpoints)."""
        self.wait()
        tensors, doc = _prepare(state, meta)
        host = self._stage(tensors)

        def job() -> None:
            _write(Path(path), host, doc)
            if then is not None:
                then(Path(path))

        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last write and stop the background thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._staging = {}

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- loading -------------------------------------------------------------------

def _differences(got: Any, like: Any, path: str = "") -> list[str]:
    """Every structural, shape and dtype difference between two trees."""
    out: list[str] = []
    if isinstance(like, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path or '<root>'}: expected a tensor, found {type(got).__name__}"]
        if got.shape != like.shape:
            out.append(f"{path}: shape {tuple(got.shape)} in the checkpoint, {tuple(like.shape)} expected")
        if got.dtype != like.dtype:
            out.append(f"{path}: dtype {got.dtype} in the checkpoint, {like.dtype} expected")
        return out
    if type(got) is not type(like):
        return [f"{path or '<root>'}: {type(got).__name__} in the checkpoint, {type(like).__name__} expected"]
    if isinstance(like, TrainState):
        for f in ("params", "buffers", "opt_state", "step", "key"):
            out += _differences(getattr(got, f), getattr(like, f), f"{path}{f}/")
    elif isinstance(like, dict):
        missing, extra = sorted(set(like) - set(got)), sorted(set(got) - set(like))
        if missing:
            out.append(f"{path or '<root>'}: missing {missing}")
        if extra:
            out.append(f"{path or '<root>'}: unexpected {extra}")
        for k in like:
            if k in got:
                out += _differences(got[k], like[k], f"{path}{k}/")
    elif isinstance(like, (tuple, list)):
        if len(got) != len(like):
            out.append(f"{path or '<root>'}: {len(got)} items in the checkpoint, {len(like)} expected")
        for i, (a, b) in enumerate(zip(got, like, strict=False)):
            out += _differences(a, b, f"{path}{i}/")
    return out


def _recorded_files(path: Path, doc: dict[str, Any]) -> dict[str, str]:
    """The tensor files ``doc`` records (name -> sha256), checked against the directory's files."""
    if doc["version"] == 1:
        files = {TENSORS: doc.get("tensors_sha256")}
    else:
        files = doc.get("tensor_files")
        if not isinstance(files, dict) or not files or not all(
                isinstance(k, str) and _TENSOR_FILE.fullmatch(k) and isinstance(v, str) for k, v in files.items()):
            raise CorruptCheckpointError(f"{path / META} has no valid list of tensor files: {files!r}")
    present = {p.name for p in path.iterdir() if p.name != META}
    if missing := sorted(files.keys() - present):
        raise CorruptCheckpointError(f"{path} is incomplete: {', '.join(missing)} missing")
    if extra := sorted(present - files.keys()):
        raise CheckpointError(f"refusing to load {path}: {extra} are not among the tensor files its "
                              f"{META} records ({sorted(files)})")
    return files


def load_checkpoint(path: str | os.PathLike, like: Any = None, device: torch.device | str | None = None, *,
                    pipeline_fingerprint: str | None = None,
                    allow_pipeline_change: bool = False) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, meta)``.

    Args:
        path: the checkpoint directory.
        like: a state to compare with: every difference of structure, shape or
            dtype is reported in one error.
        device: where to put the tensors (default: the CPU).
        pipeline_fingerprint: the fingerprint of the data the run uses now;
            a checkpoint made with other data is an error, because silently
            resuming on different data is how leaks happen...
        allow_pipeline_change: ...unless this is True.

    Nothing in the directory is unpickled; any file besides those of the
    format is refused before anything is read. Every tensor file is checked
    against its recorded sha256 (several shards in parallel).

    Example:
        >>> state, meta = load_checkpoint("runs/a/step_100", like=state, pipeline_fingerprint=dm.fingerprint)
    """
    path = Path(path)
    if not path.is_dir():
        # An overwrite killed between its two renames leaves the previous (complete) checkpoint aside.
        previous = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if not previous:
            raise CheckpointError(f"{path} is not a checkpoint directory")
        warnings.warn(f"{path} was being replaced when its writer stopped; loading the previous checkpoint "
                      f"{previous[-1]}", stacklevel=2)
        path = previous[-1]
    others = sorted(p.name for p in path.iterdir() if p.name != META and not _TENSOR_FILE.fullmatch(p.name))
    if others:
        raise CheckpointError(f"refusing to load {path}: it holds files a fnlight checkpoint never has ({others}); "
                              "fnlight checkpoints contain no pickles, and nothing here was read")
    try:
        doc = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path / META} is missing or not JSON ({e})") from None
    if doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        raise CheckpointError(f"{path} is not a fnlight checkpoint of version 1 or {VERSION} "
                              f"(format {doc.get('format')!r}, version {doc.get('version')!r})")
    files = _recorded_files(path, doc)
    read = _each(lambda name: _safetensors.read(path / name), list(files))  # each hashed while read
    for (name, recorded), (_, actual) in zip(files.items(), read, strict=True):
        if actual != recorded:
            raise CorruptCheckpointError(f"{path / name} is corrupted: its sha256 is {actual}, the checkpoint "
                                         f"recorded {recorded}")
    meta = doc["meta"]
    saved_fp = meta.get("pipeline", {}).get("fingerprint") if isinstance(meta.get("pipeline"), dict) else None
    if pipeline_fingerprint is not None and saved_fp is not None and saved_fp != pipeline_fingerprint \
            and not allow_pipeline_change:
        raise CheckpointError(
            f"the checkpoint was made with data pipeline {saved_fp[:16]}..., but this run's is "
            f"{pipeline_fingerprint[:16]}...: resuming on different data would mix them. Pass "
            "allow_pipeline_change=True if that is what you want."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, (raw, _) in zip(files, read, strict=True):
        try:
            part = _safetensors.parse(raw)
        except ValueError as e:
            raise CorruptCheckpointError(f"{path / name} is not a valid safetensors file: {e}") from None
        if twice := sorted(part.keys() & tensors.keys()):
            raise CorruptCheckpointError(f"{path / name} repeats tensors of another shard: {twice[:3]}")
        tensors.update(part)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    state = _decode(doc["structure"], tensors)
    if like is not None:
        problems = _differences(state, like)
        if problems:
            raise CheckpointError(f"the checkpoint at {path} does not match the expected state:\n  "
                                  + "\n  ".join(problems))
    with contextlib.suppress(KeyError):
        meta = {**meta, "step": doc["step"]}
    return state, meta
