"""make_train_step(sync_batchnorm=True): BatchNorm statistics across real gloo ranks.

2 ranks with half batches and synced BatchNorm train like 1 rank with whole batches (parameters
and running statistics); without the sync they do not; with one rank the option changes no bit.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import fnlight
import fnlight.optim as fo
from fnlight.train.syncbn import convert_sync_batchnorm, sync_batch_norm
from fnlight.tree import tree_equal

from .conftest import finish_ranks, spawn_ranks
from .models import data, loss_fn


# No bias before BatchNorm (which removes it): its true gradient is zero, and Adam, which normalizes
# gradients, would turn the rounding noise of that zero into lr-sized steps that differ between runs.
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def convnet(seed=0):
    """A small conv net whose BatchNorm2d keeps a cumulative average (momentum=None)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=None),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g) * 2 + 1  # a mean far from 0, where E[x^2] - E[x]^2 would lose bits
    return x, (x[:, 0, 2:4, 2:4].mean((1, 2)) > 1).long() + (x[:, 1].mean((1, 2)) > 1).long()


CASES = {"mlp": (mlp, lambda n: data(n)), "conv": (convnet, images)}


def train(case, rank=0, world=1, steps=4, batch=16, sync=False, accumulate=1, compile=False):
    """Adam for ``steps`` batches, this rank seeing its ``1/world`` of each batch. With ``accumulate=k``
    the rank's part of a batch is the rank's part of each of the k micro-batches that one rank with the
    whole batch would make, so that micro-batch i is the same set of samples in both runs."""
    make, sample = CASES[case]
    model = make()
    opt = fo.adam(1e-2)
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, loss_fn, opt, sync_batchnorm=sync, accumulate=accumulate,
                                   compile={"backend": "aot_eager"} if compile else False)
    x, y = sample(steps * batch)
    for i in range(steps):
        b = slice(batch * i, batch * (i + 1))
        part = [torch.cat([m.chunk(world)[rank] for m in t[b].chunk(accumulate)]) for t in (x, y)]
        state, _ = step(state, tuple(part))
    return state


# name: (case, sync_batchnorm, accumulate, compile)
RUNS = {"mlp-sync": ("mlp", True, 1, False), "mlp-nosync": ("mlp", False, 1, False),
        "conv-sync": ("conv", True, 1, False), "conv-nosync": ("conv", False, 1, False),
        "mlp-sync-acc2": ("mlp", True, 2, False), "conv-sync-compiled": ("conv", True, 1, True)}

SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
import fnlight
import fnlight.optim as fo
from fnlight import distributed
from fnlight.train.syncbn import all_reduce_sum, sync_batch_norm
from tests.models import data, loss_fn
from tests.test_sync_batchnorm import RUNS, mlp, train

distributed.init(backend="gloo", timeout_s=60)
rank, world = distributed.rank(), distributed.world_size()
for name, (case, sync, acc, comp) in RUNS.items():
    state = train(case, rank, world, sync=sync, accumulate=acc, compile=comp)
    save_file({**state.params, **state.buffers}, sys.argv[1] + f"/{name}-rank{rank}.safetensors")

# torch.nn.SyncBatchNorm layers (whose own forward torch.func cannot run) are synced without the flag
synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(mlp())
assert isinstance(synced[1], torch.nn.SyncBatchNorm)
x, y = data(16)
state = fnlight.TrainState.create(mlp(), fo.sgd(0.1))
mine, theirs = (fnlight.make_train_step(model, loss_fn, fo.sgd(0.1), sync_batchnorm=flag)(
    state, (x.chunk(2)[rank], y.chunk(2)[rank]))[0] for model, flag in ((mlp(), True), (synced, False)))
assert fnlight.tree.tree_equal(mine, theirs)

# The synced function against F.batch_norm on the whole input, with uneven parts (3 and 5 samples):
# outputs, input gradients (each rank's rows), weight/bias gradients (summed over ranks) and running stats.
g = torch.Generator().manual_seed(1)
x, w_out = torch.randn(8, 3, 2, generator=g) * 3 + 2, torch.randn(8, 3, 2, generator=g)
weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
rows = slice(0, 3) if rank == 0 else slice(3, 8)

def loss(x, weight, bias, running, synced):
    if synced:
        y = sync_batch_norm(x, *running, weight, bias, 0.1, 1e-5)
    else:
        y = F.batch_norm(x, *running, weight, bias, training=True, momentum=0.1, eps=1e-5)
    return (y * (w_out[rows] if synced else w_out)).sum(), y

ref_running, running = (torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))
(ref_grads, (ref_loss, ref_y)) = torch.func.grad_and_value(loss, argnums=(0, 1, 2), has_aux=True)(
    x, weight, bias, ref_running, False)
for how in ("torch.func", "autograd"):
    if how == "torch.func":
        grads, (_, y) = torch.func.grad_and_value(loss, argnums=(0, 1, 2), has_aux=True)(
            x[rows], weight, bias, running, True)
    else:
        leaves = [t.clone().requires_grad_() for t in (x[rows], weight, bias)]
        _, y = loss(*leaves, (torch.zeros(3), torch.ones(3)), True)
        (y * w_out[rows]).sum().backward()
        grads = [t.grad for t in leaves]
    torch.testing.assert_close(y.detach(), ref_y[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], ref_grads[0][rows], rtol=1e-5, atol=1e-5)
    for mine, ref in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(all_reduce_sum(mine), ref, rtol=1e-5, atol=1e-5)
for mine, ref in zip(running, ref_running):
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
# a rank with no samples still takes part in both all-reduces (or the other would wait forever)
rows = slice(0, 8) if rank == 0 else slice(8, 8)
grads, (_, y) = torch.func.grad_and_value(loss, argnums=(0, 1, 2), has_aux=True)(x[rows], weight, bias, running, True)
torch.testing.assert_close(grads[0], ref_grads[0][rows], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(y, ref_y[rows], rtol=1e-5, atol=1e-6)
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Launch the 2 gloo ranks once; returns the directory of their saved states."""
    out = tmp_path_factory.mktemp("syncbn")
    script = out / "rank.py"
    script.write_text(SCRIPT)
    finish_ranks(spawn_ranks([sys.executable, str(script), str(out)], 2), timeout=120)
    return out


def _load(directory, name):
    from safetensors.torch import load_file

    return [load_file(str(directory / f"{name}-rank{r}.safetensors")) for r in range(2)]


def _whole(case, accumulate=1):
    state = train(case, accumulate=accumulate)  # one rank, whole batches, no sync
    return {**state.params, **state.buffers}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["mlp-sync", "conv-sync", "mlp-sync-acc2", "conv-sync-compiled"])
def test_two_synced_ranks_match_one_rank_with_whole_batches(two_ranks, run):
    case, _, accumulate, _ = RUNS[run]
    r0, r1 = _load(two_ranks, run)
    assert tree_equal(r0, r1)  # both ranks hold bitwise the same parameters and statistics
    whole = _whole(case, accumulate)
    assert sorted(r0) == sorted(whole)  # the same names: checkpoints fit either way
    assert {"running_mean", "running_var", "num_batches_tracked"} <= {k.rsplit(".", 1)[-1] for k in r0}
    for k, v in whole.items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{run} {k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["mlp-nosync", "conv-nosync"])
def test_without_sync_the_per_rank_statistics_differ(two_ranks, run):
    """The comparison above can fail: per-rank statistics give other running stats and weights."""
    r0, r1 = _load(two_ranks, run)
    assert tree_equal(r0, r1)  # (the step still averages the statistics across ranks)
    whole = _whole(RUNS[run][0])
    for stat in ("running_mean", "running_var"):
        k = next(k for k in whole if k.endswith(stat))
        assert not torch.allclose(r0[k], whole[k], rtol=1e-3, atol=1e-4), k
    assert any(not torch.allclose(r0[k], whole[k], rtol=1e-3, atol=1e-4) for k in whole if "weight" in k)


@pytest.mark.parametrize("case, accumulate", [("mlp", 1), ("conv", 1), ("mlp", 2)])
def test_one_rank_sync_changes_no_bit(case, accumulate):
    plain = train(case, sync=False, accumulate=accumulate)
    synced = train(case, sync=True, accumulate=accumulate)
    assert tree_equal(plain, synced)


def test_the_template_is_a_copy_with_the_same_names():
    model = convnet()
    template = convert_sync_batchnorm(model)
    assert type(model[1]) is torch.nn.BatchNorm2d and type(template[1]).__name__ == "SyncBatchNorm2d"
    assert isinstance(template[1], torch.nn.BatchNorm2d)
    assert dict(template.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert dict(template.named_buffers()).keys() == dict(model.named_buffers()).keys()
    assert template[0].weight is model[0].weight  # tensors are shared, not copied
    step = fnlight.make_train_step(model, loss_fn, fo.sgd(0.1), sync_batchnorm=True)
    assert step._template is not model
    no_bn = torch.nn.Linear(2, 2)
    plain_step = fnlight.make_train_step(no_bn, loss_fn, fo.sgd(0.1), sync_batchnorm=True)
    assert plain_step._template is plain_step.model  # no BatchNorm: no second copy


def test_sync_batch_norm_alone_is_batch_norm():
    """In one process the synced function is BatchNorm (outputs, gradients, running statistics)."""
    x = torch.randn(6, 4, 5, dtype=torch.float64) * 4 + 3
    weight, bias = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    mine = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    ref = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(sync_batch_norm(x, *mine, weight, bias, 0.3, 1e-5),
                               F.batch_norm(x, *ref, weight, bias, training=True, momentum=0.3, eps=1e-5))
    torch.testing.assert_close(mine, ref)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sync_batch_norm(t, None, None, weight, bias, 0.1, 1e-5), (x,))
