"""Checkpoints: the public API (save, load, save in the background, find where to resume).

A checkpoint is a directory: the state's tensors in safetensors files and a
``checkpoint.json`` with the structure, step, key, the caller's ``meta``,
versions and checksums of every file and of itself. Three modules share the
work:

- :mod:`fnlight.train.checkpoint_tree`: a state tree <-> tensor names and a
  JSON structure (injective names; no pickles; hostile structures refused);
- :mod:`fnlight.train.checkpoint_files`: the layout on disk: shards, the
  atomic write that never removes what it did not write, the verified read
  that sees one whole checkpoint even while another process replaces it;
- this module: :func:`save_checkpoint`, :func:`load_checkpoint`,
  :class:`AsyncCheckpointer`, and :func:`find_resumable` (what the Trainer
  resumes from, skipping damaged checkpoints).

Errors: :class:`CheckpointError` for what cannot be saved or does not match
(another model, other data); its subclass :class:`CorruptCheckpointError` for
every kind of damage or malformation (a failed checksum, a missing or
truncated file, bad JSON, a FIFO or a dangling symlink in place of a file),
always naming the file and what is wrong.

Example:
    >>> state = fnlight.TrainState.create(torch.nn.Linear(2, 1), fnlight.optim.adam(1e-3), seed=0)
    >>> fnlight.save_checkpoint("runs/a/step_100", state, meta={"epoch": 3})
    PosixPath('runs/a/step_100')
    >>> state2, meta = fnlight.load_checkpoint("runs/a/step_100", like=state)
    >>> fnlight.tree.tree_equal(state2, state), meta
    (True, {'epoch': 3, 'step': 0})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._remote import Location, RemotePath, location
from . import checkpoint_files as files
from . import checkpoint_remote as remote
from . import checkpoint_zero
from .checkpoint_files import FORMAT, MAX_SHARDS, META, TENSORS, VERSION
from .checkpoint_tree import (
    NAMED_TUPLES,
    CheckpointError,
    CorruptCheckpointError,
    decode,
    differences,
    encode,
    register_named_tuple,
    tensor_names,
)
from .ensemble import scalar_step
from .state import TrainState

__all__ = [
    "FORMAT", "MAX_SHARDS", "META", "NAMED_TUPLES", "TENSORS", "VERSION", "AsyncCheckpointer", "CheckpointError",
    "CorruptCheckpointError", "Resumable", "find_resumable", "list_checkpoints", "load_checkpoint",
    "register_named_tuple", "remove_checkpoint", "save_checkpoint", "step_dir", "tensor_names",
]

log = logging.getLogger("fnlight")


def step_dir(ckpt_dir: str | os.PathLike | RemotePath, step: int) -> Location:
    """Where the Trainer keeps the checkpoint of ``step``: ``<ckpt_dir>/step_<step:09d>`` (a Path, or a
    RemotePath when ``ckpt_dir`` is a URL such as ``s3://bucket/run``).

    Example:
        >>> step_dir("runs/a/ckpt", 100)
        PosixPath('runs/a/ckpt/step_000000100')
    """
    return location(ckpt_dir) / f"step_{int(step):09d}"


def list_checkpoints(ckpt_dir: str | os.PathLike | RemotePath) -> list[Location]:
    """The Trainer's ``step_<n>`` checkpoint directories in ``ckpt_dir``, oldest first. In a remote
    ``ckpt_dir``, only committed ones (with their manifest): one a writer is still writing, or was killed
    writing, is not listed.

    Example:
        >>> for step in (10, 200, 30):
        ...     _ = save_checkpoint(f"runs/a/ckpt/step_{step:09d}", {"w": torch.zeros(1)})
        >>> list_checkpoints("runs/a/ckpt")[-1]   # the newest
        PosixPath('runs/a/ckpt/step_000000200')
    """
    where = location(ckpt_dir)
    if isinstance(where, RemotePath):
        return list(remote.list_checkpoints(where))
    found = [p for p in where.glob("step_*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def remove_checkpoint(path: Location) -> None:
    """Delete a checkpoint directory (a remote one's manifest first, so it stops existing at once); a missing
    one is fine.

    Example:
        ```python
        remove_checkpoint(step_dir("s3://bucket/run/checkpoints", 100))
        ```
    """
    if isinstance(path, RemotePath):
        remote.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _write(path: Location, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Location:
    if isinstance(path, RemotePath):
        return remote.write(path, tensors, doc)
    return files.write(path, tensors, doc)


def prepare(state: Any, meta: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state's tensors by name, and the JSON document (``checkpoint_files.write`` adds the checksums).

    Example:
        >>> tensors, doc = prepare({"w": torch.ones(2)}, {"epoch": 1})
        >>> list(tensors), sorted(doc), doc["meta"]
        (['w'], ['meta', 'structure', 'versions'], {'epoch': 1})
    """
    from .. import __version__

    tensors, structure = encode(state)
    try:
        meta = json.loads(json.dumps(meta or {}))  # JSON-able now (and a copy), not at load time
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta must be JSON-able: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict, got {type(meta).__name__}")
    doc: dict[str, Any] = {
        "structure": structure, "meta": meta,
        "versions": {"fnlight": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
    }
    if isinstance(state, TrainState):
        # a stacked state (an ensemble) records its members' common step and each member's key
        doc["step"] = scalar_step(state)
        doc["key"] = int(state.key) if state.key.dim() == 0 else state.key.tolist()
    return tensors, doc


def save_checkpoint(path: str | os.PathLike | RemotePath, state: Any, *, meta: dict[str, Any] | None = None
                    ) -> Location:
    """Write ``state`` (a TrainState or any tree of tensors) and JSON-able ``meta`` to the directory ``path``.

    Atomic: a reader sees the previous checkpoint at ``path`` (if any) or this one, never a part.
    ``path`` may be absent, an empty directory or a checkpoint (which is replaced); anything else
    there (a file, a run directory) is a CheckpointError and nothing is written or removed. A failed
    write (e.g. a full disk) raises an OSError naming ``path`` and leaves no temporary file behind.
    See :class:`AsyncCheckpointer` to write in the background.

    ``path`` may be a URL (``s3://``, ``gs://``, ``memory://``...; needs ``fnlight[remote]``): object stores
    have no rename, so the files are written and then committed by a manifest (sizes and sha256s of every
    file) written last; until then, and if the writer dies first, readers see no checkpoint at ``path``.
    Overwriting a remote checkpoint removes the old one first (see ``checkpoint_remote``).

    Example:
        >>> save_checkpoint("runs/a/step_100", {"w": torch.ones(3)}, meta={"epoch": 3, "position": 12})
        PosixPath('runs/a/step_100')

        A URL works the same way (``pip install 'fnlight[remote]'``):

        ```python
        save_checkpoint("s3://bucket/runs/a/step_100", state)
        ```
    """
    tensors, doc = prepare(state, meta)
    return _write(location(path), {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, doc)


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
        ```python
        with AsyncCheckpointer() as ckpt:
            for step in range(1000):
                state, _ = train_step(state, next(batches))
                if step % 100 == 0:
                    ckpt.save(f"runs/a/step_{step}", state)   # returns after the host copy
        ```
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

    def save(self, path: str | os.PathLike | RemotePath, state: Any, *, meta: dict[str, Any] | None = None,
             then: Callable[[Location], Any] | None = None) -> None:
        """Copy ``state`` to host memory now and write it to ``path`` in the background;
        ``then(path)`` runs in the background after the write (e.g. pruning old checkpoints).
        A ``path`` that holds something other than a checkpoint is an error at once (and again
        when the write starts, in case something appeared there meanwhile)."""
        self.wait()
        where = location(path)
        if isinstance(where, Path):
            with contextlib.suppress(OSError):  # (an OSError, e.g. a parent that is a file, comes from the write)
                files.check_replaceable(where)
        tensors, doc = prepare(state, meta)
        host = self._stage(tensors)

        def job() -> None:
            _write(where, host, doc)
            if then is not None:
                then(where)

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


def load_checkpoint(path: str | os.PathLike | RemotePath, like: Any = None, device: torch.device | str | None = None, *,
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
    format is refused before anything is read. ``checkpoint.json`` and every
    tensor file are checked against their recorded sha256s (shards in
    parallel), and the tensors are copies in memory: nothing done to the files
    afterwards changes them. While another process replaces the checkpoint,
    the load returns the previous one or the new one, whole. Damage of any
    kind raises :class:`CorruptCheckpointError` naming the file.

    A remote ``path`` (a URL) is read through its manifest: a checkpoint without one does not exist
    (CorruptCheckpointError: incomplete), every file is checked against the size and sha256 it records,
    and a file it does not record is refused.

    Example:
        >>> _ = save_checkpoint("runs/a/step_100", {"w": torch.ones(3)}, meta={"pipeline": {"fingerprint": "ab"}})
        >>> state, meta = load_checkpoint("runs/a/step_100", like={"w": torch.zeros(3)}, pipeline_fingerprint="ab")
        >>> state["w"]
        tensor([1., 1., 1.])
    """
    path = location(path)
    if isinstance(path, RemotePath):
        (doc, tensors), where = remote.read(path), path
    else:
        doc, tensors, where = files.read(path)
    tensors = checkpoint_zero.merge(doc, tensors, where)  # the ranks' pieces of a sharded optimizer state
    if where != path:
        log.warning("%s was being replaced when its writer stopped; loaded the previous checkpoint %s", path, where)
    meta = doc.get("meta", {})
    pipeline = meta.get("pipeline")
    saved_fp = pipeline.get("fingerprint") if isinstance(pipeline, dict) else None
    if pipeline_fingerprint is not None and saved_fp is not None and saved_fp != pipeline_fingerprint \
            and not allow_pipeline_change:
        raise CheckpointError(
            f"the checkpoint was made with data pipeline {str(saved_fp)[:16]}..., but this run's is "
            f"{pipeline_fingerprint[:16]}...: resuming on different data would mix them. Pass "
            "allow_pipeline_change=True if that is what you want."
        )
    if device is not None and torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    try:
        state = decode(doc["structure"], tensors)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{where / META} is malformed: {e}") from None
    if like is not None:
        problems = differences(state, like)
        if problems:
            raise CheckpointError(f"the checkpoint at {path} does not match the expected state:\n  "
                                  + "\n  ".join(problems))
    if "step" in doc:
        meta = {**meta, "step": doc["step"]}
    return state, meta


class Resumable(NamedTuple):
    """What :func:`find_resumable` found: the newest checkpoint that loads (``path``, ``state``, ``meta``;
    all None when none does) and the newer ones it skipped, ``(path, reason)`` each, newest first."""

    path: Location | None
    state: Any
    meta: dict[str, Any] | None
    skipped: tuple[tuple[Location, str], ...]

    def message(self) -> str | None:
        """One line saying what was skipped and why, and where the run resumes (None when nothing was skipped).

        Example:
            ```python
            find_resumable("runs/a/ckpt", like=state).message()
            # 'skipped the damaged checkpoint runs/a/ckpt/step_000000200 (... is corrupted: ...); resuming from
            # runs/a/ckpt/step_000000100'
            ```
        """
        if not self.skipped:
            return None
        what = "; ".join(f"{p} ({reason})" for p, reason in self.skipped)
        s = "s" if len(self.skipped) > 1 else ""
        where = f"resuming from {self.path}" if self.path is not None else \
            "no older checkpoint loads: starting from the given state"
        return f"skipped the damaged checkpoint{s} {what}; {where}"


def find_resumable(ckpt_dir: str | os.PathLike | RemotePath, like: Any = None,
                   device: torch.device | str | None = None, *, pipeline_fingerprint: str | None = None,
                   allow_pipeline_change: bool = False) -> Resumable:
    """Load the newest ``step_<n>`` checkpoint in ``ckpt_dir`` that is intact, skipping damaged ones.

    Every :class:`CorruptCheckpointError` (a failed checksum of a tensor file or of ``checkpoint.json``,
    a missing, truncated, malformed or non-regular file) skips to the next older checkpoint and is
    recorded in ``skipped``; any other :class:`CheckpointError` (a state that does not match ``like``,
    other data) is raised, since an older checkpoint would not fix it. Arguments as :func:`load_checkpoint`.

    Example:
        ```python
        found = find_resumable("runs/a/ckpt", like=state, pipeline_fingerprint=dm.fingerprint)
        if found.message(): print(found.message())
        state = found.state if found.path is not None else state
        ```
    """
    skipped: list[tuple[Location, str]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state, meta = load_checkpoint(path, like, device, pipeline_fingerprint=pipeline_fingerprint,
                                          allow_pipeline_change=allow_pipeline_change)
        except CorruptCheckpointError as e:
            skipped.append((path, " ".join(str(e).split())))
            continue
        except CheckpointError:
            gone = not remote.exists(path) if isinstance(path, RemotePath) else not os.path.lexists(path)
            if gone:  # deleted meanwhile (another run's keep_last): not damage
                continue
            raise
        return Resumable(path, state, meta, tuple(skipped))
    return Resumable(None, None, None, tuple(skipped))
