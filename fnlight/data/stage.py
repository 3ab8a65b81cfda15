"""Stages, pipelines and the plan a pipeline builds for each split.

A stage is a frozen dataclass whose fields are its hyperparameters. ``a >> b``
makes a :class:`Pipeline`; pipelines compose and flatten. Building a pipeline
(for a seed, a cache root and a rank) yields, for every split, a
:class:`SplitPlan`: the lazy dataset of everything before ``batch()``, the
order stages (shuffle, shard, batch) and the operations on whole batches
after ``batch()`` (transforms, ``to_device``).

Example:
    >>> import torch, fnlight.data as fd
    >>> p = fd.from_tensors(torch.arange(10.0)) >> fd.shuffle() >> fd.batch(4)
    >>> [s["stage"] for s in p.describe()["stages"]]
    ['from_tensors', 'shuffle', 'batch']
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import random as fr
from .dataset import Dataset, Splits
from .describe import describe_value, fingerprint_of
from .order import Affine, BatchOrder, Order

DEFAULT_SPLIT = "train"


def default_root() -> Path:
    """The cache root: ``$FNLIGHT_HOME`` if set, else ``~/.cache/fnlight``."""
    return Path(os.environ.get("FNLIGHT_HOME") or Path.home() / ".cache" / "fnlight")


@dataclass(frozen=True)
class Context:
    """What a build depends on besides the stages: seed, cache root, rank, device."""

    seed: int = 0
    root: Path = field(default_factory=default_root)
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    def stage_key(self, where: Where, split: str, seed: int | None = None) -> torch.Tensor:
        """The base key of a stage for ``split``.

        It folds in the stage's name and its occurrence among stages of that
        name (so two random transforms are independent, and moving a transform
        across ``batch()`` keeps its randomness), then the split name (so
        sample ``i`` of "train" and of "val" are independent).
        """
        k = fr.key(self.seed if seed is None else seed)
        k = fr.fold_in(fr.fold_in(k, zlib.crc32(where.stage.encode())), where.occurrence)
        return fr.fold_in(k, zlib.crc32(split.encode()))


@dataclass(frozen=True)
class Where:
    """A stage's place in the pipeline being built."""

    stage: str  # the stage's name
    occurrence: int  # how many earlier stages have the same name
    prefix: Pipeline  # the stages before it


class OrderOp:
    """A step of the epoch's index plan: maps a lazy :class:`~fnlight.data.order.Order`
    of sample indices (before ``batch``) or a :class:`~fnlight.data.order.BatchOrder`
    (after it) to a new one, without computing any index."""

    #: True for ``shard()``'s op: the one that deals the epoch out to the ranks.
    deals: bool = False
    #: True for ``batch()``'s op.
    batches: bool = False

    def __call__(self, seq: Order | BatchOrder, epoch: int) -> Order | BatchOrder:
        raise NotImplementedError


PostFn = Callable[[Any, torch.Tensor, int], Any]  # (batch, indices, epoch) -> batch


@dataclass(frozen=True)
class SplitPlan:
    """How to produce the batches of one split (built from a pipeline)."""

    name: str
    dataset: Dataset
    order: tuple[OrderOp, ...] = ()
    batch: Any = None  # the Batch stage, once seen
    host_post: tuple[PostFn, ...] = ()  # after batch, on the host
    device_post: tuple[PostFn, ...] = ()  # from to_device on
    random_stage: str | None = None  # the first random stage before batch(), if any

    def replace(self, **changes: Any) -> SplitPlan:
        return dataclasses.replace(self, **changes)

    def add_post(self, fn: PostFn) -> SplitPlan:
        if self.device_post:
            return self.replace(device_post=self.device_post + (fn,))
        return self.replace(host_post=self.host_post + (fn,))

    def check_before_order(self, stage: str) -> None:
        """Stages that re-index a split must come before shuffle/shard/batch."""
        if self.order:
            raise ValueError(
                f"{stage}() changes which samples split {self.name!r} holds, so it must come "
                "before shuffle(), shard() and batch() in the pipeline."
            )

    def host_batch(self, idx: torch.Tensor, epoch: int) -> Any:
        """The batch at ``idx`` up to (not including) ``to_device``."""
        if self.batch.collate is not None:
            x = self.batch.collate([self.dataset.item(int(i), epoch) for i in idx])
        else:
            x = self.dataset.gather(idx, epoch)
        for fn in self.host_post:
            x = fn(x, idx, epoch)
        return x

    def device_batch(self, x: Any, idx: torch.Tensor, epoch: int) -> Any:
        """Finish a host batch: ``to_device`` and the stages after it."""
        for fn in self.device_post:
            x = fn(x, idx, epoch)
        return x

    def get_batch(self, idx: torch.Tensor, epoch: int) -> Any:
        """The finished batch at ``idx``."""
        return self.device_batch(self.host_batch(idx, epoch), idx, epoch)

    def index_plan(self, epoch: int, skip: int = 0) -> BatchOrder:
        """The lazy sequence of the index tensors of ``epoch``'s batches (computed on demand).

        ``skip``: leave out the first ``skip`` elements of the sequence that ``shard()`` deals out
        (samples, or batches when ``shard`` comes after ``batch``) and deal out the rest, as a run
        whose epoch started there would: what an elastic resume on another number of ranks reads
        (see :mod:`fnlight.train.elastic`). A split without ``shard()`` skips nothing.
        """
        if self.batch is None:
            raise ValueError(
                f"split {self.name!r} has no batch() stage; add one, e.g. "
                "`pipeline >> fnlight.data.batch(64)`."
            )
        seq: Order | BatchOrder = Order(len(self.dataset))
        for op in self.order:
            if op.deals and skip:
                if not 0 <= skip <= len(seq):
                    raise ValueError(f"skip={skip} is out of range: shard() deals out {len(seq)} elements")
                seq = seq[skip:] if isinstance(seq, BatchOrder) else seq.remap(len(seq) - skip, Affine(skip, 1))
                skip = 0
            seq = op(seq, epoch)
        assert isinstance(seq, BatchOrder)
        return seq

    @property
    def dealt(self) -> tuple[bool, bool] | None:
        """Where ``shard()`` is: None without one, else (whether it comes before ``batch()``, whether
        an op reorders the rank's elements after it, e.g. a shuffle after ``shard``)."""
        deals = [i for i, op in enumerate(self.order) if op.deals]
        if not deals:
            return None
        after = self.order[deals[0] + 1:]
        return any(op.batches for op in after), any(not op.batches for op in after)

    def index_batches(self, epoch: int) -> list[torch.Tensor]:
        """The index tensors of every batch of ``epoch``, in order (materialized)."""
        return list(self.index_plan(epoch))


Plans = dict[str, SplitPlan]


class Stage:
    """Base of every stage: a frozen dataclass that describes itself and composes with ``>>``.

    Subclasses set ``name`` and implement ``build(plans, ctx, where) -> plans``.
    """

    name: ClassVar[str] = "stage"
    is_source: ClassVar[bool] = False

    @property
    def key_name(self) -> str:
        """The name whose occurrences number this stage's random keys."""
        return self.name

    prepares_by_building: ClassVar[bool] = False  # True for stages with side effects at build

    def describe(self) -> dict[str, Any]:
        """The stage's name and hyperparameters, JSON-able and stable across processes."""
        out: dict[str, Any] = {"stage": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.name.startswith("_"):
                out[f.name] = describe_value(getattr(self, f.name))
        return out

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        raise NotImplementedError

    def prepare(self, ctx: Context) -> None:
        """Run this stage's side effects (download, disk cache); a no-op for pure stages."""

    def __rshift__(self, other: Stage | Pipeline) -> Pipeline:
        return Pipeline((self,)) >> other

    def __rrshift__(self, other: Any) -> Pipeline:
        raise TypeError(_not_a_stage(other))


def _not_a_stage(other: Any) -> str:
    return (
        f"`>>` composes fnlight stages, but got {type(other).__name__} ({other!r:.60}). "
        "Make stages with the factories in fnlight.data, e.g. "
        "`fd.from_tensors(x, y) >> fd.shuffle() >> fd.batch(64)`; wrap a function "
        "in fd.transform(fn)."
    )


def resolve_on(on: str | tuple[str, ...] | None, plans: Plans, stage: str) -> list[str]:
    """The split names a stage applies to; an unknown name is an error."""
    if on is None:
        return list(plans)
    names = (on,) if isinstance(on, str) else tuple(on)
    unknown = [n for n in names if n not in plans]
    if unknown:
        raise ValueError(
            f"{stage}(on={on!r}) names unknown split(s) {unknown}; at this point the pipeline "
            f"has the splits {sorted(plans)}."
        )
    return list(names)


def normalize_on(on: str | Iterable[str] | None) -> str | tuple[str, ...] | None:
    """Store ``on=`` as a hashable value."""
    if on is None or isinstance(on, str):
        return on
    return tuple(on)


@dataclass(frozen=True)
class Pipeline:
    """An immutable sequence of stages. ``describe()`` and ``fingerprint`` identify it.

    Example:
        >>> import torch, fnlight.data as fd
        >>> a = fd.from_tensors(torch.zeros(4)) >> fd.batch(2)
        >>> b = fd.from_tensors(torch.zeros(4)) >> fd.batch(3)
        >>> a.fingerprint != b.fingerprint
        True
    """

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        for s in self.stages:
            if not isinstance(s, Stage):
                raise TypeError(_not_a_stage(s))

    def __rshift__(self, other: Stage | Pipeline) -> Pipeline:
        if isinstance(other, Pipeline):
            return Pipeline(self.stages + other.stages)
        if isinstance(other, Stage):
            return Pipeline(self.stages + (other,))
        raise TypeError(_not_a_stage(other))

    def __rrshift__(self, other: Any) -> Pipeline:
        raise TypeError(_not_a_stage(other))

    def __len__(self) -> int:
        return len(self.stages)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of every stage and hyperparameter, in order."""
        return {"fnlight_pipeline": 1, "stages": [s.describe() for s in self.stages]}

    @property
    def fingerprint(self) -> str:
        """sha256 of ``describe()``; raises FingerprintError if a part is not describable."""
        return fingerprint_of(self.describe())

    def prepare(self, ctx: Context) -> None:
        """Run the side-effecting stages once: the source's download, and the disk
        caches (which need everything before them built)."""
        self._source().prepare(ctx)
        if any(s.prepares_by_building for s in self.stages[1:]):
            self.build(ctx)

    def _source(self) -> Stage:
        if not self.stages:
            raise ValueError("an empty pipeline has no data; start it with a source stage.")
        src = self.stages[0]
        if not src.is_source:
            raise ValueError(
                f"a pipeline starts with a source stage (download, from_tensors, from_torch, "
                f"digits, ...), but this one starts with {src.name}()."
            )
        return src

    def build(self, ctx: Context) -> Plans:
        """The plan of every split (lazy: no batch is computed here)."""
        self._source()
        plans: Plans = {}
        seen: dict[str, int] = {}
        for pos, stage in enumerate(self.stages):
            if pos and stage.is_source:
                raise ValueError(f"{stage.name}() is a source and can only be the first stage.")
            where = Where(stage.key_name, seen.get(stage.key_name, 0), self.prefix(pos))
            seen[stage.key_name] = where.occurrence + 1
            plans = stage.build(plans, ctx, where)
        return plans

    def prefix(self, n: int) -> Pipeline:
        """The first ``n`` stages."""
        return Pipeline(self.stages[:n])


def plans_for(stage: str, on: str | tuple[str, ...] | None, plans: Plans,
              update: Callable[[SplitPlan], SplitPlan]) -> Plans:
    """Apply ``update`` to the plans of the splits named by ``on`` (all when None)."""
    names = set(resolve_on(on, plans, stage))
    return {k: update(p) if k in names else p for k, p in plans.items()}


def splits_to_plans(value: Dataset | Splits) -> Plans:
    """Plans for a source's output: a single dataset becomes the split ``"train"``."""
    if isinstance(value, Dataset):
        value = Splits({DEFAULT_SPLIT: value})
    if not isinstance(value, Splits):
        raise TypeError(f"a source must produce a Dataset or Splits, got {type(value).__name__}")
    return {name: SplitPlan(name, ds) for name, ds in value.items()}
