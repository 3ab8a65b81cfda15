"""Schedules against torch.optim.lr_scheduler over 1000 steps (1e-12 relative), as functions of an
int or an integer tensor; a LambdaLR-style callable as a learning rate."""

import pytest
import torch

import fnlight.optim as fo

S = torch.optim.lr_scheduler

CASES = [
    ("one_cycle", fo.one_cycle(0.1, 1000), lambda o: S.OneCycleLR(o, 0.1, total_steps=1000, cycle_momentum=False)),
    ("one_cycle_linear_three_phase", fo.one_cycle(0.1, 1000, pct_start=0.25, anneal_strategy="linear",
                                                  div_factor=10, final_div_factor=100, three_phase=True),
     lambda o: S.OneCycleLR(o, 0.1, total_steps=1000, pct_start=0.25, anneal_strategy="linear", div_factor=10,
                            final_div_factor=100, three_phase=True, cycle_momentum=False)),
    ("cosine_warm_restarts", fo.cosine_warm_restarts(0.1, T_0=50, eta_min=1e-3),
     lambda o: S.CosineAnnealingWarmRestarts(o, T_0=50, eta_min=1e-3)),
    ("cosine_warm_restarts_mult", fo.cosine_warm_restarts(0.1, T_0=10, T_mult=2),
     lambda o: S.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2)),
    ("multistep", fo.multistep(0.1, [100, 300, 301, 700], gamma=0.5),
     lambda o: S.MultiStepLR(o, [100, 300, 301, 700], gamma=0.5)),
    ("polynomial", fo.polynomial(0.1, total_iters=800, power=2.0), lambda o: S.PolynomialLR(o, 800, 2.0)),
    ("polynomial_default", fo.polynomial(0.1), lambda o: S.PolynomialLR(o)),
    ("exponential", fo.exponential_decay(0.1, 1, 0.995), lambda o: S.ExponentialLR(o, 0.995)),
    ("exponential_staircase", fo.exponential_decay(0.1, 30, 0.5, staircase=True), lambda o: S.StepLR(o, 30, 0.5)),
    ("step_decay", fo.step_decay(0.1, 30, 0.5), lambda o: S.StepLR(o, 30, 0.5)),
]


@pytest.mark.parametrize("name, ours, make", CASES, ids=[c[0] for c in CASES])
def test_equal_to_torch_lr_scheduler(name, ours, make):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make(opt)
    for step in range(1000):
        want = opt.param_groups[0]["lr"]
        got = ours(step)
        assert got.dtype == torch.float64 and got.shape == ()
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-15), (name, step)
        assert float(ours(torch.tensor(step, dtype=torch.int32))) == float(got)
        opt.step()
        sched.step()


def test_a_callable_learning_rate_may_return_a_float():
    """LambdaLR-style: any callable of the step returning a float or a tensor."""
    lam = lambda s: 0.1 * 0.5 ** (int(s) // 10)  # noqa: E731
    opt = fo.sgd(lam)
    params = {"w": torch.zeros(())}
    state = opt.init(params)
    for _ in range(25):
        params, state = fo.step(opt, {"w": torch.ones(())}, state, params)
    want = -sum(lam(t) for t in range(25))
    assert float(params["w"]) == pytest.approx(want, rel=1e-6)
    assert float(fo.adam(lambda s: torch.tensor(1e-3)).learning_rate(3)) == pytest.approx(1e-3)


def test_schedule_errors():
    with pytest.raises(ValueError, match="one more schedule"):
        fo.join_schedules([fo.constant(1.0)], [10])
    with pytest.raises(ValueError, match="T_0"):
        fo.cosine_warm_restarts(0.1, T_0=0)
    with pytest.raises(ValueError, match="anneal_strategy"):
        fo.one_cycle(0.1, 100, anneal_strategy="exp")
