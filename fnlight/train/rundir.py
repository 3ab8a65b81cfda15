"""The run directory's bookkeeping: new ``runs/version_<n>`` directories, setting an earlier run aside
(``fnlight fit --no-resume``), and the record of where a run resumed (``resumes.jsonl``, which
``fnlight plot`` marks on the curves). Local paths and object-store URLs alike.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .._remote import Location, RemotePath, location

__all__ = ["RESUMES", "next_version", "read_resumes", "record_resume", "set_aside"]

log = logging.getLogger("fnlight")


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
    items = sorted(p for p in run.iterdir() if p.name != "previous") if run.is_dir() else []
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
