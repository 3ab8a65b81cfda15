"""``DataModule``: Lightning's DataModule as an immutable value over a pipeline.

Example:
    >>> import torch, fnlight, fnlight.data as fd
    >>> pipeline = (fd.from_tensors(torch.rand(100, 3), torch.randint(0, 2, (100,)))
    ...             >> fd.split({"train": 0.8, "val": 0.2}) >> fd.shuffle() >> fd.batch(16))
    >>> dm = fnlight.DataModule(pipeline, seed=0)
    >>> dm.num_batches("train")
    5
    >>> x, y = next(iter(dm.batches("train", epoch=3, start=2)))
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .. import distributed
from .batch import batch as batch_stage
from .dataset import Dataset
from .describe import fingerprint_of
from .loader import BatchIterator
from .order import BatchOrder
from .shuffle import shuffle as shuffle_stage
from .sources import from_torch
from .stage import Context, Pipeline, Plans, SplitPlan, Stage, default_root

#: Lightning's stages and the split each reads by default.
DEFAULT_STAGES: Mapping[str, str] = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}


def _several_datasets(value: Any) -> bool:
    """A list, tuple or mapping of torch datasets (Lightning's several dataloaders for one stage), rather
    than one dataset (which may itself be a list of samples)."""
    items = list(value.values()) if isinstance(value, Mapping) else value if isinstance(value, list | tuple) \
        else None
    return bool(items) and all(isinstance(v, torch.utils.data.Dataset) for v in items)


@dataclass(frozen=True, eq=False)
class DataModule:
    """Batches of a pipeline's splits, by (split, epoch, position).

    Args:
        pipeline: a :class:`~fnlight.data.Pipeline` (or a single source stage).
        seed: the seed of shuffles and random transforms (``split`` has its own).
        root: the cache root for downloads and disk caches (default
            ``$FNLIGHT_HOME`` or ``~/.cache/fnlight``).
        stages: Lightning stage -> split name (``fit`` -> ``train``, ...).
        device: where ``to_device()`` stages move batches (default: CUDA if available).
        prefetch: batches computed ahead in a background thread. The default
            (None) prefetches 2 batches when the pipeline moves batches to a
            GPU, whose work runs while the thread prepares the next batch, and
            none otherwise: on the CPU a second thread competes for the same
            cores and slows a pipeline down (measured: about 2x on 2 cores).
        workers: worker processes for CPU-heavy Python transforms (0: none);
            results are identical for any number of workers.
        rank: this process's rank for ``shard()`` (default: from ``torch.distributed``).
        world_size: the number of ranks for ``shard()`` (default: from ``torch.distributed``).

    The configuration is immutable; building the splits is done once, lazily,
    and memoized. ``close()`` (or ``with dm:``) stops every live iteration.
    """

    pipeline: Pipeline
    seed: int = 0
    root: str | Path | None = None
    stages: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_STAGES))
    device: str | None = None
    prefetch: int | None = None
    workers: int = 0
    rank: int | None = None
    world_size: int | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)  # the plans, per context
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)
    _live: Any = field(default_factory=weakref.WeakSet, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.pipeline, Stage):
            object.__setattr__(self, "pipeline", Pipeline((self.pipeline,)))
        if not isinstance(self.pipeline, Pipeline):
            raise TypeError(f"DataModule needs a Pipeline, got {type(self.pipeline).__name__}")
        if (self.prefetch or 0) < 0 or self.workers < 0:
            raise ValueError("prefetch and workers must be >= 0")
        object.__setattr__(self, "stages", MappingProxyType(dict(self.stages)))

    @classmethod
    def from_datasets(cls, train: Any = None, val: Any = None, test: Any = None, predict: Any = None,
                      batch_size: int = 1, shuffle: bool = True, num_workers: int = 0,
                      fingerprint: str | None = None, *, train_dataset: Any = None, val_dataset: Any = None,
                      test_dataset: Any = None, predict_dataset: Any = None, **kwargs: Any) -> DataModule:
        """A DataModule over map-style torch datasets (Lightning's ``from_datasets``).

        Each split is one dataset, given as ``train=`` or under Lightning's name
        ``train_dataset=`` (``val``, ``test``, ``predict`` alike); the train split is
        shuffled (``shuffle=False``: not), as Lightning's ``from_datasets`` does.
        ``fingerprint`` names the datasets' content (see :func:`~fnlight.data.from_torch`);
        ``num_workers`` is ``workers`` under Lightning's name. Lightning's lists or dicts
        of datasets (several dataloaders for one stage) are refused: a fnlight stage
        reads one split (concatenate them with ``torch.utils.data.ConcatDataset``, or
        name each as a split of its own with :func:`~fnlight.data.from_torch`).

        Example:
            >>> import torch
            >>> tds = torch.utils.data.TensorDataset(torch.rand(10, 2), torch.arange(10))
            >>> dm = DataModule.from_datasets(train=tds, val=tds, batch_size=4)
            >>> dm = DataModule.from_datasets(train_dataset=tds, batch_size=4)   # Lightning's names
        """
        named: dict[str, Any] = {}
        for name, ours, theirs in (("train", train, train_dataset), ("val", val, val_dataset),
                                   ("test", test, test_dataset), ("predict", predict, predict_dataset)):
            if ours is not None and theirs is not None:
                raise TypeError(f"from_datasets: give {name}= or {name}_dataset=, not both")
            ds = ours if ours is not None else theirs
            if ds is None:
                continue
            if _several_datasets(ds):
                raise TypeError(
                    f"from_datasets: {name} is a {type(ds).__name__} of {len(ds)} datasets; Lightning makes one "
                    "dataloader of each, but a fnlight stage reads one split: concatenate them "
                    "(torch.utils.data.ConcatDataset([...])) or give each a split of its own "
                    f"(fnlight.data.from_torch({name}_a=..., {name}_b=...) with DataModule(stages=...))")
            named[name] = ds
        kwargs.setdefault("workers", num_workers)
        pipeline = from_torch(fingerprint=fingerprint, **named) >> batch_stage(batch_size)
        if shuffle and "train" in named:
            pipeline = Pipeline(pipeline.stages[:1] + (shuffle_stage(),) + pipeline.stages[1:])
        return cls(pipeline, **kwargs)

    def replace(self, **changes: Any) -> DataModule:
        """A new DataModule with some settings changed (and nothing built yet)."""
        return dataclasses.replace(self, **changes)

    # -- building -----------------------------------------------------------
    @property
    def context(self) -> Context:
        """What the build depends on: seed, root, rank, world size, device."""
        return Context(
            seed=self.seed,
            root=Path(self.root) if self.root is not None else default_root(),
            rank=distributed.rank() if self.rank is None else self.rank,
            world_size=distributed.world_size() if self.world_size is None else self.world_size,
            device=torch.device(self.device) if self.device is not None else None,
        )

    def prepare(self, per_node: bool = False) -> None:
        """Run the side-effecting stages (downloads, disk caches) once.

        In a distributed run rank 0 prepares while the other ranks wait at a
        barrier, so ranks never download at once. With ``per_node=True`` the
        first rank of every node (``LOCAL_RANK`` 0) prepares instead, for nodes
        whose ``root`` is a local disk (Lightning's ``prepare_data_per_node``).
        The Trainer calls it at the start of ``fit``.

        Example:
            ```python
            dm.prepare()                 # one download for the whole job
            ```
        """
        ctx = self.context
        if distributed.world_size() > 1:
            try:
                if (distributed.local_rank() if per_node else distributed.rank()) == 0:
                    self.pipeline.prepare(ctx)
            finally:
                distributed.barrier()
        else:
            self.pipeline.prepare(ctx)

    def setup(self) -> Plans:
        """Build (once per context) and return the plan of every split.

        The memo is keyed by the context, so a DataModule used before
        ``torch.distributed`` is initialized is rebuilt for the right rank after.
        """
        ctx = self.context
        with self._lock:
            if ctx not in self._memo:
                self._memo[ctx] = self.pipeline.build(ctx)
            return self._memo[ctx]

    @property
    def split_names(self) -> list[str]:
        """The names of the pipeline's splits."""
        return list(self.setup())

    def split_for(self, stage: str) -> str:
        """The split that a Lightning stage (fit, validate, test, predict) reads."""
        if stage not in self.stages:
            raise KeyError(f"unknown stage {stage!r}; the stages are {sorted(self.stages)}")
        return self.stages[stage]

    def plan(self, split: str) -> SplitPlan:
        """The plan of ``split`` (a split name, or a stage name such as ``"fit"``)."""
        plans = self.setup()
        if split not in plans and split in self.stages:
            split = self.stages[split]
        if split not in plans:
            raise KeyError(f"no split named {split!r}; this pipeline has the splits {sorted(plans)}")
        return plans[split]

    def dataset(self, split: str) -> Dataset:
        """The lazy dataset of ``split`` (everything before ``batch()``)."""
        return self.plan(split).dataset

    # -- iterating ----------------------------------------------------------
    def index_plan(self, split: str, epoch: int = 0) -> BatchOrder:
        """The lazy index plan of ``split`` in ``epoch``: a sequence of the batches'
        index tensors, each computed when it is read (see :mod:`fnlight.data.order`)."""
        return self.plan(split).index_plan(epoch)

    def index_batches(self, split: str, epoch: int = 0) -> list[torch.Tensor]:
        """The sample indices of every batch of ``split`` in ``epoch``, as a list
        (materialized: for inspection; iteration uses :meth:`index_plan`)."""
        return self.plan(split).index_batches(epoch)

    def num_batches(self, split: str, skip: int = 0) -> int:
        """The number of batches of ``split`` in an epoch (the same for every epoch); with ``skip``,
        of an epoch whose first ``skip`` elements ``shard()`` deals out are left out (see :meth:`batches`)."""
        return len(self.plan(split).index_plan(0, skip))

    def batches(self, split: str, epoch: int = 0, start: int = 0, skip: int = 0) -> BatchIterator:
        """The batches of ``split`` in ``epoch``, from position ``start`` on.

        ``batches(split, e, start=b)`` yields exactly the batches an
        uninterrupted pass would yield from its ``b``-th on: resuming needs
        nothing but (epoch, position). ``skip=s`` leaves out the first ``s`` elements of
        the sequence ``shard()`` deals out and deals out the rest to the ranks: the epoch
        of a run resumed on another number of ranks (:mod:`fnlight.train.elastic`).
        """
        plan = self.plan(split)
        all_batches = plan.index_plan(epoch, skip)
        if not 0 <= start <= len(all_batches):
            raise ValueError(f"start={start} is out of range: split {split!r} has {len(all_batches)} batches")
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = 2 if plan.device_post and torch.cuda.is_available() else 0
        it = BatchIterator(plan, epoch, all_batches[start:], prefetch, self.workers)
        self._live.add(it)
        return it

    # -- identity -----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The pipeline's description plus the seed and the stage mapping."""
        return {"pipeline": self.pipeline.describe(), "seed": self.seed, "stages": dict(self.stages)}

    @property
    def fingerprint(self) -> str:
        """sha256 of ``describe()`` (FingerprintError if a part has no stable description)."""
        return fingerprint_of(self.describe(), "DataModule")

    # -- resources ----------------------------------------------------------
    def close(self) -> None:
        """Stop every live iteration's prefetch thread and worker processes."""
        for it in list(self._live):
            it.close()

    def __enter__(self) -> DataModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
