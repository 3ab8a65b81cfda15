"""fnlight.optim against torch.optim: 200 steps, several parameter shapes, float32."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight.optim as fo
from fnlight.testing import assert_reproducible, optimizers
from fnlight.tree import tree_equal
from tests._optim_helpers import PER_TENSOR

SHAPES = {"w1": (7, 5), "b1": (7,), "w2": (3, 7, 2), "scale": (), "b2": (1,)}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def grads_at(step, params):
    # deterministic gradient-like values that depend on the current params (like a real loss)
    g = torch.Generator().manual_seed(1000 + step)
    return {k: torch.randn(p.shape, generator=g) * 0.1 + 0.05 * p for k, p in params.items()}


def run_torch(opt_cls, steps, **kw):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in make_params().items()}
    opt = opt_cls(list(params.values()), **kw)
    for t in range(steps):
        gs = grads_at(t, {k: p.detach() for k, p in params.items()})
        for k, p in params.items():
            p.grad = gs[k]
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def run_fnlight(opt, steps, inplace=False, fused=True):
    params = make_params()
    state = opt.init(params)
    for t in range(steps):
        if fused:
            params, state = fo.step(opt, grads_at(t, params), state, params, inplace=inplace)
        else:
            updates, state = opt.update(grads_at(t, params), state, params, inplace=inplace)
            params = fo.apply_updates(params, updates, inplace=inplace)
    return params


CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05), fo.sgd(0.05)),
    ("sgd_wd", torch.optim.SGD, dict(lr=0.05, weight_decay=1e-2), fo.sgd(0.05, weight_decay=1e-2)),
    ("momentum", torch.optim.SGD, dict(lr=0.05, momentum=0.9), fo.sgd(0.05, momentum=0.9)),
    ("momentum_damp", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3),
     fo.sgd(0.05, momentum=0.9, dampening=0.3)),
    ("nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     fo.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("adam", torch.optim.Adam, dict(lr=1e-2), fo.adam(1e-2)),
    ("adam_wd", torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2), fo.adam(1e-2, weight_decay=1e-2)),
    ("adam_amsgrad", torch.optim.Adam, dict(lr=1e-2, amsgrad=True), fo.adam(1e-2, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), fo.adamw(1e-2, weight_decay=0.1)),
    ("adamw_amsgrad", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99)),
     fo.adamw(1e-2, b1=0.8, b2=0.99, weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize("name, cls, kw, ours", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["foreach", "fused", "single"])
def test_200_steps_match_torch_optim(name, cls, kw, ours, impl):
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True), "single": dict(foreach=False)}[impl]
    expected = run_torch(cls, 200, **kw, **flags)
    got = run_fnlight(ours, 200)
    # Adam's step runs torch's fused kernel; SGD's mirrors the foreach ops: each is bitwise equal to its twin
    if (impl == "fused") == name.startswith("adam"):
        assert tree_equal(got, expected), name
    for k in SHAPES:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"{name}/{impl}: {k}")


@given(cfg=optimizers())
def test_drawn_configurations_match_their_torch_twin_bit_for_bit(cfg):
    # SGD mirrors torch's foreach ops, Adam(W) runs torch's fused kernel: bitwise equal to that twin,
    # and close to every other implementation
    twin = dict(foreach=True) if cfg.name == "sgd" else dict(fused=True)
    got = run_fnlight(cfg.build(), 30)
    assert tree_equal(got, run_torch(cfg.torch, 30, **twin)), cfg
    other = run_torch(cfg.torch, 30, foreach=False)
    for k in SHAPES:
        torch.testing.assert_close(got[k], other[k], rtol=1e-6, atol=1e-7, msg=f"{cfg}: {k}")


UNFUSED = [
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2), fo.adam(1e-2, weight_decay=1e-2, fused=False)),
    ("adam_amsgrad", torch.optim.Adam, dict(lr=1e-2, amsgrad=True), fo.adam(1e-2, amsgrad=True, fused=False)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
     fo.adamw(1e-2, weight_decay=0.1, amsgrad=True, fused=False)),
]


@pytest.mark.parametrize("name, cls, kw, ours", UNFUSED, ids=[c[0] for c in UNFUSED])
@pytest.mark.parametrize("impl", ["foreach", "single"])
def test_unfused_adam_mirrors_torch_foreach_bit_for_bit(name, cls, kw, ours, impl):
    flags = dict(foreach=True) if impl == "foreach" else dict(foreach=False)
    assert tree_equal(run_fnlight(ours, 200), run_torch(cls, 200, **kw, **flags))


def test_masked_weight_decay_in_the_fused_kernel():
    opt = fo.adamw(1e-2, weight_decay=0.5, mask=fo.default_decay_mask)
    unfused = fo.adamw(1e-2, weight_decay=0.5, mask=fo.default_decay_mask, fused=False)
    a, b = run_fnlight(opt, 50), run_fnlight(unfused, 50)
    for k in SHAPES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, cls, kw, ours", CASES + UNFUSED, ids=[c[0] for c in CASES + UNFUSED])
@pytest.mark.parametrize("fused", [True, False])
def test_inplace_donation_is_bitwise_identical(name, cls, kw, ours, fused):
    assert tree_equal(run_fnlight(ours, 30, inplace=True, fused=fused), run_fnlight(ours, 30, fused=fused))


@pytest.mark.parametrize("name, cls, kw, ours", CASES, ids=[c[0] for c in CASES])
def test_update_plus_apply_matches_the_fused_step(name, cls, kw, ours):
    got, fused = run_fnlight(ours, 200, fused=False), run_fnlight(ours, 200)
    for k in SHAPES:
        torch.testing.assert_close(got[k], fused[k], rtol=1e-5, atol=1e-6)


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t``'s values in layouts that are not contiguous (as vmap and transposed views give them)."""
    stacked = torch.stack([t.t(), -t.t()], dim=-1).permute(2, 1, 0)  # [2, *t.shape], the member axis not outermost
    return {"transposed": t.t().contiguous().t(), "a row of a permuted stack": stacked[0],
            "every other column": torch.stack([t, t], dim=-1)[..., 0]}


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "a row of a permuted stack", "every other column"])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_fused_kernel_takes_tensors_that_are_not_contiguous(decoupled, layout, inplace):
    """torch's fused Adam kernel reads each tensor as one contiguous block: a gradient or parameter laid
    out otherwise must give the same update as its contiguous copy (it once flipped update signs)."""
    opt = (fo.adamw if decoupled else fo.adam)(1e-2, fused=True)
    g = torch.Generator().manual_seed(0)
    w, grads = torch.randn(7, 5, generator=g), [torch.randn(7, 5, generator=g) for _ in range(3)]
    ref_p, ref_s = {"w": w.clone()}, opt.init({"w": w})
    odd_p, odd_s = {"w": _layouts(w.clone())[layout]}, opt.init({"w": w})
    assert not odd_p["w"].is_contiguous()
    for gr in grads:
        ref_p, ref_s = fo.step(opt, {"w": gr}, ref_s, ref_p)
        odd_g = _layouts(gr)[layout]
        assert not odd_g.is_contiguous()
        odd_p, odd_s = fo.step(opt, {"w": odd_g}, odd_s, odd_p, inplace=inplace)
    assert torch.equal(odd_p["w"], ref_p["w"]) and tree_equal(odd_s, ref_s)


def test_chain_keeps_the_fused_step():
    opt = fo.chain(fo.clip_by_global_norm(0.1), fo.adam(1e-2))
    assert opt.step is not None and float(opt.learning_rate(0)) == pytest.approx(1e-2)
    params = make_params()
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    topt = torch.optim.Adam(torch_params.values(), lr=1e-2, foreach=True)
    state = opt.init(params)
    for t in range(50):
        g = grads_at(t, params)
        params, state = fo.step(opt, g, state, params)
        for k, p in torch_params.items():
            p.grad = grads_at(t, {kk: pp.detach() for kk, pp in torch_params.items()})[k]
        torch.nn.utils.clip_grad_norm_(torch_params.values(), 0.1)
        topt.step()
    for k in SHAPES:
        torch.testing.assert_close(params[k], torch_params[k].detach(), rtol=1e-6, atol=1e-6)


def test_update_is_pure():
    params = make_params()
    opt = fo.chain(fo.clip_by_global_norm(0.5), fo.adamw(1e-2))
    state = opt.init(params)
    for t in range(3):
        updates, state = opt.update(grads_at(t, params), state, params)
        params = fo.apply_updates(params, updates)
    # bitwise the same updates on every call; grads, state and params untouched
    assert_reproducible(opt.update, grads_at(3, params), state, params)
    assert_reproducible(fo.step, opt, grads_at(3, params), state, params)


def test_clip_by_global_norm_matches_clip_grad_norm_():
    grads = grads_at(0, make_params())
    params = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in grads.items()}
    for k, p in params.items():
        p.grad = grads[k].clone() * 10
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    clipped, _ = fo.clip_by_global_norm(1.0).update({k: v * 10 for k, v in grads.items()}, fo.EmptyState())
    for k in grads:
        torch.testing.assert_close(clipped[k], params[k].grad, rtol=1e-6, atol=1e-7)
    small, _ = fo.clip_by_global_norm(1e6).update(grads, fo.EmptyState())
    assert tree_equal(small, grads)


def test_masked_weight_decay():
    params = make_params()
    opt = fo.adamw(1e-2, weight_decay=0.5, mask=fo.default_decay_mask)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero, opt.init(params), params)
    for k, v in params.items():
        decayed = not torch.equal(updates[k], torch.zeros_like(v))
        assert decayed == (v.dim() > 1), k
    with pytest.raises(ValueError, match="not a parameter"):
        fo.adamw(1e-2, mask={"nope": True}).init(params)


@pytest.mark.parametrize("sched, torch_sched", [
    (fo.step_decay(0.1, 7, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
    (fo.cosine_decay(0.1, 50, alpha=0.1), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 50, 0.01)),
])
def test_schedules_match_torch_schedulers(sched, torch_sched):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s = torch_sched(opt)
    for step in range(50):
        assert float(sched(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        s.step()


def test_schedule_shapes():
    w = fo.warmup_cosine(1.0, 10, 110, init=0.1, end=0.01)
    assert float(w(0)) == pytest.approx(0.1) and float(w(10)) == pytest.approx(1.0)
    assert float(w(60)) == pytest.approx(0.505) and float(w(110)) == pytest.approx(0.01)
    assert float(w(500)) == pytest.approx(0.01)
    lw = fo.linear_warmup(2.0, 4)
    assert [float(lw(s)) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert float(fo.constant(3e-4)(torch.tensor(99))) == pytest.approx(3e-4)
    with pytest.raises(ValueError):
        fo.warmup_cosine(1.0, 10, 5)


@given(steps=st.integers(1, 40), lr=st.floats(1e-4, 1e-1))
def test_schedule_inside_the_optimizer(steps, lr):
    # a schedule is evaluated at the update count, as torch's LR schedulers are
    sched = fo.linear_warmup(lr, 10)
    opt = fo.sgd(sched)
    params = {"w": torch.zeros(())}
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update({"w": torch.ones(())}, state, params)
        params = fo.apply_updates(params, updates)
    expected = -sum(float(sched(t)) for t in range(steps))
    assert float(params["w"]) == pytest.approx(expected, rel=1e-5)


def test_learning_rate_is_exposed():
    assert float(fo.adam(fo.step_decay(1.0, 2, 0.5)).learning_rate(4)) == 0.25


SCHEDULED = [
    fo.sgd(fo.linear_warmup(0.1, 5), momentum=0.9, dampening=0.1),
    fo.sgd(fo.warmup_cosine(0.1, 3, 20), momentum=0.9, nesterov=True, weight_decay=1e-2),
    fo.adam(fo.warmup_cosine(1e-2, 3, 20), weight_decay=1e-2),
    fo.adam(fo.linear_warmup(1e-2, 5), fused=False),
    fo.adamw(fo.step_decay(1e-2, 4, 0.5), amsgrad=True, mask=fo.default_decay_mask),
    fo.adamw(fo.step_decay(1e-2, 4, 0.5), fused=False),
    fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(fo.linear_warmup(1e-2, 5))),
]


@pytest.mark.parametrize("opt", SCHEDULED, ids=range(len(SCHEDULED)))
@pytest.mark.parametrize("fused", [True, False])
def test_donation_reads_the_schedule_at_the_same_step(opt, fused):
    # in-place updates advance the step counter in place: the rate must be read before
    assert tree_equal(run_fnlight(opt, 20, inplace=True, fused=fused), run_fnlight(opt, 20, fused=fused))


def test_chain_knows_its_learning_rate():
    sched = fo.linear_warmup(1.0, 4)
    assert fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(sched)).learning_rate is sched


def test_per_step_scalars_are_unchanged_eager_and_compiled():
    """per_step only changes how inductor stores the scalars (one buffer instead of a
    recomputation per vector), never their values; one scalar works too."""
    from fnlight.optim._base import per_step

    def f(count):
        t = count.to(torch.float64)
        a, b = per_step((1.0 - 0.9**t).to(torch.float32), torch.sqrt(1.0 - 0.999**t).to(torch.float32))
        (c,) = per_step(torch.cos(t).to(torch.float32))
        return a, b, c

    count = torch.tensor(7)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(count), f(count), strict=True):
        assert got.shape == () and torch.equal(got, want)


# -- per_tensor: the law the ensemble step's one-call update relies on ---------------------------


@pytest.mark.parametrize("name", sorted(PER_TENSOR))
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple), min_size=2, max_size=4),
       seed=st.integers(0, 2**16))
def test_a_per_tensor_optimizer_updates_tensors_as_if_each_were_alone(name, shapes, seed):
    """``per_tensor``: updating several tensors in one call equals updating each in a call of its own, bitwise."""
    opt = PER_TENSOR[name]()
    assert opt.per_tensor
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    together, state = {k: v.clone() for k, v in params.items()}, None
    alone = {k: ({k: v.clone()}, None) for k, v in params.items()}
    state = opt.init(together)
    alone = {k: (p, opt.init(p)) for k, (p, _) in alone.items()}
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        together, state = fo.step(opt, {k: v.clone() for k, v in grads.items()}, state, together, inplace=True)
        alone = {k: fo.step(opt, {k: grads[k].clone()}, s, p, inplace=True) for k, (p, s) in alone.items()}
    for k, (p, _) in alone.items():
        assert torch.equal(together[k], p[k]), k


def test_per_tensor_is_off_where_tensors_interact_or_are_picked_by_name():
    assert not fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3)).per_tensor
    assert not fo.adamw(1e-3, mask=fo.default_decay_mask).per_tensor
    assert not fo.sgd(0.1, mask={"w": True}).per_tensor
    assert not fo.lars(0.1, trust_ratio_mask=lambda p: {k: v.dim() > 1 for k, v in p.items()}).per_tensor
    assert not fo.apply_if_finite(fo.adam(1e-3), 3).per_tensor
    assert not fo.GradientTransformation(lambda p: (), lambda u, s, p=None, *, inplace=False: (u, s)).per_tensor
