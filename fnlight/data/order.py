"""Lazy index plans: an epoch's order as a function of the position, never a list.

``shuffle``, ``shard`` and ``batch`` do not build the epoch's order: each maps
a position to the position it reads in the sequence before it (a keyed
bijection for ``shuffle``, an affine map for ``shard``, a range for ``batch``),
so the sample at position ``p`` of epoch ``e`` is computed when it is needed.
Memory and the time to the first batch are the same for 10**3 and 10**10
samples, and resuming at batch ``b`` computes batch ``b`` directly.

:class:`Order` is a lazy sequence of sample indices, :class:`BatchOrder` a lazy
sequence of index tensors (one per batch). Both are computed in vectorized
chunks when iterated.

Example:
    >>> import torch, fnlight.data as fd
    >>> dm = fd.DataModule(fd.from_tensors(torch.arange(10**6)) >> fd.shuffle() >> fd.batch(4))
    >>> plan = dm.index_plan("train", epoch=0)           # nothing is computed yet
    >>> len(plan), plan[len(plan) - 1].shape              # only the last batch is computed
    (250000, torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import torch

from .. import random as fr

#: Sample indices computed per vectorized chunk when a plan is iterated: large
#: enough to amortize torch's per-op overhead, small enough to be negligible memory.
CHUNK_SAMPLES = 1 << 15


class PositionMap:
    """A map from positions of a new sequence to positions of the one before it."""

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Permute(PositionMap):
    """A keyed random bijection of ``range(n)`` (:func:`fnlight.random.index_shuffle`)."""

    def __init__(self, key: torch.Tensor, n: int):
        self.key, self.n = key, n

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        return fr.index_shuffle(self.key, pos, self.n)


class Affine(PositionMap):
    """``(start + pos * step) % modulo`` (``modulo`` 0: no wrap-around)."""

    def __init__(self, start: int, step: int, modulo: int = 0):
        self.start, self.step, self.modulo = start, step, modulo

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        out = pos * self.step + self.start if self.step != 1 else pos + self.start
        return out % self.modulo if self.modulo else out


class Order:
    """A lazy sequence of ``n`` sample indices: ``take(positions) -> indices``.

    The base order is ``range(n)``; ``remap`` puts a :class:`PositionMap` in front.
    """

    def __init__(self, n: int, parent: Order | None = None, fn: PositionMap | None = None):
        self.n, self.parent, self.fn = n, parent, fn

    def __len__(self) -> int:
        return self.n

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        """The indices at ``pos`` (an int64 tensor of positions in ``[0, len)``)."""
        order: Order | None = self
        while order is not None and order.fn is not None:
            pos = order.fn(pos)
            order = order.parent
        return pos

    def remap(self, n: int, fn: PositionMap) -> Order:
        """The order of length ``n`` whose position ``p`` reads this order at ``fn(p)``."""
        return Order(n, self, fn)

    def materialize(self) -> torch.Tensor:
        """Every index, in order (memory grows with ``len``: for tests and small data)."""
        return self.take(torch.arange(self.n))


class BatchOrder(Sequence[torch.Tensor]):
    """A lazy sequence of the index tensors of an epoch's batches.

    Batch ``j`` holds the samples at positions ``[b * size, (b + 1) * size)`` of
    ``samples``, where ``b = ids.take(j)`` (``shuffle`` and ``shard`` after
    ``batch()`` remap ``ids``). Indexing computes one batch; iterating computes
    chunks of about :data:`CHUNK_SAMPLES` indices at a time; slicing is lazy.
    """

    def __init__(self, samples: Order, size: int, drop_last: bool, ids: Order | None = None):
        self.samples, self.size, self.drop_last = samples, size, drop_last
        n = len(samples)
        self.ids = ids if ids is not None else Order(n // size if drop_last else -(-n // size))

    def __len__(self) -> int:
        return len(self.ids)

    def remap(self, n: int, fn: PositionMap) -> BatchOrder:
        """Reorder or select whole batches (``shuffle``/``shard`` after ``batch()``)."""
        return BatchOrder(self.samples, self.size, self.drop_last, self.ids.remap(n, fn))

    @overload
    def __getitem__(self, j: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, j: slice) -> BatchOrder: ...

    def __getitem__(self, j: int | slice) -> torch.Tensor | BatchOrder:
        n = len(self)
        if isinstance(j, slice):
            r = range(n)[j]
            return self.remap(len(r), Affine(r.start, r.step))
        if not -n <= j < n:
            raise IndexError(f"batch {j} is out of range: the epoch has {n} batches")
        return self.chunk(j % n, j % n + 1)[0]

    def chunk(self, start: int, stop: int) -> list[torch.Tensor]:
        """The index tensors of batches ``start, ..., stop - 1``, in one vectorized pass."""
        if not start < stop:
            return []
        b = self.ids.take(torch.arange(start, stop))
        first = b * self.size
        lengths = (len(self.samples) - first).clamp_(max=self.size)
        total = int(lengths.sum())
        if bool((lengths == self.size).all()):  # every batch full: one reshape, no ragged split
            pos = (first[:, None] + torch.arange(self.size)).flatten()
            return list(self.samples.take(pos).view(-1, self.size).unbind(0))
        starts_of = torch.repeat_interleave(first - (torch.cumsum(lengths, 0) - lengths), lengths)
        pos = torch.arange(total) + starts_of
        return list(self.samples.take(pos).split(lengths.tolist()))

    def batches_per_chunk(self) -> int:
        return max(1, CHUNK_SAMPLES // self.size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = self.batches_per_chunk()
        for start in range(0, len(self), step):
            yield from self.chunk(start, min(start + step, len(self)))

    def __repr__(self) -> str:
        return f"BatchOrder(batches={len(self)}, size={self.size}, samples={len(self.samples)})"
