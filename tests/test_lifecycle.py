"""The run around the step (Python API): signals stop a fit cleanly and the same fit resumes bitwise; a
finished run is not trained again; checkpoints record their hyperparameters; errors from the user's code say
where they happened; wrong arguments fail when the step is built; progress lines go through ``logging``."""

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fnlight
import fnlight.optim as fo
from fnlight.train import Interrupted
from fnlight.train.rundir import LOCK, RunDirInUse, set_aside
from fnlight.tree import tree_equal

from .models import loss_fn, mlp
from .test_resume import no_time, setup

ROOT = Path(__file__).resolve().parents[1]


def trainer(tmp, *callbacks, **kw):
    cbs = (fnlight.EarlyStopping("train/loss", patience=100), *callbacks)
    return fnlight.Trainer(**{"max_epochs": 4, "run_dir": tmp / "run", "ckpt_dir": tmp / "ck", "callbacks": cbs,
                              "loggers": (fnlight.train.CSVLogger(),), **kw})


def csv_rows(text):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(io.StringIO(text))]


def send_at(step, signum=signal.SIGTERM):
    """A callback that sends this process a real signal during the given step."""
    def on_step(state, metrics):
        if int(state.step) == step:
            os.kill(os.getpid(), signum)
    return fnlight.LambdaCallback(on_step=on_step)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run (4 epochs of 5 steps)."""
    dm, state, step, eval_step = setup()
    tmp = tmp_path_factory.mktemp("full")
    result = trainer(tmp).fit(state, step, dm, eval_step)
    return result, (tmp / "run" / "metrics.csv").read_text()


# -- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("signum", "at"), [(signal.SIGTERM, 7), (signal.SIGINT, 10), (signal.SIGUSR1, 1)])
def test_a_signal_saves_where_it_stopped_and_the_same_fit_resumes_bitwise(tmp_path, full, signum, at):
    dm, state, step, eval_step = setup()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with pytest.raises(Interrupted) as info:
        trainer(tmp_path, send_at(at, signum)).fit(state, step, dm, eval_step)
    e = info.value
    assert e.signal == signum and e.step == at and e.exit_code == 128 + signum
    assert (e.epoch, e.position) == ((at - 1) // 5, (at - 1) % 5 + 1)  # mid-epoch: after the step in progress
    assert e.checkpoint == tmp_path / "ck" / f"step_{at:09d}" and e.checkpoint.is_dir()
    assert str(e).startswith(f"interrupted by {signal.Signals(signum).name} at step {at}, epoch {e.epoch}")
    _, meta = fnlight.load_checkpoint(e.checkpoint)
    assert (meta["epoch"], meta["position"], meta["finished"]) == (e.epoch, e.position, None)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    resumed = trainer(tmp_path).fit(state, step, dm, eval_step)
    assert resumed.resumed_from == e.checkpoint
    assert tree_equal(resumed.state, full[0].state)
    assert no_time(resumed.history) == no_time(full[0].history)
    # the logs flushed at the interrupt, and continued without gaps or duplicates
    assert csv_rows((tmp_path / "run" / "metrics.csv").read_text()) == csv_rows(full[1])


def test_a_signal_at_an_epoch_end_and_with_async_saves(tmp_path, full):
    dm, state, step, eval_step = setup()
    stop_in_val = fnlight.LambdaCallback(on_epoch=lambda s, m: os.kill(os.getpid(), signal.SIGTERM)
                                         if int(s.step) == 10 else None)
    with pytest.raises(Interrupted) as info:
        trainer(tmp_path, stop_in_val, async_save=True).fit(state, step, dm, eval_step)
    assert (info.value.step, info.value.epoch, info.value.position) == (10, 2, 0)
    resumed = trainer(tmp_path, async_save=True).fit(state, step, dm, eval_step)
    assert tree_equal(resumed.state, full[0].state) and no_time(resumed.history) == no_time(full[0].history)


def test_without_a_ckpt_dir_a_signal_still_stops_cleanly(tmp_path):
    dm, state, step, _ = setup()
    with pytest.raises(Interrupted, match="no checkpoint .the Trainer has no ckpt_dir.") as info:
        fnlight.Trainer(max_epochs=2, run_dir=tmp_path, loggers=(), callbacks=(send_at(3),)).fit(state, step, dm)
    assert info.value.checkpoint is None and info.value.step == 3


def test_signals_can_be_left_alone(tmp_path):
    dm, state, step, _ = setup()
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        result = fnlight.Trainer(max_epochs=1, run_dir=tmp_path, loggers=(), handle_signals=("SIGTERM",),
                                 callbacks=(send_at(2, signal.SIGUSR1),)).fit(state, step, dm)
        assert int(result.state.step) == 5 and seen == [signal.SIGUSR1]  # the caller's own handler ran
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        fnlight.Trainer(handle_signals=("SIGNOPE",))


def run_script(tmp, block_at, mode):
    return subprocess.Popen([sys.executable, "-m", "tests._interrupt_fit", str(tmp), str(block_at), mode], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, word, timeout=120):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == word:
            return lines
    raise AssertionError(f"no {word!r} from the process: {lines} {proc.stderr.read() if proc.poll() else ''}")


@pytest.mark.slow
def test_sigterm_to_a_real_process_then_the_same_command_again_is_bitwise_the_uninterrupted_run(tmp_path, full):
    proc = run_script(tmp_path, 8, "sync")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"interrupted SIGTERM step=8 epoch=1 position=3 checkpoint={tmp_path / 'ck' / 'step_000000008'} " \
           "handlers_restored=True" in out, out + err
    assert "received SIGTERM: stopping after the current step" in err
    (tmp_path / "go").unlink()
    proc = run_script(tmp_path, -1, "sync")  # the same command again
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "finished" in out, err
    final, meta = fnlight.load_checkpoint(tmp_path / "final")
    assert tree_equal(final, full[0].state) and no_time(meta["history"]) == no_time(full[0].history)


@pytest.mark.slow
def test_a_second_sigint_while_saving_aborts_at_once_and_leaves_no_damaged_checkpoint(tmp_path):
    proc = run_script(tmp_path, 7, "slowsave")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGINT)
    (tmp_path / "go").touch()
    wait_for(proc, "saving")  # the interrupt's checkpoint is being written (and would take a minute)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20 and proc.returncode in (-signal.SIGINT, 130), err
    assert "KeyboardInterrupt" in err
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step_000000005"], names  # the one being written is gone, no temp directory left
    fnlight.load_checkpoint(tmp_path / "ck" / names[-1])  # the newest loads


@pytest.mark.slow
def test_with_signal_handling_off_sigterm_kills_at_once(tmp_path):
    proc = run_script(tmp_path, 7, "off")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000000005"]


# -- finished runs ---------------------------------------------------------------------------------

def test_a_finished_run_trains_nothing_again_and_raising_the_limit_continues_it(tmp_path, full, caplog):
    dm, state, step, eval_step = setup()
    trainer(tmp_path, max_epochs=2).fit(state, step, dm, eval_step)
    ckpts = sorted((tmp_path / "ck").iterdir())
    assert fnlight.load_checkpoint(ckpts[-1])[1]["finished"] == "max_epochs"
    rows = (tmp_path / "run" / "metrics.csv").read_text()
    steps = []
    with caplog.at_level(logging.INFO, logger="fnlight"):
        again = trainer(tmp_path, fnlight.LambdaCallback(on_step=lambda s, m: steps.append(1)),
                        max_epochs=2).fit(state, step, dm, eval_step)
    assert steps == [] and again.already_finished and again.finished == "max_epochs"
    assert int(again.state.step) == 10 and len(again.history) == 2
    assert sorted((tmp_path / "ck").iterdir()) == ckpts and (tmp_path / "run" / "metrics.csv").read_text() == rows
    assert f"already finished at step 10 (max_epochs reached): nothing to train ({ckpts[-1]}" in caplog.text
    more = trainer(tmp_path).fit(state, step, dm, eval_step)  # max_epochs 4: continues
    assert not more.already_finished and tree_equal(more.state, full[0].state)


def test_max_steps_mid_epoch_is_finished_until_raised(tmp_path, full):
    dm, state, step, eval_step = setup()
    trainer(tmp_path, max_steps=7).fit(state, step, dm, eval_step)
    _, meta = fnlight.load_checkpoint(tmp_path / "ck" / "step_000000007")
    assert (meta["finished"], meta["epoch"], meta["position"]) == ("max_steps", 1, 2)
    assert trainer(tmp_path, max_steps=7).fit(state, step, dm, eval_step).already_finished
    assert tree_equal(trainer(tmp_path).fit(state, step, dm, eval_step).state, full[0].state)


def test_an_early_stopped_run_is_not_trained_one_more_epoch_at_every_rerun(tmp_path, caplog):
    dm, state, step, eval_step = setup()
    stopper = fnlight.EarlyStopping("val/loss", mode="max", patience=1)  # stops after the second epoch
    tr = fnlight.Trainer(max_epochs=10, run_dir=tmp_path / "run", ckpt_dir=tmp_path / "ck", callbacks=(stopper,),
                         loggers=(fnlight.train.CSVLogger(),))
    with caplog.at_level(logging.INFO, logger="fnlight"):
        first = tr.fit(state, step, dm, eval_step)
    assert first.finished == "stopped by EarlyStopping" and int(first.state.step) == 10
    assert "stopped by EarlyStopping at step 10, epoch 1" in caplog.text
    _, meta = fnlight.load_checkpoint(tmp_path / "ck" / "step_000000010")
    assert meta["finished"] == "stopped by EarlyStopping"
    assert meta["callbacks"]["EarlyStopping#0"]["wait"] == 1 and meta["callbacks"]["EarlyStopping#0"][
        "stopped_epoch"] == 1
    for _ in range(2):
        again = tr.fit(state, step, dm, eval_step)
        assert again.already_finished and int(again.state.step) == 10
        assert again.callback_state(stopper) == first.callback_state(stopper)
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 2


# -- an honest record ------------------------------------------------------------------------------

def test_checkpoints_record_the_hparams_given_to_fit(tmp_path):
    dm, state, step, _ = setup()
    hp = {"lr": 1e-2, "layers": [8, 8], "name": "mlp", "opt": {"b1": 0.9}}
    trainer(tmp_path, max_epochs=1).fit(state, step, dm, hparams=hp)
    _, meta = fnlight.load_checkpoint(tmp_path / "ck" / "step_000000005")
    assert meta["hparams"] == hp
    with pytest.raises(TypeError, match=r"hparams\['act'\] is a type, which a checkpoint's JSON cannot hold"):
        trainer(tmp_path / "b", max_epochs=1).fit(state, step, dm, hparams={"act": torch.nn.ReLU})
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_resume_messages_name_the_checkpoint_used_and_the_ones_skipped(tmp_path, caplog):
    dm, state, step, _ = setup()
    trainer(tmp_path, max_steps=7, ckpt_every_n_steps=3).fit(state, step, dm)
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step_000000003", "step_000000006", "step_000000007"]
    for name in ("step_000000007", "step_000000006"):
        (ck / name / "tensors.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="fnlight"):
        result = trainer(tmp_path, max_steps=8).fit(state, step, dm)
    assert result.resumed_from == ck / "step_000000003"
    [line] = [r.getMessage() for r in caplog.records if r.name == "fnlight" and "checkpoint" in r.getMessage()]
    assert line.startswith(f"skipped the damaged checkpoints {ck / 'step_000000007'} (") and "\n" not in line
    assert f"; {ck / 'step_000000006'} (" in line
    assert line.endswith(f"; resuming from {ck / 'step_000000003'} (step 3, epoch 0, batch 3)")
    for p in ck.iterdir():
        (p / "tensors.safetensors").write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fnlight"):
        result = trainer(tmp_path, max_steps=2).fit(state, step, dm)
    assert result.resumed_from is None and int(result.state.step) == 2
    assert f"every checkpoint in {ck} is damaged: starting afresh" in caplog.text


def test_set_aside_keeps_the_previous_run_loadable(tmp_path):
    dm, state, step, _ = setup()
    trainer(tmp_path, max_epochs=1).fit(state, step, dm)
    (tmp_path / "run" / "extra.txt").write_text("x")
    assert set_aside(tmp_path / "run") == tmp_path / "run" / "previous" / "0"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != LOCK) == ["previous"]
    assert (tmp_path / "run" / "previous" / "0" / "metrics.csv").is_file()
    (tmp_path / "run" / "new.txt").write_text("y")
    assert set_aside(tmp_path / "run") == tmp_path / "run" / "previous" / "1"
    assert set_aside(tmp_path / "run") is None and set_aside(tmp_path / "nothing") is None


# -- one run at a time in a run directory ------------------------------------------------------------

HOLD = "import sys; from fnlight.train.rundir import claim; c = claim(sys.argv[1]); c.__enter__(); " \
       "print('held', flush=True); sys.stdin.read()"


def test_a_second_process_cannot_train_in_a_claimed_run_dir_and_kill_9_leaves_no_stale_claim(tmp_path):
    from .test_cli import assert_one_line_error, invoke

    dm, state, step, _ = setup()
    run = tmp_path / "run"
    trainer(tmp_path, max_epochs=1).fit(state, step, dm)  # an earlier run's files, which nobody may touch
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"{run} is in use: another process is training there"):
            trainer(tmp_path, max_epochs=2).fit(state, step, dm)
        # fnlight fit, even with --no-resume (which would move the holder's files aside): one line, exit 2
        assert_one_line_error(invoke("fit", "--set", "hidden=8", "--max-steps", "1", "--run-dir", run, "--no-resume"),
                              f"{run} is in use")
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing read-modified or moved
    finally:
        holder.kill()  # kill -9: the kernel drops its lock; nothing stale is left to clean up
        holder.wait()
    result = trainer(tmp_path, max_epochs=2).fit(state, step, dm)
    assert result.resumed_from is not None and len(result.history) == 2


def test_claims_nest_within_a_process(tmp_path):
    from fnlight.train.rundir import claim

    dm, state, step, _ = setup()
    with claim(tmp_path / "run"):  # what fnlight fit holds around Trainer.fit
        trainer(tmp_path, max_epochs=1).fit(state, step, dm)
        trainer(tmp_path, max_epochs=2).fit(state, step, dm)
    out = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "run")], input="", capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "held", out.stderr  # released once the outermost claim ends


# -- errors from the user's code ---------------------------------------------------------------------

def test_an_error_in_loss_fn_keeps_its_type_and_traceback_and_says_where(tmp_path):
    dm, state, _, eval_step = setup()
    model = mlp(dropout=0.3, bn=True)

    def bad_loss(model_fn, batch, key):
        if bad_loss.calls == 6:
            raise ZeroDivisionError("my bug")
        bad_loss.calls += 1
        return loss_fn(model_fn, batch, key)

    bad_loss.calls = 0
    opt = fo.adamw(1e-2)
    step = fnlight.make_train_step(model, bad_loss, opt)
    with pytest.raises(ZeroDivisionError, match="my bug") as info:
        fnlight.Trainer(max_epochs=2, run_dir=tmp_path, loggers=()).fit(fnlight.TrainState.create(model, opt), step,
                                                                         dm)
    assert info.value.__notes__ == [
        "in the train step (loss_fn test_an_error_in_loss_fn_keeps_its_type_and_traceback_and_says_where.<locals>"
        ".bad_loss) at step 7, epoch 1, batch 1 of split 'train'"]
    assert info.traceback[-1].name == "bad_loss"  # the original traceback, down to the user's line


def test_errors_in_metrics_fn_callbacks_and_the_pipeline_say_where(tmp_path):
    import fnlight.data as fd

    dm, state, step, _ = setup()
    model = mlp(dropout=0.3, bn=True)

    def bad_metrics(model_fn, batch):
        raise ValueError("bad metric")

    with pytest.raises(ValueError, match="bad metric") as info:
        fnlight.Trainer(loggers=(), run_dir=tmp_path).validate(state, fnlight.make_eval_step(model, bad_metrics), dm)
    assert info.value.__notes__ == ["in the eval step (metrics_fn test_errors_in_metrics_fn_callbacks_and_the_pipeline"
                                    "_say_where.<locals>.bad_metrics) for validate, batch 0 of split 'val'"]

    def boom(state, metrics):
        raise RuntimeError("callback bug")

    with pytest.raises(RuntimeError, match="callback bug") as info:
        fnlight.Trainer(loggers=(), run_dir=tmp_path, callbacks=(fnlight.LambdaCallback(on_epoch=boom),)).fit(
            state, step, dm)
    assert info.value.__notes__ == ["in callback LambdaCallback#0 (LambdaCallback.on_epoch) at the end of epoch 0"]

    def broken(sample):
        raise KeyError("no such column")

    bad_dm = dm.replace(pipeline=dm.pipeline >> fd.transform(broken, on="train"))
    with pytest.raises(KeyError, match="no such column") as info:
        fnlight.Trainer(loggers=(), run_dir=tmp_path).fit(state, step, bad_dm)
    # (a transform after batch(): no single sample fails)
    assert info.value.__notes__[-1] == ("while producing batch 0 of split 'train' (epoch 0) in the data pipeline "
                                        "(a transform, collate or reader)")

    # a per-sample transform that fails on one sample: the note names its index in the split
    def picky(sample):
        x, y = sample
        if int(y) == 13:
            raise ValueError("sample 13 is bad")
        return x, y

    ids = (fd.from_tensors(torch.linspace(-1, 1, 40)[:, None], torch.arange(40)) >> fd.split({"train": 0.5, "val": 0.5},
           seed=0))
    good = fnlight.DataModule(ids >> fd.shuffle() >> fd.batch(4), seed=0)
    j = [int(good.dataset("train")[k][1]) for k in range(20)].index(13)  # its index in the train split
    b = next(b for b, idx in enumerate(good.index_batches("train", 0)) if j in idx.tolist())
    bad = fnlight.DataModule(ids >> fd.transform(picky, on="train") >> fd.shuffle() >> fd.batch(4), seed=0)
    lin = torch.nn.Linear(1, 1)

    def lin_loss(model_fn, batch, key):
        return model_fn(batch[0]).pow(2).mean()

    opt = fo.sgd(0.1)
    with pytest.raises(ValueError, match="sample 13 is bad") as info:
        fnlight.Trainer(loggers=(), run_dir=tmp_path, max_epochs=2).fit(
            fnlight.TrainState.create(lin, opt), fnlight.make_train_step(lin, lin_loss, opt), bad)
    assert info.value.__notes__[-1] == (f"while producing batch {b} of split 'train' (epoch 0) in the data pipeline "
                                        f"(a transform, collate or reader); it fails on sample {j} of the split")


# -- checked when the step is built ----------------------------------------------------------------

def test_wrong_step_arguments_fail_when_the_step_is_built():
    model = mlp()
    with pytest.raises(TypeError, match=r"loss_fn .*two.*\(model_fn, batch\) cannot be called as loss_fn\(model_fn, "
                                        r"batch, key\): it must take 3 positional parameters"):
        def two(model_fn, batch):
            return 0.0
        fnlight.make_train_step(model, two, fo.sgd(0.1))
    with pytest.raises(TypeError, match=r"torch.optim.Adam, .*fnlight.optim.adam\(learning_rate=0.003\) has the "
                                        "same arithmetic"):
        fnlight.make_train_step(model, loss_fn, torch.optim.Adam(model.parameters(), lr=3e-3))
    with pytest.raises(TypeError, match="torch.optim.SGD.*fnlight.optim.sgd"):
        fnlight.make_train_step(model, loss_fn, torch.optim.SGD)
    with pytest.raises(TypeError, match="must be a fnlight.optim GradientTransformation .init, update., got str"):
        fnlight.make_train_step(model, loss_fn, "adam")
    with pytest.raises(TypeError, match=r"metrics_fn .* cannot be called as metrics_fn\(model_fn, batch\)"):
        fnlight.make_eval_step(model, lambda batch: {})
    fnlight.make_train_step(model, lambda *args: 0.0, fo.sgd(0.1))  # *args takes three
    fnlight.make_train_step(model, lambda model_fn, batch, key=None: 0.0, fo.sgd(0.1))


def test_a_state_made_with_another_optimizer_is_one_error_naming_both(tmp_path):
    dm, _, _, _ = setup()
    model = mlp()
    step = fnlight.make_train_step(model, loss_fn, fo.adam(1e-3))
    state = fnlight.TrainState.create(model, fo.sgd(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="created with another optimizer than the train step's: its optimizer "
                                         "state holds SgdState, the step's optimizer makes AdamState"):
        fnlight.Trainer(run_dir=tmp_path, loggers=()).fit(state, step, dm)
    # the same optimizer with other hyperparameters is fine
    fnlight.Trainer(run_dir=tmp_path, loggers=(), max_steps=1).fit(
        fnlight.TrainState.create(model, fo.adam(5e-2)), step, dm)


# -- progress through logging ----------------------------------------------------------------------

PROGRESS_SCRIPT = r"""
import logging, sys
import fnlight
from tests.test_resume import setup
if sys.argv[1] == "quiet":
    logging.getLogger("fnlight").setLevel(logging.WARNING)
dm, state, step, eval_step = setup()
fnlight.Trainer(max_epochs=2, run_dir=sys.argv[2], ckpt_dir=sys.argv[2] + "/ck", loggers=()).fit(state, step, dm,
                                                                                                  eval_step)
"""


@pytest.mark.slow
def test_without_a_terminal_fit_logs_one_line_per_epoch_unless_configured_quiet(tmp_path):
    def run(mode, where):
        out = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, mode, str(tmp_path / where)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stderr

    err = run("default", "a")
    lines = [line for line in err.splitlines() if line.startswith("fnlight: epoch")]
    assert len(lines) == 2 and "train/loss" in lines[0] and "val/acc" in lines[0], err
    err = run("default", "a")  # again: finished, one line
    assert "fnlight: already finished at step 10 (max_epochs reached)" in err and "epoch 0" not in err
    assert run("quiet", "b").strip() == ""


def test_experiment_json_written_only_through_on_checkpoint(tmp_path):
    dm, state, step, _ = setup()
    seen = []
    trainer(tmp_path, max_epochs=2, keep_last=1).fit(state, step, dm, on_checkpoint=seen.append)
    assert seen == [tmp_path / "ck" / "step_000000005", tmp_path / "ck" / "step_000000010"]
    assert json.loads((tmp_path / "ck" / "step_000000010" / "checkpoint.json").read_text())["step"] == 10
