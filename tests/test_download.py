"""``fnlight.data.download`` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fnlight
import fnlight.data as fd
from fnlight.data.download import Download

from .conftest import serving

CSV = b"1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,10,2\n"
CSV_SHA = hashlib.sha256(CSV).hexdigest()
WRONG_SHA = "0" * 64


@dataclass(frozen=True)
class Reply:
    """One response: ``status``, ``body`` (sent in ``chunks`` pieces over ``delay_s``),
    and a ``Content-Length`` header (``claimed``, default ``len(body)``)."""

    status: int = 200
    body: bytes = b""
    claimed: int | None = None
    delay_s: float = 0.0
    chunks: int = 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        # a route without a query string matches any (as a signed URL's server would)
        path = self.path if self.path in srv.routes else self.path.partition("?")[0]
        with srv.lock:
            n = srv.requests[path]
            srv.requests[path] += 1
            srv.auth[path] = self.headers.get("Authorization")
        replies = srv.routes.get(path)
        if replies is None:
            self.send_error(404)
            return
        reply = replies[min(n, len(replies) - 1)]
        if reply.status != 200:
            self.send_error(reply.status)
            return
        self.send_response(200)
        length = len(reply.body) if reply.claimed is None else reply.claimed
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with srv.lock:
            srv.served[path] += 1
        step = -(-len(reply.body) // reply.chunks) or 1
        for i in range(0, len(reply.body), step):
            try:
                self.wfile.write(reply.body[i:i + step])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up (a deadline, a full disk)
            if reply.delay_s:
                time.sleep(reply.delay_s / reply.chunks)
        # HTTP/1.0: the connection closes after the response, so a body shorter
        # than its Content-Length is a truncated transfer.
        self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.routes: dict[str, list[Reply]] = {}
        self.requests: Counter[str] = Counter()  # every GET, by path
        self.served: Counter[str] = Counter()  # GETs that sent (some of) the body
        self.auth: dict[str, str | None] = {}  # the last Authorization header, by path

    def route(self, path: str, *replies: Reply) -> str:
        """Serve ``replies`` in turn at ``path`` (the last one repeats); return the URL."""
        self.routes[path] = list(replies)
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"


@pytest.fixture
def server():
    with serving(_Server()) as srv:
        yield srv


def _dl(url: str, sha256: str | None = CSV_SHA, **kw) -> Download:
    kw.setdefault("retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return fd.download(url, sha256=sha256, **kw)


def _leftovers(d: Path) -> list[str]:
    """Every file in a download directory except the lock file."""
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock"))


# -- success -------------------------------------------------------------------


def test_fetch_stores_verified_file_once_and_loads_csv(server, tmp_path):
    url = server.route("/data/table.csv", Reply(body=CSV))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url)

    path = src.fetch(ctx)
    assert path == src.path(ctx) == tmp_path / "downloads" / CSV_SHA[:16] / "table.csv"
    assert path.read_bytes() == CSV
    assert server.served["/data/table.csv"] == 1
    assert _leftovers(path.parent) == ["table.csv"]

    assert src.fetch(ctx) == path  # verified copy: no second request
    ds = src.load(ctx)
    assert server.requests["/data/table.csv"] == 1
    assert server.served["/data/table.csv"] == 1

    assert isinstance(ds, fd.TensorDataset) and len(ds) == 5
    x, y = ds[torch.arange(5)]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.tensor([[1.0, 2], [3, 4], [5, 6], [7, 8], [9, 10]]))
    assert torch.equal(y, torch.tensor([0, 1, 0, 1, 2]))


def test_fetch_in_a_fresh_stage_uses_the_cached_file(server, tmp_path):
    url = server.route("/t.csv", Reply(body=CSV))
    ctx = fd.Context(root=tmp_path)
    _dl(url).fetch(ctx)
    # An equal stage built anew (as another run would) finds the verified file.
    assert _dl(url, retries=0).fetch(ctx).read_bytes() == CSV
    assert server.requests["/t.csv"] == 1


def test_datamodule_prepares_and_batches_a_download(server, tmp_path):
    url = server.route("/dm.csv", Reply(body=CSV))
    dm = fnlight.DataModule(_dl(url) >> fd.batch(2), root=tmp_path, prefetch=0)
    dm.prepare()
    assert (tmp_path / "downloads" / CSV_SHA[:16] / "dm.csv").read_bytes() == CSV
    batches = list(dm.batches("train"))
    assert [b[1].tolist() for b in batches] == [[0, 1], [0, 1], [2]]
    assert torch.equal(batches[0][0], torch.tensor([[1.0, 2], [3, 4]]))
    assert server.served["/dm.csv"] == 1


def test_corrupted_cached_file_is_replaced(server, tmp_path):
    url = server.route("/c.csv", Reply(body=CSV))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url)
    path = src.path(ctx)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage that is not the file")
    assert src.fetch(ctx).read_bytes() == CSV
    assert server.served["/c.csv"] == 1
    assert _leftovers(path.parent) == ["c.csv"]


def test_explicit_root_wins_over_context_root(server, tmp_path):
    url = server.route("/r.csv", Reply(body=CSV))
    src = _dl(url, root=tmp_path / "mine")
    path = src.fetch(fd.Context(root=tmp_path / "ctx"))
    assert path == tmp_path / "mine" / "downloads" / CSV_SHA[:16] / "r.csv"
    assert path.read_bytes() == CSV
    assert not (tmp_path / "ctx").exists()


def test_filename_and_uppercase_sha256(server, tmp_path):
    url = server.route("/get?id=3", Reply(body=CSV))
    src = _dl(url, sha256=CSV_SHA.upper(), filename="iris.csv")
    assert src.sha256 == CSV_SHA
    path = src.fetch(fd.Context(root=tmp_path))
    assert path.name == "iris.csv" and path.read_bytes() == CSV


# -- checksums -----------------------------------------------------------------


def test_wrong_checksum_raises_and_keeps_nothing(server, tmp_path):
    url = server.route("/bad.csv", Reply(body=CSV))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url, sha256=WRONG_SHA)
    with pytest.raises(fd.ChecksumError) as info:
        src.fetch(ctx)
    msg = str(info.value)
    assert WRONG_SHA in msg and CSV_SHA in msg
    assert isinstance(info.value, fd.DownloadError)
    assert server.requests["/bad.csv"] == 1  # a checksum mismatch is not retried
    assert not src.path(ctx).exists()
    assert _leftovers(src.path(ctx).parent) == []


def test_missing_sha256_raises_with_actual_digest_and_keeps_nothing(server, tmp_path):
    url = server.route("/nosha.csv", Reply(body=CSV))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url, sha256=None)
    with pytest.raises(fd.ChecksumError, match=CSV_SHA):
        src.fetch(ctx)
    assert server.requests["/nosha.csv"] == 1
    assert not src.path(ctx).exists()
    assert _leftovers(src.path(ctx).parent) == []
    # ... and the digest it reports is the one that works.
    assert _dl(url, sha256=CSV_SHA).fetch(ctx).read_bytes() == CSV


# -- retries -------------------------------------------------------------------


def test_server_error_is_retried(server, tmp_path):
    url = server.route("/flaky.csv", Reply(status=500), Reply(body=CSV))
    path = _dl(url, retries=3).fetch(fd.Context(root=tmp_path))
    assert path.read_bytes() == CSV
    assert server.requests["/flaky.csv"] == 2
    assert server.served["/flaky.csv"] == 1
    assert _leftovers(path.parent) == ["flaky.csv"]


def test_persistent_server_error_gives_up_after_all_attempts(server, tmp_path):
    url = server.route("/down.csv", Reply(status=503))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url, retries=2)
    with pytest.raises(fd.DownloadError, match=r"after 3 attempts.*503"):
        src.fetch(ctx)
    assert server.requests["/down.csv"] == 3
    assert _leftovers(src.path(ctx).parent) == []


def test_not_found_is_not_retried(server, tmp_path):
    url = server.route("/missing.csv", Reply(status=404))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url, retries=4, backoff_s=1.0)  # a retry would take >= 1 s
    t0 = time.monotonic()
    with pytest.raises(fd.DownloadError, match="404") as info:
        src.fetch(ctx)
    assert time.monotonic() - t0 < 0.9
    assert not isinstance(info.value, fd.ChecksumError)
    assert server.requests["/missing.csv"] == 1
    assert _leftovers(src.path(ctx).parent) == []


def test_truncated_transfer_every_time_fails_after_retries(server, tmp_path):
    url = server.route("/trunc.csv", Reply(body=CSV[:10], claimed=len(CSV)))
    ctx = fd.Context(root=tmp_path)
    src = _dl(url, retries=2)
    with pytest.raises(fd.DownloadError, match="truncated") as info:
        src.fetch(ctx)
    assert not isinstance(info.value, fd.ChecksumError)
    assert server.requests["/trunc.csv"] == 3
    assert server.served["/trunc.csv"] == 3
    assert not src.path(ctx).exists()
    assert _leftovers(src.path(ctx).parent) == []


def test_truncated_first_transfer_is_retried(server, tmp_path):
    url = server.route("/trunc1.csv", Reply(body=CSV[:10], claimed=len(CSV)), Reply(body=CSV))
    path = _dl(url, retries=2).fetch(fd.Context(root=tmp_path))
    assert path.read_bytes() == CSV
    assert server.requests["/trunc1.csv"] == 2
    assert _leftovers(path.parent) == ["trunc1.csv"]


def test_connection_refused_is_retried_then_fails(tmp_path):
    srv = _Server()  # bound, then closed: nothing listens on this port any more
    port = srv.server_address[1]
    srv.server_close()
    src = _dl(f"http://127.0.0.1:{port}/x.csv", retries=1)
    with pytest.raises(fd.DownloadError, match="after 2 attempts"):
        src.fetch(fd.Context(root=tmp_path))


# -- concurrency ---------------------------------------------------------------

# A fresh interpreter imports fnlight once (importing torch four times at once is slow)
# and forks four worker processes; each builds the stage and fetches at the same time.
_LAUNCHER = textwrap.dedent(
    """
    import hashlib, os, sys, time, traceback
    from pathlib import Path
    import fnlight.data as fd

    url, sha, root = sys.argv[1:4]
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                src = fd.download(url, sha256=sha, retries=0, timeout_s=10.0)
                start = time.time()
                path = src.fetch(fd.Context(root=Path(root)))
                end = time.time()
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                os.write(1, f"{os.getpid()} {start} {end} {digest}\\n".encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print("exit codes", codes, file=sys.stderr)
    sys.exit(1 if any(codes) else 0)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_concurrent_processes_download_once(server, tmp_path):
    body = os.urandom(1 << 16)
    sha = hashlib.sha256(body).hexdigest()
    url = server.route("/big.bin", Reply(body=body, delay_s=0.8, chunks=16))  # long enough to overlap under load
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, url, sha, str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert len(lines) == 4, proc.stdout
    assert len({pid for pid, *_ in lines}) == 4  # four distinct processes
    assert all(digest == sha for *_, digest in lines)  # each read the complete file
    # They really overlapped: every fetch started before the first one finished.
    assert max(float(start) for _, start, _, _ in lines) < min(float(end) for *_, end, _ in lines)
    assert server.served["/big.bin"] == 1
    path = root / "downloads" / sha[:16] / "big.bin"
    assert path.read_bytes() == body
    assert _leftovers(path.parent) == ["big.bin"]


# -- file:// and the cache root ------------------------------------------------


def test_file_url(tmp_path):
    local = tmp_path / "src dir" / "local.csv"
    local.parent.mkdir()
    local.write_bytes(CSV)
    src = _dl(local.as_uri())
    assert src.filename == "local.csv"
    ctx = fd.Context(root=tmp_path / "root")
    path = src.fetch(ctx)
    assert path == tmp_path / "root" / "downloads" / CSV_SHA[:16] / "local.csv"
    assert path.read_bytes() == CSV
    assert len(src.load(ctx)) == 5
    with pytest.raises(fd.ChecksumError, match=CSV_SHA):
        _dl(local.as_uri(), sha256=WRONG_SHA).fetch(ctx)


def test_fnlight_home_sets_the_default_root(server, tmp_path, monkeypatch):
    home = tmp_path / "fnlight-home"
    monkeypatch.setenv("FNLIGHT_HOME", str(home))
    assert fd.Context().root == home
    url = server.route("/home.csv", Reply(body=CSV))
    src = _dl(url)
    assert src.fetch(fd.Context()) == home / "downloads" / CSV_SHA[:16] / "home.csv"
    assert (home / "downloads" / CSV_SHA[:16] / "home.csv").read_bytes() == CSV
    assert fnlight.DataModule(src).context.root == home

    monkeypatch.delenv("FNLIGHT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert fd.Context().root == tmp_path / "user" / ".cache" / "fnlight"
    assert fnlight.DataModule(src, root=tmp_path / "x").context.root == tmp_path / "x"


# -- validation and description ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"url": "ftp://example.org/a.csv"}, "http://, https:// and file://"),
        ({"url": "example.org/a.csv"}, "http://, https:// and file://"),
        ({"sha256": "abc"}, "64 hex digits"),
        ({"sha256": "g" * 64}, "64 hex digits"),
        ({"filename": "sub/a.csv"}, "plain file name"),
        ({"filename": ".."}, "plain file name"),
        ({"retries": -1}, "retries"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"url": "http://127.0.0.1:1/a.csv", "sha256": CSV_SHA, **kwargs}
    with pytest.raises(ValueError, match=match):
        fd.download(**args)


def test_url_path_with_encoded_slash_is_refused():
    with pytest.raises(ValueError, match="plain file name"):
        fd.download("http://127.0.0.1:1/a%2Fb.csv", sha256=CSV_SHA)


def test_default_reader_is_read_csv_with_label_last():
    src = fd.download("http://127.0.0.1:1/a.csv", sha256=CSV_SHA)
    assert src.read == fd.read_csv(label=-1)
    assert src.filename == "a.csv"


def test_describe_ignores_root_and_retry_policy_but_not_data():
    url = "http://127.0.0.1:1/a.csv"
    a = fd.download(url, sha256=CSV_SHA, read=fd.read_csv(), root="/tmp/a", retries=0)
    b = fd.download(url, sha256=CSV_SHA, read=fd.read_csv(), root="/tmp/b", retries=9,
                    timeout_s=1.0, backoff_s=3.0)
    assert a.describe() == b.describe()
    assert fd.Pipeline((a,)).fingerprint == fd.Pipeline((b,)).fingerprint
    assert (a >> fd.batch(4)).fingerprint == (b >> fd.batch(4)).fingerprint

    others = [
        fd.download(url, sha256=WRONG_SHA, read=fd.read_csv()),
        fd.download(url, sha256=CSV_SHA, read=fd.read_csv(label=0)),
        fd.download(url, sha256=CSV_SHA, read=fd.read_csv(label=None)),
        fd.download(url, sha256=CSV_SHA, read=fd.read_csv(dtype="float64")),
        fd.download(url, sha256=CSV_SHA, read=fd.read_csv(skip_rows=1)),
        fd.download(url, sha256=CSV_SHA, read=fd.read_npz(("x", "y"))),
        fd.download(url, sha256=CSV_SHA, read=fd.read_csv(), filename="b.csv"),
    ]
    prints = {fd.Pipeline((s,)).fingerprint for s in [a, *others]}
    assert len(prints) == len(others) + 1


def test_missing_local_file_fails_at_once(tmp_path):
    import time

    stage = fd.download((tmp_path / "nope.csv").as_uri(), sha256="0" * 64, backoff_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(fd.DownloadError, match="nope.csv"):
        stage.fetch(fd.Context(root=tmp_path))
    assert time.perf_counter() - t0 < 0.9  # not retried


# -- identity, credentials, deadlines, a full disk -----------------------------------------------------------------


def test_a_re_signed_url_keeps_the_fingerprint_and_the_cached_file(server, tmp_path):
    base = server.route("/signed.csv", Reply(body=CSV))
    a = _dl(base + "?X-Amz-Signature=aaa&X-Amz-Expires=60")
    b = _dl(base + "?X-Amz-Signature=bbb&X-Amz-Expires=3600")
    assert a.describe() == b.describe() and fd.Pipeline((a,)).fingerprint == fd.Pipeline((b,)).fingerprint
    a.fetch(fd.Context(root=tmp_path))
    b.fetch(fd.Context(root=tmp_path))
    assert server.requests["/signed.csv"] == 1  # the same content, already verified
    pipeline = lambda src: src >> fd.split({"train": 0.6, "val": 0.4}) >> fd.batch(2)  # noqa: E731
    dm_a = fnlight.DataModule(pipeline(a), root=tmp_path, prefetch=0)
    dm_b = fnlight.DataModule(pipeline(b), root=tmp_path, prefetch=0)
    state = {"w": torch.zeros(2)}
    fnlight.save_checkpoint(tmp_path / "ck", state, meta={"pipeline": {"fingerprint": dm_a.fingerprint,
                                                                        "description": dm_a.describe()}})
    fnlight.load_checkpoint(tmp_path / "ck", pipeline_fingerprint=dm_b.fingerprint)  # resumes: no error
    # without a sha256 the content is not known, and the URL (redacted) stays part of the description
    assert _dl(base + "?v=1", sha256=None).describe()["url"] == base + "?v=***"


SECRETS = ("hunter2", "s3cr3t-token", "sig-abcdef")


def test_credentials_never_appear_in_descriptions_checkpoints_or_errors(server, tmp_path):
    host, port = server.server_address[:2]
    server.route("/private.csv", Reply(body=CSV))
    server.route("/gone.csv", Reply(status=404))
    server.route("/flaky.csv", Reply(status=503))
    url = f"http://alice:hunter2@{host}:{port}/private.csv?token=s3cr3t-token&Signature=sig-abcdef"
    src = _dl(url)
    texts = [repr(src), json.dumps(src.describe()), repr(src >> fd.batch(2))]
    assert src.fetch(fd.Context(root=tmp_path)).read_bytes() == CSV  # the credentials are used...
    assert server.auth["/private.csv"] == "Basic " + base64.b64encode(b"alice:hunter2").decode()
    dm = fnlight.DataModule(src >> fd.split({"train": 0.6, "val": 0.4}) >> fd.batch(2), root=tmp_path)
    fnlight.save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)},
                            meta={"pipeline": {"fingerprint": dm.fingerprint, "description": dm.describe()}})
    texts.append((tmp_path / "ck" / "checkpoint.json").read_text())
    for bad in (dict(url=url.replace("private", "gone")), dict(url=url.replace("private", "flaky")),
                dict(url=url, sha256=WRONG_SHA, root=tmp_path / "other"), dict(url=url, sha256=None)):
        with pytest.raises(fd.DownloadError) as e:
            _dl(bad.pop("url"), **bad).fetch(fd.Context(root=tmp_path / "errors"))
        texts.append(str(e.value))
    with pytest.raises(ValueError) as e:
        fd.download(url.replace("http", "ftp"), sha256=CSV_SHA)
    texts.append(str(e.value))
    for text in texts:  # ...and never shown
        assert not [s for s in SECRETS if s in text], text
    assert "alice" not in texts[-1] and "***@" in texts[-1]


def test_an_attempt_that_outlives_its_deadline_is_abandoned(server, tmp_path):
    trickle = Reply(body=CSV * 20, chunks=50, delay_s=10.0)  # a byte every 0.2 s: no read ever times out
    url = server.route("/slow.csv", trickle)
    src = _dl(url, sha256=hashlib.sha256(CSV * 20).hexdigest(), retries=1, timeout_s=2.0, deadline_s=0.8)
    t0 = time.monotonic()
    with pytest.raises(fd.DownloadError, match=r"after 2 attempts; last error: the attempt outlived "
                                               r"deadline_s=0.8s \(received \d+ of 620 bytes\)"):
        src.fetch(fd.Context(root=tmp_path))
    assert time.monotonic() - t0 < 6  # two attempts of ~1 s (and a backoff), not 20 s
    assert server.requests["/slow.csv"] == 2 and _leftovers(src.path(fd.Context(root=tmp_path)).parent) == []
    with pytest.raises(ValueError, match="deadline_s"):
        fd.download(url, sha256=CSV_SHA, deadline_s=0)


def test_a_full_disk_names_the_file_and_the_url_and_keeps_nothing(server, tmp_path):
    from .faults import small_disk

    body = os.urandom(3 << 20)
    url = server.route("/big.bin", Reply(body=body))
    src = _dl(url + "?token=s3cr3t-token", sha256=hashlib.sha256(body).hexdigest(), read=fd.read_npz())
    with small_disk(tmp_path, "1m") as disk:
        with pytest.raises(fd.DownloadError, match=r"cannot write .*big.bin \(downloading .*/big.bin\?token=\*\*\*\): "
                                                   r"No space left on device; nothing was kept") as e:
            src.fetch(fd.Context(root=disk))
        assert "s3cr3t" not in str(e.value)
        assert server.requests["/big.bin"] == 1  # a local problem: not retried
        assert _leftovers(src.path(fd.Context(root=disk)).parent) == []
