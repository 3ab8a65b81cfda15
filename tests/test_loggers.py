"""CSV and JSONL logs under faults: torn lines, a full disk, a killed writer, two runs in one run_dir."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fnlight
from fnlight.train import CSVLogger, JSONLLogger

from .faults import small_disk

ROOT = Path(__file__).resolve().parents[1]


def rows(n, start=0):
    return [{"kind": "step", "step": i, "epoch": 0, "loss": 1.0 / (i + 1)} for i in range(start, start + n)]


def fill(logger, run_dir, n, keep=None):
    lg = logger.open(run_dir, keep)
    for r in rows(n):
        lg.log(r)
    lg.close()


def test_a_torn_last_jsonl_line_is_dropped_on_resume_and_said(tmp_path, caplog):
    fill(JSONLLogger(), tmp_path, 5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 5, "lo')  # the disk filled up, or the process was killed
    lg = JSONLLogger().open(tmp_path, {"step": 10, "epoch": 0})
    lg.log(rows(1, 5)[0])
    lg.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5]
    [msg] = [r.getMessage() for r in caplog.records if r.name == "fnlight"]
    assert "metrics.jsonl: dropped its last line, cut short" in msg


def test_a_torn_last_csv_line_is_dropped_on_resume(tmp_path, caplog):
    fill(CSVLogger(), tmp_path, 4)
    with open(tmp_path / "steps.csv", "a") as f:
        f.write("4,0,0.2")
    lg = CSVLogger().open(tmp_path, {"step": 10, "epoch": 0})
    lg.log(rows(1, 4)[0])
    text = (tmp_path / "steps.csv").read_text()
    assert text.splitlines() == ["step,epoch,loss"] + [f"{i},0,{1.0 / (i + 1)}" for i in range(5)]
    assert any("steps.csv: dropped its last line" in r.getMessage() for r in caplog.records)


def test_damaged_middle_lines_are_dropped_not_fatal(tmp_path, caplog):
    fill(JSONLLogger(), tmp_path, 3)
    raw = (tmp_path / "metrics.jsonl").read_bytes().split(b"\n")
    raw[1] = b"\0" * len(raw[1])
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(raw[:2] + [b"{not json"] + raw[2:]))
    JSONLLogger().open(tmp_path, {"step": 10}).close()
    got = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == [0, 2]
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 2


def test_two_runs_sharing_a_run_dir_never_write_nul_bytes(tmp_path):
    a = JSONLLogger().open(tmp_path)
    for r in rows(20):
        a.log(r)
    b = JSONLLogger().open(tmp_path)  # a second run in the same directory starts over
    b.log(rows(1, 100)[0])
    a.log(rows(1, 20)[0])  # the first writes on: at the end of the file, not at its old offset
    c_ = CSVLogger().open(tmp_path)
    c_.log(rows(1)[0])
    d = CSVLogger().open(tmp_path, None)
    for r in rows(3, 50):
        c_.log(r)
        d.log(r)
    a.close()
    b.close()
    for name in ("metrics.jsonl", "steps.csv"):
        assert b"\0" not in (tmp_path / name).read_bytes()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [100, 20]


def test_a_full_disk_during_a_log_write_names_the_file_and_resume_drops_the_torn_line(tmp_path, caplog):
    with small_disk(tmp_path, "1m") as disk:
        lg = JSONLLogger().open(disk)
        for r in rows(3):
            lg.log(r)
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 4096)
        with pytest.raises(OSError) as e:
            for r in rows(1000, 3):
                lg.log({**r, "pad": "y" * 3000})
        assert e.value.errno == errno.ENOSPC and str(disk / "metrics.jsonl") in str(e.value)
        lg.close()
        csv_logger = CSVLogger().open(disk)
        with pytest.raises(OSError, match=r"steps.csv"):
            csv_logger.log(rows(1)[0])
        filler.unlink()
        lg = JSONLLogger().open(disk, {"step": 10_000})  # resuming: never fatal
        lg.log(rows(1, 7)[0])
        lg.close()
        lines = (disk / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines) and json.loads(lines[-1])["step"] == 7
        assert [r["step"] for r in map(json.loads, lines[:3])] == [0, 1, 2]
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]


KILLED_LOGGER = r"""
import sys
from pathlib import Path
from fnlight.train import CSVLogger, JSONLLogger
d = Path(sys.argv[1])
loggers = [JSONLLogger().open(d), CSVLogger().open(d)]
i = 0
while True:
    for lg in loggers:
        lg.log({"kind": "step", "step": i, "epoch": 0, "loss": 0.5, "pad": "z" * (i % 50_000)})
    if i == 0:
        print("started", flush=True)
    i += 1
"""


@pytest.mark.slow
def test_resume_after_sigkill_during_log_writes_is_never_fatal(tmp_path):
    for attempt in range(3):
        d = tmp_path / f"run{attempt}"
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-c", KILLED_LOGGER, str(d)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline() == "started\n"
        time.sleep(0.3 + 0.2 * attempt)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for logger in (JSONLLogger(), CSVLogger()):
            logger.open(d, {"step": 10**9, "epoch": 0}).close()
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(len(steps))) and steps


def test_the_trainer_resumes_with_a_torn_metrics_jsonl(tmp_path, caplog):
    from .models import resume_setup

    dm, state, step, _ = resume_setup()

    def trainer(**kw):
        return fnlight.Trainer(max_epochs=2, run_dir=tmp_path, ckpt_dir=tmp_path / "ck",
                               loggers=(JSONLLogger(), CSVLogger()), **kw)

    trainer(max_steps=7, ckpt_every_n_steps=2).fit(state, step, dm)  # one epoch row logged
    for name in ("metrics.jsonl", "metrics.csv"):
        with open(tmp_path / name, "a") as f:
            f.write('{"kind": "ep' if name.endswith("jsonl") else "1,10,0.")
    full = trainer().fit(state, step, dm)
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got] == [0, 1] == [r["epoch"] for r in full.history]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
    assert sum("dropped its last line" in r.getMessage() for r in caplog.records) == 2
