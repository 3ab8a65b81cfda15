"""The ``download`` source: the pipeline's one side effect, made safe.

A file is fetched once into the cache root, verified against its sha256 and
only then renamed into place, so a reader never sees a partial or wrong file:
- the body streams into a process-unique temp file next to the target,
  is fsynced, hashed and checked, then ``os.replace``-d (atomic on POSIX);
- a file lock makes concurrent processes download once (the others wait and
  then verify what the first one wrote); correctness never rests on the lock
  alone, because the temp file + verify + rename protocol is safe without it;
- transient failures (connection errors, HTTP 5xx/429, truncated bodies) are
  retried with exponential backoff; a 4xx or a checksum mismatch is not.

Example:
    >>> import fnlight.data as fd
    >>> src = fd.download("https://example.org/iris.csv", sha256="ab12...",
    ...                   read=fd.read_csv(label=-1))
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from filelock import FileLock

from .._io import fsync, sha256_file
from .dataset import Dataset, Splits
from .readers import Reader, read_csv
from .sources import Source
from .stage import Context

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded (after retries, for transient errors)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


class _Transient(Exception):
    """A failure worth retrying."""


_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file (memoized per path, size and mtime)."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _verified:
        _verified[memo] = sha256_file(path)
    return _verified[memo]


def _progress(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False,
                disable=not sys.stderr.isatty())


@dataclass(frozen=True)
class Download(Source):
    name: ClassVar[str] = "download"
    url: str
    sha256: str | None
    filename: str
    read: Reader
    root: str | None = None
    retries: int = 4
    timeout_s: float = 30.0
    backoff_s: float = 0.5

    def describe(self) -> dict[str, Any]:
        # Where the file is cached and how patiently it is fetched do not change
        # the data, so they stay out of the description (and the fingerprint).
        return {"stage": self.name, "url": self.url, "sha256": self.sha256,
                "filename": self.filename, "read": self.read.describe()}

    def path(self, ctx: Context) -> Path:
        """Where the verified file lives: ``<root>/downloads/<sha256[:16]>/<filename>``."""
        root = Path(self.root) if self.root is not None else ctx.root
        return root / "downloads" / (self.sha256 or "unverified")[:16] / self.filename

    def prepare(self, ctx: Context) -> None:
        self.fetch(ctx)

    def load(self, ctx: Context) -> Dataset | Splits:
        return self.read(self.fetch(ctx))

    def fetch(self, ctx: Context) -> Path:
        """Download the file unless a verified copy exists; return its path."""
        path = self.path(ctx)
        if self.sha256 is not None and path.exists() and file_sha256(path) == self.sha256:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            # Another process may have finished while we waited for the lock.
            if self.sha256 is not None and path.exists() and file_sha256(path) == self.sha256:
                return path
            last: Exception | None = None
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
                try:
                    self._fetch_once(path)
                    return path
                except _Transient as e:
                    last = e
            raise DownloadError(
                f"could not download {self.url} after {self.retries + 1} attempts; last error: {last}"
            )

    def _fetch_once(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            digest = self._stream(tmp)
            if self.sha256 is None:
                raise ChecksumError(
                    f"download({self.url!r}) needs sha256= to verify the file. The file just "
                    f"fetched has sha256={digest!r}; pass that if you trust this source."
                )
            if digest != self.sha256:
                raise ChecksumError(
                    f"checksum mismatch for {self.url}: expected sha256 {self.sha256}, "
                    f"got {digest}. Nothing was kept; check the URL or the expected digest."
                )
            os.replace(tmp, path)
            fsync(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _stream(self, tmp: Path) -> str:
        h = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None else None
                with open(tmp, "xb") as f, _progress(total, self.filename) as bar:
                    while block := resp.read(_CHUNK):
                        f.write(block)
                        h.update(block)
                        received += len(block)
                        bar.update(len(block))
                    f.flush()
                    os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise DownloadError(f"HTTP {e.code} {e.reason} for {self.url}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, FileNotFoundError | PermissionError | IsADirectoryError):
                raise DownloadError(f"cannot read {self.url}: {e.reason}") from None
            raise _Transient(f"URLError: {e.reason}") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        if total is not None and received != total:
            raise _Transient(f"truncated transfer: received {received} of {total} bytes")
        return h.hexdigest()


def download(url: str, sha256: str | None = None, filename: str | None = None,
             read: Reader | None = None, *, root: str | os.PathLike | None = None,
             retries: int = 4, timeout_s: float = 30.0, backoff_s: float = 0.5) -> Download:
    """A source that downloads ``url`` (``http(s)://`` or ``file://``) and reads it.

    Args:
        url: where the file is.
        sha256: its expected hex digest. Required in practice: without it the
            download fails with an error that tells you the actual digest.
        filename: the name to store it under (default: the URL's last path part).
        read: how to turn the file into data (default ``read_csv(label=-1)``).
        root: the cache root (default ``$FNLIGHT_HOME`` or ``~/.cache/fnlight``,
            or the DataModule's ``root``).
        retries, timeout_s, backoff_s: retry policy for transient failures.

    Example:
        >>> src = download("https://example.org/iris.csv.gz", sha256="0f3a...",
        ...                read=read_csv(label=-1))
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise ValueError(f"download supports http://, https:// and file:// URLs, got {url!r}")
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    name = filename or urllib.parse.unquote(Path(parsed.path).name) or "data"
    if "/" in name or name in (".", ".."):
        raise ValueError(f"filename must be a plain file name, got {name!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return Download(url, sha256, name, read if read is not None else read_csv(),
                    None if root is None else str(root), retries, timeout_s, backoff_s)
