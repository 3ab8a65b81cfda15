"""Lazy, index-based datasets and named splits.

A dataset computes element ``i`` when asked (``ds[i]``) and, on the fast path,
a whole batch from a LongTensor of indices (``ds[idx]``), returning a pytree of
stacked tensors. Random stages make an element a function of ``(epoch, i)``:
``ds.gather(idx, epoch)`` and ``ds.item(i, epoch)``; ``ds[...]`` is epoch 0.

Example:
    >>> import torch
    >>> ds = TensorDataset((torch.arange(6.0), torch.arange(6)))
    >>> ds[torch.tensor([4, 1])]
    (tensor([4., 1.]), tensor([4, 1]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optree
import torch

from ..tree import NAMESPACE, tree_flatten, tree_map, tree_unflatten


class ShapeError(ValueError):
    """Samples that should stack into a batch have inconsistent shapes or structure."""


def stack_samples(samples: list[Any], what: str) -> Any:
    """Stack a list of sample pytrees into one batch pytree (leaves stacked on axis 0).

    ``what`` names the producer of the samples, for the error message.
    """
    if not samples:
        raise ShapeError(f"{what} produced no samples to stack.")
    leaves0, spec0 = tree_flatten(samples[0])
    columns: list[list[Any]] = [[leaf] for leaf in leaves0]
    for j, s in enumerate(samples[1:], 1):
        leaves, spec = tree_flatten(s)
        if spec != spec0:
            raise ShapeError(
                f"{what} returned samples of different structure: sample 0 is {spec0}, "
                f"sample {j} is {spec}. Return the same structure for every sample."
            )
        for col, leaf in zip(columns, leaves, strict=True):
            col.append(leaf)
    paths = optree.tree_paths(samples[0], namespace=NAMESPACE)
    out = []
    for path, col in zip(paths, columns, strict=True):
        if isinstance(col[0], torch.Tensor):
            shapes = {tuple(t.shape) for t in col}
            if len(shapes) > 1:
                first = tuple(col[0].shape)
                j = next(k for k, t in enumerate(col) if tuple(t.shape) != first)
                raise ShapeError(
                    f"{what} returned samples of inconsistent shapes at leaf {list(path)}: "
                    f"sample 0 has shape {first}, sample {j} has shape {tuple(col[j].shape)}. "
                    "Make every sample the same shape, or pass batch(size, collate=fn) "
                    "with a collate function that pads them."
                )
            out.append(torch.stack(col))
        else:
            try:
                out.append(torch.as_tensor(col))
            except (TypeError, ValueError, RuntimeError) as e:
                raise ShapeError(
                    f"{what} returned leaves at {list(path)} of type {type(col[0]).__name__} "
                    "that cannot be stacked into a tensor; pass batch(size, collate=fn) to "
                    f"batch them yourself ({e})."
                ) from None
    return tree_unflatten(spec0, out)


def index_of(batch: Any, j: int) -> Any:
    """Element ``j`` of a batch pytree (``leaf[j]`` on every leaf)."""
    return tree_map(lambda t: t[j], batch)


class Dataset:
    """Base of lazy index-based datasets. Subclasses override ``gather`` or ``item``
    (or both): each default is written in terms of the other.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        """The elements at ``idx`` (a 1-D LongTensor), stacked into one batch."""
        return stack_samples([self.item(int(i), epoch) for i in idx], type(self).__name__)

    def item(self, i: int, epoch: int = 0) -> Any:
        """Element ``i`` (of ``epoch``, for random stages)."""
        return index_of(self.gather(torch.tensor([i]), epoch), 0)

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> Any:
        n = len(self)
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for a dataset of {n} samples")
            return self.item(index % n)
        if isinstance(index, slice):
            index = torch.arange(n)[index]
        idx = torch.as_tensor(index, dtype=torch.int64)
        if idx.dim() != 1:
            raise IndexError(f"index a dataset with an int or a 1-D tensor, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"indices out of range for a dataset of {n} samples")
        return self.gather(idx % n if idx.numel() else idx)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.item(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class TensorDataset(Dataset):
    """A pytree of tensors sharing their first dimension; sample ``i`` is ``leaf[i]``."""

    def __init__(self, tensors: Any):
        leaves, _ = tree_flatten(tensors)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError("TensorDataset needs a non-empty pytree whose leaves are all tensors.")
        sizes = {t.shape[0] if t.dim() else None for t in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ShapeError(
                "the tensors of a dataset must share their first dimension (one row per "
                f"sample); got first dimensions {sorted(str(s) for s in sizes)}."
            )
        self.tensors = tensors
        self._n = sizes.pop()

    def __len__(self) -> int:
        return self._n

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        # index_select is ~3x faster than advanced indexing (t[idx]) for row gathers on the CPU
        return tree_map(lambda t: torch.index_select(t, 0, idx.to(t.device)), self.tensors)

    def item(self, i: int, epoch: int = 0) -> Any:
        return tree_map(lambda t: t[i], self.tensors)


def _as_tensors(sample: Any) -> Any:
    return tree_map(lambda v: v if isinstance(v, torch.Tensor) else _maybe_tensor(v), sample)


def _maybe_tensor(v: Any) -> Any:
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):
        return v


class TorchDataset(Dataset):
    """Any map-style ``torch.utils.data.Dataset`` (``__len__`` + ``__getitem__(int)``).

    Numbers and numpy arrays in its samples become tensors; batches are gathered
    one sample at a time (there is no batched fast path to use).
    """

    def __init__(self, dataset: Any):
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        if iterable or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"from_torch needs a map-style dataset with __len__ and __getitem__, got "
                f"{type(dataset).__name__} (an IterableDataset has no random access)."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, i: int, epoch: int = 0) -> Any:
        return _as_tensors(self.dataset[i])


class SubsetDataset(Dataset):
    """The elements of ``parent`` at ``indices`` (a 1-D LongTensor), re-indexed from 0."""

    def __init__(self, parent: Dataset, indices: torch.Tensor):
        self.parent, self.indices = parent, indices

    def __len__(self) -> int:
        return int(self.indices.numel())

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        return self.parent.gather(torch.index_select(self.indices, 0, idx), epoch)

    def item(self, i: int, epoch: int = 0) -> Any:
        return self.parent.item(int(self.indices[i]), epoch)


BatchFn = Callable[[Any, torch.Tensor, int], Any]
ItemFn = Callable[[Any, int, int], Any]


class MapDataset(Dataset):
    """``parent`` with a per-element function applied lazily.

    ``batch_fn(batch, idx, epoch)`` maps a gathered batch; ``item_fn(sample, i, epoch)``
    maps one element. They must agree (the transform stage guarantees it).
    """

    def __init__(self, parent: Dataset, batch_fn: BatchFn, item_fn: ItemFn):
        self.parent, self.batch_fn, self.item_fn = parent, batch_fn, item_fn

    def __len__(self) -> int:
        return len(self.parent)

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        return self.batch_fn(self.parent.gather(idx, epoch), idx, epoch)

    def item(self, i: int, epoch: int = 0) -> Any:
        return self.item_fn(self.parent.item(i, epoch), i, epoch)


class Splits(Mapping[str, Dataset]):
    """An immutable mapping of split names to datasets.

    Example:
        >>> s = Splits(train=TensorDataset(torch.zeros(8, 2)), val=TensorDataset(torch.zeros(2, 2)))
        >>> {k: len(v) for k, v in s.items()}
        {'train': 8, 'val': 2}
    """

    def __init__(self, splits: Mapping[str, Dataset] | None = None, /, **named: Dataset):
        items = dict(splits or {}, **named)
        for name, ds in items.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"split names must be non-empty strings, got {name!r}")
            if not isinstance(ds, Dataset):
                raise TypeError(f"split {name!r} must be a fnlight Dataset, got {type(ds).__name__}")
        self._items = items

    def __getitem__(self, name: str) -> Dataset:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no split named {name!r}; the splits are {sorted(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return "Splits(" + ", ".join(f"{k}={len(v)}" for k, v in self._items.items()) + ")"
