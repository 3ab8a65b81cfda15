"""The optimizers torch.optim does not have, against optax itself (the oracle runs in-process
on JAX's CPU backend with float64 enabled; arrays go through NumPy): 300 steps, 1e-10 relative
in float64. Also the wrappers with optax's semantics."""

import numpy as np
import pytest
import torch

import fnlight.optim as fo
from tests._optim_helpers import max_rel

jax = pytest.importorskip("jax", reason="the optax oracle needs jax[cpu] (pip install 'jax[cpu]' optax, or "
                                        "pip install -e '.[dev]')")
optax = pytest.importorskip("optax", reason="the optax oracle needs optax (pip install optax)")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

# one matrix big enough for adafactor to factor its second moment
SHAPES = {"w1": (7, 5), "b1": (7,), "w2": (3, 7, 2), "big": (130, 140), "b2": (1,)}


def make(dtype):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}


def grads_at(t, params):
    g = torch.Generator().manual_seed(1000 + t)
    return {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64).to(params[k].dtype) * 0.1
            + 0.05 * params[k] for k in SHAPES}


def run_ours(opt, steps, dtype=torch.float64, mode="step"):
    p = make(dtype)
    s = opt.init(p)
    for t in range(steps):
        g = grads_at(t, p)
        if mode == "step":
            p, s = fo.step(opt, g, s, p)
        else:
            u, s = opt.update(g, s, p)
            p = fo.apply_updates(p, u)
    return p


def to_torch(tree):
    return {k: torch.from_numpy(np.array(v)) for k, v in tree.items()}


def run_optax(opt, steps, dtype=torch.float64):
    p = {k: jnp.asarray(v.numpy()) for k, v in make(dtype).items()}
    s = opt.init(p)
    for t in range(steps):
        g = {k: jnp.asarray(v.numpy()) for k, v in grads_at(t, to_torch(p)).items()}
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
    return to_torch(p)


CASES = [
    ("lion", lambda m: m.lion(1e-3)),
    ("lion_wd", lambda m: m.lion(1e-3, b1=0.8, b2=0.95, weight_decay=0.1)),
    ("lamb", lambda m: m.lamb(1e-2, weight_decay=1e-2)),
    ("lamb_eps_root", lambda m: m.lamb(1e-2, eps=1e-5, eps_root=1e-8)),
    ("lars", lambda m: m.lars(0.1, weight_decay=1e-3)),
    ("lars_nesterov", lambda m: m.lars(0.1, momentum=0.8, nesterov=True, eps=1e-8, trust_coefficient=0.01)),
    ("adafactor", lambda m: m.adafactor(1e-2)),
    ("adafactor_momentum_wd", lambda m: m.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3,
                                                    clipping_threshold=None, multiply_by_parameter_scale=False)),
    ("adabelief", lambda m: m.adabelief(1e-2)),
    ("adabelief_nesterov", lambda m: m.adabelief(1e-2, b1=0.8, nesterov=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, make_opt", CASES, ids=[c[0] for c in CASES])
def test_equal_to_optax_in_float64(name, make_opt):
    want = run_optax(make_opt(optax), 300)
    if name == "adafactor_momentum_wd":  # optax keeps the momentum in float32 by default: ours in the params' dtype
        want = run_optax(optax.adafactor(1e-2, momentum=0.9, weight_decay_rate=1e-3, clipping_threshold=None,
                                         multiply_by_parameter_scale=False, dtype_momentum=jnp.float64), 300)
    assert max_rel(run_ours(make_opt(fo), 300), want) <= 1e-10
    assert max_rel(run_ours(make_opt(fo), 300, mode="update"), want) <= 1e-10


def test_signatures_follow_optax():
    import inspect

    for name in ("lion", "lamb", "lars", "adafactor", "adabelief"):
        ours, theirs = inspect.signature(getattr(fo, name)), inspect.signature(getattr(optax, name))
        for p in ours.parameters.values():
            assert p.name in theirs.parameters, (name, p.name)
            default = theirs.parameters[p.name].default
            if p.default is not inspect.Parameter.empty and isinstance(default, int | float | bool | None):
                assert p.default == default, (name, p.name)


def test_wrappers_follow_optax():
    nan = float("nan")
    grads = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([nan, 1.0])}, {"w": torch.tensor([nan, 1.0])},
             {"w": torch.tensor([nan, 1.0])}, {"w": torch.tensor([0.5, -3.0])}]
    ours, theirs = fo.apply_if_finite(fo.sgd(0.1), 1), optax.apply_if_finite(optax.sgd(0.1), 1)
    p, s = {"w": torch.ones(2)}, None
    jp = {"w": jnp.ones(2, dtype=jnp.float32)}
    s, js = ours.init(p), theirs.init(jp)
    for g in grads:
        p, s = fo.step(ours, g, s, p)
        u, js = theirs.update({"w": jnp.asarray(g["w"].numpy())}, js, jp)
        jp = optax.apply_updates(jp, u)
        np.testing.assert_array_equal(p["w"].numpy(), np.asarray(jp["w"], dtype=np.float32))
        assert int(s.notfinite_count) == int(js.notfinite_count)
        assert int(s.total_notfinite) == int(js.total_notfinite)

    g = {"w": torch.tensor([[1.0, nan], [-4.0, 0.5]]), "b": torch.tensor([3.0, -0.1])}
    jg = {k: jnp.asarray(v.numpy()) for k, v in g.items()}
    for ours_t, theirs_t in ((fo.zero_nans(), optax.zero_nans()), (fo.clip(0.7), optax.clip(0.7))):
        u, _ = ours_t.update(g, ours_t.init(g))
        ju, _ = theirs_t.update(jg, theirs_t.init(jg))
        for k in g:
            np.testing.assert_array_equal(u[k].numpy(), np.asarray(ju[k]))

    # adaptive clipping: torch's (out, in) weights are JAX's (in, out), transposed
    g = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 5, "b": torch.tensor([3.0, -0.1])}
    params = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), "b": torch.tensor([0.5, 0.2])}
    u, _ = fo.adaptive_grad_clip(0.1).update(g, fo.EmptyState(), params)
    tr = {"w": lambda x: x.T, "b": lambda x: x}
    ju, _ = optax.adaptive_grad_clip(0.1).update({k: jnp.asarray(tr[k](v).numpy()) for k, v in g.items()}, None,
                                                 {k: jnp.asarray(tr[k](v).numpy()) for k, v in params.items()})
    for k in g:
        np.testing.assert_allclose(tr[k](u[k]).numpy(), np.asarray(ju[k]), rtol=1e-6)
    assert not torch.equal(u["w"], g["w"])


@pytest.mark.parametrize("name, ours, theirs", [
    ("exponential_decay", fo.exponential_decay(0.1, 7, 0.8, transition_begin=5, staircase=True, end_value=0.01),
     lambda: optax.exponential_decay(0.1, 7, 0.8, transition_begin=5, staircase=True, end_value=0.01)),
    ("join_schedules", fo.join_schedules([fo.linear_warmup(1.0, 10), fo.cosine_decay(1.0, 90)], [10]),
     lambda: optax.join_schedules([optax.linear_schedule(0.0, 1.0, 10), optax.cosine_decay_schedule(1.0, 90)], [10])),
])
def test_schedules_follow_optax(name, ours, theirs):
    sched = theirs()
    for step in range(150):
        assert float(ours(step)) == pytest.approx(float(sched(step)), rel=1e-12, abs=1e-15), (name, step)
        assert float(ours(torch.tensor(step))) == float(ours(step))
