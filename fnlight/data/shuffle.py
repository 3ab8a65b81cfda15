"""``shuffle``: a permutation of the order that is a pure function of (seed, epoch).

The permutation is never materialized: position ``p`` reads position
``index_shuffle(fold_in(stage_key, epoch), p, n)`` of the order before it (a
keyed bijection, see :func:`fnlight.random.index_shuffle`), so a shuffle over
10**10 samples costs nothing until its batches are read.

Example:
    >>> import torch, fnlight.data as fd
    >>> dm = fd.DataModule(fd.from_tensors(torch.arange(6)) >> fd.shuffle() >> fd.batch(6), seed=0)
    >>> sorted(next(iter(dm.batches("train", epoch=1))).tolist())
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import random as fr
from .order import BatchOrder, Order, Permute
from .stage import Context, OrderOp, Plans, SplitPlan, Stage, Where, normalize_on, plans_for


class _ShuffleOp(OrderOp):
    def __init__(self, key: torch.Tensor):
        self.key = key

    def __call__(self, seq: Order | BatchOrder, epoch: int) -> Order | BatchOrder:
        # after batch(), seq is a BatchOrder: whole batches are shuffled
        return seq.remap(len(seq), Permute(fr.fold_in(self.key, epoch), len(seq)))


@dataclass(frozen=True)
class Shuffle(Stage):
    name: ClassVar[str] = "shuffle"
    on: str | tuple[str, ...] | None = "train"
    seed: int | None = None

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        def update(plan: SplitPlan) -> SplitPlan:
            op = _ShuffleOp(ctx.stage_key(where, plan.name, self.seed))
            return plan.replace(order=plan.order + (op,))

        return plans_for("shuffle", self.on, plans, update)


def shuffle(on: str | tuple[str, ...] | None = "train", seed: int | None = None) -> Shuffle:
    """Shuffle the order of the named splits each epoch (default: ``"train"`` only).

    Position ``p`` of epoch ``e`` holds element ``index_shuffle(fold_in(stage_key, e), p, n)``
    of the order before it, computed on demand (nothing of size ``n`` is built):
    the same for the same (seed, epoch), different across epochs, identical on
    every rank (so ``shard()`` after it gives disjoint parts without talking).
    ``seed`` overrides the DataModule's seed. After ``batch()`` it shuffles
    whole batches instead of samples.

    Example:
        >>> p = shuffle() >> shuffle(on=("train", "val"), seed=3)
    """
    return Shuffle(normalize_on(on), seed)
