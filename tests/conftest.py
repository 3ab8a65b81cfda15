import contextlib
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests build pipelines and run torch ops: keep examples few and
# deadlines off (a 2-core CI machine is slow and noisy).
settings.register_profile(
    "fnlight", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fnlight"))

# fnlight's own pytest plugin (fnlight.testing.plugin, entry point pytest11) provides the
# fnlight_* fixtures; pytester runs pytest inside a test (tests/test_testing.py).
pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _isolated_home(fnlight_home):
    """Never touch the user's ~/.cache/fnlight from a test."""


def cuda(test):
    """A CUDA-only test: marked ``gpu`` (benchmarks/gpu_check.sh runs ``-m gpu``), skipped without a device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(scope="session", autouse=True)
def _no_leaks():
    """After the whole run: no prefetch thread and no worker process is left behind."""
    yield
    import multiprocessing
    import threading
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        threads = [t for t in threading.enumerate() if t.name == "fnlight-prefetch"]
        children = multiprocessing.active_children()
        if not threads and not children:
            return
        time.sleep(0.1)
    raise AssertionError(f"leaked after the test run: threads {threads}, processes {children}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for torch.distributed rendezvous in tests), below the ephemeral range."""
    from fnlight.distributed import free_port as pick

    return pick()


ROOT = Path(__file__).resolve().parents[1]


def spawn_ranks(argv: list[str], world: int, env: dict | None = None,
                local_ranks: list[int] | None = None) -> list[subprocess.Popen]:
    """``world`` processes running ``argv`` as the ranks of one gloo group on 127.0.0.1 (torchrun's
    variables set by hand), from the repository root; one plain process when ``world`` is 1."""
    port = free_port()
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            **(env or {})}
    procs = []
    for r in range(world):
        rank_env = dict(base)
        if world > 1:
            rank_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                         "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_ranks[r] if local_ranks else r)}
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish_ranks(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    """Wait for every rank; assert each exited 0 (showing their stderr if not); their stdouts."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    return [o[0] for o in outs]


@contextlib.contextmanager
def serving(srv):
    """Run an ``http.server`` server on a thread for the duration of the block (a real server on loopback)."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)
