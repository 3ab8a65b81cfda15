"""TensorBoard and MLflow loggers, read back with the packages' own readers (tensorboard's event
accumulator; an MLflow client on a local SQLite store), through a run that crashes and is resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fnlight
import fnlight.optim as fo
from fnlight.train import JSONLLogger, LambdaCallback
from fnlight.train.mlflow_logger import RECORD, flatten_params

from .models import datamodule, loss_fn, metrics_fn, mlp


class Crash(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """MLflow puts a SQLite store's artifacts (and a default store) under ./mlruns: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def fit(tmp_path: Path, loggers, crash_at: int | None = None, max_epochs: int = 3, hparams=None):
    """3 steps per epoch, a checkpoint per epoch, a step row every step and a validation every 2 steps;
    ``crash_at``: an exception after that step's update, before its row is logged."""
    model, opt = mlp(), fo.adamw(1e-2)
    state = fnlight.TrainState.create(model, opt, seed=1)

    def boom(state, metrics):
        if crash_at is not None and int(state.step) == crash_at:
            raise Crash(f"crash at step {crash_at}")

    trainer = fnlight.Trainer(max_epochs=max_epochs, run_dir=tmp_path / "run", ckpt_dir=tmp_path / "run" / "ckpt",
                              log_every_n_steps=1, val_every_n_steps=2, loggers=(JSONLLogger(), *loggers),
                              callbacks=(LambdaCallback(on_step=boom),), progress=False)
    return trainer.fit(state, fnlight.make_train_step(model, loss_fn, opt), datamodule(),
                       fnlight.make_eval_step(model, metrics_fn), hparams=hparams)


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_series(rows, step_prefix: str, epoch_metric: bool) -> dict[str, list[tuple[int, float]]]:
    """Every number of every row as (step, value) series named as the logger names them."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        values = {k: v for k, v in r.items() if k not in ("kind", "step", "epoch")}
        if r["kind"] == "epoch" and epoch_metric:
            values["epoch"] = r["epoch"]
        for k, v in values.items():
            name = f"{step_prefix}{k}" if r["kind"] == "step" else k
            out.setdefault(name, []).append((r["step"], float(v)))
    return out


def crash_then_resume(tmp_path: Path, make_loggers, hparams=None):
    with pytest.raises(Crash):
        fit(tmp_path, make_loggers(), crash_at=5, hparams=hparams)  # steps 1-4 logged, checkpoint at step 3
    res = fit(tmp_path, make_loggers(), hparams=hparams)
    assert res.resumed_from is not None and res.resumed_from.name.endswith("3")
    rows = jsonl_rows(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "step" and "loss" in r] == list(range(1, 10))
    return res, rows


@pytest.mark.slow
def test_tensorboard_scalars_read_back_by_tensorboard_after_a_crash_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, rows = crash_then_resume(tmp_path, lambda: (fnlight.train.TensorBoardLogger(),))
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})  # 0: keep every scalar
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    want = expected_series(rows, "step/", epoch_metric=False)
    assert sorted(got) == sorted(want)
    for tag, series in want.items():  # event files hold float32
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_checkpoint_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hparams = {"lr": 1e-2, "model": {"width": 16, "act": "relu"}, "sizes": [6, 16, 3]}
    res, rows = crash_then_resume(tmp_path, lambda: (fnlight.train.MLflowLogger(uri, experiment="digits"),),
                                  hparams=hparams)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the resume continued the run the crash left
    run = runs[0]
    assert run.info.run_id == json.loads((tmp_path / "run" / RECORD).read_text())["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten_params(hparams) == {
        "lr": "0.01", "model.width": "16", "model.act": "relu", "sizes": "[6, 16, 3]"}

    want = expected_series(rows, "step/", epoch_metric=True)
    assert sorted(run.data.metrics) == sorted(want)
    for key, series in want.items():  # per step and per epoch, each step once (none logged twice on resume)
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == series, key
    assert [v for s, v in want["epoch"]] == [0, 1, 2]

    final = res.state
    names = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    last = sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir())[-1]
    assert names == {last}
    files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, f"checkpoints/{last}")}
    assert files == {p.name for p in (tmp_path / "run" / "ckpt" / last).iterdir()}
    local = client.download_artifacts(run.info.run_id, f"checkpoints/{last}", str(tmp_path / "dl"))
    state, meta = fnlight.load_checkpoint(local, final)
    assert fnlight.tree.tree_equal(state, final) and meta["hparams"] == hparams


def test_mlflow_logger_without_mlflow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("no mlflow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ImportError, match=r"fnlight\[mlflow\]"):
        fnlight.train.MLflowLogger().open(tmp_path)
