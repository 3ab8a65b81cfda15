"""Sharded optimizer state (ZeRO-1) on real gloo ranks equals the replicated data-parallel step."""

import json
import sys
import threading

import optree
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fnlight
import fnlight.optim as fo
from fnlight.train import zero

from .conftest import finish_ranks, spawn_ranks
from .models import loss_fn, mlp

#: Elementwise optimizers: the sharded update is bitwise the replicated one where the gradient sums are
#: (2 ranks: a + b either way; 3 ranks: gloo's reduce-scatter and all-reduce add in different orders).
#: (With compile, the replicated update is compiled, Adam's foreach arithmetic, and the sharded one eager,
#: torch's fused kernel: equal to rounding.)
ELEMENTWISE = ("adam", "adamw_masked", "sgd_momentum", "rmsprop", "adam_bf16_skip", "groups")
#: adafactor and adaptive_grad_clip sum row and column statistics of whole tensors from the pieces'
#: partial sums (across ranks): equal to float rounding, not bitwise (index_add_ sums in another order
#: than torch's mean and vector_norm).


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_optimizer_state_equals_replicated_after_50_steps(tmp_path, world):
    print(tmp_path)  # (the ranks' reports stay there: rank<r>.json, with every measured difference)
    finish_ranks(spawn_ranks([sys.executable, "-m", "tests._zero_rank", str(tmp_path), "50"], world), timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, report in enumerate(reports):
        for name, r in report.items():
            if name.startswith("checkpoint_equal"):
                assert r, (rank, name)
                continue
            assert r["ranks_equal"], (rank, name)
            # whole-tensor norms (clip, lamb, lars, adaptive_grad_clip's rows) and adafactor's row and column
            # means and RMS sum partial sums across ranks: equal to float rounding
            assert r["max_abs_diff"] < 1e-6 and r["opt_state_max_abs_diff"] < 1e-6, (rank, name, r)
            if world == 2 and name in ELEMENTWISE:
                assert r["bitwise"], (rank, name, r)
            # each rank keeps about 1/world of the optimizer state (and, whole, the counts and factored moments)
            whole = r["whole_opt_numel"]
            assert r["local_opt_numel"] - whole <= (r["full_opt_numel"] - whole) / world + 2 * zero.ALIGN, (rank, r)
            # (adafactor's rows and columns: 16 + 30 + 5 + 16 elements, 6 placeholders, a count)
            assert whole <= 74 if "adafactor" in name else whole <= 2, (rank, name, r)
    for name in ("adam", "adafactor"):  # one file per rank, one record
        files = sorted(p.name for p in (tmp_path / f"ck_{name}").iterdir())
        assert files == ["checkpoint.json"] + [f"tensors-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
    assert sum(reports[r]["adam"]["local_opt_numel"] for r in range(world)) == \
        reports[0]["adam"]["full_opt_numel"] + world - 1  # the slices partition the moments; a count per rank
    # the sharded adafactor checkpoint loads whole, in this one process, and trains on unsharded
    state, meta = fnlight.load_checkpoint(tmp_path / "ck_adafactor")
    opt = fo.adafactor(1e-2, min_dim_size_to_factor=4, momentum=0.9, weight_decay_rate=1e-3)
    like = opt.init(state.params)
    assert fnlight.tree.tree_map(lambda t: t.shape, state.opt_state) == fnlight.tree.tree_map(lambda t: t.shape, like)
    assert int(state.opt_state.count) == 3 and all(float(v.abs().sum()) > 0 for v in state.opt_state.v.values()
                                                    if v.numel() > 1) and meta["note"] == "zero"
    model = mlp(din=30, dout=5)
    step = fnlight.make_train_step(model, loss_fn, opt)
    state, _ = step(state, (torch.randn(8, 30), torch.randint(0, 5, (8,))))
    assert int(state.step) == 4


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


class ThreadRanks:
    """``world`` ranks as threads of this process: ``sum_fn(rank)`` is an all-reduce (a sum in rank
    order, the same on every rank) and ``gather`` an all-gather of pieces, through a barrier."""

    def __init__(self, world):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def _exchange(self, rank, value):
        self.slots[rank] = value
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def sum_fn(self, rank):
        def sum_across(t):
            got = self._exchange(rank, t.clone())
            out = got[0].clone()
            for x in got[1:]:
                out += x
            return out
        return sum_across

    def run(self, fn):
        results, errors = [None] * self.world, []

        def go(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as e:
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=go, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        return results


def sharded_steps(make_opt, params, grads, world):
    """Every thread rank updates its pieces (fnlight.optim.sharded with the layout's piece map), as the
    sharded step does; the new parameters are the ranks' pieces joined. Per rank: (params, opt state)."""
    ranks = ThreadRanks(world)

    def rank_fn(rank):
        layout, opt = zero.Layout.of(params, rank, world), make_opt()
        state, p = zero.shard_opt_state(opt.init(params), layout), params
        for g in grads:
            with fo.sharded(ranks.sum_fn(rank), layout.piece_map()):
                pieces, state = fo.step(opt, layout.pieces(g), state, layout.pieces(p))
            every = ranks._exchange(rank, pieces)
            p = {k: torch.cat([every[r][k].reshape(-1) for r in range(world)]).view(v.shape) for k, v in params.items()}
        return p, state

    return ranks.run(rank_fn)


ROWWISE = {
    "adafactor": lambda: fo.adafactor(1e-2, min_dim_size_to_factor=3, momentum=0.9, weight_decay_rate=1e-3),
    "adafactor_defaults": lambda: fo.adafactor(),  # nothing factored below 128: RMS clipping, parameter scale
    "adafactor_groups": lambda: fo.multi_transform(
        {"f": fo.adafactor(1e-2, min_dim_size_to_factor=2, weight_decay_rate=1e-3,
                           weight_decay_mask=fo.default_decay_mask), "a": fo.adam(1e-2)},
        lambda p: {k: "a" if k == "e" else "f" for k in p}),
    "agc_sgd": lambda: fo.chain(fo.adaptive_grad_clip(0.05), fo.sgd(0.1, momentum=0.9)),
    "ema_inject_adafactor": lambda: fo.with_ema(fo.inject_hyperparams(fo.adafactor)(
        learning_rate=1e-2, min_dim_size_to_factor=3), 0.9),
}


@settings(max_examples=8, deadline=None)
@example(rows=70, cols=9, world=3, name="adafactor")  # (the bounds, at 448 and 896, cut "a" and "c" mid-row)
@example(rows=70, cols=9, world=3, name="agc_sgd")
@example(rows=70, cols=9, world=4, name="adafactor_groups")
@example(rows=70, cols=9, world=3, name="adafactor_defaults")
@example(rows=70, cols=9, world=4, name="ema_inject_adafactor")
@given(rows=st.integers(1, 70), cols=st.integers(1, 9), world=st.integers(2, 4), name=st.sampled_from(sorted(ROWWISE)))
def test_rowwise_statistics_of_pieces_equal_those_of_whole_tensors(rows, cols, world, name):
    """adafactor's row/column means and RMS, adaptive_grad_clip's per-row norms: computed from the pieces
    (tensors straddling the ranks' slices at any place) with partial sums across ranks, the update equals
    the whole tensors' to float rounding and every rank keeps the same factored moments."""
    g = torch.Generator().manual_seed(rows * 100 + cols)
    params = {"a": torch.randn(rows, cols, generator=g), "b": torch.randn(cols, generator=g),
              "c": torch.randn(3, rows, 2, generator=g), "d": torch.randn((), generator=g),
              "e": torch.randn(cols, 3, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(3)]
    opt = ROWWISE[name]()
    p, state = params, opt.init(params)
    for gr in grads:
        p, state = fo.step(opt, gr, state, p)
    got = sharded_steps(ROWWISE[name], params, grads, world)
    moments = [fnlight.tree.tree_leaves((_factored(s).v_row, _factored(s).v_col)) for _, s in got]
    for rank, (q, _) in enumerate(got):
        for k in params:
            torch.testing.assert_close(q[k], p[k], rtol=2e-6, atol=2e-6, msg=f"{name} {k} rank {rank}")
            assert torch.equal(q[k], got[0][0][k])  # the ranks agree bitwise
        assert all(torch.equal(x, y) for x, y in zip(moments[rank], moments[0], strict=True))


def _factored(state):
    """The FactoredState inside an optimizer state (an empty one when there is none)."""
    for node in optree.tree_flatten(state, is_leaf=lambda x: isinstance(x, fo.FactoredState))[0]:
        if isinstance(node, fo.FactoredState):
            return node
    return fo.FactoredState(torch.zeros(()), {}, {}, {}, None)


def test_adafactor_state_is_cut_where_shaped_like_the_parameters_and_kept_whole_where_factored():
    params = {"w": torch.zeros(200, 3), "m": torch.zeros(9, 130), "b": torch.zeros(130), "s": torch.zeros(())}
    opt = fo.adafactor(momentum=0.9, min_dim_size_to_factor=3)
    full = opt.init(params)
    layouts = [zero.Layout.of(params, r, 3) for r in range(3)]
    shards = [zero.shard_opt_state(full, lay) for lay in layouts]
    for lay, s in zip(layouts, shards, strict=True):
        assert all(torch.equal(s.v_row[k], full.v_row[k]) and torch.equal(s.v_col[k], full.v_col[k]) for k in params)
        assert s.v["w"].shape == (1,) and s.v["m"].shape == (1,)  # factored: the placeholder, whole
        assert s.v["b"].shape == lay.piece_shape(2) and s.ema["w"].shape == lay.piece_shape(0)  # cut
    assert sum(s.ema["w"].numel() for s in shards) == 600 and sum(s.v["b"].numel() for s in shards) == 130
    # a state type that declares nothing and is not shaped like the parameters is refused, saying how to fix it
    with pytest.raises(ValueError, match="sharding_keeps_whole"):
        zero.shard_opt_state({"w": torch.zeros(3)}, layouts[0])
