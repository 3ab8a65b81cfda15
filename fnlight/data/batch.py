"""``batch``: group the order into batches of index tensors, gathered at once.

Example:
    >>> import torch, fnlight.data as fd
    >>> dm = fd.DataModule(fd.from_tensors(torch.arange(5)) >> fd.batch(2))
    >>> [b.tolist() for b in dm.batches("train")]
    [[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .order import BatchOrder, Order
from .stage import Context, OrderOp, Plans, SplitPlan, Stage, Where, normalize_on, plans_for


class _BatchOp(OrderOp):
    batches = True

    def __init__(self, size: int, drop_last: bool):
        self.size, self.drop_last = size, drop_last

    def __call__(self, seq: Order | BatchOrder, epoch: int) -> BatchOrder:
        if not isinstance(seq, Order):
            raise ValueError("batch() appears twice in the order of a split")
        return BatchOrder(seq, self.size, self.drop_last)


@dataclass(frozen=True)
class Batch(Stage):
    name: ClassVar[str] = "batch"
    size: int
    drop_last: bool = False
    collate: Callable[[list[Any]], Any] | None = None
    on: str | tuple[str, ...] | None = None

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        def update(plan: SplitPlan) -> SplitPlan:
            if plan.batch is not None:
                raise ValueError(
                    f"batch() is applied twice to split {plan.name!r}; use on= to give each "
                    "split its own batch size."
                )
            return plan.replace(batch=self, order=plan.order + (_BatchOp(self.size, self.drop_last),))

        return plans_for("batch", self.on, plans, update)


def batch(size: int, drop_last: bool = False, collate: Callable[[list[Any]], Any] | None = None,
          on: str | tuple[str, ...] | None = None) -> Batch:
    """Group samples into batches of ``size`` (the last one smaller unless ``drop_last``).

    A batch is a pytree of stacked tensors, gathered in one indexing operation
    per leaf (the fast path). ``collate(list_of_samples) -> batch`` instead
    fetches samples one by one and combines them yourself (e.g. to pad
    sequences of different lengths). ``on`` restricts it to some splits, so
    each split can have its own batch size.

    Example:
        >>> b = batch(64, on="train") >> batch(256, on=("val", "test"))
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"batch size must be a positive int, got {size!r}.")
    if collate is not None and not callable(collate):
        raise TypeError(f"collate must be a function of a list of samples, got {type(collate).__name__}")
    return Batch(size, drop_last, collate, normalize_on(on))
