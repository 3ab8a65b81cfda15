"""compile=True: parity with eager, and no recompilation when the learning rate changes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fnlight
import fnlight.optim as fo
from fnlight.testing import assert_reproducible
from fnlight.tree import tree_equal

from .models import data, loss_fn, mlp

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
    from torch._dynamo.testing import CompileCounterWithBackend

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
