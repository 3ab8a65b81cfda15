"""Checkpoint save / load time in a remote directory (S3 through s3fs) vs a local one.

What it measures, on a state of ``--params`` parameters (default 100M, float32, as
``benchmarks/checkpoint.py`` builds it; ``--moments`` adds Adam's two moments, 3x the bytes):

* ``local.save_s`` / ``local.load_s``: ``fnlight.save_checkpoint`` / ``load_checkpoint`` of a local
  directory (a temp directory: fsync, atomic rename; loads from the page cache);
* ``remote.save_s`` / ``remote.load_s``: the same to ``s3://<bucket>/...`` on moto's S3 server, started
  here in a process of its own on 127.0.0.1 (in memory, over loopback HTTP): the tensor files uploaded
  (multipart, shards in parallel) while hashed, ``checkpoint.json``, then the manifest (the commit);
  the load lists, reads and verifies every file.

Each figure is the median of ``--repeats`` rounds. Moto is a Python server on the same machine, so the
remote figures say what fnlight's side costs plus an unoptimized server, not what a real S3 bucket over a
network gives (there, bandwidth decides). No target: the figures are reported.

Run:
    .venv/bin/python benchmarks/remote.py                      # 100M parameters, 3 rounds
    .venv/bin/python benchmarks/remote.py --params 1e6 --repeats 1 --json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import make_state, touch  # noqa: E402

import fnlight  # noqa: E402
from fnlight._remote import location  # noqa: E402
from fnlight.train.checkpoint import remove_checkpoint  # noqa: E402
from fnlight.tree import tree_leaves  # noqa: E402


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in a process of its own on a free port of 127.0.0.1; returns it and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)


def timed(fn, *args):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="parameters in the state (default 100M)")
    ap.add_argument("--moments", action="store_true", help="save Adam's moments too (3x the bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object of median seconds")
    args = ap.parse_args()

    state = make_state(int(args.params))
    tree = state if args.moments else state.params
    nbytes = sum(t.numel() * t.element_size() for t in tree_leaves(tree))
    expected = touch(tree)
    proc, endpoint = start_moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    root = Path(tempfile.mkdtemp(prefix="fnlight-remote-bench-"))
    bucket = f"fnlight-bench-{uuid.uuid4().hex[:8]}"
    times: dict[str, dict[str, list[float]]] = {"local": {"save_s": [], "load_s": []},
                                                "remote": {"save_s": [], "load_s": []}}
    try:
        import fsspec

        fsspec.filesystem("s3").mkdir(bucket)
        for r in range(args.repeats):
            for where, path in (("local", root / f"r{r}"), ("remote", f"s3://{bucket}/r{r}")):
                if where == "local":
                    os.sync()  # (untimed) the local save does not pay for the previous round's dirty pages
                t, _ = timed(fnlight.save_checkpoint, path, tree)
                times[where]["save_s"].append(t)
                t, (loaded, _) = timed(fnlight.load_checkpoint, path)
                times[where]["load_s"].append(t)
                assert touch(loaded) == expected
                del loaded
                remove_checkpoint(location(path))  # (untimed) every round writes to an empty place
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    med = {w: {k: statistics.median(v) for k, v in d.items()} for w, d in times.items()}
    res = {**med, "bytes": nbytes, "remote_over_local_save": med["remote"]["save_s"] / med["local"]["save_s"]}
    if args.json:
        print(json.dumps(res))
        return
    print(f"state: {int(args.params) / 1e6:.1f}M parameters{' + Adam moments' if args.moments else ''} = "
          f"{nbytes / 1e9:.2f} GB; torch {torch.__version__}; {args.repeats} rounds, median seconds")
    for w in ("local", "remote"):
        print(f"  {w:7s} save {med[w]['save_s']:7.2f}  load {med[w]['load_s']:7.2f}   "
              f"({nbytes / 1e6 / med[w]['save_s']:.0f} / {nbytes / 1e6 / med[w]['load_s']:.0f} MB/s)")
    print(f"  remote.save_s / local.save_s = {res['remote_over_local_save']:.1f}x (moto on this machine; no target)")


if __name__ == "__main__":
    main()
