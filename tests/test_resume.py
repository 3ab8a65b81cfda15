"""Trainer checkpoints: an interrupted and resumed fit ends bitwise where an uninterrupted one does."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd
import fnlight.optim as fo
from fnlight.train.checkpoint import CheckpointError
from fnlight.tree import tree_equal

from . import pipelines
from .models import data, loss_fn, metrics_fn, mlp


def setup():
    x, y = data(60)
    pipeline = (fd.from_tensors(x, y) >> fd.split({"train": 0.8, "val": 0.2}, stratify_by=1)
                >> fd.transform(pipelines.noisy, on="train") >> fd.shuffle() >> fd.batch(10))
    dm = fnlight.DataModule(pipeline, seed=3)
    model = mlp(dropout=0.3, bn=True)
    opt = fo.adamw(fo.warmup_cosine(1e-2, 3, 20), weight_decay=0.1)
    state = fnlight.TrainState.create(model, opt, seed=5)
    return dm, state, fnlight.make_train_step(model, loss_fn, opt), fnlight.make_eval_step(model, metrics_fn)


def trainer(tmp, steps_taken=None, **kw):
    cbs = (fnlight.EarlyStopping("val/loss", patience=100),)
    if steps_taken is not None:  # counts the steps this fit really runs
        cbs += (fnlight.LambdaCallback(on_step=lambda s, m: steps_taken.append(int(s.step))),)
    return fnlight.Trainer(max_epochs=4, run_dir=tmp / "run", ckpt_dir=tmp / "ck", callbacks=cbs, loggers=(), **kw)


def no_time(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


@settings(max_examples=6)
@given(stop_at=st.integers(1, 19), every=st.integers(1, 3))
def test_resume_after_any_step_equals_the_uninterrupted_run(tmp_path_factory, stop_at, every):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path_factory.mktemp("full")).fit(state, step, dm, eval_step)
    tmp = tmp_path_factory.mktemp("cut")
    trainer(tmp, max_steps=stop_at, ckpt_every_n_steps=every).fit(state, step, dm, eval_step)  # "crashes" here
    taken = []
    resumed = trainer(tmp, taken, ckpt_every_n_steps=every).fit(state, step, dm, eval_step)
    last_saved = stop_at - stop_at % every  # the newest step checkpoint (0: none, so it starts over)
    assert taken == list(range(last_saved + 1, 21))  # it started from the newest checkpoint, not from scratch
    assert tree_equal(resumed.state, full.state)
    assert no_time(resumed.history) == no_time(full.history)
    assert resumed.callback_states[0] == full.callback_states[0]  # EarlyStopping continued its counts


def test_a_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "a").fit(state, step, dm, eval_step)
    trainer(tmp_path / "b", max_steps=13, ckpt_every_n_steps=4).fit(state, step, dm, eval_step)
    newest = sorted((tmp_path / "b" / "ck").iterdir())[-1]
    assert newest.name == "step_000000012"
    (newest / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint .*step_000000012"):
        resumed = trainer(tmp_path / "b", ckpt_every_n_steps=4).fit(state, step, dm, eval_step)
    assert tree_equal(resumed.state, full.state)


def test_keep_last_and_epoch_checkpoints(tmp_path):
    dm, state, step, _ = setup()
    trainer(tmp_path, keep_last=2).fit(state, step, dm)
    assert [p.name for p in sorted((tmp_path / "ck").iterdir())] == ["step_000000015", "step_000000020"]
    _, meta = fnlight.load_checkpoint(tmp_path / "ck" / "step_000000020")
    assert meta["epoch"] == 4 and meta["position"] == 0 and meta["pipeline"]["fingerprint"] == dm.fingerprint
    done = trainer(tmp_path, keep_last=2).fit(state, step, dm)  # everything was done: nothing more to train
    assert int(done.state.step) == 20


def test_resuming_on_different_data_is_refused(tmp_path):
    dm, state, step, _ = setup()
    trainer(tmp_path, max_steps=3, ckpt_every_n_steps=1).fit(state, step, dm)
    with pytest.raises(CheckpointError, match="different data"):
        trainer(tmp_path).fit(state, step, dm.replace(seed=4))


def test_resume_false_starts_over(tmp_path):
    dm, state, step, _ = setup()
    trainer(tmp_path, max_steps=3, ckpt_every_n_steps=1).fit(state, step, dm)
    fresh = trainer(tmp_path, max_steps=2, resume=False).fit(state, step, dm)
    assert int(fresh.state.step) == 2
    shutil.rmtree(tmp_path / "ck")
    with pytest.raises(ValueError, match="ckpt_every_n_steps"):
        fnlight.Trainer(ckpt_dir=tmp_path, ckpt_every_n_steps=0)
    assert torch.equal(state.step, torch.tensor(0))


@pytest.mark.parametrize("stop_at", [3, 7, 10])
def test_logs_continue_across_a_resume_without_duplicates_or_gaps(tmp_path, stop_at):
    dm, state, step, eval_step = setup()

    def run(tmp, **kw):
        return fnlight.Trainer(max_epochs=3, run_dir=tmp / "run", ckpt_dir=tmp / "ck", log_every_n_steps=2,
                               **kw).fit(state, step, dm, eval_step)

    run(tmp_path / "full", ckpt_every_n_steps=3)
    run(tmp_path / "cut", ckpt_every_n_steps=3, max_steps=stop_at)  # logs rows past its last checkpoint, then stops
    run(tmp_path / "cut", ckpt_every_n_steps=3)

    def rows(tmp, name):
        text = (tmp / "run" / name).read_text().splitlines()
        return [",".join(c for c in line.split(",")) for line in text]

    def strip_time(lines, name):
        import json

        if name.endswith(".jsonl"):
            return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]
        header = lines[0].split(",")
        drop = header.index("time_s") if "time_s" in header else None
        return [[c for i, c in enumerate(x.split(",")) if i != drop] for x in lines]

    for name in ("metrics.jsonl", "metrics.csv", "steps.csv"):
        full, cut = rows(tmp_path / "full", name), rows(tmp_path / "cut", name)
        assert strip_time(cut, name) == strip_time(full, name), name


TRAINER_SCRIPT = r"""
import sys, time
import fnlight
from tests.test_resume import setup
dm, state, step, eval_step = setup()
slow = fnlight.LambdaCallback(on_step=lambda s, m: time.sleep(0.05))  # leave time to be killed mid-run
cbs = (fnlight.EarlyStopping("val/loss", patience=100), slow)
fnlight.Trainer(max_epochs=4, run_dir=sys.argv[1] + "/run", ckpt_dir=sys.argv[1] + "/ck", ckpt_every_n_steps=1,
                callbacks=cbs, loggers=()).fit(state, step, dm, eval_step)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_a_training_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "full").fit(state, step, dm, eval_step)
    rng = random.Random(0)
    for attempt in range(3):
        tmp = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", TRAINER_SCRIPT, str(tmp)], cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list((tmp / "ck").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8))  # somewhere in the remaining ~1 s of training
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saved = sorted(p.name for p in (tmp / "ck").glob("step_*"))
        assert saved and len(saved) < 20, saved  # killed mid-run, after at least one checkpoint
        resumed = trainer(tmp, ckpt_every_n_steps=1).fit(state, step, dm, eval_step)
        assert tree_equal(resumed.state, full.state)
        assert no_time(resumed.history) == no_time(full.history)
