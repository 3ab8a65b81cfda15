"""The optimizers with a torch.optim counterpart, against torch.optim in-process: 200 steps,
float32 and float64, the fused ``step`` (bitwise or to the stated bound) and ``update`` +
``apply_updates``."""

import pytest
import torch

import fnlight.optim as fo
from fnlight.tree import tree_equal
from tests._optim_helpers import SHAPES, max_rel, run_fnlight, run_torch

CASES = [
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2), lambda: fo.rmsprop(1e-2)),
    ("rmsprop_centered_momentum_wd", torch.optim.RMSprop,
     dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.9, weight_decay=1e-2),
     lambda: fo.rmsprop(1e-2, alpha=0.9, centered=True, momentum=0.9, weight_decay=1e-2)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-1, lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2),
     lambda: fo.adagrad(1e-1, lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2)),
    ("adamax", torch.optim.Adamax, dict(lr=2e-2, weight_decay=1e-2), lambda: fo.adamax(2e-2, weight_decay=1e-2)),
    ("nadam", torch.optim.NAdam, dict(lr=2e-3, weight_decay=1e-2), lambda: fo.nadam(2e-3, weight_decay=1e-2)),
    ("nadam_decoupled", torch.optim.NAdam, dict(lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True,
                                                momentum_decay=6e-3),
     lambda: fo.nadam(2e-3, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=6e-3)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.1), lambda: fo.radam(1e-2, weight_decay=0.1)),
    ("radam_decoupled", torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     lambda: fo.radam(1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adadelta", torch.optim.Adadelta, dict(lr=1.0, rho=0.8, weight_decay=1e-2),
     lambda: fo.adadelta(1.0, rho=0.8, weight_decay=1e-2)),
]
MAXIMIZE = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
     lambda: fo.sgd(0.05, momentum=0.9, weight_decay=1e-2, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2),
     lambda: fo.adam(1e-2, weight_decay=1e-2, fused=False, maximize=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1),
     lambda: fo.adamw(1e-2, weight_decay=0.1, fused=False, maximize=True)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5),
     lambda: fo.rmsprop(1e-2, momentum=0.5, maximize=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-1), lambda: fo.adagrad(1e-1, maximize=True)),
    ("adamax", torch.optim.Adamax, dict(lr=2e-2), lambda: fo.adamax(2e-2, maximize=True)),
    ("nadam", torch.optim.NAdam, dict(lr=2e-3), lambda: fo.nadam(2e-3, maximize=True)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2), lambda: fo.radam(1e-2, maximize=True)),
    ("adadelta", torch.optim.Adadelta, dict(lr=1.0), lambda: fo.adadelta(1.0, maximize=True)),
]


@pytest.mark.parametrize("name, cls, kw, make", CASES, ids=[c[0] for c in CASES])
def test_step_is_bitwise_torch_foreach_in_float32_and_within_1e_12_in_float64(name, cls, kw, make):
    assert tree_equal(run_fnlight(make(), 200), run_torch(cls, 200, foreach=True, **kw)), name
    got64, want64 = run_fnlight(make(), 200, torch.float64), run_torch(cls, 200, torch.float64, foreach=True, **kw)
    assert all(v.dtype == torch.float64 for v in got64.values())
    assert max_rel(got64, want64) <= 1e-12, name


@pytest.mark.parametrize("name, cls, kw, make", CASES, ids=[c[0] for c in CASES])
def test_update_path_and_donation_agree_with_torch(name, cls, kw, make):
    want = run_torch(cls, 200, foreach=True, **kw)
    assert max_rel(run_fnlight(make(), 200, mode="update"), want) <= 1e-6, name
    assert tree_equal(run_fnlight(make(), 200, inplace=True), want), name
    want64 = run_torch(cls, 200, torch.float64, foreach=True, **kw)
    assert max_rel(run_fnlight(make(), 200, torch.float64, mode="update"), want64) <= 1e-12, name


@pytest.mark.parametrize("name, cls, kw, make", MAXIMIZE, ids=[c[0] for c in MAXIMIZE])
def test_maximize(name, cls, kw, make):
    want = run_torch(cls, 100, foreach=True, maximize=True, **kw)
    assert tree_equal(run_fnlight(make(), 100), want), name
    assert max_rel(run_fnlight(make(), 100, mode="update"), want) <= 1e-6, name


def test_fused_adam_maximize_is_torch_fused():
    want = run_torch(torch.optim.AdamW, 50, fused=True, maximize=True, lr=1e-2, weight_decay=0.1)
    assert tree_equal(run_fnlight(fo.adamw(1e-2, weight_decay=0.1, maximize=True), 50), want)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_family_in_float64(decoupled):
    cls, make = (torch.optim.AdamW, fo.adamw) if decoupled else (torch.optim.Adam, fo.adam)
    want = run_torch(cls, 200, torch.float64, foreach=True, lr=1e-2, weight_decay=0.1)
    for fused in (False, True):
        got = run_fnlight(make(1e-2, weight_decay=0.1, fused=fused), 200, torch.float64)
        assert max_rel(got, want) <= 1e-12
    assert max_rel(run_fnlight(make(1e-2, weight_decay=0.1), 200, torch.float64, mode="update"), want) <= 1e-12


def test_adamw_update_path_matches_torch():
    """torch multiplies the parameters by the rounded factor (1 - lr * wd); the update path adds
    p * (1 - lr * wd) - p, the same factor (it used to add -lr * wd * p: 5e-6 after 200 steps)."""
    want = run_torch(torch.optim.AdamW, 200, foreach=True, lr=1e-2, weight_decay=0.1)
    got = run_fnlight(fo.adamw(1e-2, weight_decay=0.1), 200, mode="update")
    assert max_rel(got, want) <= 1e-6
    for k in SHAPES:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
