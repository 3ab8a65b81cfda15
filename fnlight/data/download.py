"""The ``download`` source: the pipeline's one side effect, made safe.

A file is fetched once into the cache root, verified against its sha256 and
only then renamed into place, so a reader never sees a partial or wrong file:
- the body streams into a process-unique temp file next to the target,
  is fsynced, hashed and checked, then ``os.replace``-d (atomic on POSIX);
- a file lock makes concurrent processes download once (the others wait and
  then verify what the first one wrote); correctness never rests on the lock
  alone, because the temp file + verify + rename protocol is safe without it;
- transient failures (connection errors, HTTP 5xx/429, truncated bodies, an
  attempt that outlives ``deadline_s``) are retried with exponential backoff;
  a 4xx, a checksum mismatch or a local write error (a full disk) is not;
- the content is identified by its sha256: the description (and so the
  pipeline's fingerprint) holds the URL without its query string, so a
  re-signed URL (S3, GCS) of the same file keeps the fingerprint and a run
  resumes; credentials in a URL (``user:pass@``, query values) never appear
  in a description, a ``repr`` or an error message (they are written ``***``);
  ``user:pass@`` is sent as HTTP basic authentication.

Example:
    ```python
    import fnlight.data as fd
    src = fd.download("https://example.org/iris.csv", sha256="ab12...",
                      read=fd.read_csv(label=-1))
    ```
"""

from __future__ import annotations

import base64
import contextlib
import errno
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


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the user info and every query value.

    Example:
        >>> redact("https://me:pw@host/a.csv?X-Amz-Signature=abc&v=2")
        'https://***@host/a.csv?X-Amz-Signature=***&v=***'
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{kv.partition('=')[0]}=***" if "=" in kv else "***" for kv in parts.query.split("&")) \
        if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, "***" if parts.fragment else ""))


def _identity(url: str) -> str:
    """What identifies a file whose sha256 is known: the URL without user info, query string and fragment."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _request(url: str) -> urllib.request.Request | str:
    """A request for ``url``; ``user:pass@`` in it becomes a basic Authorization header."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    plain = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return urllib.request.Request(plain, headers={"Authorization": f"Basic {token}"})


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
    deadline_s: float | None = 3600.0

    def __repr__(self) -> str:
        return (f"Download(url={redact(self.url)!r}, sha256={self.sha256!r}, filename={self.filename!r}, "
                f"read={self.read!r})")

    def describe(self) -> dict[str, Any]:
        # Where the file is cached and how patiently it is fetched do not change
        # the data, so they stay out of the description (and the fingerprint);
        # with a sha256 the content is known, so neither does a re-signed query string.
        url = _identity(self.url) if self.sha256 is not None else redact(self.url)
        return {"stage": self.name, "url": url, "sha256": self.sha256,
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
                f"could not download {redact(self.url)} after {self.retries + 1} attempts; last error: {last}"
            )

    def _fetch_once(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            digest = self._stream(tmp)
            if self.sha256 is None:
                raise ChecksumError(
                    f"download({redact(self.url)!r}) needs sha256= to verify the file. The file just "
                    f"fetched has sha256={digest!r}; pass that if you trust this source."
                )
            if digest != self.sha256:
                raise ChecksumError(
                    f"checksum mismatch for {redact(self.url)}: expected sha256 {self.sha256}, "
                    f"got {digest}. Nothing was kept; check the URL or the expected digest."
                )
            os.replace(tmp, path)
            fsync(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _stream(self, tmp: Path) -> str:
        h = hashlib.sha256()
        received, start = 0, time.monotonic()
        shown = redact(self.url)
        try:
            with urllib.request.urlopen(_request(self.url), timeout=self.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None else None
                read = getattr(resp, "read1", resp.read)  # what has arrived: a trickle cannot hide the deadline
                with self._local(tmp, shown), open(tmp, "xb") as f, _progress(total, self.filename) as bar:
                    while block := read(_CHUNK):
                        f.write(block)
                        h.update(block)
                        received += len(block)
                        bar.update(len(block))
                        if self.deadline_s is not None and time.monotonic() - start > self.deadline_s:
                            raise _Transient(f"the attempt outlived deadline_s={self.deadline_s:g}s (received "
                                             f"{received} of {total if total is not None else '?'} bytes)")
                    f.flush()
                    os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise DownloadError(f"HTTP {e.code} {e.reason} for {shown}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, FileNotFoundError | PermissionError | IsADirectoryError):
                raise DownloadError(f"cannot read {shown}: {e.reason}") from None
            raise _Transient(f"URLError: {e.reason}") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        if total is not None and received != total:
            raise _Transient(f"truncated transfer: received {received} of {total} bytes")
        return h.hexdigest()

    @contextlib.contextmanager
    def _local(self, tmp: Path, shown: str) -> Any:
        """Turn an error of the local file (a full disk, no permission) into a DownloadError naming both ends."""
        try:
            yield
        except (ConnectionError, TimeoutError):
            raise
        except OSError as e:
            if e.filename is None and not isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError) \
                    and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                raise  # a network error from the socket
            raise DownloadError(f"cannot write {tmp.parent / self.filename} (downloading {shown}): "
                                f"{e.strerror or e}; nothing was kept") from None


def download(url: str, sha256: str | None = None, filename: str | None = None,
             read: Reader | None = None, *, root: str | os.PathLike | None = None,
             retries: int = 4, timeout_s: float = 30.0, backoff_s: float = 0.5,
             deadline_s: float | None = 3600.0) -> Download:
    """A source that downloads ``url`` (``http(s)://`` or ``file://``) and reads it.

    Args:
        url: where the file is.
        sha256: its expected hex digest. Required in practice: without it the
            download fails with an error that tells you the actual digest.
        filename: the name to store it under (default: the URL's last path part).
        read: how to turn the file into data (default ``read_csv(label=-1)``).
        root: the cache root (default ``$FNLIGHT_HOME`` or ``~/.cache/fnlight``,
            or the DataModule's ``root``).
        retries, timeout_s, backoff_s: retry policy for transient failures
            (``timeout_s`` bounds each wait for bytes from the server).
        deadline_s: how long one attempt may take in all (a server that
            trickles bytes cannot keep it alive longer; it ends at most
            ``timeout_s`` later); then it is retried. None: no limit.

    Example:
        ```python
        src = download("https://example.org/iris.csv.gz", sha256="0f3a...",
                       read=read_csv(label=-1))
        ```
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise ValueError(f"download supports http://, https:// and file:// URLs, got {redact(url)!r}")
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    name = filename or urllib.parse.unquote(Path(parsed.path).name) or "data"
    if "/" in name or name in (".", ".."):
        raise ValueError(f"filename must be a plain file name, got {name!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if deadline_s is not None and deadline_s <= 0:
        raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s}")
    return Download(url, sha256, name, read if read is not None else read_csv(),
                    None if root is None else str(root), retries, timeout_s, backoff_s, deadline_s)
