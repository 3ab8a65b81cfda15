"""Ensembles (stacked states, vectorized steps), per-sample gradients and DP-SGD."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo
from fnlight.train import ensemble as ensemble_mod
from fnlight.train.dp import clip_per_sample
from fnlight.train.step import NonFiniteError, TorchFuncTrapError
from tests._optim_helpers import PER_TENSOR

MEMBERS = 4


def mlp(drop: float = 0.0, norm: str | None = None) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Linear(6, 12)]
    if norm == "batch":
        layers.append(torch.nn.BatchNorm1d(12))
    if norm == "group":
        layers.append(torch.nn.GroupNorm(3, 12))
    layers += [torch.nn.ReLU(), torch.nn.Dropout(drop), torch.nn.Linear(12, 3)]
    return torch.nn.Sequential(*layers)


def loss_fn(model_fn, batch, key):
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def metrics_fn(model_fn, batch):
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def batches(n: int = 20, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def states(opt, n: int = MEMBERS, **kw) -> list[fnlight.TrainState]:
    return [fnlight.TrainState.create(mlp(**kw), opt, seed=s) for s in range(n)]


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


# -- stack / unstack --------------------------------------------------------------------

def test_stack_unstack_round_trip_bitwise():
    ss = states(fo.adamw(1e-2, weight_decay=0.1))
    stacked = fnlight.stack_states(ss)
    assert fnlight.num_members(stacked) == MEMBERS and fnlight.num_members(ss[0]) is None
    assert stacked.params["0.weight"].shape == (MEMBERS, 12, 6) and stacked.step.shape == (MEMBERS,)
    back = fnlight.unstack_states(stacked)
    for a, b in zip(back, ss, strict=True):
        assert fnlight.tree.tree_equal(a, b)


def test_stack_refuses_different_states_naming_the_leaf():
    a = fnlight.TrainState.create(mlp(), fo.adam(1e-3))
    b = fnlight.TrainState.create(torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.ReLU(), torch.nn.Dropout(0),
                                                      torch.nn.Linear(13, 3)), fo.adam(1e-3))
    with pytest.raises(ValueError, match=r"state 1 differs from state 0 at state.params\['0.bias'\]: \(13,\)"):
        fnlight.stack_states([a, b])
    c = fnlight.TrainState.create(mlp(), fo.sgd(1e-3))
    with pytest.raises(ValueError, match="another structure"):
        fnlight.stack_states([a, c])
    with pytest.raises(ValueError, match="at least one"):
        fnlight.stack_states([])
    with pytest.raises(ValueError, match="stacked state"):
        fnlight.unstack_states(a)


# -- the ensemble step equals each member trained alone ------------------------------------

@pytest.mark.parametrize("opt,kw", [
    (fo.adam(1e-2), {}),
    (fo.sgd(0.1, momentum=0.9, nesterov=True), {}),
    (fo.adamw(fo.warmup_cosine(1e-2, 5, 20), weight_decay=0.1), {"clip": 0.5}),
    (fo.chain(fo.clip_by_global_norm(0.3), fo.adam(1e-2)), {"accumulate": 2}),
    (fo.lamb(1e-2), {}),
    (fo.lars(0.1), {}),
    (fo.adafactor(1e-2), {}),
    (fo.chain(fo.clip_by_global_norm(0.3), fo.rmsprop(1e-2, momentum=0.9, centered=True)), {}),
], ids=["adam", "sgd-nesterov", "adamw-schedule-clip", "chain-accumulate", "lamb", "lars", "adafactor",
        "clip-rmsprop"])
def test_each_member_equals_training_it_alone(opt, kw):
    ss = states(opt)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, **kw)
    one = fnlight.make_train_step(mlp(), loss_fn, opt, **kw)
    stacked = fnlight.stack_states(ss)
    data = batches()
    for b in data:
        stacked, metrics = ens(stacked, b)
    assert metrics["loss"].shape == (MEMBERS,)
    for member, alone in zip(fnlight.unstack_states(stacked), ss, strict=True):
        for b in data:
            alone, _ = one(alone, b)
        # measured (torch 2.13 CPU): bitwise equal, but 2.1e-7 relative with accumulate=2 (the chunks' gradient sums
        # round differently under vmap); batched matmuls may round differently on other machines
        assert max_rel(member.params, alone.params) < 1e-5
        assert int(member.step) == int(alone.step) == len(data)


class TokenModel(torch.nn.Module):
    """Token and position embeddings: under vmap their gradients are not contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.out = torch.nn.Embedding(10, 8), torch.nn.Embedding(5, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.tok(x) + self.pos(torch.arange(x.shape[1])))).mean(1)


EMBEDDING_OPTS = {"adam": lambda: fo.adam(1e-2), "adamw": lambda: fo.adamw(1e-2), **PER_TENSOR}


@pytest.mark.parametrize("name", sorted(EMBEDDING_OPTS))
def test_members_with_embeddings_equal_their_lone_runs_bitwise(name):
    """vmap gives the embeddings' gradients a layout that is not contiguous; torch's fused Adam kernel,
    given them as they were, paired their elements wrongly (members ended 8-11% off their lone runs).
    LARS's norms of those gradients round differently (measured 6e-8 absolute after 20 steps)."""
    opt, g = EMBEDDING_OPTS[name](), torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 10, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(20)]
    ss = [fnlight.TrainState.create(TokenModel(), opt, seed=s) for s in range(MEMBERS)]
    ens = fnlight.make_train_step(TokenModel(), loss_fn, opt, ensemble=True)
    one = fnlight.make_train_step(TokenModel(), loss_fn, opt)
    stacked = fnlight.stack_states(ss)
    for b in data:
        stacked, _ = ens(stacked, b)
    for member, alone in zip(fnlight.unstack_states(stacked), ss, strict=True):
        for b in data:
            alone, _ = one(alone, b)
        if name == "lars":
            assert max_rel(member.params, alone.params) < 1e-6
        else:
            assert fnlight.tree.tree_first_difference(member.params, alone.params) is None


@pytest.fixture
def merged_calls(monkeypatch):
    """One entry per one-call update of all members (:meth:`_Merged.apply`)."""
    calls: list[bool] = []
    real = ensemble_mod._Merged.apply

    def spy(self, *args):
        real(self, *args)
        calls.append(True)
    monkeypatch.setattr(ensemble_mod._Merged, "apply", spy)
    return calls


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("name", sorted(PER_TENSOR))
def test_per_tensor_optimizers_update_all_members_in_one_call_bitwise(name, donate, merged_calls):
    opt = PER_TENSOR[name]()
    one_call = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, donate=donate, clip=0.5)
    # one optimizer per member: updated member by member, as each would be alone
    by_member = fnlight.make_train_step(mlp(), loss_fn, (opt,) * MEMBERS, ensemble=True, donate=donate, clip=0.5)
    a = fnlight.stack_states(states(opt))
    b = fnlight.tree.tree_map(torch.clone, a)
    for batch in batches(6):
        a, ma = one_call(a, batch)
        b, mb = by_member(b, batch)
    assert merged_calls == [True] * 6
    assert fnlight.tree.tree_first_difference(a, b) is None
    assert torch.equal(ma["loss"], mb["loss"])


def test_members_with_different_hyperparameters_are_updated_one_by_one(merged_calls):
    opt = fo.inject_hyperparams(fo.adam)(learning_rate=1e-3)
    base = fnlight.TrainState.create(mlp(), opt, seed=0)
    members = [base.replace(opt_state=fo.set_hyperparams(base.opt_state, learning_rate=lr)) for lr in (1e-3, 1e-2)]
    stacked = fnlight.stack_states(members)
    before = fnlight.tree.tree_map(torch.clone, stacked)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)
    after, _ = ens(stacked, batches(1)[0])
    assert merged_calls == []  # declined (before touching anything)
    assert fnlight.tree.tree_equal(stacked, before)
    assert fo.hyperparams(after.opt_state)["learning_rate"].tolist() == [1e-3, 1e-2]
    assert after.opt_state.count.tolist() == [1, 1]


def _fresh_tensor_sgd(lr: float) -> fo.GradientTransformation:
    """An optimizer that ignores ``inplace`` and returns fresh tensors (as a user's own may)."""
    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(grads, state, params=None, *, inplace=False):
        return {k: -lr * g for k, g in grads.items()}, {"count": state["count"] + 1}
    return fo.GradientTransformation(init, update)


@pytest.mark.parametrize("donate", [False, True])
def test_an_optimizer_returning_fresh_tensors_still_updates_every_member(donate):
    opt = _fresh_tensor_sgd(0.1)
    ss = states(opt)
    before = fnlight.stack_states(ss)
    stacked = fnlight.stack_states(ss)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, donate=donate)
    one = fnlight.make_train_step(mlp(), loss_fn, opt)
    data = batches(3)
    for b in data:
        stacked, _ = ens(stacked, b)
    assert stacked.opt_state["count"].tolist() == [3] * MEMBERS
    for member, alone in zip(fnlight.unstack_states(stacked), ss, strict=True):
        for b in data:
            alone, _ = one(alone, b)
        assert max_rel(member.params, alone.params) < 1e-5
    if not donate:  # the given state is untouched
        assert fnlight.tree.tree_equal(fnlight.stack_states(ss), before)


def test_an_optimizer_state_leaf_that_is_not_a_tensor_is_refused():
    def init(params):
        return {"count": 0}

    def update(grads, state, params=None, *, inplace=False):
        return grads, {"count": state["count"] + 1}
    opt = fo.GradientTransformation(init, update)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)
    with pytest.raises(TypeError, match="must hold its values in tensors"):
        ens(fnlight.stack_states(states(opt)), batches(1)[0])


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("norm", [None, "batch"])
def test_member_chunks_give_the_same_members(norm, chunk, donate):
    # (with BatchNorm, sgd: the bias before it has a gradient of pure rounding noise, which Adam would amplify)
    opt = fo.chain(fo.clip_by_global_norm(0.5), fo.adam(1e-2) if norm is None else fo.sgd(0.1, momentum=0.9))
    data = [(x.expand(MEMBERS, *x.shape).clone(), y.expand(MEMBERS, *y.shape).clone()) for x, y in batches(4)]
    data = [(x + torch.arange(MEMBERS).reshape(-1, 1, 1), y) for x, y in data]  # each member its own batch
    whole = fnlight.make_train_step(mlp(norm=norm), loss_fn, opt, ensemble=True, member_batches=True)
    chunked = fnlight.make_train_step(mlp(norm=norm), loss_fn, opt, ensemble=True, member_batches=True,
                                      member_chunk=chunk, donate=donate)
    a = fnlight.stack_states(states(opt, norm=norm))
    b = fnlight.tree.tree_map(torch.clone, a)
    given = fnlight.tree.tree_map(torch.clone, b)
    for batch in data:
        a, ma = whole(a, batch)
        b2, mb = chunked(b, batch)
        if not donate:  # the given state is untouched
            assert fnlight.tree.tree_equal(b, given)
        b = given = b2
    assert ma["loss"].shape == mb["loss"].shape == (MEMBERS,)
    assert b.step.tolist() == [len(data)] * MEMBERS
    if norm is None:  # measured: bitwise (a member's arithmetic does not depend on how many share a pass)
        assert fnlight.tree.tree_equal(a, b)
    else:  # measured: <= 1.2e-7 (BatchNorm's batched statistics round differently)
        assert max_rel(b.params, a.params) < 1e-5 and max_rel(b.buffers, a.buffers) < 1e-5


def test_member_chunks_skip_and_name_members_by_their_index_in_the_whole_state():
    opt = fo.sgd(0.1)
    ss = states(opt)
    ss[2] = ss[2].replace(params={**ss[2].params, "0.weight": ss[2].params["0.weight"] * float("nan")})
    batch = batches(1)[0]
    skip = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, member_chunk=2, on_nonfinite="skip")
    state, metrics = skip(fnlight.stack_states(ss), batch)
    assert metrics["skipped"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert state.step.tolist() == [1] * MEMBERS
    raising = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, member_chunk=2)
    with pytest.raises(NonFiniteError, match=r"member\(s\) \[2\]"):
        raising(fnlight.stack_states(ss), batch)
    with pytest.raises(ValueError, match="member_chunk must be a positive int"):
        fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, member_chunk=0)
    with pytest.raises(ValueError, match="member_chunk goes with ensemble=True"):
        fnlight.make_train_step(mlp(), loss_fn, opt, member_chunk=2, dp=fnlight.DPConfig(1.0, 0.0))


def test_batchnorm_members_keep_their_own_running_statistics():
    opt = fo.sgd(0.05)
    ss = states(opt, norm="batch")
    ens = fnlight.make_train_step(mlp(norm="batch"), loss_fn, opt, ensemble=True)
    one = fnlight.make_train_step(mlp(norm="batch"), loss_fn, opt)
    stacked = fnlight.stack_states(ss)
    for b in batches(5):
        stacked, _ = ens(stacked, b)
    means = stacked.buffers["1.running_mean"]
    assert not torch.equal(means[0], means[1])
    alone = ss[2]
    for b in batches(5):
        alone, _ = one(alone, b)
    assert max_rel(fnlight.unstack_states(stacked)[2].buffers, alone.buffers) < 1e-5


def test_member_batches_give_each_member_its_own_batch():
    opt = fo.adam(1e-2)
    ss = states(opt)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, member_batches=True)
    one = fnlight.make_train_step(mlp(), loss_fn, opt)
    per_member = [batches(3, seed=10 + i) for i in range(MEMBERS)]
    stacked = fnlight.stack_states(ss)
    for t in range(3):
        x = torch.stack([per_member[i][t][0] for i in range(MEMBERS)])
        y = torch.stack([per_member[i][t][1] for i in range(MEMBERS)])
        stacked, _ = ens(stacked, (x, y))
    for i, member in enumerate(fnlight.unstack_states(stacked)):
        alone = ss[i]
        for b in per_member[i]:
            alone, _ = one(alone, b)
        assert max_rel(member.params, alone.params) < 1e-5
    with pytest.raises(ValueError, match="leading member axis of 4"):
        ens(stacked, batches(1)[0])


# -- randomness: a member depends only on its own key and state --------------------------------

def run(step, ss, data):
    stacked = fnlight.stack_states(ss)
    for b in data:
        stacked, _ = step(stacked, b)
    return fnlight.unstack_states(stacked)


def test_dropout_is_per_member_reproducible_and_independent_of_the_others():
    opt = fo.adam(1e-2)
    ss = states(opt, drop=0.3)
    ens = fnlight.make_train_step(mlp(drop=0.3), loss_fn, opt, ensemble=True)
    data = batches(5)
    a, b = run(ens, ss, data), run(ens, ss, data)
    for x, y in zip(a, b, strict=True):
        assert fnlight.tree.tree_equal(x, y)  # a rerun is bitwise identical
    d = run(ens, [ss[2], ss[0], ss[2]], data)  # reordered and repeated
    assert fnlight.tree.tree_equal(d[0], a[2]) and fnlight.tree.tree_equal(d[1], a[0])
    assert fnlight.tree.tree_equal(d[2], a[2])


def test_members_with_different_keys_draw_different_dropout():
    opt = fo.adam(1e-2)
    base = fnlight.TrainState.create(mlp(drop=0.5), opt, seed=0)
    ss = [base.replace(key=fnlight.random.key(k)) for k in range(3)]  # same weights, different keys
    ens = fnlight.make_train_step(mlp(drop=0.5), loss_fn, opt, ensemble=True)
    out = run(ens, ss, batches(2))
    assert not torch.equal(out[0].params["0.weight"], out[1].params["0.weight"])
    same = run(ens, [base, base], batches(2))
    assert fnlight.tree.tree_equal(same[0], same[1])


def test_other_random_ops_get_a_clear_error():
    opt = fo.sgd(0.1)

    def noisy(model_fn, batch, key):
        x, y = batch
        return F.cross_entropy(model_fn(x + torch.randn_like(x)), y)

    ens = fnlight.make_train_step(mlp(), noisy, opt, ensemble=True)
    with pytest.raises(TorchFuncTrapError, match="its own key"):
        ens(fnlight.stack_states(states(opt, 2)), batches(1)[0])


# -- non-finite members -------------------------------------------------------------------------

def test_a_nonfinite_member_is_skipped_alone_or_named():
    opt = fo.adam(1e-2)
    ss = states(opt, 3)
    bad = ss[1].replace(params={**ss[1].params, "0.bias": torch.full((12,), float("nan"))})
    stacked = fnlight.stack_states([ss[0], bad, ss[2]])
    skip = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, on_nonfinite="skip")
    new, metrics = skip(stacked, batches(1)[0])
    assert metrics["skipped"].tolist() == [0.0, 1.0, 0.0]
    members = fnlight.unstack_states(new)
    assert fnlight.tree.tree_equal(members[1].params, bad.params)  # untouched, only the step advanced
    assert int(members[1].step) == 1
    alone, _ = fnlight.make_train_step(mlp(), loss_fn, opt)(ss[0], batches(1)[0])
    assert max_rel(members[0].params, alone.params) < 1e-5
    with pytest.raises(NonFiniteError, match=r"member\(s\) \[1\]"):
        fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)(stacked, batches(1)[0])


# -- eval -----------------------------------------------------------------------------------------

def test_ensemble_eval_step_matches_each_member():
    ss = states(fo.sgd(0.1), norm="batch")
    ev = fnlight.make_eval_step(mlp(norm="batch"), metrics_fn, ensemble=True)
    plain = fnlight.make_eval_step(mlp(norm="batch"), metrics_fn)
    b = batches(1)[0]
    out = ev(fnlight.stack_states(ss), b)
    assert out["acc"].shape == (MEMBERS,)
    for i, s in enumerate(ss):
        ref = plain(s, b)
        assert torch.allclose(out["loss"][i], ref["loss"], rtol=1e-6) and out["acc"][i] == ref["acc"]


@pytest.mark.slow
def test_compiled_ensemble_equals_eager():
    opt = fo.adam(1e-2)
    ss = states(opt)
    data = batches(4)
    eager = run(fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True), ss, data)
    compiled = run(fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True, compile=True), ss, data)
    for a, b in zip(eager, compiled, strict=True):
        assert max_rel(a.params, b.params) < 1e-5
    # with dropout: aot_eager gives eager's bits; inductor refuses with a clear message
    ss = states(opt, drop=0.2)
    eager = run(fnlight.make_train_step(mlp(drop=0.2), loss_fn, opt, ensemble=True), ss, data)
    aot = run(fnlight.make_train_step(mlp(drop=0.2), loss_fn, opt, ensemble=True,
                                      compile={"backend": "aot_eager"}), ss, data)
    for a, b in zip(eager, aot, strict=True):
        assert max_rel(a.params, b.params) < 1e-5


# -- per-sample gradients ------------------------------------------------------------------------------

def autograd_per_sample(model, state, x, y):
    out = []
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_() for k, v in state.params.items()}
        loss = F.cross_entropy(torch.func.functional_call(model, {**p, **state.buffers}, (x[i:i + 1],)), y[i:i + 1])
        out.append(dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True)))
    return out


def test_per_sample_grads_equal_a_per_sample_autograd_loop():
    torch.manual_seed(0)
    model = mlp(norm="group")
    state = fnlight.TrainState.create(model, fo.sgd(0.1), seed=3)
    x, y = batches(1, size=7)[0]
    g = fnlight.per_sample_grads(model, loss_fn)(state, (x, y))
    ref = autograd_per_sample(model, state, x, y)
    for i in range(7):
        for k in state.params:
            assert g[k].shape[0] == 7
            torch.testing.assert_close(g[k][i], ref[i][k], rtol=1e-5, atol=1e-6)


def test_per_sample_grads_refuse_batchnorm():
    with pytest.raises(TypeError, match="BatchNorm"):
        fnlight.per_sample_grads(mlp(norm="batch"), loss_fn)


# -- DP-SGD ---------------------------------------------------------------------------------------------

def test_clip_per_sample_arithmetic():
    per = {"a": torch.tensor([[3.0], [0.0], [0.3]]), "b": torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.4, 0.0]])}
    summed, norms = clip_per_sample(per, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.0, 0.5]))
    torch.testing.assert_close(summed["a"], torch.tensor([3.0 / 5 + 0.3]))
    torch.testing.assert_close(summed["b"], torch.tensor([4.0 / 5 + 0.4, 0.0]))


def test_dp_without_noise_and_clipping_equals_the_ordinary_step():
    model = mlp(norm="group")
    opt = fo.adam(1e-2)
    a = b = fnlight.TrainState.create(model, opt, seed=0)
    dp = fnlight.make_train_step(model, loss_fn, opt, dp=fnlight.DPConfig(clip_norm=1e9, noise_multiplier=0.0))
    plain = fnlight.make_train_step(model, loss_fn, opt)
    for batch in batches(10):
        a, ma = dp(a, batch)
        b, mb = plain(b, batch)
    assert max_rel(a.params, b.params) < 1e-5
    assert set(ma) == {"loss", "grad_norm", "clipped"} and float(ma["clipped"]) == 0.0


def test_dp_with_noise_is_reproducible_and_independent_of_accumulation():
    model = mlp(drop=0.2)
    opt = fo.sgd(0.1)
    cfg = fnlight.DPConfig(clip_norm=0.5, noise_multiplier=1.1)
    state = fnlight.TrainState.create(model, opt, seed=0)

    def train(step):
        s = state
        for batch in batches(4):
            s, m = step(s, batch)
        return s, m

    a, ma = train(fnlight.make_train_step(model, loss_fn, opt, dp=cfg))
    b, _ = train(fnlight.make_train_step(model, loss_fn, opt, dp=cfg))
    assert fnlight.tree.tree_equal(a, b)
    assert 0 < float(ma["clipped"]) <= 1
    c, _ = train(fnlight.make_train_step(model, loss_fn, opt, dp=cfg, accumulate=2))
    assert max_rel(c.params, a.params) < 1e-5  # sample i draws from fold_in(key, i) in any chunking
    plain, _ = train(fnlight.make_train_step(model, loss_fn, opt))
    assert max_rel(plain.params, a.params) > 1e-3


def test_dp_noise_has_the_configured_scale():
    model = torch.nn.Linear(200, 50)
    cfg = fnlight.DPConfig(clip_norm=0.7, noise_multiplier=2.0)
    step = fnlight.make_train_step(model, lambda mf, b, k: mf(b[0]).sum() * 0.0, fo.sgd(1.0), dp=cfg)
    state = fnlight.TrainState.create(model, fo.sgd(1.0))
    grads, _ = step.gradients(state, (torch.randn(10, 200),))
    noise = torch.cat([g.reshape(-1) for g in grads.values()]) * 10  # undo the division by the batch size
    assert abs(float(noise.std()) - 1.4) < 0.03 and abs(float(noise.mean())) < 0.03
    expected = dataclasses.replace(cfg, expected_batch_size=20)  # Opacus's divisor for Poisson sampling
    halved, _ = fnlight.make_train_step(model, step.loss_fn, fo.sgd(1.0), dp=expected).gradients(
        state, (torch.randn(10, 200),))
    for k in grads:
        torch.testing.assert_close(halved[k] * 2, grads[k])


def test_dp_config_and_combinations_are_checked():
    with pytest.raises(ValueError, match="clip_norm"):
        fnlight.DPConfig(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        fnlight.DPConfig(clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        fnlight.DPConfig(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0)
    cfg = fnlight.DPConfig(1.0, 1.0)
    with pytest.raises(ValueError, match="leave clip=None"):
        fnlight.make_train_step(mlp(), loss_fn, fo.sgd(0.1), dp=cfg, clip=1.0)
    with pytest.raises(ValueError, match="not supported"):
        fnlight.make_train_step(mlp(), loss_fn, fo.sgd(0.1), dp=cfg, ensemble=True)
    with pytest.raises(TypeError, match="DPConfig"):
        fnlight.make_train_step(mlp(), loss_fn, fo.sgd(0.1), dp={"clip_norm": 1.0})


def test_dp_clipping_matches_opacus():
    opacus = pytest.importorskip("opacus", reason="opacus is in the dev extra; not installed here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    state = fnlight.TrainState.create(model, fo.sgd(1.0))
    x, y = batches(1, size=9)[0]
    clip = 0.4
    # Opacus: per-sample gradients from GradSampleModule, clipped and summed by DPOptimizer (no noise)
    gsm = opacus.GradSampleModule(copy.deepcopy(model))  # its hooks stay off fnlight's template
    sgd = torch.optim.SGD(gsm.parameters(), lr=1.0)
    dpo = opacus.optimizers.DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=9)
    F.cross_entropy(gsm(x), y).backward()
    dpo.pre_step()
    theirs = {k: p.grad for k, p in zip(state.params, gsm.parameters(), strict=True)}
    ours, metrics = fnlight.make_train_step(model, loss_fn, fo.sgd(1.0),
                                            dp=fnlight.DPConfig(clip, 0.0)).gradients(state, (x, y))
    assert float(metrics["clipped"]) > 0.5  # most samples are clipped: the comparison tests the clipping
    for k in ours:
        # Opacus divides by (norm + 1e-6), fnlight by norm: a relative difference of about 1e-6 / norm
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-7)


# -- sweeps: hyperparameters held in the optimizer state differ per member ---------------------------

@pytest.mark.parametrize("factory,kw", [(fo.adamw, {"weight_decay": 0.1}), (fo.sgd, {"momentum": 0.9})],
                         ids=["adamw", "sgd-momentum"])
def test_learning_rate_sweep_members_equal_separate_runs(factory, kw):
    opt = fo.inject_hyperparams(factory)(learning_rate=1e-3, **kw)
    base = fnlight.TrainState.create(mlp(), opt, seed=0)
    lrs = [1e-3, 3e-3, 1e-2]
    members = [base.replace(opt_state=fo.set_hyperparams(base.opt_state, learning_rate=lr)) for lr in lrs]
    stacked = fnlight.stack_states(members)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)
    data = batches(10)
    for b in data:
        stacked, _ = ens(stacked, b)
    assert fo.hyperparams(stacked.opt_state)["learning_rate"].tolist() == lrs
    for lr, member in zip(lrs, fnlight.unstack_states(stacked), strict=True):
        plain = factory(lr, **kw)
        alone = fnlight.TrainState.create(mlp(), plain, seed=0).replace(params=base.params)
        step = fnlight.make_train_step(mlp(), loss_fn, plain)
        for b in data:
            alone, _ = step(alone, b)
        assert max_rel(member.params, alone.params) < 1e-5  # measured <= 1.1e-7


@pytest.mark.parametrize("donate", [False, True])
def test_one_optimizer_per_member(donate):
    """What `fnlight fit --sweep` uses when a hyperparameter is not in the optimizer state (a schedule's peak)."""
    opts = [fo.adamw(fo.warmup_cosine(peak, 3, 10), weight_decay=0.1) for peak in (1e-3, 1e-2)]
    ss = [fnlight.TrainState.create(mlp(), opt, seed=i) for i, opt in enumerate(opts)]
    ens = fnlight.make_train_step(mlp(), loss_fn, opts, ensemble=True, clip=0.5, donate=donate)
    stacked = fnlight.stack_states([fnlight.tree.tree_map(torch.clone, s) for s in ss])
    data = batches(6)
    for b in data:
        stacked, _ = ens(stacked, b)
    for member, opt, alone in zip(fnlight.unstack_states(stacked), opts, ss, strict=True):
        step = fnlight.make_train_step(mlp(), loss_fn, opt, clip=0.5)
        for b in data:
            alone, _ = step(alone, b)
        assert max_rel(member.params, alone.params) < 1e-5
    with pytest.raises(ValueError, match="2 optimizers"):
        ens(fnlight.stack_states(states(opts[0], 3)), data[0])


def test_a_loss_fn_returning_a_model_output_gets_the_hint_in_an_ensemble_too():
    class Output:
        def __init__(self, loss):
            self.loss = loss

    def out_loss(model_fn, batch, key):
        return Output(loss_fn(model_fn, batch, key))
    step = fnlight.make_train_step(mlp(), out_loss, fo.sgd(0.1), ensemble=True)
    with pytest.raises(TypeError, match=r"return its \.loss"):
        step(fnlight.stack_states(states(fo.sgd(0.1))), batches(1)[0])


def test_a_per_tensor_optimizer_changing_a_non_tensor_leaf_is_refused_too():
    def init(params):
        return {"count": 0, "mu": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(grads, state, params=None, *, inplace=False):
        return {k: -0.1 * g for k, g in grads.items()}, {"count": state["count"] + 1, "mu": state["mu"]}
    opt = fo.GradientTransformation(init, update, per_tensor=True)
    ens = fnlight.make_train_step(mlp(), loss_fn, opt, ensemble=True)
    with pytest.raises(TypeError, match="must hold its values in tensors"):
        ens(fnlight.stack_states(states(opt)), batches(1)[0])


def test_the_dp_names_still_import_from_the_ensemble_module():
    from fnlight.train import dp, ensemble

    assert ensemble.DPConfig is dp.DPConfig and ensemble.clip_per_sample is dp.clip_per_sample
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ensemble.nothing  # noqa: B018
