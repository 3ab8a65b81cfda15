"""Parameter groups (masked, multi_transform, label_by_name, set_to_zero, freeze), hyperparameters
in the state (inject_hyperparams, hyperparams, set_hyperparams), any pytree of parameters, the
weight EMA, and the decay mask's convention."""

import pytest
import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo
from fnlight.tree import tree_equal
from tests._optim_helpers import grads_at, make_params, max_rel


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def loss_fn(model_fn, batch, key=None):
    x, y = batch
    return F.cross_entropy(model_fn(x), y)


def batches(n, size=16):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


GROUP_LABELS = fo.label_by_name({"*.bias": "no_decay", "1.*": "no_decay"}, default="decay")


def two_group_optimizer(lr_decay=1e-2, lr_no=3e-3, **kw):
    return fo.multi_transform({"decay": fo.adamw(lr_decay, weight_decay=0.1, **kw),
                               "no_decay": fo.adamw(lr_no, weight_decay=0.0, **kw)}, GROUP_LABELS)


def torch_groups(model, **kw):
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "lr": 1e-2, "weight_decay": 0.1},
                              {"params": no, "lr": 3e-3, "weight_decay": 0.0}], **kw)


def torch_loop(model, opt, data, on_step=None):
    for i, (x, y) in enumerate(data):
        if on_step is not None:
            on_step(i, opt)
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_two_groups_through_make_train_step_equal_torch_adamw_param_groups(impl):
    model, ref = mlp(), mlp()
    opt = two_group_optimizer(fused=impl == "fused")
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = fnlight.TrainState.create(model, opt)
    data = batches(50)
    for b in data:
        state, _ = step(state, b)
    want = torch_loop(ref, torch_groups(ref, **{impl: True}), data)
    assert tree_equal(state.params, want)


def test_set_hyperparams_mid_run_equals_changing_param_group_lr():
    model, ref = mlp(), mlp()
    opt = fo.inject_hyperparams(fo.adamw)(learning_rate=1e-2, weight_decay=0.1)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = fnlight.TrainState.create(model, opt)
    data = batches(30)
    for i, b in enumerate(data):
        if i == 12:
            before = state.opt_state
            state = state.replace(opt_state=fo.set_hyperparams(state.opt_state, learning_rate=2.5e-3))
            assert float(fo.hyperparams(before)["learning_rate"]) == 1e-2  # the old state is unchanged
        state, _ = step(state, b)

    def on_step(i, o):
        if i == 12:
            o.param_groups[0]["lr"] = 2.5e-3

    # weight_decay is a tensor in the state, so the step runs the foreach arithmetic (the fused kernel takes floats)
    want = torch_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=True), data,
                      on_step)
    assert tree_equal(state.params, want)
    assert float(fo.hyperparams(state.opt_state)["learning_rate"]) == 2.5e-3


def test_inject_hyperparams_with_schedules_and_groups():
    params = make_params()
    inner = fo.inject_hyperparams(fo.sgd)(learning_rate=fo.linear_warmup(0.1, 10), momentum=0.9)
    plain = fo.sgd(fo.linear_warmup(0.1, 10), momentum=0.9)
    s1, s2, p1, p2 = inner.init(params), plain.init(params), params, params
    for t in range(15):
        p1, s1 = fo.step(inner, grads_at(t, p1), s1, p1)
        p2, s2 = fo.step(plain, grads_at(t, p2), s2, p2)
    assert max_rel(p1, p2) <= 1e-6
    hp = fo.hyperparams(s1)
    assert set(hp) == {"learning_rate", "momentum"} and float(hp["learning_rate"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="follow a schedule"):
        fo.set_hyperparams(s1, learning_rate=0.5)
    with pytest.raises(ValueError, match="no injected hyperparameter"):
        fo.set_hyperparams(s1, nope=0.5)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        fo.hyperparams(plain.init(params))

    groups = fo.multi_transform({"a": fo.inject_hyperparams(fo.adam)(learning_rate=1e-2),
                                 "b": fo.inject_hyperparams(fo.adam)(learning_rate=1e-3)},
                                lambda p: {k: "a" if k.startswith("w") else "b" for k in p})
    state = groups.init(params)
    assert {g: float(v["learning_rate"]) for g, v in fo.hyperparams(state).items()} == {"a": 1e-2, "b": 1e-3}
    state = fo.set_hyperparams(state, group="b", learning_rate=5e-4)
    assert {g: float(v["learning_rate"]) for g, v in fo.hyperparams(state).items()} == {"a": 1e-2, "b": 5e-4}


@pytest.mark.slow
def test_set_hyperparams_does_not_recompile():
    from torch._dynamo.utils import counters

    model = mlp()
    opt = fo.inject_hyperparams(fo.adamw)(learning_rate=1e-2, weight_decay=0.1, b1=0.8)
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"})
    eager = fnlight.make_train_step(model, loss_fn, opt)
    state = ref = fnlight.TrainState.create(model, opt)
    data = batches(6)
    torch._dynamo.reset()
    counters.clear()
    for i, b in enumerate(data):
        if i == 2:
            graphs = counters["stats"]["unique_graphs"]
        if i in (3, 4):
            state = state.replace(opt_state=fo.set_hyperparams(state.opt_state, learning_rate=1e-3 * i, b1=0.5))
            ref = ref.replace(opt_state=fo.set_hyperparams(ref.opt_state, learning_rate=1e-3 * i, b1=0.5))
        state, _ = step(state, b)
        ref, _ = eager(ref, b)
    assert counters["stats"]["unique_graphs"] == graphs
    for k, v in ref.params.items():
        torch.testing.assert_close(state.params[k], v, rtol=1e-5, atol=1e-6)


def test_masked_and_freeze():
    params = make_params()
    g = grads_at(0, params)
    decay_only = fo.masked(fo.add_decayed_weights(0.5), fo.default_decay_mask)
    u, _ = decay_only.update(g, decay_only.init(params), params)
    for k in params:
        want = g[k] + 0.5 * params[k] if params[k].dim() > 1 else g[k]
        torch.testing.assert_close(u[k], want)
    frozen = fo.freeze(fo.adam(1e-2), lambda p: {k: k.startswith("w") for k in p})
    state = frozen.init(params)
    assert set(state.inner_states["train"].mu) == {"b1", "scale", "b2"}  # no state for the frozen group
    new, _ = fo.step(frozen, g, state, params)
    upd, _ = frozen.update(g, state, params)
    for k in params:
        assert torch.equal(new[k], params[k]) == k.startswith("w"), k
        assert torch.equal(fo.apply_updates(params, upd)[k], new[k])
    u, _ = fo.set_to_zero().update(g, fo.EmptyState())
    assert all(not v.any() for v in u.values())


def test_multi_transform_label_errors():
    params = make_params()
    with pytest.raises(ValueError, match="no label for the parameters"):
        fo.multi_transform({"a": fo.sgd(0.1)}, {"w1": "a"}).init(params)
    with pytest.raises(ValueError, match=r"labels \['c'\] have no transformation"):
        fo.multi_transform({"a": fo.sgd(0.1)}, lambda p: {k: "c" for k in p}).init(params)
    with pytest.raises(ValueError, match="no pattern matches"):
        fo.multi_transform({"a": fo.sgd(0.1)}, fo.label_by_name({"w*": "a"})).init(params)


def test_any_pytree_of_parameters():
    """Nested dicts, lists, tuples and NamedTuples: the same numbers as the flat dict."""
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: torch.Tensor
        b: torch.Tensor

    flat = make_params()

    def nest(d):
        return {"layer": [d["w1"], (d["b1"], d["w2"])], "extra": Pair(d["scale"], d["b2"])}

    def unnest(t):
        return {"w1": t["layer"][0], "b1": t["layer"][1][0], "w2": t["layer"][1][1], "scale": t["extra"].a,
                "b2": t["extra"].b}

    for opt in (fo.adamw(1e-2, mask=fo.default_decay_mask), fo.sgd(0.1, momentum=0.9), fo.lion(1e-3),
                fo.chain(fo.clip_by_global_norm(0.5), fo.nadam(1e-2)), fo.with_ema(fo.rmsprop(1e-2), 0.9),
                fo.multi_transform({"x": fo.adam(1e-2), "y": fo.sgd(0.1)}, lambda p: fo.default_decay_mask(p) and
                                   __import__("optree").tree_map(lambda m: "x" if m else "y", fo.default_decay_mask(p),
                                                                 namespace="fnlight"))):
        p_flat, p_tree = flat, nest(flat)
        s_flat, s_tree = opt.init(p_flat), opt.init(p_tree)
        for t in range(5):
            g = grads_at(t, p_flat)
            p_flat, s_flat = fo.step(opt, g, s_flat, p_flat)
            u, s_tree = opt.update(nest(g), s_tree, p_tree)
            p_tree = fo.apply_updates(p_tree, u)
        assert isinstance(p_tree["extra"], Pair)
        for k, v in unnest(p_tree).items():
            torch.testing.assert_close(v, p_flat[k], rtol=1e-6, atol=1e-7)


def test_float64_parameters_get_float64_arithmetic():
    p = {"w": torch.zeros((), dtype=torch.float64)}
    opt = fo.sgd(0.1)
    new, _ = fo.step(opt, {"w": torch.ones((), dtype=torch.float64)}, opt.init(p), p)
    assert float(new["w"]) == -0.1  # not -0.10000000149 (0.1 rounded to float32)
    sched = fo.sgd(fo.constant(0.1))
    new, _ = fo.step(sched, {"w": torch.ones((), dtype=torch.float64)}, sched.init(p), p)
    assert float(new["w"]) == -0.1
    # a 0-d float32 parameter stays float32 (a float64 scalar does not promote it)
    p32 = {"s": torch.ones(())}
    for opt in (fo.adam(1e-2, fused=False), fo.nadam(1e-2), fo.radam(1e-2), fo.adamw(fo.constant(1e-2))):
        new, _ = fo.step(opt, {"s": torch.ones(())}, opt.init(p32), p32)
        assert new["s"].dtype == torch.float32
    assert fo.global_norm([torch.ones(2, dtype=torch.float64), torch.ones(2)]).dtype == torch.float64
    assert fo.global_norm({"a": torch.ones(2, dtype=torch.bfloat16)}).dtype == torch.float32


def test_weight_ema_equals_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model, ref = mlp(), mlp()
    opt = fo.with_ema(fo.adamw(1e-2), decay=0.9)
    step = fnlight.make_train_step(model, loss_fn, opt, donate=True)
    state = fnlight.TrainState.create(model, opt)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    averaged = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for b in batches(20):
        state, _ = step(state, b)
        torch_opt.zero_grad()
        loss_fn(ref, b).backward()
        torch_opt.step()
        averaged.update_parameters(ref)
    ema = fo.ema_params(state.opt_state)
    want = {k[len("module."):]: v.detach() for k, v in averaged.named_parameters()}
    assert tree_equal(ema, want)
    assert not tree_equal(ema, state.params)


def test_default_decay_mask_convention():
    class GPT(torch.nn.Module):
        def __init__(self, untied=False):
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(11, 4), torch.nn.Embedding(8, 4)
            self.ln_f = torch.nn.LayerNorm(4)
            self.fc = torch.nn.Linear(4, 4)
            self.conv = torch.nn.Conv1d(4, 4, 3)
            self.lm_head = torch.nn.Linear(4, 11, bias=False)
            if not untied:
                self.lm_head.weight = self.wte.weight
            self.fc.bias.requires_grad_(False)

    for untied in (False, True):
        model = GPT(untied)
        state = fnlight.TrainState.create(model, fo.sgd(0.1))
        by_name = fo.default_decay_mask(state.params)
        by_model = fo.default_decay_mask(model)(state.params)
        decayed = sorted(k for k, v in by_name.items() if v)
        assert decayed == sorted(["fc.weight", "conv.weight"] + (["lm_head.weight"] if untied else []))
        assert by_model == by_name

    class Odd(torch.nn.Module):  # an embedding and a norm under unusual names: recognised by type
        def __init__(self):
            super().__init__()
            self.table, self.fc = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3)

    params = dict(Odd().named_parameters())
    assert fo.default_decay_mask(Odd())(params) == {"table.weight": False, "fc.weight": True, "fc.bias": False}

    tied = GPT()
    mask = fo.default_decay_mask(tied)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to 'wte.weight'"):
        fo.add_decayed_weights(0.1, mask=_with_names(mask, {"lm_head.weight": True})).init(
            fnlight.TrainState.create(tied, fo.sgd(0.1)).params)
    with pytest.raises(ValueError, match="'fc.bias' is a frozen parameter"):
        fo.add_decayed_weights(0.1, mask=_with_names(mask, {"fc.bias": True})).init(
            fnlight.TrainState.create(tied, fo.sgd(0.1)).params)
    with pytest.raises(ValueError, match="did you mean 'fc.weight'"):
        fo.adamw(1e-3, mask={"fc.weigth": True}).init(fnlight.TrainState.create(tied, fo.sgd(0.1)).params)


def _with_names(mask, extra):
    def m(params):
        return {**mask(params), **extra}
    m.model_names = mask.model_names
    return m


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: fo.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    lambda: fo.rmsprop(1e-2, momentum=0.9, centered=True),
    lambda: fo.with_ema(two_group_optimizer(), 0.9),
    lambda: fo.inject_hyperparams(fo.radam)(learning_rate=fo.linear_warmup(1e-2, 3), weight_decay=0.1),
    lambda: fo.lion(1e-3),
], ids=["nadam", "rmsprop", "groups_ema", "inject_radam", "lion"])
def test_compiled_step_computes_what_the_eager_step_does(make):
    model = mlp()
    opt = make()
    eager = fnlight.make_train_step(model, loss_fn, opt)
    compiled = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"})
    a = b = fnlight.TrainState.create(model, opt)
    for batch in batches(4):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    for k, v in a.params.items():
        torch.testing.assert_close(b.params[k], v, rtol=1e-5, atol=1e-6)


def test_every_optimizer_state_survives_a_checkpoint(tmp_path):
    model = mlp()
    opts = [fo.with_ema(fo.multi_transform({"a": fo.inject_hyperparams(fo.nadam)(learning_rate=1e-2),
                                            "b": fo.apply_if_finite(fo.rmsprop(1e-2, centered=True), 2)},
                                           GROUP_LABELS_AB), 0.9),
            fo.chain(fo.zero_nans(), fo.adafactor(1e-2, momentum=0.9)), fo.lars(0.1), fo.lion(1e-3),
            fo.adagrad(0.1), fo.adadelta(), fo.adabelief(1e-3), fo.lamb(1e-3), fo.adamax(), fo.radam()]
    for i, opt in enumerate(opts):
        state = fnlight.TrainState.create(model, opt)
        state, _ = fnlight.make_train_step(model, loss_fn, opt)(state, batches(1)[0])
        fnlight.save_checkpoint(tmp_path / str(i), state)
        loaded, _ = fnlight.load_checkpoint(tmp_path / str(i))
        assert tree_equal(loaded, state), i
        assert fo.update_count(loaded.opt_state) is not None


GROUP_LABELS_AB = fo.label_by_name({"*.bias": "b"}, default="a")


def test_per_member_hyperparameters_under_vmap():
    """An ensemble stacks states with a leading member axis: injected hyperparameters become one
    value per member, and every optimizer runs under torch.func.vmap (foreach ops one by one)."""
    import optree

    params = make_params()
    lrs = [1e-2, 3e-3, 1e-3]
    for factory in (fo.adamw, fo.nadam, fo.sgd, fo.rmsprop):
        opt = fo.inject_hyperparams(factory)(learning_rate=1e-2, weight_decay=0.01)
        states = [fo.set_hyperparams(opt.init(params), learning_rate=lr) for lr in lrs]

        leaves = [optree.tree_flatten(s, namespace="fnlight") for s in states]
        spec = leaves[0][1]
        stacked = [torch.stack(xs) for xs in zip(*(lv for lv, _ in leaves), strict=True)]

        zero = {k: torch.zeros_like(v) for k, v in params.items()}
        noise = [grads_at(t, zero) for t in range(5)]  # (no random draws under vmap)

        def run(p, s, opt=opt, noise=noise):
            for t in range(5):
                p, s = fo.step(opt, {k: noise[t][k] + 0.05 * p[k] for k in p}, s, p)
            return p

        def run_leaves(p, state_leaves, spec=spec, run=run):
            return run(p, optree.tree_unflatten(spec, state_leaves))

        batched = torch.func.vmap(run_leaves)({k: torch.stack([v] * 3) for k, v in params.items()}, stacked)
        for m, s in enumerate(states):
            want = run(params, s)
            for k in params:
                torch.testing.assert_close(batched[k][m], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_groups_benchmark_json():
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lightning")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "step_throughput.py"), "--quick", "--json",
                          "--workload", "groups"], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rates = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rates) == {"groups"}
    assert set(rates["groups"]) == {"torch_foreach", "torch_fused", "fnlight_eager", "fnlight_donate"}
    assert all(v > 0 for v in rates["groups"].values())
