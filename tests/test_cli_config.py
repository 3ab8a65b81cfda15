"""``fnlight fit``'s config files, its callbacks and loggers from the command line, and ``fnlight summary``,
each driven as a real process.

The round trip is the contract: ``fit ... --print-config > run.yaml`` then ``fit --config run.yaml`` is the same
run, bitwise (the final checkpoint's tensors), and a config printed from a config is the config again.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from fnlight._cli_config import OPTIONS, check_value
from fnlight.cli import main
from fnlight.train import load_checkpoint
from fnlight.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--set", "hidden=16")


def fnlight(*args: object, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
            ) -> subprocess.CompletedProcess:
    """``fnlight ARGS`` in a process (``python -m fnlight.cli``), in ``cwd``, one thread."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fnlight.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def newest_tensors(run: Path) -> dict:
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    return {name: load_file(f) for name, f in ((p.name, p) for p in ckpt.glob("*.safetensors"))}


def meta_of(run: Path) -> dict:
    return load_checkpoint(list_checkpoints(run / "checkpoints")[-1])[1]


# -- the round trip ------------------------------------------------------------------------------

@pytest.mark.slow
def test_print_config_then_config_is_the_same_run_bitwise(tmp_path):
    args = (*SMALL, "--set", "lr=0.005", "--max-steps", "12", "--seed", "3", "--clip", "1.0", "--accumulate", "2",
            "--log-every-n-steps", "5", "--ckpt-every-n-steps", "5")
    direct = fnlight("fit", *args, "--run-dir", "direct", cwd=tmp_path)
    assert direct.returncode == 0, direct.stderr
    assert "model: digits MLP (Sequential)" in direct.stdout and "  train    1,437             23" in direct.stdout
    assert [c.name for c in list_checkpoints(tmp_path / "direct" / "checkpoints")] == \
        ["step_000000005", "step_000000010", "step_000000012"]  # --ckpt-every-n-steps 5, and where it stopped
    with open(tmp_path / "direct" / "steps.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["5", "10"]  # --log-every-n-steps 5
    printed = fnlight("fit", *args, "--print-config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert not (tmp_path / "runs").exists()  # --print-config trains nothing and writes nothing
    (tmp_path / "run.yaml").write_text(printed.stdout)
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["target"] == "fnlight.experiment:digits"
    assert cfg["hparams"] == {"seed": 3, "max_epochs": 40, "hidden": 16, "lr": 0.005, "batch_size": 64,
                              "dropout": 0.2, "weight_decay": 0.01}
    # every option is there, defaults filled in (seed and max_epochs are the factory's: in hparams)
    trainer = cfg["trainer"]
    assert trainer["max_steps"] == 12 and trainer["clip"] == 1.0 and trainer["accumulate"] == 2
    assert trainer["precision"] == "32" and trainer["compile"] is False and trainer["devices"] == 1
    assert trainer["device"] == "cpu" and trainer["loggers"] == ["csv", "jsonl"] and trainer["keep_last"] == 3
    assert "seed" not in trainer and "max_epochs" not in trainer
    n_leaves = sum(1 for o in OPTIONS if o.name not in ("seed", "max_epochs"))
    flat = [v for sec in ("trainer", "callbacks", "ensemble") for v in _leaves(cfg[sec])]
    assert len(flat) == n_leaves

    again = fnlight("fit", "--config", "run.yaml", "--run-dir", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "12 steps in" in again.stdout
    a, b = newest_tensors(tmp_path / "direct"), newest_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and a
    for name in a:
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype and a[name][key].shape == b[name][key].shape
            assert a[name][key].reshape(-1).view(torch.uint8).equal(b[name][key].reshape(-1).view(torch.uint8)), key

    # the resolved config is in the run directory (with its run_dir) and in every checkpoint
    saved = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert saved == {**cfg, "trainer": {**cfg["trainer"], "run_dir": "again"}}
    assert meta_of(tmp_path / "again")["config"] == saved
    assert yaml.safe_load((tmp_path / "direct" / "config.yaml").read_text()) == \
        {**cfg, "trainer": {**cfg["trainer"], "run_dir": "direct"}}
    # the hyperparameter record is still the factory's arguments
    assert meta_of(tmp_path / "again")["hparams"] == cfg["hparams"]

    # a config printed from the config is the config again (and from the run's own config.yaml, that run)
    reprinted = fnlight("fit", "--config", "run.yaml", "--print-config", cwd=tmp_path)
    assert reprinted.returncode == 0 and reprinted.stdout == printed.stdout
    resumed = fnlight("fit", "--config", "again/config.yaml", cwd=tmp_path)
    assert resumed.returncode == 0 and "already finished at step 12" in resumed.stdout, resumed.stdout


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


@pytest.mark.slow
def test_command_line_overrides_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "hparams:\n  hidden: 16\n  lr: 0.01\ntrainer:\n  max_steps: 50\n  loggers: [csv, jsonl]\n"
        "callbacks:\n  early_stopping:\n    patience: 7\n")
    res = fnlight("fit", "--config", "run.yaml", "--set", "lr=0.003", "--max-steps", "5", "--logger", "csv",
                  "--early-stopping", "val/acc", "--print-config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["hparams"]["hidden"] == 16 and cfg["hparams"]["lr"] == 0.003  # the file's, and --set's
    assert cfg["trainer"]["max_steps"] == 5 and cfg["trainer"]["loggers"] == ["csv"]
    assert cfg["callbacks"]["early_stopping"] == {"monitor": "val/acc", "mode": "min", "patience": 7,
                                                  "min_delta": 0.0, "check_finite": True}
    # a TARGET on the command line replaces the file's; TOML reads as YAML does
    (tmp_path / "run.toml").write_text('target = "fnlight.experiment:digits"\n[hparams]\nhidden = 16\nlr = 0.01\n'
                                       '[trainer]\nmax_steps = 50\nloggers = ["csv", "jsonl"]\n'
                                       '[callbacks.early_stopping]\npatience = 7\n')
    toml = fnlight("fit", "--config", "run.toml", "--set", "lr=0.003", "--max-steps", "5", "--logger", "csv",
                   "--early-stopping", "val/acc", "--print-config", cwd=tmp_path)
    assert toml.returncode == 0 and toml.stdout == res.stdout, toml.stderr


# -- bad configs: one line, exit code 2, file:line ------------------------------------------------------

BAD = [
    ("run.yaml", "trainer:\n  max_steps: 5\nmodel:\n  hidden: 3\n",
     "run.yaml:3: unknown key model; the top level takes: target, hparams, trainer, callbacks, ensemble"),
    ("run.yaml", "trainer:\n  max_steps: 5\n  max_stepz: 6\n",
     "run.yaml:3: unknown key trainer.max_stepz (did you mean 'max_steps'?)"),
    ("run.yaml", "callbacks:\n  early_stopping:\n    monitor: val/loss\n    patiense: 2\n",
     "run.yaml:4: unknown key callbacks.early_stopping.patiense (did you mean 'patience'?)"),
    ("run.yaml", "hparams:\n  hiden: 3\n", "run.yaml:2: unknown key hparams.hiden (did you mean 'hidden'?)"),
    ("run.yaml", "trainer:\n  devices: 1\n  max_steps: ten\n",
     "run.yaml:3: trainer.max_steps: expected an integer or null, got 'ten' (str)"),
    ("run.yaml", "hparams:\n  hidden: 1.5\n", "run.yaml:2: hparams.hidden: expected an integer, got 1.5 (float)"),
    ("run.yaml", "trainer:\n  precision: 16\n", "run.yaml:2: trainer.precision: expected '32' or 'bf16-mixed'"),
    ("run.yaml", "trainer:\n  loggers: [csv, nosuch]\n", "run.yaml:2: trainer.loggers: unknown logger 'nosuch'"),
    ("run.yaml", "trainer:\n  max_steps: 5\n max_epochs: 2\n", "run.yaml:3: not valid YAML"),
    ("run.yaml", "trainer: [1, 2]\n", "run.yaml:1: trainer: expected a mapping of max_epochs, max_steps"),
    ("run.yaml", "trainer:\n  max_steps: 5\ntrainer:\n  seed: 1\n", "run.yaml:3: the key trainer is given twice"),
    ("run.toml", "[trainer]\nmax_steps = 5\n\n[callbacks.early_stopping]\nmode = 'max'\npatience = 'x'\n",
     "run.toml:6: callbacks.early_stopping.patience: expected an integer, got 'x' (str)"),
    ("run.toml", "[trainer]\nmax_steps = 5\nfoo = 1\n", "run.toml:3: unknown key trainer.foo"),
    ("run.toml", "[trainer]\nmax_steps = = 5\n", "run.toml:2: not valid TOML"),
]


#: the kinds the command is run for as a real process (the others run in-process, with click's CliRunner)
IN_A_PROCESS = {0, 2, 4, 8}


@pytest.mark.parametrize("name, text, needle", BAD, ids=[f"{i}-{b[2].split(': ', 1)[1][:30]}"
                                                         for i, b in enumerate(BAD)])
def test_bad_config_is_one_line_with_file_and_line(tmp_path, monkeypatch, name, text, needle):
    (tmp_path / name).write_text(text)
    args = ("fit", "--config", name, "--max-steps", "1")
    if BAD.index((name, text, needle)) in IN_A_PROCESS:
        res = fnlight(*args, cwd=tmp_path)
        code, out, err = res.returncode, res.stdout, res.stderr
    else:
        monkeypatch.chdir(tmp_path)
        res = CliRunner().invoke(main, list(args))
        code, out, err = res.exit_code, res.stdout, res.stderr
    assert code == 2, (out, err)
    assert err.startswith(f"error: {needle}"), err
    assert err.count("\n") == 1 and out == ""
    assert not (tmp_path / "runs").exists()


def test_missing_config_and_bad_logger_option(tmp_path):
    res = fnlight("fit", "--config", "nope.yaml", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: --config nope.yaml: cannot read it"), res.stderr
    res = fnlight("fit", "--logger", "csv,jsnl", cwd=tmp_path)
    assert res.returncode == 2 and "unknown logger 'jsnl' (did you mean 'jsonl'?)" in res.stderr, res.stderr


def test_tensorboard_logger_without_tensorboard_is_a_clear_error(tmp_path):
    blocker = tmp_path / "block"  # a tensorboard that cannot be imported, whether or not the real one is installed
    (blocker / "tensorboard").mkdir(parents=True)
    (blocker / "tensorboard" / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    res = fnlight("fit", *SMALL, "--logger", "csv,tensorboard", "--max-steps", "1", cwd=tmp_path,
                  env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert res.returncode == 2, res.stderr
    assert res.stderr == ("error: --logger csv,tensorboard: the tensorboard logger needs the tensorboard package: "
                          "pip install 'fnlight[tensorboard]'\n")


@pytest.mark.slow
def test_without_pyyaml_print_config_then_config_still_round_trips(tmp_path):
    blocker = tmp_path / "block"  # a yaml that cannot be imported: the base install, without fnlight[config]
    (blocker / "yaml").mkdir(parents=True)
    (blocker / "yaml" / "__init__.py").write_text("raise ImportError('no PyYAML here')\n")
    env = {"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    printed = fnlight("fit", *SMALL, "--max-steps", "3", "--print-config", cwd=tmp_path, env=env)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "run.yaml").write_text(printed.stdout.replace('"max_steps": 3', '"max_steps": 4'))
    res = fnlight("fit", "--config", "run.yaml", "--run-dir", "r", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert meta_of(tmp_path / "r")["step"] == 4
    bad = printed.stdout.replace('"max_steps": 3', '"max_stepz": 3')
    (tmp_path / "bad.yaml").write_text(bad)
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "max_stepz" in text)
    res = fnlight("fit", "--config", "bad.yaml", cwd=tmp_path, env=env)
    assert res.returncode == 2 and f"bad.yaml:{line}" in res.stderr and "max_stepz" in res.stderr, res.stderr
    (tmp_path / "real.yaml").write_text("trainer:\n  max_steps: 3\n")  # real YAML still needs PyYAML
    res = fnlight("fit", "--config", "real.yaml", cwd=tmp_path, env=env)
    assert res.returncode == 2 and "needs PyYAML: pip install 'fnlight[config]'" in res.stderr, res.stderr


# -- callbacks and loggers from the command line ----------------------------------------------------------

@pytest.mark.slow
def test_early_stopping_and_save_best_from_the_command_line(tmp_path):
    # lr=0: the validation loss never improves after the first epoch, so patience 1 stops after epoch 1
    (tmp_path / "es.yaml").write_text("callbacks:\n  early_stopping:\n    patience: 1\n")
    res = fnlight("fit", "--config", "es.yaml", *SMALL, "--set", "lr=0", "--set", "weight_decay=0",
                  "--early-stopping", "val/loss", "--logger", "csv", "--run-dir", "run", "--no-summary",
                  "--save-best", "val/loss", "--keep-last", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "46 steps in" in res.stdout and "stopped by EarlyStopping" in res.stdout, res.stdout
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 2  # header + epochs 0, 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # --logger csv: only the CSV logger
    assert "model:" not in res.stdout  # --no-summary
    assert meta_of(tmp_path / "run")["finished"] == "stopped by EarlyStopping"
    # --save-best val/loss keeps the best epoch's checkpoint (the first: ties keep the earlier) beside the newest
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000000023",
                                                                                   "step_000000046"]


@pytest.mark.slow
def test_seeds_from_a_config_file(tmp_path):
    (tmp_path / "ens.yaml").write_text("hparams:\n  hidden: 16\ntrainer:\n  max_steps: 4\n  summary: false\n"
                                       "ensemble:\n  seeds: [0, 1]\n")
    res = fnlight("fit", "--config", "ens.yaml", "--run-dir", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 members in one vectorized step (--seeds): seed=0, seed=1" in res.stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["ensemble"]["seeds"] == "0,1"
    assert meta_of(tmp_path / "run")["hparams"]["labels"] == ["seed=0", "seed=1"]


# -- summary ---------------------------------------------------------------------------------------------

FROZEN = '''
import torch
from fnlight.experiment import digits


def partly_frozen(hidden: int = 32):
    exp = digits(hidden=hidden, dropout=0.0)
    for p in exp.model[0].parameters():
        p.requires_grad_(False)
    exp.model[3].bias.requires_grad_(False)
    return exp
'''


@pytest.mark.slow
def test_summary_command(tmp_path):
    (tmp_path / "frozen_exp.py").write_text(FROZEN)
    res = fnlight("summary", "frozen_exp.py:partly_frozen", "--set", "hidden=32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("  ") and ln.split()[0].isdigit()}
    assert rows["0"] == ["0", "Linear", "2,080", "frozen", "[64,", "32]"]  # 64*32 + 32, output on one batch
    assert rows["1"] == ["1", "ReLU", "0", "-", "[64,", "32]"]
    assert rows["3"] == ["3", "Linear", "1,056", "mixed", "[64,", "32]"]
    assert rows["6"] == ["6", "Linear", "330", "trainable", "[64,", "10]"]
    trainable = 1056 - 32 + 330
    assert f"total: {2080 + 1056 + 330:,} parameters ({trainable:,} trainable, {2080 + 32:,} frozen)" in res.stdout
    state = next(ln for ln in lines if ln.startswith("state: "))
    # adamw: two moments per trainable parameter, float32, and an int64 count; frozen parameters ride as buffers
    assert f"parameters {4 * trainable:,}, optimizer state {8 * trainable + 8:,}" in state, state
    assert f"buffers and frozen parameters {4 * (2080 + 32):,}" in state
    assert any(ln.split() == ["train", "1,437", "23"] for ln in lines)
    assert any(ln.split() == ["test", "180", "3"] for ln in lines)
    assert "pipeline:" in lines and any("batch(size=64" in ln for ln in lines)
    # deeper, from a config file
    (tmp_path / "s.yaml").write_text("target: frozen_exp.py:partly_frozen\nhparams:\n  hidden: 8\n")
    res = fnlight("summary", "--config", "s.yaml", cwd=tmp_path)
    assert res.returncode == 0 and "hidden=8" in res.stdout and "  0     Linear" in res.stdout, res.stderr


def test_check_value_law():
    assert check_value(float, 3) == 3.0 and isinstance(check_value(float, 3), float)
    assert check_value(list, "csv, jsonl") == ["csv", "jsonl"]
    assert check_value(str, [0, 1]) == "0,1"
    for kind, bad in [(int, True), (int, 1.5), (bool, "yes"), (str, 3), (("min", "max"), "avg")]:
        with pytest.raises(ValueError, match="expected"):
            check_value(kind, bad)
    assert check_value(int, None, optional=True) is None
    with pytest.raises(ValueError, match="got null"):
        check_value(int, None)


# -- the experiment's own run options ------------------------------------------------------------------------

OWN = '''
import dataclasses
from fnlight.experiment import digits
from fnlight.train import EarlyStopping


def tuned(hidden: int = 16):
    return dataclasses.replace(digits(hidden=hidden), ckpt_every_n_steps=5, log_every_n_steps=7, clip=0.5,
                               callbacks=(EarlyStopping("val/acc", mode="max"),))
'''


def test_the_experiments_run_options_are_the_defaults(tmp_path, monkeypatch):
    (tmp_path / "own_exp.py").write_text(OWN)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["fit", "own_exp.py:tuned", "--log-every-n-steps", "3", "--print-config"])
    assert res.exit_code == 0, res.output
    trainer = yaml.safe_load(res.stdout)["trainer"]
    assert trainer["ckpt_every_n_steps"] == 5 and trainer["clip"] == 0.5  # the experiment's
    assert trainer["log_every_n_steps"] == 3  # the command line's
    assert trainer["max_epochs"] == 40 and trainer["seed"] == 0  # the factory takes neither: the trainer's


def test_experiment_trainer_adds_the_runs_callbacks_and_loggers_to_its_own():
    import dataclasses

    from fnlight.experiment import digits
    from fnlight.train import CSVLogger, EarlyStopping, JSONLLogger, LearningRateMonitor

    own, extra = EarlyStopping("val/acc", mode="max"), LearningRateMonitor()
    exp = dataclasses.replace(digits(hidden=8, max_epochs=3), callbacks=[own], max_steps=9, val_every_n_steps=4)
    trainer = exp.trainer(callbacks=(extra,), run_dir="unused")
    assert trainer.callbacks == (own, extra) and trainer.loggers is None  # None: the Trainer's default loggers
    assert (trainer.max_epochs, trainer.max_steps, trainer.val_every_n_steps) == (3, 9, 4)
    logger = JSONLLogger()
    exp = dataclasses.replace(exp, loggers=(logger,))
    assert exp.trainer().loggers == (logger,)
    csv = CSVLogger()
    assert exp.trainer(loggers=(csv,), max_steps=2).loggers == (logger, csv)
    assert exp.step_options() == {"precision": "32", "compile": False, "clip": None, "accumulate": 1}


@pytest.mark.slow
def test_tensorboard_and_mlflow_loggers_from_the_command_line(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = fnlight("fit", *SMALL, "--max-steps", "30", "--log-every-n-steps", "10", "--logger",
                  "jsonl,tensorboard,mlflow", "--run-dir", tmp_path / "run", cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "cli"})
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    # TensorBoard: every scalar of the epoch row, read back by tensorboard's own reader
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    for key in ("train/loss", "val/acc"):
        assert events.Scalars(key)[-1].step == epoch["step"]
        assert abs(events.Scalars(key)[-1].value - epoch[key]) < 1e-6
    assert [e.step for e in events.Scalars("step/loss")] == [10, 20, 30]
    # MLflow: one finished run in the store, with the hyperparameters and the metrics
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["hidden"] == "16"
    assert abs(run.data.metrics["val/acc"] - epoch["val/acc"]) < 1e-9
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step/loss")] == [10, 20, 30]
