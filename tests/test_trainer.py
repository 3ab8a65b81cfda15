"""The Trainer: a frozen config whose fit threads the state; callbacks and loggers."""

import io
import json

import pytest
import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo
from fnlight.train import ConsoleLogger, CSVLogger, JSONLLogger, Signal
from fnlight.tree import tree_equal, tree_map

from .models import data, datamodule, loss_fn, metrics_fn, mlp


def setup(dropout=0.2, bn=True, lr=1e-2):
    model = mlp(dropout=dropout, bn=bn)
    opt = fo.adamw(lr)
    return (model, fnlight.TrainState.create(model, opt, seed=1), fnlight.make_train_step(model, loss_fn, opt),
            fnlight.make_eval_step(model, metrics_fn))


def test_fit_is_deterministic_and_leaves_the_callers_state_alone(tmp_path):
    model, state, step, eval_step = setup()
    snapshot = tree_map(torch.clone, state)
    trainer = fnlight.Trainer(max_epochs=3, run_dir=tmp_path / "a")
    a = trainer.fit(state, step, datamodule(), eval_step=eval_step)
    b = fnlight.Trainer(max_epochs=3, run_dir=tmp_path / "b").fit(state, step, datamodule(), eval_step=eval_step)
    def without_time(history):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in history]

    assert tree_equal(a.state, b.state) and without_time(a.history) == without_time(b.history)
    assert tree_equal(state, snapshot)  # the loop donates only states it made itself
    pure = fnlight.Trainer(max_epochs=3, run_dir=tmp_path / "c", donate=False).fit(state, step, datamodule())
    assert tree_equal(pure.state, a.state)
    assert int(a.state.step) == 3 * datamodule().num_batches("train")


def test_history_rows_are_weighted_by_batch_size(tmp_path):
    _, state, step, eval_step = setup(dropout=0.0, bn=False)
    seen = []
    cb = fnlight.LambdaCallback(on_step=lambda s, m: seen.append(float(m["loss"])))
    dm = datamodule(n=70, batch=16)  # 53 training samples: batches of 16, 16, 16, 5
    res = fnlight.Trainer(max_epochs=1, run_dir=tmp_path, callbacks=(cb,)).fit(state, step, dm, eval_step)
    sizes = [len(b) for b in dm.index_batches("train", 0)]
    assert sizes == [16, 16, 16, 5]
    weighted = sum(loss * n for loss, n in zip(seen, sizes, strict=True)) / sum(sizes)
    assert res.history[0]["train/loss"] == pytest.approx(weighted, rel=1e-6)
    assert set(res.history[0]) >= {"epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "time_s"}


def test_validate_and_test_average_over_unequal_batches():
    _, state, step, eval_step = setup(dropout=0.0, bn=False)
    dm = datamodule(n=70, batch=5)  # 18 validation samples: 5, 5, 5, 3
    x, y = dm.dataset("val").gather(torch.arange(len(dm.dataset("val"))))
    full = eval_step(state, (x, y))
    got = fnlight.Trainer().validate(state, eval_step, dm)
    assert got["loss"] == pytest.approx(float(full["loss"]), rel=1e-6)
    assert got["acc"] == pytest.approx(float(full["acc"]), rel=1e-6)
    assert fnlight.Trainer().test(state, eval_step, dm) == got  # this datamodule tests on "val"


def test_predict_concatenates_in_order():
    model, state, _, _ = setup(dropout=0.0, bn=False)
    dm = datamodule(n=70, batch=4)

    def predict_fn(state, batch):
        return {"logits": torch.func.functional_call(model, (state.params, state.buffers), (batch[0],)),
                "y": batch[1]}

    out = fnlight.Trainer().predict(state, predict_fn, dm)
    x, y = dm.dataset("val").gather(torch.arange(len(dm.dataset("val"))))
    assert torch.equal(out["y"], y) and out["logits"].shape == (len(y), 3)


def test_early_stopping_stops_and_keeps_its_state(tmp_path):
    _, state, step, eval_step = setup(lr=0.0, bn=False, dropout=0.0)  # nothing changes
    es = fnlight.EarlyStopping("val/loss", patience=2)
    res = fnlight.Trainer(max_epochs=20, run_dir=tmp_path, callbacks=(es,)).fit(state, step, datamodule(), eval_step)
    assert len(res.history) == 3  # epoch 0 sets the best, epochs 1 and 2 do not improve
    assert res.callback_states[0]["wait"] == 2 and res.callback_states[0]["stopped_epoch"] == 2
    with pytest.raises(KeyError, match="monitors 'val/nope'"):
        fnlight.Trainer(max_epochs=1, run_dir=tmp_path, callbacks=(fnlight.EarlyStopping("val/nope"),)).fit(
            state, step, datamodule(), eval_step)


def test_early_stopping_max_mode_and_min_delta():
    from fnlight.train import FitContext

    es = fnlight.EarlyStopping("acc", mode="max", patience=2, min_delta=0.1)
    ctx = FitContext(None, None, None, None, epoch=4)
    s, sig = es.on_epoch(es.init(), None, {"acc": 0.5}, ctx)
    assert not sig.stop and s["best"] == 0.5
    s, sig = es.on_epoch(s, None, {"acc": 0.55}, ctx)  # better, but not by more than min_delta
    assert not sig.stop and s == {"best": 0.5, "wait": 1, "stopped_epoch": -1}
    s, sig = es.on_epoch(s, None, {"acc": 0.7}, ctx)
    assert s["best"] == 0.7 and s["wait"] == 0
    s, _ = es.on_epoch(s, None, {"acc": 0.1}, ctx)
    s, sig = es.on_epoch(s, None, {"acc": 0.1}, ctx)
    assert sig.stop and s["stopped_epoch"] == 4


class Ones(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.w.sum() * x.sum() * 0 + self.w.sum()  # gradient 1 for every weight


def test_lr_monitor_logs_the_rate_the_update_used(tmp_path):
    model = Ones()
    opt = fo.sgd(fo.linear_warmup(1e-2, 10))
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, lambda mf, b, k: mf(b[0]), opt)
    deltas, last = [], [torch.zeros(3)]

    def record(s, m):
        deltas.append(float(last[0][0] - s.params["w"][0]))  # w moves by -lr * 1 each step
        last[0] = s.params["w"].clone()

    stop_at_5 = fnlight.LambdaCallback(on_step=lambda s, m: int(s.step) >= 5)
    res = fnlight.Trainer(max_epochs=10, run_dir=tmp_path, log_every_n_steps=1,
                          callbacks=(fnlight.LearningRateMonitor(), fnlight.LambdaCallback(on_step=record), stop_at_5)
                          ).fit(state, step, datamodule())
    assert int(res.state.step) == 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "step"]
    assert lrs == pytest.approx([0.0, 1e-3, 2e-3, 3e-3, 4e-3])
    assert deltas == pytest.approx(lrs)  # the logged rate is the one applied (with the loop's donation)
    assert rows[-1]["kind"] == "epoch"


def test_donating_fit_equals_the_pure_fit_under_a_schedule(tmp_path):
    model = mlp(dropout=0.2, bn=True)
    opt = fo.adamw(fo.warmup_cosine(1e-2, 3, 12), weight_decay=0.1)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt)
    a = fnlight.Trainer(max_epochs=3, run_dir=tmp_path / "a").fit(state, step, datamodule())
    b = fnlight.Trainer(max_epochs=3, run_dir=tmp_path / "b", donate=False).fit(state, step, datamodule())
    assert tree_equal(a.state, b.state)


def test_early_stopping_skips_epochs_without_validation_and_stops_on_nan(tmp_path):
    _, state, step, eval_step = setup(lr=0.0, bn=False, dropout=0.0)
    es = fnlight.EarlyStopping("val/loss", patience=2)
    res = fnlight.Trainer(max_epochs=20, val_every_n_epochs=2, run_dir=tmp_path, callbacks=(es,)).fit(
        state, step, datamodule(), eval_step)
    assert len(res.history) == 6  # validated at epochs 1, 3, 5: best, wait 1, wait 2
    s, sig = es.on_epoch(es.init(), None, {"val/loss": float("nan")}, fnlight.train.FitContext(None, None, None, None))
    assert sig.stop


def test_max_steps_is_checked_before_stepping(tmp_path):
    _, state, step, _ = setup()
    assert int(fnlight.Trainer(max_steps=0, run_dir=tmp_path).fit(state, step, datamodule()).state.step) == 0
    started = state.replace(step=torch.tensor(3))
    assert int(fnlight.Trainer(max_steps=3, run_dir=tmp_path).fit(started, step, datamodule()).state.step) == 3
    with pytest.raises(ValueError, match="no training batches"):
        fnlight.Trainer(max_epochs=None, max_steps=5, limit_train_batches=0, run_dir=tmp_path).fit(
            state, step, datamodule())


def test_max_steps_and_batch_limits(tmp_path):
    _, state, step, _ = setup()
    assert int(fnlight.Trainer(max_epochs=None, max_steps=7, run_dir=tmp_path).fit(state, step, datamodule())
               .state.step) == 7
    res = fnlight.Trainer(max_epochs=2, limit_train_batches=2, run_dir=tmp_path).fit(state, step, datamodule())
    assert int(res.state.step) == 4
    res = fnlight.Trainer(max_epochs=1, limit_train_batches=0.5, run_dir=tmp_path).fit(state, step, datamodule())
    assert int(res.state.step) == 1  # 3 batches: half is 1


def test_loggers_write_csv_jsonl_and_console(tmp_path):
    _, state, step, eval_step = setup()
    stream = io.StringIO()
    trainer = fnlight.Trainer(max_epochs=2, run_dir=tmp_path, log_every_n_steps=2,
                              loggers=(CSVLogger(), JSONLLogger(), ConsoleLogger(stream)))
    trainer.fit(state, step, datamodule(), eval_step)
    epochs = (tmp_path / "metrics.csv").read_text().splitlines()
    assert epochs[0].split(",")[:3] == ["step", "epoch", "train/loss"] and len(epochs) == 3
    assert "val/acc" in epochs[0]
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert steps[0].startswith("step,epoch,loss") and len(steps) == 1 + 3  # steps 2, 4, 6
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("epoch") == 2 and kinds.count("step") == 3
    assert stream.getvalue().count("\n") == 2 and "val/acc=" in stream.getvalue()


def test_default_run_dirs_are_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, state, step, _ = setup()
    a = fnlight.Trainer(max_steps=1).fit(state, step, datamodule())
    b = fnlight.Trainer(max_steps=1).fit(state, step, datamodule())
    assert a.run_dir.name == "version_0" and b.run_dir.name == "version_1"


def test_any_pure_function_can_be_the_train_step(tmp_path):
    model, state, step, _ = setup()
    calls = []

    def wrapped(s, b):
        calls.append(1)
        return step(s, b)

    res = fnlight.Trainer(max_epochs=1, run_dir=tmp_path).fit(state, wrapped, datamodule())
    assert len(calls) == 3 and int(res.state.step) == 3


def test_deterministic_mode_is_scoped(tmp_path):
    _, state, step, _ = setup()
    before = torch.are_deterministic_algorithms_enabled()
    seen = []
    cb = fnlight.LambdaCallback(on_step=lambda s, m: seen.append(torch.are_deterministic_algorithms_enabled()))
    fnlight.Trainer(max_steps=2, deterministic=True, run_dir=tmp_path, callbacks=(cb,)).fit(state, step, datamodule())
    assert seen == [True, True] and torch.are_deterministic_algorithms_enabled() == before


def test_signals_and_config_checks():
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        fnlight.Trainer(max_epochs=None)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        fnlight.Trainer(log_every_n_steps=0)
    with pytest.raises(TypeError, match="Signal"):
        fnlight.LambdaCallback(on_step=lambda s, m: "stop").on_step(None, None, {}, None)
    assert fnlight.LambdaCallback(on_epoch=lambda s, m: Signal(save=True)).on_epoch(None, None, {}, None)[1].save


def test_training_learns():
    model, state, step, eval_step = setup(dropout=0.0, bn=False, lr=3e-2)
    dm = datamodule(n=256, batch=32)
    res = fnlight.Trainer(max_epochs=15, loggers=(), run_dir="/tmp/unused").fit(state, step, dm, eval_step)
    assert res.history[-1]["train/loss"] < 0.5 * res.history[0]["train/loss"]
    x, y = data(8)
    assert F.cross_entropy(torch.func.functional_call(mlp(), (res.state.params, res.state.buffers), (x,)), y) < 2


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    _, state, step, _ = setup()
    fnlight.Trainer(max_epochs=1, run_dir=tmp_path, log_every_n_steps=1,
                    loggers=(fnlight.train.TensorBoardLogger(),)).fit(state, step, datamodule())
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_logger_without_tensorboard_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"fnlight\[tensorboard\]"):
        fnlight.train.TensorBoardLogger().open(tmp_path)
