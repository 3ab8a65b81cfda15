"""Real processes with torch.distributed (gloo on 127.0.0.1): prepare() on rank 0
with a barrier, and shard() taking its rank from the process group."""

import hashlib
import http.server
import json
import sys
import threading
import time

import pytest

from .conftest import spawn_ranks

BODY = "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)).encode()

SCRIPT = r"""
import json, sys, time
import torch
import fnlight, fnlight.data as fd
from fnlight import distributed

distributed.init(backend="gloo", timeout_s=60)
url, sha, root, per_node = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "per_node"
if per_node:
    root += str(distributed.rank())  # each "node" has its own local disk
p = fd.download(url, sha256=sha, read=fd.read_csv(label=-1)) >> fd.shard() >> fd.batch(100)
dm = fnlight.DataModule(p, root=root, prefetch=0)
fetches = []
real_fetch = fd.Download.fetch
fd.Download.fetch = lambda self, ctx: fetches.append(1) or real_fetch(self, ctx)
dm.prepare(per_node=per_node)
done = time.time()
fd.Download.fetch = real_fetch
idx = dm.index_batches("train")[0].tolist()
print(json.dumps({"rank": distributed.rank(), "world": distributed.world_size(), "prepared_at": done,
                  "fetches_in_prepare": len(fetches), "indices": idx}))
torch.distributed.destroy_process_group()
"""


class Slow(http.server.BaseHTTPRequestHandler):
    served: list = []

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        for i in range(0, len(BODY), 64):
            time.sleep(0.02)
            if i + 64 >= len(BODY):
                Slow.served.append(time.time())  # no client can hold the file before this
            self.wfile.write(BODY[i:i + 64])
            self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["job", "per_node"])
def test_rank0_prepares_while_the_others_wait(tmp_path, mode):
    """job: rank 0 prepares for everyone; per_node: two "nodes" (both ranks have LOCAL_RANK 0 and a
    node-local root), each prepares its own copy."""
    Slow.served = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    procs = []
    try:
        procs = spawn_ranks([sys.executable, str(script), url, hashlib.sha256(BODY).hexdigest(),
                             str(tmp_path / "root"), mode], 2, env={"FNLIGHT_HOME": str(tmp_path / "home")},
                            local_ranks=[0, 1] if mode == "job" else [0, 0])
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
        server.shutdown()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["rank"])
    assert [r["world"] for r in results] == [2, 2]
    if mode == "job":
        assert len(Slow.served) == 1  # one download for the whole job
        assert [r["fetches_in_prepare"] for r in results] == [1, 0]  # rank 1 only waited at the barrier
    else:
        assert len(Slow.served) == 2  # one per node
        assert [r["fetches_in_prepare"] for r in results] == [1, 1]
    assert all(r["prepared_at"] >= min(Slow.served) for r in results)  # nobody went on before a download ended
    assert results[0]["indices"] == list(range(0, 40, 2)) and results[1]["indices"] == list(range(1, 40, 2))
