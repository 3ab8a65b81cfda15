"""Laws of the functional train and eval steps."""

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo
from fnlight.testing import assert_reproducible
from fnlight.train.step import NonFiniteError, TorchFuncTrapError
from fnlight.tree import tree_equal, tree_map

from .models import data, loss_fn, metrics_fn, mlp


def clone(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def run(step, state, batches):
    for b in batches:
        state, _ = step(state, b)
    return state


def batches(n=4, size=16):
    x, y = data(n * size)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


@pytest.mark.parametrize("kw", [dict(), dict(dropout=0.5), dict(bn=True), dict(bn=True, dropout=0.3)])
def test_step_is_pure(kw):
    model = mlp(**kw)
    opt = fo.adamw(1e-2)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = run(step, fnlight.TrainState.create(model, opt, seed=1), batches(2))
    # same inputs, same outputs (dropout included); the input state and batch and the global RNG are untouched
    new, _ = assert_reproducible(step, state, batches(1)[0], runs=3)
    assert int(new.step) == int(state.step) + 1 and not tree_equal(new.params, state.params)


def test_step_does_not_touch_the_global_rng():
    model = mlp(dropout=0.5)
    step = fnlight.make_train_step(model, loss_fn, fo.sgd(0.1))
    state = fnlight.TrainState.create(model, fo.sgd(0.1))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    step(state, batches(1)[0])
    assert torch.equal(torch.rand(3), expected)


def test_dropout_masks_follow_key_and_step():
    model = mlp(dropout=0.5)
    step = fnlight.make_train_step(model, lambda mf, b, k: mf(b[0]).square().mean(), fo.sgd(0.1))
    s0 = fnlight.TrainState.create(model, fo.sgd(0.1), seed=0)
    b = batches(1)[0]
    a, _ = assert_reproducible(step, s0, b)
    assert not tree_equal(a.params, step(s0.replace(key=fnlight.random.key(1)), b)[0].params)
    assert not tree_equal(a.params, step(s0.replace(step=torch.tensor(5)), b)[0].params)


def test_batchnorm_statistics_come_back_as_new_buffers():
    model = mlp(bn=True)
    opt = fo.sgd(0.0)
    state = fnlight.TrainState.create(model, opt)
    x, y = batches(1)[0]
    new, _ = fnlight.make_train_step(model, loss_fn, opt)(state, (x, y))
    reference = copy.deepcopy(model).train()
    reference(x)
    assert torch.allclose(new.buffers["1.running_mean"], reference[1].running_mean)
    assert torch.allclose(new.buffers["1.running_var"], reference[1].running_var)
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    assert torch.equal(state.buffers["1.running_mean"], torch.zeros(16))


def test_eval_step_uses_eval_mode_and_reads_running_stats():
    model = mlp(bn=True, dropout=0.9)
    opt = fo.adam(1e-2)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = run(step, fnlight.TrainState.create(model, opt), batches(3))
    eval_step = fnlight.make_eval_step(model, metrics_fn)
    x, y = batches(1)[0]
    got = eval_step(state, (x, y))
    plain = state.write_to(mlp(bn=True, dropout=0.9)).eval()
    with torch.no_grad():
        expected = F.cross_entropy(plain(x), y)
    assert torch.allclose(got["loss"], expected)
    assert tree_equal(assert_reproducible(eval_step, state, (x, y)), got)  # no dropout, no statistics update


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_step_on_the_whole_batch(k):
    model = mlp(bn=False)
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    x, y = data(48)
    whole = run(fnlight.make_train_step(model, loss_fn, opt), state, [(x, y)] * 3)
    micro = run(fnlight.make_train_step(model, loss_fn, opt, accumulate=k), state, [(x, y)] * 3)
    for name in whole.params:
        torch.testing.assert_close(micro.params[name], whole.params[name], rtol=1e-5, atol=1e-6)


def test_unequal_micro_batches_are_weighted_by_size():
    model = mlp()
    opt = fo.sgd(0.1)
    state = fnlight.TrainState.create(model, opt)
    x, y = data(10)
    whole, m1 = fnlight.make_train_step(model, loss_fn, opt)(state, (x, y))
    micro, m2 = fnlight.make_train_step(model, loss_fn, opt, accumulate=3)(state, (x, y))  # 4, 3, 3
    for name in whole.params:
        torch.testing.assert_close(micro.params[name], whole.params[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2["loss"], m1["loss"])


def test_donation_reuses_memory_and_gives_the_same_result():
    model = mlp(bn=True, dropout=0.2)
    opt = fo.adamw(1e-2)
    state = fnlight.TrainState.create(model, opt)
    pure = run(fnlight.make_train_step(model, loss_fn, opt), state, batches(4))
    donated_in = clone(state)
    ptr = donated_in.params["0.weight"].data_ptr()
    donated = run(fnlight.make_train_step(model, loss_fn, opt, donate=True), donated_in, batches(4))
    assert tree_equal(pure, donated)
    assert donated.params["0.weight"].data_ptr() == ptr  # updated in place
    assert not tree_equal(donated_in.params, state.params)  # the donated input was consumed


def test_clip_matches_clip_grad_norm():
    model = mlp()
    state = fnlight.TrainState.create(model, fo.sgd(1.0))
    x, y = batches(1)[0]
    new, _ = fnlight.make_train_step(model, loss_fn, fo.sgd(1.0), clip=0.01)(state, (x, y))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    torch.optim.SGD(ref.parameters(), lr=1.0).step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(new.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_gradients_match_plain_autograd_and_torch_adam():
    model = mlp()
    ref = copy.deepcopy(model)
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt)
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=True)
    for b in batches(5):
        state, _ = step(state, b)
        topt.zero_grad()
        F.cross_entropy(ref(b[0]), b[1]).backward()
        topt.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-6, atol=1e-6)


def nan_loss(model_fn, batch, key):
    x, y = batch
    return F.cross_entropy(model_fn(x), y) * torch.where(x[0, 0] > 100, float("nan"), 1.0)


def test_non_finite_raise_names_the_step():
    model = mlp()
    step = fnlight.make_train_step(model, nan_loss, fo.sgd(0.1))
    state = run(step, fnlight.TrainState.create(model, fo.sgd(0.1)), batches(2))
    x, y = batches(1)[0]
    x = x.clone()
    x[0, 0] = 1000
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2"):
        step(state, (x, y))


@pytest.mark.parametrize("donate", [False, True])
def test_non_finite_skip_keeps_the_state_but_counts_the_step(donate):
    model = mlp(bn=True)
    opt = fo.adam(1e-2)
    step = fnlight.make_train_step(model, nan_loss, opt, on_nonfinite="skip", donate=donate)
    state = run(fnlight.make_train_step(model, nan_loss, opt), fnlight.TrainState.create(model, opt), batches(2))
    before = clone(state)
    x, y = batches(1)[0]
    x = x.clone()
    x[0, 0] = 1000
    new, metrics = step(state, (x, y))
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == int(before.step) + 1
    assert tree_equal((new.params, new.buffers, new.opt_state, new.key),
                      (before.params, before.buffers, before.opt_state, before.key))
    _, ok = step(new, batches(1)[0])
    assert float(ok["skipped"]) == 0.0


def test_bf16_mixed_keeps_float32_master_weights():
    model = mlp()
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    b16 = run(fnlight.make_train_step(model, loss_fn, opt, precision="bf16-mixed"), state, batches(3))
    f32 = run(fnlight.make_train_step(model, loss_fn, opt), state, batches(3))
    assert all(p.dtype == torch.float32 for p in b16.params.values())
    assert not tree_equal(b16.params, f32.params)
    for k in f32.params:
        torch.testing.assert_close(b16.params[k], f32.params[k], rtol=0.1, atol=0.02)


def test_known_torch_func_traps_are_explained(tmp_path):
    model = mlp(bn=True)

    def vmapped_loss(model_fn, batch, key):
        x, y = batch
        return torch.func.vmap(lambda xi: model_fn(xi).sum())(x.reshape(4, 4, -1)).sum()

    with pytest.raises(TorchFuncTrapError, match="BatchNorm cannot update its running statistics under"):
        fnlight.make_train_step(model, vmapped_loss, fo.sgd(0.1))(fnlight.TrainState.create(model, fo.sgd(0.1)),
                                                                   batches(1)[0])

    lin = mlp()

    def checkpointed(model_fn, batch, key):
        x, _ = batch
        return torch.utils.checkpoint.checkpoint(model_fn, x, use_reentrant=False).sum()

    # under torch.func.grad (the compiled step's gradients) activation checkpointing cannot work
    with pytest.raises(TorchFuncTrapError, match="Checkpoint in the eager step"):
        fnlight.make_train_step(lin, checkpointed, fo.sgd(0.1), compile={"backend": "eager"})(
            fnlight.TrainState.create(lin, fo.sgd(0.1)), batches(1)[0])
    # ... and the failed trace leaves checkpointing usable in the eager step (torch would not)
    fnlight.make_train_step(lin, checkpointed, fo.sgd(0.1))(fnlight.TrainState.create(lin, fo.sgd(0.1)), batches(1)[0])

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        with pytest.raises(TypeError, match=r"Pass the plain module \(ddp.module\)"):
            fnlight.make_train_step(ddp, loss_fn, fo.sgd(0.1))
    finally:
        dist.destroy_process_group()


def _under_a_transform(step, state, batch):
    """``step(state, batch)`` run inside ``torch.func.grad`` of a function that does not use it:
    a transform is active, which sends the step down its grad_and_value path."""
    out = []

    def f(t):
        out.append(step(state, batch))
        return t.sum()

    torch.func.grad(f)(torch.zeros(()))
    return out[0]


def smooth_net():
    """A model whose backward formulas depend on grad mode (SiLU, GroupNorm)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
                               torch.nn.Linear(16, 3))


@pytest.mark.parametrize("kw", [dict(), dict(accumulate=2), dict(clip=0.5), dict(precision="bf16-mixed")])
@pytest.mark.parametrize("model_kw", [dict(), dict(bn=True, dropout=0.3)])
def test_eager_gradients_agree_with_the_grad_and_value_path(kw, model_kw):
    """The eager step takes gradients with torch.autograd.grad; inside a torch.func transform it
    uses grad_and_value. For a ReLU MLP (BatchNorm statistics and dropout masks included) the two
    give bitwise equal steps."""
    model = mlp(**model_kw)
    opt = fo.adamw(1e-2)
    step = fnlight.make_train_step(model, loss_fn, opt, **kw)
    state = fnlight.TrainState.create(model, opt, seed=3)
    via_func = via_autograd = state
    for b in batches(3):
        via_autograd, m_autograd = step(via_autograd, b)
        via_func, m_func = _under_a_transform(step, via_func, b)
        assert tree_equal(m_autograd, m_func)
    assert tree_equal(via_autograd, via_func)
    assert not tree_equal(via_autograd.params, state.params)


def test_eager_step_computes_what_a_plain_pytorch_loop_computes():
    """Bitwise a loss.backward() loop, for ops whose backward formula depends on grad mode
    (grad_and_value's create_graph=True backward differs from it in the last bits there)."""
    model, reference = smooth_net(), smooth_net()
    opt = fo.sgd(0.1)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = via_func = fnlight.TrainState.create(model, opt)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, foreach=True)
    for b in batches(3):
        state, _ = step(state, b)
        via_func, _ = _under_a_transform(step, via_func, b)
        torch_opt.zero_grad()
        F.cross_entropy(reference(b[0]), b[1]).backward()
        torch_opt.step()
    assert tree_equal(state.params, {k: p.detach() for k, p in reference.named_parameters()})
    tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6), state.params, via_func.params)


@pytest.mark.parametrize("bn", [False, True])
def test_the_step_runs_on_a_state_of_inference_tensors(bn):
    model = mlp(bn=bn)
    opt = fo.adam(1e-2)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state = fnlight.TrainState.create(model, opt)
    b = batches(1)[0]
    with torch.inference_mode():  # e.g. a state loaded or built under inference mode
        frozen = tree_map(lambda t: t.clone(), state)
    assert all(p.is_inference() for p in frozen.params.values())
    assert tree_equal(step(frozen, b)[0], step(state, b)[0])
    if not bn:  # (BatchNorm cannot update its statistics under inference mode, with or without fnlight)
        with torch.inference_mode():
            inside, _ = step(state, b)
        assert tree_equal(inside, step(state, b)[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_an_outer_autocast_does_not_accumulate_casts():
    """Autocast caches casts of leaves that require grad until the outermost autocast exits: each
    step's fresh leaves must not pile up in a caller's autocast (8 MiB of bf16 weights a step here)."""
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    model = torch.nn.Sequential(torch.nn.Linear(8, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 3))
    opt = fo.sgd(0.01)
    step = fnlight.make_train_step(model, loss_fn, opt, precision="bf16-mixed", donate=True)
    state = fnlight.TrainState.create(model, opt)
    b = data(8, din=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            state, _ = step(state, b)
        before = rss_mib()
        for _ in range(12):
            state, _ = step(state, b)
        grown = rss_mib() - before
    assert grown < 40, f"resident memory grew by {grown:.0f} MiB in 12 steps"


def test_a_parameter_used_through_a_broadcast_trains():
    """Its gradient is an expanded tensor (stride 0), which in-place kernels cannot write."""
    class Offset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.scale = torch.nn.Linear(6, 3), torch.nn.Parameter(torch.ones(3, 4))

        def forward(self, x):
            return self.linear(x) * self.scale.sum() / 12

    torch.manual_seed(0)
    reference = Offset()
    torch_opt = torch.optim.Adam(reference.parameters(), lr=0.1, foreach=True)
    x, y = batches(1)[0]
    assert 0 in torch.autograd.grad(F.cross_entropy(reference(x), y), reference.scale)[0].stride()
    torch_opt.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    torch_opt.step()
    for kw in (dict(), dict(on_nonfinite="skip"), dict(donate=True)):
        torch.manual_seed(0)
        model = Offset()
        state = fnlight.TrainState.create(model, fo.adam(0.1))
        new, _ = fnlight.make_train_step(model, loss_fn, fo.adam(0.1), **kw)(state, batches(1)[0])
        torch.testing.assert_close(new.params["scale"], reference.scale.detach())


def test_unused_parameters_get_zero_gradients_as_with_grad_and_value():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    step = fnlight.make_train_step(model, loss_fn, fo.sgd(0.1))
    state = fnlight.TrainState.create(model, fo.sgd(0.1))
    new, _ = step(state, batches(1)[0])
    assert torch.equal(new.params["unused.weight"], state.params["unused.weight"])
    assert not torch.equal(new.params["used.weight"], state.params["used.weight"])


def test_activation_checkpointing_works_in_the_eager_step():
    model = mlp(dropout=0.3)
    opt = fo.adam(1e-2)

    def checkpointed(model_fn, batch, key):
        x, y = batch
        return F.cross_entropy(torch.utils.checkpoint.checkpoint(model_fn, x, use_reentrant=False), y)

    plain = run(fnlight.make_train_step(model, loss_fn, opt), fnlight.TrainState.create(model, opt), batches(3))
    ckpt = run(fnlight.make_train_step(model, checkpointed, opt), fnlight.TrainState.create(model, opt), batches(3))
    # the recomputed forward sees the same dropout masks (checkpoint restores the generator it seeded)
    assert tree_equal(plain, ckpt)


def test_a_loss_that_does_not_depend_on_the_parameters_is_an_error():
    model = mlp()
    state = fnlight.TrainState.create(model, fo.sgd(0.1))

    def reentrant(model_fn, batch, key):  # the input does not require grad: the graph is cut
        x, y = batch
        return F.cross_entropy(torch.utils.checkpoint.checkpoint(model_fn, x, use_reentrant=True), y)

    for bad in (lambda mf, b, k: b[0].sum(), reentrant):
        with pytest.raises(ValueError, match="does not depend on the parameters"), \
                pytest.warns(UserWarning) if bad is reentrant else contextlib.nullcontext():
            fnlight.make_train_step(model, bad, fo.sgd(0.1))(state, batches(1)[0])

    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fnlight.make_train_step(frozen, loss_fn, fo.sgd(0.1))(fnlight.TrainState.create(frozen, fo.sgd(0.1)),
                                                              batches(1)[0])


def test_tied_weights_stay_tied():
    """A weight shared by two layers is one parameter of the state, used by both (as
    torch.optim sees it): fnlight's step equals a plain PyTorch loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3))
    model[2].weight = model[0].weight
    reference = copy.deepcopy(model)
    opt = fo.sgd(0.1, momentum=0.9)
    state = fnlight.TrainState.create(model, opt)
    assert "2.weight" not in state.params
    state = run(fnlight.make_train_step(model, loss_fn, opt), state, batches(3))
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(3):
        torch_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        torch_opt.step()
    for k, p in reference.named_parameters():
        torch.testing.assert_close(state.params[k], p.detach(), rtol=1e-6, atol=1e-7)
    x, y = batches(1)[0]
    metrics = fnlight.make_eval_step(model, metrics_fn)(state, (x, y))
    torch.testing.assert_close(metrics["loss"], F.cross_entropy(reference.eval()(x), y))


def test_argument_checks():
    with pytest.raises(ValueError, match="precision"):
        fnlight.make_train_step(mlp(), loss_fn, fo.sgd(0.1), precision="16")
    with pytest.raises(ValueError, match="accumulate"):
        fnlight.make_train_step(mlp(), loss_fn, fo.sgd(0.1), accumulate=0)
    with pytest.raises(TypeError, match="scalar loss"):
        m = mlp()
        fnlight.make_train_step(m, lambda mf, b, k: mf(b[0]), fo.sgd(0.1))(fnlight.TrainState.create(m, fo.sgd(0.1)),
                                                                           batches(1)[0])


def test_a_loss_fn_returning_a_model_output_is_told_to_return_its_loss():
    from transformers.modeling_outputs import CausalLMOutput

    m = mlp()
    state = fnlight.TrainState.create(m, fo.sgd(0.1))

    def returns_output(model_fn, batch, key):
        x, y = batch
        logits = model_fn(x)
        return CausalLMOutput(loss=F.cross_entropy(logits, y), logits=logits)

    step = fnlight.make_train_step(m, returns_output, fo.sgd(0.1))
    with pytest.raises(TypeError, match=r"CausalLMOutput.*return its \.loss, e\.g\. `return model_fn\(\*\*batch\)"):
        step(state, batches(1)[0])
    fixed = fnlight.make_train_step(m, lambda mf, b, k: returns_output(mf, b, k).loss, fo.sgd(0.1))
    reference = fnlight.make_train_step(m, lambda mf, b, k: F.cross_entropy(mf(b[0]), b[1]), fo.sgd(0.1))
    assert tree_equal(fixed(state, batches(1)[0])[0], reference(state, batches(1)[0])[0])


@pytest.mark.parametrize("bn", [False, True])
def test_steps_keep_no_weights_of_the_module_and_never_change_it(bn):
    """The steps keep the module without its tensors: once the caller lets go of the module, the state's
    tensors are the only copy (its parameters are freed); the module itself is not changed, nor its mode."""
    import gc
    import weakref

    model = mlp(bn=bn, dropout=0.3).eval()
    before = {k: t.detach().clone() for k, t in (*model.named_parameters(), *model.named_buffers())}
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt, sync_batchnorm=bn)
    eval_step = fnlight.make_eval_step(model, metrics_fn)
    state = run(step, state, batches(2))
    eval_step(state, batches(1)[0])
    assert not model.training and all(torch.equal(t, before[k])
                                      for k, t in (*model.named_parameters(), *model.named_buffers()))
    assert all(t.is_meta for t in (*step.model.parameters(), *eval_step.model.parameters()))
    weights = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert all(w() is None for w in weights)  # nothing of fnlight's holds them
    state = run(step, state, batches(2))  # and the steps still run
    assert eval_step(state, batches(1)[0])["loss"] > 0


def test_the_template_keeps_ties_and_grad_flags_and_the_state_must_hold_every_tensor():
    from fnlight.train.step import stateless_template

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    model[2].weight = model[0].weight
    model[2].bias.requires_grad_(False)
    template = stateless_template(model)
    assert template[2].weight is template[0].weight and template[0].weight.is_meta
    assert not template[2].bias.requires_grad and template[0].bias.requires_grad
    assert template[1].running_mean.is_meta and model[1].running_mean.device.type == "cpu"
    assert stateless_template(template) is template  # (no copy of a copy)
    opt = fo.sgd(0.1)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, lambda mf, b, k: mf(b).square().mean(), opt)
    step(state, torch.randn(8, 4))
    partial = state.replace(buffers={k: v for k, v in state.buffers.items() if k != "1.running_var"})
    with pytest.raises(KeyError, match=r"no value for the module's \['1.running_var'\].*TrainState.create"):
        step(partial, torch.randn(8, 4))
    with pytest.raises(KeyError, match="1.running_var"):
        fnlight.make_eval_step(model, lambda mf, b: {"m": mf(b).mean()})(partial, torch.randn(8, 4))


def test_a_module_that_cannot_be_copied_is_used_itself():
    import threading

    from fnlight.train.step import stateless_template

    model = mlp()
    model.lock = threading.Lock()  # deepcopy cannot copy a lock
    assert stateless_template(model) is model
    opt = fo.sgd(0.1)
    step = fnlight.make_train_step(model, loss_fn, opt)
    assert step.model is model
    state, _ = step(fnlight.TrainState.create(model, opt), batches(1)[0])
    assert int(state.step) == 1
