"""One rank of a gloo group comparing sharded optimizer state (ZeRO-1) with the replicated step
(launched by tests/test_distributed_zero.py).

Usage: python -m tests._zero_rank OUT_DIR STEPS
For each configuration, trains STEPS steps from the same state on this rank's batches twice:
``shard_optimizer_state=True`` and the replicated data-parallel step; writes OUT_DIR/rank<r>.json
with, per configuration, the largest absolute parameter difference, whether they are bitwise equal,
and whether every rank holds the same parameters.
"""

import json
import sys

import torch

import fnlight
import fnlight.optim as fo
from fnlight import distributed
from fnlight.train import zero
from tests.models import loss_fn, mlp

CONFIGS = {
    "adam": (lambda: fo.adam(1e-2), {}),
    "adamw_masked": (lambda: fo.adamw(1e-2, weight_decay=0.1, mask=fo.default_decay_mask), {}),
    "sgd_momentum": (lambda: fo.sgd(0.05, momentum=0.9, nesterov=True), {}),
    "rmsprop": (lambda: fo.rmsprop(1e-2, centered=True), {}),
    "adam_clip_accumulate": (lambda: fo.adam(1e-2), {"clip": 0.05, "accumulate": 2}),
    "chain_clip_adam_donate": (lambda: fo.chain(fo.clip_by_global_norm(0.05), fo.adam(1e-2)), {"donate": True}),
    "lamb": (lambda: fo.lamb(1e-2, weight_decay=0.01), {}),
    "groups": (lambda: fo.multi_transform(  # parameter groups: state for some parameters only, per group
        {"w": fo.adamw(1e-2, weight_decay=0.1), "b": fo.freeze(fo.sgd(0.05, momentum=0.9), lambda p: {
            k: k.startswith("3.") for k in p})}, lambda p: {k: "w" if k.endswith("weight") else "b" for k in p}),
        {}),
    "lars": (lambda: fo.lars(0.1, weight_decay=1e-3), {}),
    "adam_bf16_skip": (lambda: fo.adam(1e-2), {"precision": "bf16-mixed", "on_nonfinite": "skip"}),
    "adam_compile": (lambda: fo.adam(1e-2), {"compile": {"backend": "aot_eager"}}),  # the gradients compiled
    # row and column statistics of whole tensors from the pieces (both weights factored: sides >= 4)
    "adafactor": (lambda: fo.adafactor(1e-2, min_dim_size_to_factor=4, momentum=0.9, weight_decay_rate=1e-3), {}),
    "adafactor_unfactored": (lambda: fo.adafactor(1e-2), {}),  # RMS clipping and parameter scale of whole tensors
    "agc_sgd": (lambda: fo.chain(fo.adaptive_grad_clip(0.05), fo.sgd(0.05, momentum=0.9)), {}),
    "agc_adafactor_groups": (lambda: fo.multi_transform(
        {"w": fo.chain(fo.adaptive_grad_clip(0.05), fo.adafactor(1e-2, min_dim_size_to_factor=4, weight_decay_rate=1e-3,
                                                                 weight_decay_mask=fo.default_decay_mask)),
         "b": fo.adam(1e-2)}, lambda p: {k: "w" if k.endswith("weight") else "b" for k in p}), {}),
}


#: Row-wise statistics (adafactor's factored moments, adaptive_grad_clip's unit norms) get a first layer of
#: 16 x 30: on 2 and 3 ranks the slice bounds (384; 256) cut it in the middle of a row.
DIN = {"adafactor": 30, "adafactor_unfactored": 30, "agc_sgd": 30, "agc_adafactor_groups": 30}


def run(make_opt, kw, shard, steps, rank, world, din=7):
    # din 7: 7*16+16 + 16*5+5 = 213 elements (3 ranks: the last weight straddles two slices)
    model = mlp(din=din, dout=5)
    opt = make_opt()
    step = fnlight.make_train_step(model, loss_fn, opt, shard_optimizer_state=shard, **kw)
    state = fnlight.TrainState.create(model, opt, seed=0)
    g = torch.Generator().manual_seed(100 + rank)
    for i in range(steps):
        x, y = torch.randn(8, din, generator=g), torch.randint(0, 5, (8,), generator=g)
        if kw.get("on_nonfinite") == "skip" and i == 3:
            x = x.clone()
            x[0, 0] = float("nan") if rank == world - 1 else x[0, 0]   # one rank's NaN skips the step everywhere
        state, m = step(state, (x, y))
    return state


def piece_numel(state):
    """The elements of the optimizer-state leaves sharding cut (the rest is kept whole on every rank)."""
    pieces = []
    zero.map_pieces(state.opt_state.inner, zero.check_layout(state), lambda i, leaf, p, w: pieces.append(leaf), "count")
    return sum(t.numel() for t in pieces)


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    distributed.init(backend="gloo", timeout_s=60)
    rank, world = distributed.rank(), distributed.world_size()
    report = {}
    for name, (make_opt, kw) in CONFIGS.items():
        if "compile" in kw and world > 2:  # (compiling costs ~15 s a run on a 2-core machine: once is enough)
            continue
        sharded = run(make_opt, kw, True, steps, rank, world, DIN.get(name, 7))
        replicated = run(make_opt, kw, False, steps, rank, world, DIN.get(name, 7))
        assert zero.is_sharded(sharded)
        full = zero.unshard(sharded)
        diff = max(float((sharded.params[k] - replicated.params[k]).abs().max()) for k in replicated.params)
        same_ranks = distributed.all_true(all(torch.equal(a, b) for a, b in zip(
            distributed.broadcast(sharded.params).values(), sharded.params.values(), strict=True)))
        opt_diff = max((float((a - b).abs().max()) for a, b in zip(
            fnlight.tree.tree_leaves(full.opt_state), fnlight.tree.tree_leaves(replicated.opt_state), strict=True)
            if a.is_floating_point()), default=0.0)
        local = sum(t.numel() for t in fnlight.tree.tree_leaves(sharded.opt_state.inner))
        report[name] = {"max_abs_diff": diff, "bitwise": fnlight.tree.tree_equal(sharded.params, replicated.params),
                        "ranks_equal": same_ranks, "opt_state_max_abs_diff": opt_diff, "local_opt_numel": local,
                        "whole_opt_numel": local - piece_numel(sharded),  # (counts, factored moments)
                        "full_opt_numel": sum(t.numel() for t in fnlight.tree.tree_leaves(replicated.opt_state))}
    # a sharded checkpoint: each rank writes its slice; it loads (anywhere) as the whole state
    from fnlight.train.checkpoint_zero import save_sharded

    for name in ("adam", "adafactor"):  # (adafactor: its factored moments are written whole, by rank 0)
        sharded = run(CONFIGS[name][0], {}, True, 3, rank, world, DIN.get(name, 7))
        save_sharded(f"{out}/ck_{name}", sharded, meta={"note": "zero"})
        whole = zero.unshard(sharded)
        loaded, meta = fnlight.load_checkpoint(f"{out}/ck_{name}", like=whole)
        report[f"checkpoint_equal_{name}"] = fnlight.tree.tree_equal(loaded, whole) and meta["note"] == "zero"
    distributed.barrier()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f, indent=1)
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
