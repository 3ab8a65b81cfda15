"""compile=True: parity with eager, and no recompilation when the learning rate changes."""

import contextlib
import inspect
import logging
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import fnlight
import fnlight.optim as fo
from fnlight.testing import assert_reproducible
from fnlight.tree import tree_equal

from .models import data, datamodule, loss_fn, mlp

pytestmark = pytest.mark.slow


def batches(n, size=16):
    x, y = data(n * size)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


# Adam normalizes gradients, so on a parameter whose true gradient is zero (a bias just
# before BatchNorm) it turns rounding noise into lr-sized steps: compare BatchNorm under SGD.
@pytest.mark.parametrize("bn, opt", [
    (True, fo.sgd(fo.warmup_cosine(0.1, 3, 20), momentum=0.9, weight_decay=1e-3)),
    (False, fo.adamw(fo.warmup_cosine(1e-2, 3, 20), weight_decay=0.05)),
], ids=["batchnorm-sgd", "adamw"])
def test_compiled_step_matches_eager(bn, opt):
    model = mlp(bn=bn)
    state = fnlight.TrainState.create(model, opt)
    eager, compiled = state, state
    e_step = fnlight.make_train_step(model, loss_fn, opt)
    c_step = fnlight.make_train_step(model, loss_fn, opt, compile=True)
    for b in batches(6):
        eager, em = e_step(eager, b)
        compiled, cm = c_step(compiled, b)
    for k in eager.params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-4, atol=1e-5)
    for k in eager.buffers:
        torch.testing.assert_close(compiled.buffers[k], eager.buffers[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cm["loss"], em["loss"], rtol=1e-4, atol=1e-5)


def test_a_schedule_does_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = mlp()
    opt = fo.adam(fo.warmup_cosine(1e-2, 5, 50))
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": counter})
    state = fnlight.TrainState.create(model, opt)
    lrs = []
    for b in batches(12):
        lrs.append(float(opt.learning_rate(state.step)))
        state, _ = step(state, b)
    assert len(set(lrs)) == 12  # the rate changed every step...
    frames = counter.frame_count
    for b in batches(12):
        state, _ = step(state, b)
    assert counter.frame_count == frames <= 4  # ...and nothing was compiled again


def test_compiled_donating_step_matches_the_pure_one():
    model = mlp()
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    pure = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"})
    assert_reproducible(pure, state, batches(1)[0])
    donating = pure.donating()
    a, b = state, fnlight.tree.tree_map(torch.clone, state)
    for batch in batches(4):
        a, _ = pure(a, batch)
        b, _ = donating(b, batch)
    assert tree_equal(a.params, b.params)


def test_compiled_skip_and_raise():
    model = mlp()
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    x, y = batches(1)[0]
    bad = (torch.full_like(x, float("nan")), y)
    skip = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"}, on_nonfinite="skip")
    new, m = assert_reproducible(skip, state, bad)  # and its input state is intact
    assert float(m["skipped"]) == 1 and tree_equal(new.params, state.params) and int(new.step) == 1
    raising = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"})
    with pytest.raises(fnlight.train.NonFiniteError, match="at step 0.*on_nonfinite='skip'"):
        raising(state, bad)
    assert tree_equal(state.params, fnlight.TrainState.create(model, opt).params)  # the pure input is intact


def test_a_smaller_last_batch_compiles_a_graph_of_its_own():
    """Batch sizes change (an epoch's last batch): each shape gets a static graph. Dynamo's
    automatic dynamic shapes would retrace with a symbolic batch size, on which dropout under
    torch.func.grad fails ("Cannot call numel() on tensor with symbolic sizes")."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = mlp(dropout=0.3)
    opt = fo.adam(1e-2)
    eager_step = fnlight.make_train_step(model, loss_fn, opt)
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": counter})
    eager = compiled = fnlight.TrainState.create(model, opt, seed=1)
    x, y = data(120)
    sizes = [16, 16, 10, 16, 10, 7, 16]
    for start, n in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes, strict=True):
        batch = (x[start:start + n], y[start:start + n])
        eager, em = eager_step(eager, batch)
        compiled, cm = step(compiled, batch)
        torch.testing.assert_close(cm["loss"], em["loss"], rtol=1e-4, atol=1e-5)
    for k in eager.params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 3  # one graph per batch size: 16, 10, 7


_LOG = logging.getLogger("fnlight-test-chatty")


class Chatty(torch.nn.Module):
    """An MLP that logs from its forward, as Hugging Face models do when their loss type is unset."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        _LOG.warning("forward")  # the graph breaks here
        return self.net(x)


def test_a_graph_break_warns_once_names_the_line_and_the_step_runs_eagerly():
    model, opt = Chatty(), fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    eager_step = fnlight.make_train_step(model, loss_fn, opt)
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager"})
    with pytest.warns(fnlight.train.GraphBreakWarning) as got:
        compiled, _ = step(state, batches(1)[0])
    (w,) = [w for w in got if issubclass(w.category, fnlight.train.GraphBreakWarning)]
    text = str(w.message)
    line = inspect.getsourcelines(Chatty.forward)[1] + 1
    assert f"{__file__}:{line} (forward) <- " in text, text  # the user's line...
    assert "models.py:28 (loss_fn)" in text  # ...and the loss_fn that reached it
    assert "logging.Logger method not supported" in text and "ignore_logging_functions" in text
    assert w.filename == __file__  # the warning points at the call of the step
    with warnings.catch_warnings():
        warnings.simplefilter("error", fnlight.train.GraphBreakWarning)  # once per step
        for b in batches(3)[1:]:
            compiled, eager = step(compiled, b)[0], eager_step(compiled, b)[0]
            assert tree_equal(compiled.params, eager.params)  # after the first call: the eager step, bitwise


def test_fullgraph_makes_a_graph_break_an_error():
    model, opt = Chatty(), fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": "aot_eager", "fullgraph": True})
    with pytest.raises(fnlight.train.GraphBreakError, match=r"(?s)fullgraph.*logging.*test_compile.py:\d+ \(forward\)"):
        step(state, batches(1)[0])


def test_a_step_that_fell_back_does_not_make_later_steps_run_eagerly():
    opt = fo.adam(1e-2)
    chatty = Chatty()
    with pytest.warns(fnlight.train.GraphBreakWarning):
        fnlight.make_train_step(chatty, loss_fn, opt, compile={"backend": "aot_eager"})(
            fnlight.TrainState.create(chatty, opt), batches(1)[0])
    counter = CompileCounterWithBackend("aot_eager")
    model = mlp()
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": counter})
    state = fnlight.TrainState.create(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fnlight.train.GraphBreakWarning)
        for b in batches(3):
            state, _ = step(state, b)
    assert counter.frame_count == 1  # one graph, compiled once


def test_fit_reuses_the_users_compiled_step(tmp_path):
    """Compile once per run: the Trainer's donating variant of a compiled step is that step."""
    counter = CompileCounterWithBackend("aot_eager")
    model, opt = mlp(dropout=0.2), fo.adamw(1e-2)
    state = fnlight.TrainState.create(model, opt, seed=1)
    step = fnlight.make_train_step(model, loss_fn, opt, compile={"backend": counter})
    dm = datamodule()
    first = next(iter(dm.batches("train", 0)))
    step(state, first)  # the user tries the step: it compiles
    assert counter.frame_count == 1
    assert step.donating() is step
    fit = fnlight.Trainer(max_epochs=2, run_dir=tmp_path).fit(state, step, dm)
    assert counter.frame_count == 1  # fit compiled nothing more
    eager = fnlight.Trainer(max_epochs=2, run_dir=tmp_path / "e").fit(
        state, fnlight.make_train_step(model, loss_fn, opt), dm)
    for k in eager.state.params:
        torch.testing.assert_close(fit.state.params[k], eager.state.params[k], rtol=1e-4, atol=1e-5)


def test_no_foreach_norm_c_shim_warning_when_clipping(monkeypatch):
    """Inductor's C++ wrapper has no c-shim for _foreach_norm (clip_by_global_norm's) and says so
    on every CPU compile; fnlight's compiled step keeps that one warning quiet."""
    import torch._functorch.config
    import torch._inductor.config

    import fnlight.train.step

    def warnings_of_a_compile():
        seen = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: seen.append(record.getMessage())
        log = logging.getLogger("torch._inductor.ir")
        log.addHandler(handler)
        torch._dynamo.reset()
        try:  # (no cache hit, which would skip the lowering that warns)
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                model, opt = mlp(), fo.adam(1e-2)
                step = fnlight.make_train_step(model, loss_fn, opt, clip=1.0, compile=True)
                step(fnlight.TrainState.create(model, opt), batches(1)[0])
        finally:
            log.removeHandler(handler)
        return [m for m in seen if "_foreach_norm" in m and "c-shim" in m]

    assert not warnings_of_a_compile()
    monkeypatch.setattr(fnlight.train.step, "quiet_foreach_norm", contextlib.nullcontext)
    assert warnings_of_a_compile()  # torch does warn without fnlight's filter


@pytest.mark.parametrize("opt, clip", [
    (fo.adamw(1e-2), 1.0),  # make_train_step's clip: global_norm
    (fo.chain(fo.clip_by_global_norm(1.0), fo.lamb(1e-2)), None),  # global_norm and tensor_norms in the update
    # per-row norms, row and column means, RMS: the sharded variants are never traced
    (fo.chain(fo.adaptive_grad_clip(0.1), fo.adafactor(1e-2, min_dim_size_to_factor=2)), None),
], ids=["clip", "clip_by_global_norm-lamb", "agc-adafactor"])
def test_norms_compile_into_one_graph(opt, clip):
    # (sharded optimizer state reads a ContextVar that Dynamo cannot trace: never inside a compiled step)
    model = mlp()
    step = fnlight.make_train_step(model, loss_fn, opt, clip=clip, compile={"backend": "aot_eager", "fullgraph": True})
    state = fnlight.TrainState.create(model, opt)
    for b in batches(2):
        state, _ = step(state, b)
    assert int(state.step) == 2
