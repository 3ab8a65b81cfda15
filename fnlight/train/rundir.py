"""The run directory's bookkeeping: new ``runs/version_<n>`` directories, one run at a time in a
directory (:func:`claim`), setting an earlier run aside (``fnlight fit --no-resume``), and the record
of where a run resumed (``resumes.jsonl``, which ``fnlight plot`` marks on the curves). Local paths
and object-store URLs alike (an object store's directories are not claimed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .. import distributed
from .._remote import Location, RemotePath, location

__all__ = ["LOCK", "RESUMES", "RunDirInUse", "claim", "next_version", "read_resumes", "record_resume", "set_aside"]

log = logging.getLogger("fnlight")

#: The file a training process holds locked in its run directory (see :func:`claim`).
LOCK = ".fnlight.lock"


class RunDirInUse(RuntimeError):
    """Another process is training in this run directory (it holds the directory's :data:`LOCK`)."""


_held: dict[str, list[Any]] = {}  # resolved run directory -> [its FileLock, how many claims of this process]
_held_guard = threading.Lock()


@contextlib.contextmanager
def claim(run_dir: Location) -> Iterator[None]:
    """Hold ``run_dir`` for this process while the block runs: a second process that claims it meanwhile
    gets :class:`RunDirInUse` at once (``Trainer.fit`` and ``fnlight fit`` claim their run directory, so
    two runs of the same command never write one directory's logs and checkpoints together).

    The claim is an OS lock (``flock``) on ``run_dir/.fnlight.lock``: a process killed with ``kill -9``
    holds nothing, so there is never a stale lock to delete. Claims nest within a process. With several
    ranks, rank 0 claims and every rank gets its answer (a collective). An object-store ``run_dir``
    is not claimed.

    Example:
        >>> import subprocess, sys
        >>> with claim(Path("runs/a")):
        ...     other = [sys.executable, "-c", "from fnlight.train.rundir import claim; claim('runs/a').__enter__()"]
        ...     "RunDirInUse" in subprocess.run(other, capture_output=True, text=True).stderr
        True
    """
    run = location(run_dir)
    key, error = None, None
    if distributed.rank() == 0 and isinstance(run, Path):
        try:
            key = _acquire(run)
        except RunDirInUse as e:
            error = str(e)
    if distributed.world_size() > 1:
        error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirInUse(error)
    try:
        yield
    finally:
        if key is not None:
            _release(key)


def _acquire(run: Path) -> str:
    key = str(run.resolve())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            return key
        run.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run / LOCK), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirInUse(f"{run} is in use: another process is training there (it holds {run / LOCK}); wait "
                              "for it to end, or give another run directory (--run-dir)") from None
        _held[key] = [lock, 1]
        return key


def _release(key: str) -> None:
    with _held_guard:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            entry[0].release()


#: One JSON line per resume in the run directory (what ``fnlight plot`` marks on the curves).
RESUMES = "resumes.jsonl"


def record_resume(run_dir: Location, step: int, epoch: int, position: int, checkpoint: Location | None) -> None:
    """Append where a run resumed to ``<run_dir>/resumes.jsonl`` (one whole line per write, never fatal:
    a full disk costs the mark, not the run).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> record_resume(d, step=30, epoch=2, position=0, checkpoint=d / "ckpt" / "step_000000030")
        >>> read_resumes(d)[0]["step"]
        30
    """
    line = json.dumps({"step": step, "epoch": epoch, "position": position,
                       "checkpoint": str(checkpoint) if checkpoint is not None else None,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    where = run_dir / RESUMES if isinstance(run_dir, RemotePath) else Path(run_dir) / RESUMES
    try:
        if isinstance(where, RemotePath):  # an object store has no append: the object is rewritten whole
            where.write_text((where.read_text() if where.is_file() else "") + line)
            return
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("could not record the resume in %s: %s", where, e)


def read_resumes(run_dir: Location) -> list[dict[str, Any]]:
    """The resumes :func:`record_resume` recorded in ``run_dir``, oldest first (damaged lines skipped)."""
    try:
        where = run_dir / RESUMES if isinstance(run_dir, RemotePath) else Path(run_dir) / RESUMES
        text = where.read_text(errors="replace") if isinstance(where, Path) else where.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("epoch"), int):
            out.append(row)
    return out


def next_version(root: str | os.PathLike) -> Path:
    """A new directory ``root/version_<n>``, n one more than the largest existing (as Lightning): where a run
    without a ``run_dir`` goes.

    Example:
        >>> for n in range(3):
        ...     Path(f"runs/version_{n}").mkdir(parents=True)
        >>> next_version("runs")
        PosixPath('runs/version_3')
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        path = root / f"version_{n}"
        try:
            path.mkdir()  # atomic: two runs never share a directory
            return path
        except FileExistsError:
            n += 1


def set_aside(run_dir: str | os.PathLike) -> Path | None:
    """Move everything in ``run_dir`` into ``run_dir/previous/<n>/`` (n counting up from 0), so that a new run
    can start there while the old one stays loadable (``fnlight test --ckpt run_dir/previous/0``). What
    ``fnlight fit --no-resume`` does. Returns where it went; None when there was nothing to move.

    Example:
        >>> Path("runs/mlp").mkdir(parents=True)
        >>> _ = Path("runs/mlp/metrics.jsonl").write_text("")
        >>> set_aside("runs/mlp")
        PosixPath('runs/mlp/previous/0')
    """
    run = location(run_dir)
    if isinstance(run, RemotePath):
        return _set_aside_remote(run)
    items = sorted(p for p in run.iterdir() if p.name not in ("previous", LOCK)) if run.is_dir() else []
    if not items:
        return None
    n = 0
    while True:
        dest = run / "previous" / str(n)
        try:
            dest.mkdir(parents=True)  # atomic: two runs never share it
            break
        except FileExistsError:
            n += 1
    for p in items:
        os.rename(p, dest / p.name)  # the same file system: nothing is copied, nothing half-moved
    return dest


def _set_aside_remote(run: RemotePath) -> RemotePath | None:
    """set_aside in an object store: each file is copied to ``previous/<n>/`` (server-side) before it is
    deleted, checkpoints' manifests last, so a kill midway loses nothing (the next call moves what is left)."""
    files = {rel: size for rel, size in run.files().items() if not rel.startswith("previous/")}
    if not files:
        return None
    taken = {int(rel.split("/")[1]) for rel in run.files() if rel.startswith("previous/") and
             rel.split("/")[1].isdigit()}
    dest = run / "previous" / str(max(taken, default=-1) + 1)
    order = sorted(files, key=lambda rel: (rel.endswith("/manifest.json"), rel))  # a copy is committed last
    for rel in order:
        run.fs.copy((run / rel).path, (dest / rel).path)
    for rel in reversed(order):  # manifests first: a checkpoint stops existing before its files go
        (run / rel).unlink()
    return dest
