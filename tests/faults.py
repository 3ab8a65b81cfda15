"""Real faults for tests: a full disk (a size-limited tmpfs mount), threads left behind."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at a new directory under ``where`` (needs root: skips where refused)."""
    mnt = where / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir(parents=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs: {e}")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fnlight_threads() -> list[str]:
    """Names of live threads that fnlight's checkpoint and download code start (after a grace period)."""
    deadline = time.monotonic() + 2
    while True:
        live = [t.name for t in threading.enumerate()
                if t.name.startswith(("fnlight-sha256", "fnlight-shard"))]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.02)
