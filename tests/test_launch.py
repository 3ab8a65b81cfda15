"""Launching several processes: `fnlight fit --devices N`, torchrun on the example script, a dead rank,
and the launch options' errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fnlight.cli import digits_datamodule, main

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow


def child_env() -> dict[str, str]:
    """This environment (FNLIGHT_HOME included) without torchrun's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def fnlight_fit(*args: str) -> list[str]:
    return [sys.executable, "-m", "fnlight.cli", "fit", *args]


@slow
def test_fit_on_two_devices_prints_and_logs_once(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(fnlight_fit("--devices", "2", "--max-steps", "6", "--timeout-s", "60", "--run-dir", str(run)),
                         cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # rank 0 alone prints the summary; the data fingerprint is the one of a single process
    assert out.stdout.count("fit: digits MLP") == 1 and ", 2 ranks" in out.stdout, out.stdout
    assert f"data fingerprint {digits_datamodule().fingerprint[:16]}" in out.stdout
    assert len(re.findall(r"test accuracy \d\.\d+", out.stdout)) == 1
    assert out.stdout.count("6 steps in ") == 1 and f"run directory: {run}" in out.stdout
    assert len(re.findall(r"^step=6  epoch=0 ", out.stderr, re.M)) == 1, out.stderr  # the console logger
    # rank 0 alone wrote the logs: one epoch row (6 steps: no step row at log_every_n_steps=50)
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("epoch", 6)]
    assert not (run / "steps.csv").exists()


@slow
def test_torchrun_runs_the_example_on_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "examples" / "train_distributed.py"),
           "--max-epochs", "1", "--max-steps", "6", "--run-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("test accuracy") == 1 and "2 rank(s), 23 batches of 32" in out.stdout, out.stdout
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 1
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000000006"]


def children(pid: int) -> dict[int, dict[str, str]]:
    """The child processes of ``pid`` and their environments (Linux's /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                env = (p / "environ").read_bytes().split(b"\0")
                out[int(p.name)] = dict(e.decode().split("=", 1) for e in env if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
    return out


@slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
def test_a_dead_rank_stops_the_launch_with_its_exit_code(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(fnlight_fit("--devices", "2", "--timeout-s", "20", "--run-dir", str(run)),
                                cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and launcher.poll() is None:  # until the first epoch is logged
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text():
                break
            time.sleep(0.05)
        ranks = {env.get("RANK"): pid for pid, env in children(launcher.pid).items()}
        assert "1" in ranks, (ranks, launcher.poll())
        # the ranks run the same command, given options only, without --devices
        argv = Path(f"/proc/{ranks['1']}/cmdline").read_bytes().decode().split("\0")
        assert argv[2:] == ["-m", "fnlight.cli", "fit", "--timeout-s", "20.0", "--run-dir", str(run), ""], argv
        os.kill(ranks["1"], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert time.monotonic() - t0 < 30, "the other rank was not stopped in time"
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "fnlight fit: rank 1 of 2 was killed by SIGKILL" in err, err[-3000:]
    assert "test accuracy" not in out


def test_launch_options_are_checked(monkeypatch):
    runner = CliRunner()
    res = runner.invoke(main, ["fit", "--devices", "0"])
    assert res.exit_code == 2 and "Invalid value for '--devices'" in res.output and "0 is not in the range x>=1" \
        in res.output, res.output
    res = runner.invoke(main, ["fit", "--devices", "two"])
    assert res.exit_code == 2 and "'two' is not a valid integer" in res.output
    res = runner.invoke(main, ["fit", "--timeout-s", "0"])
    assert res.exit_code == 2 and "--timeout-s" in res.output
    res = runner.invoke(main, ["fit", "--devices", "2", "--device", "cuda:1"])
    assert res.exit_code == 2 and "give --device cuda" in res.output, res.output
    import torch

    n, more = torch.cuda.device_count(), max(2, torch.cuda.device_count() + 1)
    res = runner.invoke(main, ["fit", "--devices", str(more), "--device", "cuda"])
    assert res.exit_code == 2 and f"need {more} GPUs; this machine has {n}" in res.output, res.output
    # inside a rank that torchrun launched, torchrun has decided the number of processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(main, ["fit", "--devices", "2", "--device", "cpu"])
    assert res.exit_code == 2 and "already one of 2 ranks launched by torchrun" in res.output, res.output
