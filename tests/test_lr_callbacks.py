"""ReduceLROnPlateau (torch parity on a fixed metric sequence; in a real fit) and the LR finder."""

import math

import pytest
import torch

import fnlight
import fnlight.optim as fo
from fnlight.train import LRFinder, ReduceLROnPlateau

from .models import datamodule, loss_fn, metrics_fn, mlp

METRICS = [1.0, 0.9, 0.95, 0.95, 0.97, 0.96, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.7, 0.7, 0.7, 0.7, 0.7, 0.69999,
           0.71, 0.72, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]


@pytest.mark.parametrize("kw", [dict(), dict(factor=0.5, patience=1, cooldown=2),
                                dict(mode="max", patience=2, threshold_mode="abs", threshold=0.01, min_lr=0.02),
                                dict(patience=0, factor=0.3, min_lr=1e-3, eps=1e-3)])
def test_reduce_lr_on_plateau_equals_torch_on_a_metric_sequence(kw):
    kw = {"patience": 2, **kw}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    cb = ReduceLROnPlateau("val/loss", **kw)
    s, lrs = cb.init(), {None: 0.1}
    for m in METRICS:
        ref.step(m)
        s, changed = cb.step(s, m, lrs)
        lrs = {**lrs, **changed}
        assert lrs[None] == opt.param_groups[0]["lr"], (kw, m)


def test_reduce_lr_on_plateau_in_a_fit_changes_the_state_learning_rate(tmp_path):
    model = mlp()
    opt = fo.inject_hyperparams(fo.sgd)(learning_rate=0.5)
    state = fnlight.TrainState.create(model, opt)
    cb = ReduceLROnPlateau("train/loss", mode="max", patience=0, factor=0.5)  # loss falls: "no improvement"
    result = fnlight.Trainer(max_epochs=3, callbacks=(cb,), progress=False, loggers=(), run_dir=tmp_path).fit(
        state, fnlight.make_train_step(model, loss_fn, opt), datamodule(), )
    assert float(fo.hyperparams(result.state.opt_state)["learning_rate"]) == pytest.approx(0.5 * 0.5 ** 2)
    assert [round(h.get("lr", 0.5), 6) for h in result.history] == [0.5, 0.25, 0.125]
    with pytest.raises(ValueError, match="inject_hyperparams"):
        plain = fo.sgd(0.1)
        fnlight.Trainer(max_epochs=1, callbacks=(cb,), progress=False, loggers=(), run_dir=tmp_path).fit(
            fnlight.TrainState.create(model, plain), fnlight.make_train_step(model, loss_fn, plain), datamodule())
    _ = metrics_fn


def test_lr_finder_sweeps_and_suggests(tmp_path):
    model = mlp()
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=12)
    opt = fo.inject_hyperparams(fo.sgd)(learning_rate=1e-4)
    state = fnlight.TrainState.create(model, opt)
    result = fnlight.Trainer(max_epochs=10, callbacks=(finder,), progress=False, loggers=(), run_dir=tmp_path).fit(
        state, fnlight.make_train_step(model, loss_fn, opt), datamodule())
    rec = result.callback_state(finder)
    assert rec["lrs"][0] == pytest.approx(1e-4)
    assert all(b > a for a, b in zip(rec["lrs"], rec["lrs"][1:], strict=False))
    assert len(rec["lrs"]) <= 12 and len(rec["losses"]) == len(rec["lrs"])
    assert all(math.isclose(x, finder.rate(i), rel_tol=1e-12) for i, x in enumerate(rec["lrs"]))
    lr = finder.suggestion(rec)
    assert 1e-4 <= lr <= 10.0
