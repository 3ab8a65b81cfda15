"""Trainer checkpoints: an interrupted and resumed fit ends bitwise where an uninterrupted one does."""

import shutil
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
from fnlight.train.checkpoint import CheckpointError
from fnlight.tree import tree_equal

from .models import resume_setup


def setup():
    return resume_setup()


def trainer(tmp, steps_taken=None, **kw):
    cbs = (fnlight.EarlyStopping("train/loss", patience=100),)  # (its state is resumed too)
    if steps_taken is not None:  # counts the steps this fit really runs
        cbs += (fnlight.LambdaCallback(on_step=lambda s, m: steps_taken.append(int(s.step))),)
    return fnlight.Trainer(max_epochs=4, run_dir=tmp / "run", ckpt_dir=tmp / "ck", callbacks=cbs, loggers=(), **kw)


def no_time(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


@settings(max_examples=8)
@given(stop_at=st.integers(1, 19), every=st.integers(1, 3), crash=st.booleans())
def test_resume_after_any_step_equals_the_uninterrupted_run(tmp_path_factory, stop_at, every, crash):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path_factory.mktemp("full")).fit(state, step, dm, eval_step)
    tmp = tmp_path_factory.mktemp("cut")
    trainer(tmp, max_steps=stop_at, ckpt_every_n_steps=every).fit(state, step, dm, eval_step)  # stops here...
    assert (tmp / "ck" / f"step_{stop_at:09d}").is_dir()  # ...and saves where it stopped, mid-epoch or not
    last_saved = stop_at - stop_at % every if crash else stop_at
    if last_saved != stop_at:  # as if it had crashed after its last scheduled checkpoint
        shutil.rmtree(tmp / "ck" / f"step_{stop_at:09d}")
    taken = []
    resumed = trainer(tmp, taken, ckpt_every_n_steps=every).fit(state, step, dm, eval_step)
    assert taken == list(range(last_saved + 1, 21))  # it started from the newest checkpoint, not from scratch
    assert tree_equal(resumed.state, full.state)
    assert no_time(resumed.history) == no_time(full.history)
    assert resumed.callback_states[0] == full.callback_states[0]  # EarlyStopping continued its counts


def test_a_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "a").fit(state, step, dm, eval_step)
    trainer(tmp_path / "b", max_steps=13, ckpt_every_n_steps=4).fit(state, step, dm, eval_step)
    newest = sorted((tmp_path / "b" / "ck").iterdir())[-1]
    assert newest.name == "step_000000013"  # where max_steps stopped it
    (newest / "tensors.safetensors").write_bytes(b"garbage")
    resumed = trainer(tmp_path / "b", ckpt_every_n_steps=4).fit(state, step, dm, eval_step)
    [line] = [r.getMessage() for r in caplog.records if r.name == "fnlight"]
    assert "skipped the damaged checkpoint" in line and "step_000000013" in line and "\n" not in line
    resumed_at = tmp_path / "b" / "ck" / "step_000000012"
    assert line.endswith(f"resuming from {resumed_at} (step 12, epoch 2, batch 2)")
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


def test_resume_false_starts_over(tmp_path, caplog):
    dm, state, step, _ = setup()
    trainer(tmp_path, max_steps=3, ckpt_every_n_steps=1).fit(state, step, dm)
    fresh = trainer(tmp_path, max_steps=2, resume=False).fit(state, step, dm)
    assert int(fresh.state.step) == 2
    assert "resume=False, but" in caplog.text and "holds checkpoints of an earlier run (newest step_000000003)" \
        in caplog.text
    shutil.rmtree(tmp_path / "ck")
    with pytest.raises(ValueError, match="ckpt_every_n_steps"):
        fnlight.Trainer(ckpt_dir=tmp_path, ckpt_every_n_steps=0)
    assert torch.equal(state.step, torch.tensor(0))


def test_async_saves_resume_to_the_same_result(tmp_path):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "full").fit(state, step, dm, eval_step)
    cut = trainer(tmp_path / "cut", max_steps=7, ckpt_every_n_steps=2, keep_last=2, async_save=True)
    cut.fit(state, step, dm, eval_step)
    # fit returned after its last write; pruning ran after each write, in the background
    assert [p.name for p in sorted((tmp_path / "cut" / "ck").iterdir())] == ["step_000000006", "step_000000007"]
    resumed = trainer(tmp_path / "cut", ckpt_every_n_steps=2, keep_last=2, async_save=True).fit(state, step, dm,
                                                                                                 eval_step)
    assert tree_equal(resumed.state, full.state)
    assert no_time(resumed.history) == no_time(full.history)
    assert not [t for t in threading.enumerate() if t.name.startswith("fnlight-checkpoint")]


def best_k_trainer(tmp, **kw):
    best = fnlight.ModelCheckpoint("val/loss", save_top_k=2)
    return best, fnlight.Trainer(max_epochs=6, run_dir=tmp / "run", ckpt_dir=tmp / "ck", keep_last=1, callbacks=(best,),
                                 loggers=(), **kw)


def test_model_checkpoint_keeps_the_best_k_and_resumes_its_ranking(tmp_path):
    dm, state, step, eval_step = setup()
    best, tr = best_k_trainer(tmp_path / "full")
    full = tr.fit(state, step, dm, eval_step)
    ranked = sorted(full.history, key=lambda r: r["val/loss"])[:2]  # stable: the earlier of equal values first
    assert full.callback_state(best) == {"best_k": [[r["val/loss"], r["step"]] for r in ranked]}
    kept = {p.name for p in (tmp_path / "full" / "ck").iterdir()}
    assert kept == {f"step_{r['step']:09d}" for r in ranked} | {"step_000000030"}  # best 2 + the newest
    assert best.best_path(full) == tmp_path / "full" / "ck" / f"step_{ranked[0]['step']:09d}"
    best_state, meta = fnlight.load_checkpoint(best.best_path(full))
    assert int(best_state.step) == ranked[0]["step"] and meta["position"] == 0

    # interrupted mid-epoch and resumed: the same best k, the same directories
    _, cut = best_k_trainer(tmp_path / "cut", max_steps=17)
    cut.fit(state, step, dm, eval_step)
    best2, tr2 = best_k_trainer(tmp_path / "cut")
    resumed = tr2.fit(state, step, dm, eval_step)
    assert resumed.callback_state(best2) == full.callback_state(best)
    assert {p.name for p in (tmp_path / "cut" / "ck").iterdir()} == kept


def test_model_checkpoint_errors(tmp_path):
    dm, state, step, eval_step = setup()
    with pytest.raises(ValueError, match="ckpt_dir"):
        fnlight.Trainer(max_epochs=1, run_dir=tmp_path, loggers=(),
                        callbacks=(fnlight.ModelCheckpoint(),)).fit(state, step, dm, eval_step)
    with pytest.raises(KeyError, match="val/los"):
        fnlight.Trainer(max_epochs=1, run_dir=tmp_path, ckpt_dir=tmp_path / "ck", loggers=(),
                        callbacks=(fnlight.ModelCheckpoint("val/los"),)).fit(state, step, dm, eval_step)
    with pytest.raises(ValueError, match="save_top_k"):
        fnlight.ModelCheckpoint(save_top_k=0)
    with pytest.raises(KeyError, match="'val/loss', which no step of this fit produces .val/ metrics need an "
                                       "eval_step given to fit.; the epoch metrics are train/acc, train/loss"):
        fnlight.Trainer(max_epochs=1, run_dir=tmp_path, ckpt_dir=tmp_path / "ck2", loggers=(),
                        callbacks=(fnlight.ModelCheckpoint(),)).fit(state, step, dm)  # no eval step: never a val/loss
    with pytest.raises(ValueError, match="no best checkpoint"):
        best = fnlight.ModelCheckpoint("val/loss")
        result = fnlight.Trainer(max_epochs=2, val_every_n_epochs=5, run_dir=tmp_path, ckpt_dir=tmp_path / "ck3",
                                 loggers=(), callbacks=(best,)).fit(state, step, dm, eval_step)  # never validated
        best.best_path(result)


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
                callbacks=cbs, loggers=(), async_save=sys.argv[2] == "async").fit(state, step, dm, eval_step)
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
    for attempt, mode in enumerate(["sync", "async", "sync", "async"]):
        tmp = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", TRAINER_SCRIPT, str(tmp), mode], cwd=root,
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
