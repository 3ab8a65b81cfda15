"""Source stages: where a pipeline's data comes from (tensors, torch datasets).

Example:
    >>> import torch, fnlight.data as fd
    >>> src = fd.from_tensors(torch.zeros(5, 3), torch.arange(5))
    >>> len(src.load(fd.Context()))   # one dataset; fd.split(...) makes named splits of it
    5
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..tree import tree_hash
from .dataset import Dataset, Splits, TensorDataset, TorchDataset
from .describe import UNSTABLE
from .stage import Context, Plans, Stage, Where, splits_to_plans


class Source(Stage):
    """A stage that produces data: the first stage of every pipeline."""

    is_source: ClassVar[bool] = True
    #: False when the description does not hash the data itself (a disk cache
    #: keyed by the fingerprint would then be unsafe).
    content_hashed: ClassVar[bool] = True

    def load(self, ctx: Context) -> Dataset | Splits:
        raise NotImplementedError

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        return splits_to_plans(self.load(ctx))


@dataclass(frozen=True, eq=False)  # holds tensors: identity equality and hash
class FromTensors(Source):
    name: ClassVar[str] = "from_tensors"
    data: Any

    def load(self, ctx: Context) -> Dataset:
        return TensorDataset(self.data)

    @functools.cached_property
    def _digest(self) -> str:
        return tree_hash(self.data)

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "sha256": self._digest}


def from_tensors(*tensors: Any, **named: Any) -> FromTensors:
    """A source of in-memory tensors that share their first dimension.

    ``from_tensors(x, y)`` yields samples ``(x[i], y[i])``; ``from_tensors(x)``
    yields ``x[i]``; ``from_tensors(image=x, label=y)`` yields dicts. The data
    is described by a sha256 of its bytes, so the fingerprint follows it.

    Example:
        >>> import torch
        >>> src = from_tensors(torch.rand(100, 2), torch.randint(0, 2, (100,)))
    """
    if tensors and named:
        raise TypeError("from_tensors takes tensors positionally or by name, not both.")
    if not tensors and not named:
        raise TypeError("from_tensors needs at least one tensor.")
    data = named if named else (tensors[0] if len(tensors) == 1 else tuple(tensors))
    TensorDataset(data)  # validate now: a clear error at construction, not at first use
    return FromTensors(data)


@dataclass(frozen=True, eq=False)
class FromTorch(Source):
    name: ClassVar[str] = "from_torch"
    datasets: tuple[tuple[str, Any], ...]
    fingerprint: str | None = None

    @property
    def content_hashed(self) -> bool:  # type: ignore[override]
        return self.fingerprint is not None or all(_is_tensor_dataset(ds) for _, ds in self.datasets)

    def load(self, ctx: Context) -> Splits:
        return Splits({name: TorchDataset(ds) for name, ds in self.datasets})

    def describe(self) -> dict[str, Any]:
        datasets = {}
        for name, ds in self.datasets:
            d: dict[str, Any] = {"type": f"{type(ds).__module__}.{type(ds).__qualname__}", "len": len(ds)}
            if _is_tensor_dataset(ds):  # in-memory tensors: hash them
                d["sha256"] = tree_hash(tuple(ds.tensors))
            datasets[name] = d
        out: dict[str, Any] = {"stage": self.name, "datasets": datasets}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        elif not self.content_hashed:
            out[UNSTABLE] = ("the content of a torch Dataset cannot be hashed cheaply; pass "
                             "from_torch(..., fingerprint='<a name for this data version>') "
                             "(DataModule.from_datasets(..., fingerprint=...)) to identify it")
        return out


def _is_tensor_dataset(ds: Any) -> bool:
    return isinstance(ds, torch.utils.data.TensorDataset)


def from_torch(dataset: Any = None, /, *, fingerprint: str | None = None, **splits: Any) -> FromTorch:
    """A source wrapping map-style ``torch.utils.data.Dataset`` objects.

    ``from_torch(ds)`` gives one dataset (the split ``"train"``);
    ``from_torch(train=a, val=b, test=c)`` gives named splits. Samples are read
    one at a time and stacked, so prefer ``from_tensors`` for in-memory data.

    A ``TensorDataset`` is identified by a hash of its tensors. Any other
    dataset's content cannot be hashed cheaply: give ``fingerprint=`` a name for
    the data's version (it goes into the pipeline's fingerprint); without it the
    pipeline has no fingerprint (and cannot be cached on disk or checkpointed).

    Example:
        ```python
        import torch
        tds = torch.utils.data.TensorDataset(torch.zeros(4, 2))
        src = from_torch(train=tds)
        src2 = from_torch(train=my_image_folder, fingerprint="imagenette-v2")
        ```
    """
    if dataset is not None:
        if splits:
            raise TypeError("from_torch takes one dataset or named splits, not both.")
        splits = {"train": dataset}
    if not splits:
        raise TypeError("from_torch needs a dataset.")
    for ds in splits.values():
        TorchDataset(ds)  # validate
    return FromTorch(tuple(splits.items()), fingerprint)
