"""Checkpoint file layout: shards, the atomic write, the verified read.

A checkpoint is a directory ``<path>/`` holding:

- ``tensors.safetensors``: every tensor, by its name (see ``checkpoint_tree``).
  A state of more than ``SHARD_BYTES`` is split into up to ``MAX_SHARDS``
  whole-tensor shards, ``tensors-00001-of-0000N.safetensors`` ... (each a
  standard safetensors file), written, hashed and checked in parallel;
- ``checkpoint.json``: the structure, step, key, the caller's ``meta``,
  versions, the checksum of each tensor file (``tensor_files``: name ->
  ``"xxh128:<hex>"``, format version 3; versions 1 and 2, still read, recorded
  sha256s: ``tensors_sha256`` for one file, ``tensor_files`` for shards) and
  ``doc_sha256``, the sha256 of the document itself (its other fields in
  compact JSON), so a flipped bit that keeps it valid JSON is caught.

**Writing** (:func:`write`) never removes what it did not write: a path that
exists and is not a checkpoint (a file, a symlink, a directory with any other
entry) is refused before a byte is written. Files go into a temp directory
next to the target, are fsynced with it, and the directory is renamed into
place; an existing checkpoint is first renamed aside (``.<name>.old-<id>``)
and deleted after. Writers racing for one path retry instead of failing;
a failed write removes its temp directory and puts back what it moved aside.

**Reading** (:func:`read`) opens the directory once and reads every file
relative to that handle, so all files come from one checkpoint even while
another process replaces it; when the checkpoint is replaced or removed mid-read
(the handle no longer is the directory at ``path``), the read starts over.
Only regular files are read (a FIFO, a directory or a dangling symlink is a
clear error; a symlink to a regular file is followed and verified like one).
Every file is copied into memory while its checksum is computed, and any
malformation is a :class:`CorruptCheckpointError` naming the file.

Example:
    >>> write(Path("runs/a/step_100"), {"w": torch.zeros(3)}, {"structure": {"tensor": "w"}, "meta": {}})
    PosixPath('runs/a/step_100')
    >>> doc, tensors, where = read(Path("runs/a/step_100"))
    >>> tensors["w"]
    tensor([0., 0., 0.])
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._io import fsync
from . import _safetensors
from .checkpoint_tree import CheckpointError, CorruptCheckpointError

FORMAT = "fnlight-checkpoint"
# 1: one ``tensors.safetensors`` and its ``tensors_sha256``; 2: shards and their sha256s in ``tensor_files``;
# 3 (what is written now): ``tensor_files`` with XXH128 checksums (see ``_safetensors``), one file or shards
VERSION = 3
TENSORS, META = "tensors.safetensors", "checkpoint.json"
SHARD_BYTES = 1 << 27  # 128 MiB: above this a state is sharded, so files are written and hashed in parallel
MAX_SHARDS = 16  # ...into at most this many files (bigger shards beyond 2 GiB)
MAX_META_BYTES = 1 << 30  # a checkpoint.json bigger than this is refused unread
TENSOR_FILE = re.compile(r"tensors(-[0-9]{5}-of-[0-9]{5})?\.safetensors")
_CHECKSUM = {1: re.compile(r"[0-9a-f]{64}"), 2: re.compile(r"[0-9a-f]{64}"), 3: re.compile(r"xxh128:[0-9a-f]{32}")}
_KEYS = {"format", "version", "structure", "meta", "versions", "step", "key", "tensors_sha256", "tensor_files",
         "doc_sha256"}
_RETRIES = 200  # reads restarted because a writer replaced the checkpoint meanwhile (each after a short sleep)


def doc_checksum(doc: dict[str, Any]) -> str:
    """The sha256 of ``doc`` without its ``doc_sha256`` (compact JSON, key order kept: what is recorded)."""
    body = {k: v for k, v in doc.items() if k != "doc_sha256"}
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def finish(doc: dict[str, Any], checksums: dict[str, str]) -> dict[str, Any]:
    """``doc`` as recorded: its format, its version (from the kind of ``checksums``, tensor file name ->
    checksum, see ``_safetensors.kind``), the checksums, and its own ``doc_sha256``.

    Example:
        >>> finish({"structure": {}}, {TENSORS: "xxh128:" + "0" * 32})["version"]
        3
    """
    if all(_safetensors.kind(c) == _safetensors.XXH128 for c in checksums.values()):
        doc = {"format": FORMAT, "version": 3, **doc, "tensor_files": checksums}
    elif list(checksums) == [TENSORS]:  # sha256 (remote manifests record it): the versions before 3
        doc = {"format": FORMAT, "version": 1, **doc, "tensors_sha256": checksums[TENSORS]}
    else:
        doc = {"format": FORMAT, "version": 2, **doc, "tensor_files": checksums}
    return {**doc, "doc_sha256": doc_checksum(doc)}


def write_doc(tmp: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as ``tmp/checkpoint.json`` and fsync it and ``tmp`` (the last step before ``install``)."""
    with open(tmp / META, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync(tmp)


def each(fn: Callable[[str], Any], names: list[str]) -> list[Any]:
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


def shards(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
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


# -- writing ----------------------------------------------------------------------------------------------------


def check_replaceable(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is absent, an empty directory, or a checkpoint directory
    (only ``checkpoint.json`` and tensor files, none of them a directory): the only things a save may replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is a symlink (to {os.readlink(path)}); "
                              "nothing was written. Save to its target, or remove the link first")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"cannot save a checkpoint to {path}: a file is there and a checkpoint is a "
                              "directory; nothing was written or removed. Choose another path, or remove the file")
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:  # another writer moved it aside meanwhile
        return
    foreign = []
    for name in names:
        try:
            is_dir = stat.S_ISDIR(os.lstat(path / name).st_mode)
        except FileNotFoundError:
            continue
        if is_dir or (name != META and not TENSOR_FILE.fullmatch(name)):
            foreign.append(name + "/" if is_dir else name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is a directory that is not a fnlight "
                              f"checkpoint (it holds {shown}); nothing was written or removed. Choose another "
                              "path (e.g. a step_<n> directory inside it), or remove it yourself")


def install(tmp: Path, path: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``path``, replacing the checkpoint there (if any)."""
    for _ in range(1000):  # only other writers of the same path make it go round
        try:
            os.rename(tmp, path)  # replaces nothing or an empty directory, atomically
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        check_replaceable(path)  # another process may have put something else there meanwhile
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(path, old)  # the rename below cannot replace a non-empty directory
        except FileNotFoundError:
            continue  # another writer moved it first
        try:
            os.rename(tmp, path)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                with contextlib.suppress(OSError):
                    os.rename(old, path)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)  # another writer's newer checkpoint is there: go round
            continue
        fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    raise CheckpointError(f"could not install the checkpoint {path}: other writers kept replacing it")


def write(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Write contiguous host ``tensors`` and ``doc`` atomically as the checkpoint ``path``; returns ``path``.

    ``doc`` gets ``format``, ``version``, the tensor files' checksums and its own ``doc_sha256`` here.
    A failed write (a full disk, no permission) raises an OSError naming the checkpoint, leaves no temp
    file behind, and leaves what was at ``path`` as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            files = shards(tensors)
            # each file is checksummed while it is written (see _safetensors.write)
            checksums = each(lambda name: _safetensors.write(tmp / name, files[name]), list(files))
            write_doc(tmp, finish(doc, dict(zip(files, checksums, strict=True))))
            install(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing the checkpoint {path} (what was there is "
                               "unchanged)") from e
    return path


# -- reading ----------------------------------------------------------------------------------------------------


class _Replaced(Exception):
    """The directory being read was renamed or removed by a writer: read again."""


class _Missing(CorruptCheckpointError):
    """A file of the checkpoint is not there: damage, or a directory being deleted while it is read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _open_regular(dfd: int, path: Path, name: str) -> tuple[int, int]:
    """Open ``name`` in the directory ``dfd`` for reading: (fd, size). Only regular files (or links to one)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)  # a FIFO must not block
    except FileNotFoundError:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError:
            raise _Missing(f"{path} is incomplete: {name} missing") from None
        raise CorruptCheckpointError(f"{path / name} is a dangling symlink (to {target}): its content is not here "
                                     "(an unfetched git-annex or DVC file? `git annex get` / `dvc pull` it)") from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot open {path / name}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path / name} is a {_kind(st.st_mode)}, not a regular file; a checkpoint's "
                                     "files are regular files (or symlinks to them)")
    return fd, st.st_size


def _read_doc(dfd: int, path: Path) -> dict[str, Any]:
    fd, size = _open_regular(dfd, path, META)
    try:
        if size > MAX_META_BYTES:
            raise CorruptCheckpointError(f"{path / META} is {size} bytes, more than any checkpoint's metadata")
        raw = _safetensors.read_fd(fd, size)[0].numpy().tobytes()
    finally:
        os.close(fd)
    return parse_doc(raw, path)


def parse_doc(raw: bytes, path: Any) -> dict[str, Any]:
    """The checked document of the ``checkpoint.json`` bytes ``raw`` of the checkpoint ``path`` (a Path or a
    remote location, for messages): its format, version, own checksum and the fields every checkpoint has."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(f"{path / META} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{path / META} is corrupted: a {type(doc).__name__}, not a JSON object")
    recorded = doc.get("doc_sha256")
    if doc.get("format") != FORMAT:
        if recorded is not None or any(k.startswith("doc_sha") for k in doc):  # ours, damaged
            raise CorruptCheckpointError(f"{path / META} is corrupted: format {doc.get('format')!r}")
        raise CheckpointError(f"{path} is not a fnlight checkpoint ({META} has format {doc.get('format')!r})")
    try:
        actual = doc_checksum(doc)
    except RecursionError:
        raise CorruptCheckpointError(f"{path / META} is malformed: it nests too deeply") from None
    intact = recorded == actual if recorded is not None else not (doc.keys() - _KEYS)
    if doc.get("version") not in _CHECKSUM:
        if intact:
            raise CheckpointError(f"{path} is not a fnlight checkpoint of version 1 to {VERSION} (version "
                                  f"{doc.get('version')!r}): it was written by a newer fnlight")
        raise CorruptCheckpointError(f"{path / META} is corrupted: version {doc.get('version')!r} is unknown and its "
                                     "checksum does not match")
    if not intact:
        what = f"its sha256 is {actual}, it records {recorded}" if recorded is not None else \
            f"it has no doc_sha256 but unknown fields {sorted(doc.keys() - _KEYS)}"
        raise CorruptCheckpointError(f"{path / META} is corrupted: {what}")
    key = doc.get("key", 0)
    if "structure" not in doc or not isinstance(doc.get("meta", {}), dict) or type(doc.get("step", 0)) is not int \
            or not (type(key) is int or isinstance(key, list) and key and all(type(k) is int for k in key)):
        raise CorruptCheckpointError(f"{path / META} is malformed: it needs a structure, meta must be an object, "
                                     "step an integer and key an integer (or a list of them, an ensemble's)")
    return doc


def recorded_files(path: Any, doc: dict[str, Any], present: set[str]) -> dict[str, str]:
    """The tensor files ``doc`` records (name -> checksum), checked against the directory's files."""
    files = {TENSORS: doc.get("tensors_sha256")} if doc["version"] == 1 else doc.get("tensor_files")
    checksum = _CHECKSUM[doc["version"]]
    if not isinstance(files, dict) or not files or not all(isinstance(k, str) and TENSOR_FILE.fullmatch(k) and
                                                           isinstance(v, str) and checksum.fullmatch(v)
                                                           for k, v in files.items()):
        raise CorruptCheckpointError(f"{path / META} has no valid list of tensor files: {str(files)[:300]}")
    if missing := sorted(files.keys() - present):
        raise _Missing(f"{path} is incomplete: {', '.join(missing)} missing")
    if extra := sorted(present - files.keys() - {META}):
        raise CorruptCheckpointError(f"refusing to load {path}: {extra} are not among the tensor files its "
                                     f"{META} records ({sorted(files)})")
    return files


def _read_tensor_file(dfd: int, path: Path, name: str, recorded: str) -> dict[str, torch.Tensor]:
    fd, size = _open_regular(dfd, path, name)
    try:
        raw, actual = _safetensors.read_fd(fd, size, _safetensors.kind(recorded))
    finally:
        os.close(fd)
    return parse_tensor_file(raw, actual, recorded, path, name)


def parse_tensor_file(raw: torch.Tensor, actual: str, recorded: str, path: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the tensor file ``name`` of the checkpoint ``path``, read into ``raw`` with the checksum
    ``actual``: CorruptCheckpointError unless that is the ``recorded`` one and the bytes are valid safetensors."""
    if actual != recorded:
        algorithm = _safetensors.kind(recorded)
        raise CorruptCheckpointError(f"{path / name} is corrupted: its {algorithm} is "
                                     f"{actual.removeprefix(algorithm + ':')}, the checkpoint recorded "
                                     f"{recorded.removeprefix(algorithm + ':')}")
    try:
        return _safetensors.parse(raw)
    except ValueError as e:
        raise CorruptCheckpointError(f"{path / name} is not a valid safetensors file: {e}") from None


def join_shards(path: Any, parts: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of the shard files ``names`` (read as ``parts``) of the checkpoint ``path``, as one dict;
    CorruptCheckpointError when two shards hold a tensor of the same name."""
    tensors: dict[str, torch.Tensor] = {}
    for name, part in zip(names, parts, strict=True):
        if twice := sorted(part.keys() & tensors.keys()):
            raise CorruptCheckpointError(f"{path / name} repeats tensors of another shard: {twice[:3]}")
        tensors.update(part)
    return tensors


def _read_dir(dfd: int, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    present = set(os.listdir(dfd))
    others = sorted(n for n in present if n != META and not TENSOR_FILE.fullmatch(n))
    if others:
        raise CorruptCheckpointError(f"refusing to load {path}: it holds files a fnlight checkpoint never has "
                                     f"({others[:10]}); fnlight checkpoints contain no pickles, and nothing here "
                                     "was read")
    if META not in present:
        raise _Missing(f"{path} is incomplete: {META} missing")
    doc = _read_doc(dfd, path)
    files = recorded_files(path, doc, present)
    return doc, join_shards(path, each(lambda name: _read_tensor_file(dfd, path, name, files[name]), list(files)),
                            list(files))


def _still_there(dfd: int, path: Path) -> bool:
    """Whether the open directory ``dfd`` still is the one at ``path`` (not renamed aside, not removed)."""
    st = os.fstat(dfd)
    try:
        now = os.stat(path)
    except OSError:
        return False
    return st.st_nlink > 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _read_once(path: Path, main: Path | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One read of the directory ``path``; _Replaced when a writer replaced or deleted it meanwhile
    (``main``: the checkpoint that ``path``, left aside by an overwrite, stands in for)."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path} is a dangling symlink (to {os.readlink(path)}), not a checkpoint "
                                  "directory") from None
        raise _Replaced from None
    except NotADirectoryError:
        raise CheckpointError(f"{path} is not a checkpoint directory (it is a file)") from None
    except OSError as e:
        raise CheckpointError(f"cannot open the checkpoint {path}: {e.strerror}") from None
    try:
        try:
            return _read_dir(dfd, path)
        except (CheckpointError, OSError, EOFError) as e:
            # What we saw is no evidence of damage if the directory is no longer the checkpoint: replaced,
            # or being deleted (files vanish before their directory: give a deletion a moment to finish).
            vanishing = isinstance(e, _Missing | EOFError | FileNotFoundError)
            for _ in range(25 if vanishing else 1):
                if not _still_there(dfd, path) or (main is not None and os.path.lexists(main)):
                    raise _Replaced from e
                if vanishing:
                    time.sleep(0.02)
            if isinstance(e, CheckpointError):
                raise
            raise CorruptCheckpointError(f"cannot read the checkpoint {path}: {e}") from None
    finally:
        os.close(dfd)


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """The verified document and tensors (in memory, by name) of the checkpoint ``path``, and where they
    were read: ``path``, or the previous checkpoint that an overwrite killed between its two renames left at
    ``.<name>.old-<id>``. Raises CheckpointError (CorruptCheckpointError for damage)."""
    for attempt in range(_RETRIES):
        if attempt:
            time.sleep(min(0.001 * attempt, 0.02))
        try:
            return (*_read_once(path), path)
        except _Replaced:
            pass
        if not os.path.lexists(path):
            # Between a writer's two renames, or a writer killed there: the previous checkpoint is aside.
            aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=_mtime) if path.parent.is_dir() else []
            for old in reversed(aside):
                with contextlib.suppress(_Replaced):
                    return (*_read_once(old, main=path), old)
            if not aside and attempt >= 2:
                raise CheckpointError(f"{path} is not a checkpoint directory (nothing is there)")
    raise CorruptCheckpointError(f"{path} kept being replaced while it was read ({_RETRIES} attempts)")
