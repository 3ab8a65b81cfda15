"""A 🤗 ``datasets.Dataset`` as a pipeline source (``pip install 'fnlight[hf]'``).

Example:
    >>> import datasets, fnlight.data as fd
    >>> ds = datasets.Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 3.0]], "y": [0, 1]})
    >>> src = fd.from_hf(ds)
    >>> src.load(fd.Context())["train"][0]
    {'x': tensor([0., 1.]), 'y': tensor(0)}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .dataset import Dataset, ShapeError, Splits
from .sources import Source
from .stage import Context

_BYTES = ("string", "large_string", "binary", "large_binary")


@dataclass(frozen=True, eq=False)  # holds datasets: identity equality and hash
class FromHF(Source):
    name: ClassVar[str] = "from_hf"
    datasets: tuple[tuple[str, Any], ...]  # (split name, datasets.Dataset)
    columns: str | tuple[str, ...] | None

    def load(self, ctx: Context) -> Splits:
        return Splits({name: HFDataset(ds, self.columns) for name, ds in self.datasets})

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "columns": self.columns,
                "datasets": {name: {"fingerprint": ds._fingerprint, "rows": ds.num_rows}
                             for name, ds in self.datasets}}


class HFDataset(Dataset):
    """The rows of a ``datasets.Dataset`` as tensors (its ``"torch"`` format: integers become
    int64, floats float32). A batch is one read of the rows at the indices from Arrow."""

    def __init__(self, dataset: Any, columns: str | tuple[str, ...] | None):
        self.single = columns if isinstance(columns, str) else None
        names = [columns] if isinstance(columns, str) else list(columns or dataset.column_names)
        self.rows = dataset.with_format("torch", columns=names)
        self.names = names

    def __len__(self) -> int:
        return int(self.rows.num_rows)

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        out = self.rows[idx.tolist()]
        for name, value in out.items():
            if not isinstance(value, torch.Tensor):  # rows of different shapes come back as a list
                shapes = sorted({tuple(v.shape) for v in value})
                raise ShapeError(
                    f"column {name!r} of the 🤗 dataset has rows of different shapes ({shapes[:3]}...), which do not "
                    "stack into a batch: pad or truncate them to one length in dataset.map (e.g. the tokenizer's "
                    "padding='max_length', truncation=True), or group the tokens into blocks of one size.")
        return out[self.single] if self.single else out

    def item(self, i: int, epoch: int = 0) -> Any:
        row = self.rows[i]
        return row[self.single] if self.single else row


def _dtypes(feature: Any) -> Iterator[str]:
    """The leaf dtypes of a 🤗 feature (Value, List/Sequence, dicts of them, arrays)."""
    if isinstance(feature, Mapping):
        for f in feature.values():
            yield from _dtypes(f)
    elif isinstance(feature, list | tuple):
        for f in feature:
            yield from _dtypes(f)
    elif hasattr(feature, "feature"):
        yield from _dtypes(feature.feature)
    elif isinstance(getattr(feature, "dtype", None), str):
        yield feature.dtype


def _check(name: str, dataset: Any, columns: str | tuple[str, ...] | None) -> None:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the hf extra is installed in development
        raise ImportError("fd.from_hf needs the 🤗 datasets package: pip install 'fnlight[hf]'") from e
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"from_hf needs a map-style datasets.Dataset (random access by index), got an "
                        f"IterableDataset{f' for split {name!r}' if name != 'train' else ''}: load it without "
                        "streaming=True, or save it with save_to_disk and load_from_disk it.")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"from_hf needs a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    wanted = [columns] if isinstance(columns, str) else list(columns or dataset.column_names)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise ValueError(f"from_hf: no column {missing[0]!r} in the dataset (split {name!r}); its columns are "
                         f"{dataset.column_names}")
    for c in wanted:
        text = [d for d in _dtypes(dataset.features[c]) if d in _BYTES]
        if text:
            raise TypeError(
                f"from_hf: column {c!r} holds {text[0]} values, which are not tensors: tokenize or encode it first "
                f"(dataset.map(...)), or choose the tensor columns with from_hf(dataset, columns=[...]) "
                f"(columns: {dataset.column_names})")


def from_hf(dataset: Any, columns: str | Sequence[str] | None = None) -> FromHF:
    """A source over a 🤗 ``datasets.Dataset`` (map-style, Arrow-backed and memory-mapped, so
    it is read row by row as batches need, never whole), or a ``DatasetDict`` (its named splits).

    ``columns`` selects the columns (default: all): samples are dicts of tensors, or the tensor of
    one column when ``columns`` is a single name. Integer columns become int64 and float columns
    float32 (``datasets``' torch format); a text column must be tokenized first. The source is
    described by each dataset's own fingerprint (``dataset._fingerprint``, which 🤗 derives from
    the data and every transform applied to it), so the pipeline's fingerprint changes when the
    data does. (``load_from_disk`` derives a loaded dataset's fingerprint from the saved one: the
    same at every load, from any path, though not equal to that of the dataset before saving.)

    Example:
        ```python
        import datasets
        ds = datasets.load_from_disk("data/tokenized")  # e.g. columns input_ids, labels
        pipeline = fd.from_hf(ds, columns=["input_ids", "labels"]) >> fd.shuffle() >> fd.batch(8)
        ```
    """
    cols = columns if columns is None or isinstance(columns, str) else tuple(columns)
    if isinstance(dataset, Mapping):  # a DatasetDict
        if not dataset:
            raise ValueError("from_hf got an empty DatasetDict")
        splits = tuple((str(k), v) for k, v in dataset.items())
    else:
        splits = (("train", dataset),)
    for name, ds in splits:
        _check(name, ds, cols)
    return FromHF(splits, cols)
