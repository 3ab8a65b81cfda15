import os

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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
