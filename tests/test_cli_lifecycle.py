"""``fnlight fit`` as a real process around the run: a signal stops it with exit code 128+N and the same
command resumes bitwise; a finished run is not trained again; checkpoints carry their hyperparameters;
an error in the experiment's own code is a few lines."""

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fnlight
from fnlight.cli import main
from fnlight.experiment import Experiment, digits
from fnlight.tree import tree_equal

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "fnlight")


def slow(seed: int = 0, hidden: int = 16, max_epochs: int = 2) -> Experiment:
    """The digits MLP whose loss sleeps 40 ms per step (time to be interrupted mid-run); it creates the file
    ``$FNLIGHT_TEST_TRAINING`` (when set) at its second step, so a test can signal mid-run."""
    exp = digits(seed=seed, hidden=hidden, max_epochs=max_epochs)
    started, calls = os.environ.get("FNLIGHT_TEST_TRAINING"), []

    def loss(model_fn, batch, key):
        time.sleep(0.04)
        calls.append(1)
        if started and len(calls) == 2:  # the second step: the training loop (and its signal handlers) runs
            Path(started).touch()
        return exp.loss_fn(model_fn, batch, key)

    return dataclasses.replace(exp, loss_fn=loss)


def csv_rows(path):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(io.StringIO(path.read_text()))]


def fit_cmd(run_dir, *extra):
    return [CLI, "fit", "tests.test_cli_lifecycle:slow", "--run-dir", str(run_dir), *extra]


def start(cmd, **env):
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


def newest(run_dir):
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    out = subprocess.run(fit_cmd(run), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return run


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "delay"), [(signal.SIGTERM, 0.4), (signal.SIGINT, 1.4)])
def test_a_signal_exits_128_plus_n_and_the_same_command_resumes_bitwise(tmp_path, full, signum, delay):
    run = tmp_path / "run"
    training = tmp_path / "training"
    proc = start(fit_cmd(run), FNLIGHT_TEST_TRAINING=str(training))
    wait_for(training)  # the first step runs: the handlers are in place (a fixed delay raced them under load)
    time.sleep(delay)  # somewhere in the 46 steps (~0.05 s each)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.startswith("interrupted by")]
    assert len(lines) == 1, err
    step = int(lines[0].split(" at step ")[1].split(",")[0])
    assert 0 < step < 46, err
    assert lines[0] == (f"interrupted by {name} at step {step}, epoch {lines[0].split('epoch ')[1].split(';')[0]}; "
                        f"checkpoint {run / 'checkpoints' / f'step_{step:09d}'}; run the same command to resume")
    assert "Traceback" not in err
    again = subprocess.run(fit_cmd(run), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{step:09d}'}" in again.stdout
    assert f"(resumed at step {step})" in again.stdout
    a, _ = fnlight.load_checkpoint(newest(run))
    b, _ = fnlight.load_checkpoint(newest(full))
    assert int(a.step) == 46 and tree_equal(a, b)
    assert csv_rows(run / "metrics.csv") == csv_rows(full / "metrics.csv")


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again_and_more_epochs_continue_it(tmp_path, full):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full, run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = CliRunner().invoke(main, ["fit", "tests.test_cli_lifecycle:slow", "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    assert res.output.count("already finished") == 1, res.output
    assert f"already finished at step 46 (max_epochs reached; {newest(run)}): nothing trained (raise --max-epochs " \
           "or --max-steps to continue)" in res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # no new checkpoint, no log row
    res = CliRunner().invoke(main, ["fit", "tests.test_cli_lifecycle:slow", "--run-dir", str(run),
                                    "--max-epochs", "3"])
    assert res.exit_code == 0 and "69 steps in" in res.output and "(resumed at step 46)" in res.output, res.output


def test_checkpoints_carry_the_hyperparameters_and_inspect_shows_them(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", "--max-steps", "3", "--set", "hidden=8", "--set", "lr=0.01",
                                    "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    ckpt = run / "checkpoints" / "step_000000003"
    _, meta = fnlight.load_checkpoint(ckpt)
    assert meta["hparams"] == {"seed": 0, "max_epochs": 40, "hidden": 8, "lr": 0.01, "batch_size": 64,
                               "dropout": 0.2, "weight_decay": 0.01}
    assert meta["finished"] == "max_steps"
    res = CliRunner().invoke(main, ["inspect", str(run)])
    assert "hparams     seed=0 max_epochs=40 hidden=8 lr=0.01 batch_size=64 dropout=0.2 weight_decay=0.01" \
        in res.output and "finished    max_steps" in res.output, res.output
    info = json.loads(CliRunner().invoke(main, ["inspect", str(run), "--json"]).output)
    assert info["hparams"]["hidden"] == 8 and info["finished"] == "max_steps"
    # test uses the checkpoint's own hyperparameters, even with the run's record gone
    (run / "experiment.json").unlink()
    res = CliRunner().invoke(main, ["test", "--ckpt", str(run)])
    assert res.exit_code == 0 and "test: accuracy" in res.output, res.output
    assert f"hyperparameters of the run ({ckpt}): " in res.output and "hidden=8" in res.output


def test_experiment_json_is_written_with_the_first_checkpoint_not_before(tmp_path):
    res = CliRunner().invoke(main, ["fit", "tests.test_cli:broken_loss", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert not (tmp_path / "run" / "experiment.json").exists()


def test_an_error_in_the_experiments_code_is_a_few_lines(tmp_path):
    cmd = [CLI, "fit", "tests.test_cli:broken_loss", "--run-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) <= 5, out.stderr
    assert lines[0] == "error: IndexError: list index out of range"
    assert lines[1].startswith(f"  at {ROOT / 'tests' / 'test_cli.py'}:") and lines[1].endswith(" in loss")
    assert lines[2] == ("  in the train step (loss_fn broken_loss.<locals>.loss) at step 1, epoch 0, batch 0 of "
                        "split 'train'")
    debug = subprocess.run([CLI, "--debug", *cmd[1:]], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "in the train step (loss_fn broken_loss.<locals>.loss)" in debug.stderr  # the note, under the traceback


@pytest.mark.slow
def test_ctrl_c_on_fit_with_two_devices_saves_once_and_the_same_command_resumes_bitwise(tmp_path):
    """Ctrl-C reaches the launcher and both ranks (one process group); the launcher passes it on again: the
    ranks take the two deliveries for one, stop at the same step, rank 0 saves, and the command exits 130."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = subprocess.run(fit_cmd(tmp_path / "full", "--devices", "2"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(fit_cmd(run, "--devices", "2"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted by SIGINT at step ")]
    assert len(lines) == 1 and "Aborted" not in err, err[-3000:]
    step = int(lines[0].split(" at step ")[1].split(",")[0])
    assert (run / "checkpoints" / f"step_{step:09d}").is_dir()
    again = subprocess.run(fit_cmd(run, "--devices", "2"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"(resumed at step {step})" in again.stdout, again.stderr[-3000:]
    a, _ = fnlight.load_checkpoint(newest(run))
    b, _ = fnlight.load_checkpoint(newest(tmp_path / "full"))
    assert int(a.step) == int(b.step) and tree_equal(a, b)
