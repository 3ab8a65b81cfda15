"""Stacked states in the Trainer and in checkpoints: per-member metrics, callbacks, exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.optim as fo
from fnlight.tree import tree_equal

from .models import loss_fn, metrics_fn, mlp, resume_setup

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = 3


def setup():
    """resume_setup's data, with three members of an MLP with dropout (BatchNorm members work too; see
    test_ensemble.py) whose learning rates differ (inject_hyperparams)."""
    dm, _, _, _ = resume_setup()
    model = mlp(dropout=0.3)
    opt = fo.inject_hyperparams(fo.adamw)(learning_rate=fo.warmup_cosine(1e-2, 3, 20), weight_decay=0.1)
    states = [fnlight.TrainState.create(mlp(dropout=0.3), opt, seed=s) for s in range(MEMBERS)]
    states = [s.replace(opt_state=fo.set_hyperparams(s.opt_state, weight_decay=wd))
              for s, wd in zip(states, (0.0, 0.1, 0.3), strict=True)]
    state = fnlight.stack_states(states)
    step = fnlight.make_train_step(model, loss_fn, opt, ensemble=True)
    return dm, state, step, fnlight.make_eval_step(model, metrics_fn, ensemble=True)


def trainer(tmp, **kw):
    cbs = (fnlight.EarlyStopping("val/loss/1", patience=100),)  # monitors one member
    return fnlight.Trainer(max_epochs=4, run_dir=tmp / "run", ckpt_dir=tmp / "ck", callbacks=cbs, **kw)


def no_time(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def test_fit_logs_every_member_and_the_mean(tmp_path):
    dm, state, step, eval_step = setup()
    result = trainer(tmp_path).fit(state, step, dm, eval_step)
    assert fnlight.num_members(result.state) == MEMBERS and result.state.step.tolist() == [20] * MEMBERS
    last = result.history[-1]
    members = [last[f"val/acc/{i}"] for i in range(MEMBERS)]
    assert last["val/acc"] == pytest.approx(sum(members) / MEMBERS)
    assert {"train/loss/0", "train/loss/2", "val/loss/1"} <= set(last)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/acc/2" in r for r in rows)
    # each member equals what the eval step says of it alone
    alone = fnlight.make_eval_step(mlp(dropout=0.3), metrics_fn)
    member = fnlight.unstack_states(result.state)[2]
    assert fnlight.Trainer().validate(member, alone, dm)["acc"] == pytest.approx(last["val/acc/2"])


def test_stacked_states_round_trip_through_checkpoints(tmp_path):
    _, state, step, _ = setup()
    state, _ = step(state, (torch.randn(8, 6), torch.randint(0, 3, (8,))))
    fnlight.save_checkpoint(tmp_path / "ck", state)
    loaded, _ = fnlight.load_checkpoint(tmp_path / "ck", like=state)
    assert tree_equal(loaded, state)
    doc = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert doc["step"] == 1 and doc["key"] == state.key.tolist()


@settings(max_examples=4, deadline=None)
@given(stop_at=st.integers(1, 19))
def test_an_interrupted_ensemble_resumes_bitwise(tmp_path_factory, stop_at):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path_factory.mktemp("full"), loggers=()).fit(state, step, dm, eval_step)
    tmp = tmp_path_factory.mktemp("cut")
    trainer(tmp, max_steps=stop_at, ckpt_every_n_steps=3, loggers=()).fit(state, step, dm, eval_step)
    resumed = trainer(tmp, ckpt_every_n_steps=3, loggers=()).fit(state, step, dm, eval_step)
    assert tree_equal(resumed.state, full.state)
    assert no_time(resumed.history) == no_time(full.history)
    assert resumed.callback_states[0] == full.callback_states[0]


def test_members_at_different_steps_are_refused(tmp_path):
    dm, state, step, eval_step = setup()
    odd = state.replace(step=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="different steps"):
        trainer(tmp_path).fit(odd, step, dm, eval_step)


ENSEMBLE_SCRIPT = r"""
import sys, time
import fnlight
from tests.test_ensemble_trainer import setup, trainer
from pathlib import Path
dm, state, step, eval_step = setup()
slow = fnlight.LambdaCallback(on_step=lambda s, m: time.sleep(0.05))
tr = trainer(Path(sys.argv[1]), ckpt_every_n_steps=1, loggers=())
tr = fnlight.Trainer(**{**{f: getattr(tr, f) for f in ("max_epochs", "run_dir", "ckpt_dir", "ckpt_every_n_steps",
                                                           "loggers")}, "callbacks": (*tr.callbacks, slow)})
tr.fit(state, step, dm, eval_step)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_an_ensemble_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    dm, state, step, eval_step = setup()
    full = trainer(tmp_path / "full", loggers=()).fit(state, step, dm, eval_step)
    rng = random.Random(1)
    for attempt in range(2):
        tmp = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", ENSEMBLE_SCRIPT, str(tmp)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list((tmp / "ck").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saved = sorted(p.name for p in (tmp / "ck").glob("step_*"))
        assert saved and len(saved) < 20, saved
        resumed = trainer(tmp, ckpt_every_n_steps=1, loggers=()).fit(state, step, dm, eval_step)
        assert tree_equal(resumed.state, full.state)
        assert no_time(resumed.history) == no_time(full.history)


def test_learning_rate_monitor_reads_injected_rates_per_member(tmp_path):
    dm, _, _, _ = resume_setup()
    opt = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1)
    base = fnlight.TrainState.create(mlp(), opt)
    state = fnlight.stack_states([base.replace(opt_state=fo.set_hyperparams(base.opt_state, learning_rate=lr))
                                  for lr in (0.1, 0.3)])
    step = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)
    result = fnlight.Trainer(max_steps=3, run_dir=tmp_path, log_every_n_steps=1,
                             callbacks=(fnlight.LearningRateMonitor(),)).fit(state, step, dm)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "lr/1" in r]
    assert logged and logged[-1]["lr/0"] == 0.1 and logged[-1]["lr/1"] == 0.3 and logged[-1]["lr"] == 0.2
    assert fnlight.num_members(result.state) == 2
    # one model: the rate set between steps (set_hyperparams) is the one logged, not the optimizer's initial one
    single = base.replace(opt_state=fo.set_hyperparams(base.opt_state, learning_rate=0.05))
    one = fnlight.make_train_step(mlp(), loss_fn, opt)
    fnlight.Trainer(max_steps=2, run_dir=tmp_path / "one", log_every_n_steps=1,
                    callbacks=(fnlight.LearningRateMonitor(),)).fit(single, one, dm)
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [0.05, 0.05]
