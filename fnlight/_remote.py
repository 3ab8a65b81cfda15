"""Remote locations (``s3://``, ``gs://``, ``memory://``, ...) through fsspec: the one module that imports it.

A run directory, a checkpoints directory or a checkpoint given as a URL becomes a :class:`RemotePath`; a
plain path (or a ``file://`` URL) stays a :class:`pathlib.Path` and keeps the local code path (POSIX renames,
fsync), untouched by fsspec. :func:`location` makes the choice; code that handles both kinds asks
``isinstance(p, RemotePath)`` once and calls the few helpers here.

Object stores have no rename and no append, so what is written remotely is written as whole objects: a
checkpoint as its files plus a manifest written last (``train/checkpoint_remote.py``), a log as chunk objects
(``train/remote_logs.py``). A single object written with one PUT is atomic on S3 and GCS: a reader sees the
old one or the new one, never a part.

Credentials are never handled here: fsspec and the store's own client read them from the environment or their
config files (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``, gcloud's
application credentials; ``FSSPEC_S3_*`` variables for s3fs options). A URL that carries a password
(``ftp://user:pw@host/...``) is shown with the password replaced by ``***`` in every path and message.

Example:
    >>> location("s3://bucket/runs/a") / "checkpoints"
    RemotePath('s3://bucket/runs/a/checkpoints')
    >>> location("runs/a")
    PosixPath('runs/a')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _protocol(p: object) -> str | None:
    m = _URL.match(p) if isinstance(p, str) else None
    return m.group(1).lower() if m else None


def redact(url: str) -> str:
    """``url`` with the password of its user part (``scheme://user:password@host``) replaced by ``***``.

    Example:
        >>> redact("ftp://me:hunter2@host/x")
        'ftp://me:***@host/x'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return url.replace(parts.netloc, f"{netloc[0].split(':', 1)[0]}:***@{netloc[1]}", 1)


@dataclass(frozen=True)
class RemotePath:
    """A file or directory in a remote file system, by URL: ``/`` joins, ``name`` and ``parent`` as in
    pathlib; ``fs`` and ``path`` are the fsspec file system and its path (no I/O until they are used).

    Example:
        >>> p = RemotePath("s3://bucket/runs/a") / "checkpoints" / "step_000000100"
        >>> p.name, p.parent
        ('step_000000100', RemotePath('s3://bucket/runs/a/checkpoints'))
    """

    url: str
    _fs: list[Any] = field(default_factory=list, compare=False, repr=False)  # a cache: [(fs, path)] once used

    def __post_init__(self) -> None:
        if _protocol(self.url) is None:
            raise ValueError(f"not a URL: {redact(self.url)!r}")
        object.__setattr__(self, "url", self.url.rstrip("/") if not self.url.endswith("://") else self.url)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if "/" in self.url.split("://", 1)[1] else ""

    @property
    def parent(self) -> RemotePath:
        head, sep, rest = self.url.partition("://")
        return RemotePath(f"{head}{sep}{rest.rsplit('/', 1)[0]}") if "/" in rest else self

    @property
    def protocol(self) -> str:
        return _protocol(self.url) or ""

    def _resolved(self) -> tuple[Any, str]:
        if not self._fs:
            try:
                import fsspec
            except ImportError:
                raise ImportError(f"{self} is a remote location: that needs fsspec (and, for {self.protocol}://, "
                                  "its package, e.g. s3fs or gcsfs): pip install 'fnlight[remote]'") from None
            try:
                try:  # listings are never cached: other processes write (and a cached listing hides their files)
                    fs, path = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
                except TypeError:  # a file system that takes no such option
                    fs, path = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as e:
                raise ImportError(f"cannot open {self}: {e} (pip install 'fnlight[remote]' installs fsspec and "
                                  "s3fs; gcsfs for gs://)") from None
            self._fs.append((fs, path))
        return self._fs[0]

    @property
    def fs(self) -> Any:
        """The fsspec file system (created on first use; fsspec caches it per protocol and options)."""
        return self._resolved()[0]

    @property
    def path(self) -> str:
        """The path within :attr:`fs` (for s3: ``bucket/key``)."""
        return self._resolved()[1]

    def child(self, fs_path: str) -> RemotePath:
        """The RemotePath of a path that ``fs`` listed under this one."""
        rel = fs_path.rstrip("/")[len(self.path.rstrip("/")):].lstrip("/")
        return self / rel if rel else self

    # -- I/O: whole objects only -------------------------------------------------------------------
    def listing(self) -> dict[str, dict[str, Any]]:
        """The entries directly inside this directory, fresh (no cached listing): name -> fsspec info."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries
                if e["name"].rstrip("/") != self.path.rstrip("/")}

    def files(self) -> dict[str, int]:
        """Every file under this directory (recursively), fresh: path relative to it -> size in bytes."""
        self.fs.invalidate_cache(self.path)
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        base = self.path.rstrip("/") + "/"
        return {k[len(base):]: int(v.get("size") or 0) for k, v in found.items()
                if k.startswith(base) and v.get("type", "file") == "file"}

    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.isfile(self.path))

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One object, written whole (atomic on S3/GCS: readers see the old object or this one)."""
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Remove everything under this directory (missing files are fine)."""
        for rel in sorted(self.files(), reverse=True):
            (self / rel).unlink()

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"RemotePath({redact(self.url)!r})"

    def __hash__(self) -> int:
        return hash(self.url)


Location = Path | RemotePath


def is_remote(p: object) -> bool:
    """Whether ``p`` is a remote location: a RemotePath, or a URL other than ``file://``.

    Example:
        >>> is_remote("s3://b/x"), is_remote("file:///tmp/x"), is_remote("runs/a")
        (True, False, False)
    """
    return isinstance(p, RemotePath) or _protocol(p) not in (None, "file")


def location(p: str | os.PathLike[str] | RemotePath) -> Location:
    """``p`` as a Path (a local path, or a ``file://`` URL) or a RemotePath (any other URL).

    Example:
        >>> location("file:///tmp/run"), location("memory://run")
        (PosixPath('/tmp/run'), RemotePath('memory://run'))
    """
    if isinstance(p, RemotePath | Path):
        return p
    proto = _protocol(p)
    if proto == "file":
        return Path(str(p)[len("file://"):])
    if proto is not None:
        return RemotePath(str(p))
    return Path(p)
