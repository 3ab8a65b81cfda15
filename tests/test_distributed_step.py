"""The train step averages gradients across real gloo ranks (2 ranks x b == 1 rank x 2b)."""

import sys

import pytest
import torch

import fnlight

from .conftest import finish_ranks, spawn_ranks
from .models import train_on_part

SCRIPT = r"""
import sys, torch
import fnlight
from fnlight import distributed
from tests.models import train_on_part

distributed.init(backend="gloo", timeout_s=60)
rank = distributed.rank()
state = train_on_part(rank, distributed.world_size())   # each rank: its half of every batch
from safetensors.torch import save_file
save_file(state.params, sys.argv[1] + f"/rank{rank}.safetensors")
# buckets: many small all-reduces in flight give the same means as one per dtype
tree = {"a": torch.arange(10.0) * (rank + 1), "b": [torch.full((3, 3), 2.0 * rank), torch.tensor([rank / 2])],
        "c": torch.ones(5, dtype=torch.float64) * rank}
try:
    distributed.all_reduce_mean({"n": torch.tensor([rank])})
    raise SystemExit("an int tensor was averaged")
except TypeError as e:
    assert "floating-point" in str(e)
one, many = distributed.all_reduce_mean(tree), distributed.all_reduce_mean(tree, bucket_bytes=16)
assert fnlight.tree.tree_equal(one, many), (one, many)
assert torch.equal(one["a"], torch.arange(10.0) * 1.5)
assert torch.equal(one["c"], torch.full((5,), 0.5, dtype=torch.float64))
assert torch.equal(tree["a"], torch.arange(10.0) * (rank + 1))  # the input is untouched
mine = {"w": torch.full((4,), float(rank))}
assert torch.equal(distributed.broadcast(mine)["w"], torch.zeros(4))  # rank 0's values everywhere
assert distributed.all_reduce_sum([1.0, rank]) == [2.0, 1.0] and distributed.any_true(rank == 1)
assert not distributed.any_true(False) and distributed.broadcast_object({"r": rank}) == {"r": 0}
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_with_half_batches_match_one_rank(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    finish_ranks(spawn_ranks([sys.executable, str(script), str(tmp_path)], 2), timeout=120)
    from safetensors.torch import load_file

    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert fnlight.tree.tree_equal(r0, r1)  # every rank holds bitwise the same parameters
    state = train_on_part()  # one rank, whole batches
    for k, v in state.params.items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6)
