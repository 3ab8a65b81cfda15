"""``shard``: this rank's part of every epoch.

The epoch's order (computed identically on every rank) is padded, cyclically
from its start, to a multiple of the world size, and rank ``r`` takes the
elements ``r, r + world, r + 2 world, ...`` (as torch's DistributedSampler).
Every rank therefore gets the same number of samples, hence of batches; the
shards partition the epoch except for the at most ``world - 1`` padded
repeats. With ``drop_remainder=True`` the order is cut to a multiple of the
world size instead (disjoint, but up to ``world - 1`` samples are skipped).
Placed after ``batch()``, whole batches are dealt out the same way.

Example:
    >>> import torch, fnlight.data as fd
    >>> p = fd.from_tensors(torch.arange(10)) >> fd.shard(rank=1, world_size=4) >> fd.batch(8)
    >>> dm = fd.DataModule(p)
    >>> [b.tolist() for b in dm.batches("train")]
    [[1, 5, 9]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .order import Affine, BatchOrder, Order
from .stage import Context, OrderOp, Plans, SplitPlan, Stage, Where, normalize_on, plans_for


class _ShardOp(OrderOp):
    deals = True

    def __init__(self, rank: int, world: int, drop_remainder: bool):
        self.rank, self.world, self.drop = rank, world, drop_remainder

    def __call__(self, seq: Order | BatchOrder, epoch: int) -> Order | BatchOrder:
        n = len(seq)
        total = n - n % self.world if self.drop else n + (-n) % self.world
        # position p of this rank is position rank + p * world of the epoch; the
        # padding (modulo n) repeats the order from its start
        return seq.remap(total // self.world, Affine(self.rank, self.world, 0 if self.drop else n))


@dataclass(frozen=True)
class Shard(Stage):
    name: ClassVar[str] = "shard"
    rank: int | None = None
    world_size: int | None = None
    drop_remainder: bool = False
    on: str | tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        # The rank is where the data goes, not what the data is: every rank of
        # one run must share a fingerprint.
        return {"stage": self.name, "drop_remainder": self.drop_remainder,
                "on": list(self.on) if isinstance(self.on, tuple) else self.on}

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        rank = ctx.rank if self.rank is None else self.rank
        world = ctx.world_size if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"shard() needs 0 <= rank < world_size, got rank={rank}, world_size={world}")

        def update(plan: SplitPlan) -> SplitPlan:
            return plan.replace(order=plan.order + (_ShardOp(rank, world, self.drop_remainder),))

        return plans_for("shard", self.on, plans, update)


def shard(rank: int | None = None, world_size: int | None = None, drop_remainder: bool = False,
          on: str | tuple[str, ...] | None = None) -> Shard:
    """This rank's part of each epoch (see the module docstring for pad vs drop).

    ``rank`` and ``world_size`` default to the DataModule's, which default to
    ``torch.distributed``'s when a process group is initialized (else 0 and 1).

    Example:
        ```python
        p = shard() >> batch(32)          # before batch(): deal out samples
        ```
    """
    if (rank is None) != (world_size is None):
        raise ValueError("give shard() both rank and world_size, or neither.")
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return Shard(rank, world_size, drop_remainder, normalize_on(on))
