"""Trainer.fit across real gloo processes on 127.0.0.1: identical replicas, reduced metrics,
rank-0 logs and checkpoints, a dead rank stops the others, resume (also on another world size)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fnlight
from fnlight.tree import tree_equal

from .conftest import finish_ranks, spawn_ranks

pytestmark = pytest.mark.slow


def launch(out: Path, world: int, *args: str) -> list[subprocess.Popen]:
    """``world`` processes of tests/_dist_fit.py (one plain process when world is 1)."""
    return spawn_ranks([sys.executable, "-m", "tests._dist_fit", str(out), *args], world,
                       env={"FNLIGHT_HOME": str(out / "home")})


def report(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def no_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def test_two_ranks_with_batch_b_train_like_one_rank_with_batch_2b(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    finish_ranks(launch(two, 2, "--batch", "8") + launch(one, 1, "--batch", "16"))
    r0, r1, single = report(two, 0), report(two, 1), report(one, 0)
    assert r0["world"] == 2 and single["world"] == 1
    # every rank holds bitwise the same parameters after every step (rank 1 started from another init)
    assert r0["hashes"] == r1["hashes"] and len(r0["hashes"]) == len(single["hashes"]) == 3 * 5
    s2, _ = fnlight.load_checkpoint(two / "final0")
    s1, _ = fnlight.load_checkpoint(one / "final0")
    for k in s1.params:
        torch.testing.assert_close(s2.params[k], s1.params[k], rtol=1e-4, atol=1e-5)
    # epoch metrics are means over all ranks' samples weighted by batch size (Lightning's sync_dist)
    assert no_time(r0["history"]) == no_time(r1["history"])
    for a, b in zip(r0["history"], single["history"], strict=True):
        for key in ("train/loss", "train/acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        # 25 validation samples on 2 ranks: shard() pads with one repeat, which the mean counts (as
        # Lightning's DistributedSampler does), so validation metrics agree to about 1/25
        for key in ("val/loss", "val/acc"):
            assert a[key] == pytest.approx(b[key], rel=0.06, abs=0.05), key
    # predict: every rank returns all predictions, in the split's order, without shard's padding
    from tests._dist_fit import make_datamodule, mlp, predict_fn

    model = mlp()
    p0, _ = fnlight.load_checkpoint(two / "predictions0")
    p1, _ = fnlight.load_checkpoint(two / "predictions1")
    assert tree_equal(p0, p1) and len(p0["y"]) == 25  # 13 + 13 predicted, the padding repeat dropped
    here = fnlight.Trainer(progress=False).predict(s2, predict_fn(model), make_datamodule(8))  # one process
    assert torch.equal(p0["y"], here["y"])
    torch.testing.assert_close(p0["logits"], here["logits"], rtol=1e-5, atol=1e-6)
    # only rank 0 wrote logs: one row per epoch, one per step
    assert len((two / "run" / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert len((two / "run" / "steps.csv").read_text().splitlines()) == 1 + 15


def test_a_dead_rank_stops_the_other_and_the_run_resumes_to_the_same_state(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    finish_ranks(launch(full, 2, "--batch", "8", "--bn"))
    f0, f1 = report(full, 0), report(full, 1)
    assert f0["hashes"] == f1["hashes"]  # BatchNorm statistics are averaged: the replicas stay identical

    procs = launch(cut, 2, "--batch", "8", "--bn", "--slow")
    deadline = time.monotonic() + 120
    while not list((cut / "ck").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((cut / "ck").glob("step_*")), [p.communicate()[1][-2000:] for p in procs]
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=90)  # within the collective timeout (30 s), not a hang
    assert procs[0].returncode != 0 and time.monotonic() - t0 < 60, err[-2000:]
    procs[1].wait()
    assert not (cut / "rank0.json").exists()

    finish_ranks(launch(cut, 2, "--batch", "8", "--bn"))  # resumes from rank 0's newest checkpoint
    c0, c1 = report(cut, 0), report(cut, 1)
    assert c0["final"] == c1["final"] == f0["final"]  # bitwise the uninterrupted 2-rank run
    assert 0 < len(c0["hashes"]) < 15 and c0["hashes"] == f0["hashes"][-len(c0["hashes"]):]
    assert no_time(c0["history"]) == no_time(f0["history"])

    # the state does not depend on the world size: the 2-rank checkpoint goes on in one process
    # (the same script on fewer devices: same pipeline, so the same fingerprint; the shard is now everything)
    from tests._dist_fit import fo, loss_fn, make_datamodule, mlp

    dm = make_datamodule(8)
    model = mlp(bn=True)
    state = fnlight.TrainState.create(model, fo.adam(1e-2))
    more = fnlight.Trainer(max_epochs=4, run_dir=full / "run", ckpt_dir=full / "ck", loggers=(), progress=False)
    result = more.fit(state, fnlight.make_train_step(model, loss_fn, fo.adam(1e-2)), dm)
    last, _ = fnlight.load_checkpoint(sorted((full / "ck").glob("step_*"))[-2])  # the 2-rank run's final one
    assert int(last.step) == 15 and int(result.state.step) == 15 + 9  # one more epoch: 72 samples, batches of 8
    assert not tree_equal(result.state.params, last.params)
    # ...and the other way round: the 1-rank checkpoint goes on with 2 ranks
    finish_ranks(launch(full, 2, "--batch", "8", "--bn", "--epochs", "5"))
    g0, g1 = report(full, 0), report(full, 1)
    assert g0["hashes"] == g1["hashes"] and len(g0["hashes"]) == 5  # only epoch 4 ran: 36 samples per rank
    assert [r["step"] for r in g0["history"]] == [5, 10, 15, 24, 29]


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_rank_0_saves(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    finish_ranks(launch(full, 2, "--batch", "8"))
    procs = launch(cut, 2, "--batch", "8", "--slow")
    deadline = time.monotonic() + 120
    while not list((cut / "ck").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((cut / "ck").glob("step_*")), [p.communicate()[1][-2000:] for p in procs]
    os.kill(procs[1].pid, signal.SIGTERM)  # rank 1 only (as a scheduler that signals one node)
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in outs]
    i0, i1 = (json.loads((cut / f"interrupted{r}.json").read_text()) for r in (0, 1))
    assert i0 == i1 and i0["signal"] == "SIGTERM" and 0 < i0["step"] < 15
    saved = cut / "ck" / f"step_{i0['step']:09d}"
    assert i0["checkpoint"] == str(saved) and saved.is_dir()  # rank 0 wrote it, where both stopped
    _, meta = fnlight.load_checkpoint(saved)
    assert (meta["epoch"], meta["position"]) == (i0["epoch"], i0["position"])
    finish_ranks(launch(cut, 2, "--batch", "8"))  # the same command again
    assert report(cut, 0)["final"] == report(cut, 1)["final"] == report(full, 0)["final"]
    assert no_time(report(cut, 0)["history"]) == no_time(report(full, 0)["history"])
