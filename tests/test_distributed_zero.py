"""Sharded optimizer state (ZeRO-1) on real gloo ranks equals the replicated data-parallel step."""

import json
import sys

import pytest
import torch

import fnlight
import fnlight.optim as fo
from fnlight.train import zero

from .conftest import finish_ranks, spawn_ranks

#: Elementwise optimizers: the sharded update is bitwise the replicated one where the gradient sums are
#: (2 ranks: a + b either way; 3 ranks: gloo's reduce-scatter and all-reduce add in different orders).
#: (With compile, the replicated update is compiled, Adam's foreach arithmetic, and the sharded one eager,
#: torch's fused kernel: equal to rounding.)
ELEMENTWISE = ("adam", "adamw_masked", "sgd_momentum", "rmsprop", "adam_bf16_skip", "groups")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_optimizer_state_equals_replicated_after_50_steps(tmp_path, world):
    finish_ranks(spawn_ranks([sys.executable, "-m", "tests._zero_rank", str(tmp_path), "50"], world), timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, report in enumerate(reports):
        for name, r in report.items():
            if name == "checkpoint_equal":
                assert r, rank
                continue
            if name.startswith("adafactor"):
                assert "shard_optimizer_state=False" in r, (name, r)  # refused, with the way out
                continue
            assert r["ranks_equal"], (rank, name)
            # whole-tensor norms (clip, lamb, lars) sum partial squares across ranks: equal to float rounding
            assert r["max_abs_diff"] < 1e-6 and r["opt_state_max_abs_diff"] < 1e-6, (rank, name, r)
            if world == 2 and name in ELEMENTWISE:
                assert r["bitwise"], (rank, name, r)
            # each rank keeps about 1/world of the optimizer state
            assert r["local_opt_numel"] <= r["full_opt_numel"] / world + 2 * zero.ALIGN, (rank, name, r)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["checkpoint.json"] + [f"tensors-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
    assert sum(reports[r]["adam"]["local_opt_numel"] for r in range(world)) == \
        reports[0]["adam"]["full_opt_numel"] + world - 1  # the slices partition the moments; a count per rank


def test_layout_slices_are_balanced_aligned_and_partition_the_parameters():
    params = {"a": torch.zeros(300, 7), "b": torch.zeros(5), "c": torch.zeros(()), "d": torch.zeros(1000)}
    for world in (1, 2, 3, 4, 7):
        layouts = [zero.Layout.of(params, r, world) for r in range(world)]
        assert all(o % zero.ALIGN == 0 for o in layouts[0].offsets)
        held = [sum(b - a for a, b in map(lay.bounds, range(len(params)))) for lay in layouts]
        assert sum(held) == 3106 and max(held) - min(held) <= 2 * zero.ALIGN * len(params)  # balanced
        for i, k in enumerate(params):  # every element of every tensor in exactly one rank's piece
            covered = []
            for lay in layouts:
                a, b = lay.bounds(i)
                covered += range(a, b)
                assert a % zero.ALIGN == 0 or a == b  # slices start at aligned places of every tensor
            assert covered == list(range(params[k].numel()))
        # what a reduce-scatter and an all-gather move: the flat buffer, each rank's chunk of it
        vals = {k: torch.randn(v.shape) for k, v in params.items()}
        flat = layouts[0].flat(vals)
        assert flat.numel() == world * layouts[0].chunk
        back = layouts[0].split_full(flat)
        assert all(torch.equal(back[k], vals[k]) for k in params)
        chunks = flat.view(world, -1)
        for r, lay in enumerate(layouts):
            pieces = lay.split_local(chunks[r])
            assert all(torch.equal(pieces[k], lay.pieces(vals)[k]) for k in params)
            assert torch.equal(lay.local_flat(pieces), chunks[r])
            assert all(pieces[k].dim() == max(vals[k].dim(), 1) for k in params if pieces[k].numel() != 1)


def test_one_rank_ignores_sharding_and_ensembles_refuse():
    model = torch.nn.Linear(3, 2)
    opt = fo.adam(1e-2)

    def loss(model_fn, batch, key):
        return model_fn(batch).square().mean()

    state = fnlight.TrainState.create(model, opt)
    a, _ = fnlight.make_train_step(model, loss, opt, shard_optimizer_state=True)(state, torch.ones(4, 3))
    b, _ = fnlight.make_train_step(model, loss, opt)(state, torch.ones(4, 3))
    assert not zero.is_sharded(a) and fnlight.tree.tree_equal(a, b)
    with pytest.raises(ValueError, match="ensemble"):
        fnlight.make_train_step(model, loss, opt, shard_optimizer_state=True, ensemble=True)


def test_sharded_norms_sum_partial_squares():
    xs = [torch.arange(6.0), torch.ones(3)]
    with fo.sharded(lambda t: 2 * t):  # as if two ranks held equal pieces
        got = fo.tensor_norms(xs)
        total = fo.global_norm(xs)
    assert torch.allclose(torch.stack(got), torch.stack([v.norm() * 2 ** 0.5 for v in xs]))
    assert torch.allclose(total, torch.cat(xs).norm() * 2 ** 0.5)
    assert fo.tensor_norms(xs)[0] == xs[0].norm()
