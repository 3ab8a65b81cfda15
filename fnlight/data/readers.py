"""Readers turn a file into a dataset (or named splits). They are frozen,
describable values handed to ``download(..., read=...)``.

Example:
    >>> import fnlight.data as fd
    >>> fd.read_csv(label=-1).describe()["reader"]
    'read_csv'
"""

from __future__ import annotations

import dataclasses
import gzip
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .dataset import Dataset, Splits, TensorDataset


class Reader:
    """Base of readers: ``reader(path) -> Dataset | Splits``."""

    name: ClassVar[str] = "reader"

    def __call__(self, path: Path) -> Dataset | Splits:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        from .describe import describe_value

        out: dict[str, Any] = {"reader": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = describe_value(getattr(self, f.name))
        return out


def _open(path: Path) -> Any:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gz else open(path)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use a torch dtype such as 'float32' or 'int64'")
    return dt


@dataclass(frozen=True)
class ReadCsv(Reader):
    name: ClassVar[str] = "read_csv"
    label: int | None = -1
    dtype: str = "float32"
    label_dtype: str = "int64"
    delimiter: str = ","
    skip_rows: int = 0

    def __call__(self, path: Path) -> Dataset:
        with _open(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on empty input; we raise below
            try:
                table = np.loadtxt(f, delimiter=self.delimiter, skiprows=self.skip_rows,
                                   dtype=np.float64, ndmin=2)
            except ValueError as e:
                raise ValueError(f"{path}: not a numeric CSV table ({e}); set skip_rows= for "
                                 "a header or delimiter= for another separator") from None
        if table.shape[0] == 0:
            raise ValueError(f"{path}: the CSV file has no rows")
        values = torch.from_numpy(table)
        if self.label is None:
            return TensorDataset(values.to(_dtype(self.dtype)))
        ncol = values.shape[1]
        if ncol < 2:
            raise ValueError(f"{path}: a label column needs at least one feature column besides it, "
                             f"but the file has {ncol} column; use read_csv(label=None)")
        if not -ncol <= self.label < ncol:
            raise ValueError(f"{path}: label column {self.label} does not exist (the file has {ncol} columns)")
        col = self.label % ncol
        keep = [c for c in range(ncol) if c != col]
        x = values[:, keep].to(_dtype(self.dtype))
        y = values[:, col].to(_dtype(self.label_dtype))
        return TensorDataset((x, y))


def read_csv(label: int | None = -1, dtype: str | torch.dtype = "float32",
             label_dtype: str | torch.dtype = "int64", delimiter: str = ",",
             skip_rows: int = 0) -> ReadCsv:
    """Read a numeric CSV file (plain or gzip) into samples ``(features, label)``.

    ``label`` is the label's column (negative counts from the end) or None for
    features only. Example: ``fd.download(url, sha256=..., read=fd.read_csv(label=-1))``.
    """
    return ReadCsv(label, str(_dtype(dtype)).removeprefix("torch."),
                   str(_dtype(label_dtype)).removeprefix("torch."), delimiter, skip_rows)


def _select(arrays: Mapping[str, torch.Tensor], keys: tuple[str, ...] | None, path: Path) -> Dataset:
    if keys is None:
        return TensorDataset(dict(arrays))
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"{path}: no arrays named {missing}; the file has {sorted(arrays)}")
    data = tuple(arrays[k] for k in keys)
    return TensorDataset(data[0] if len(data) == 1 else data)


def _read_arrays(arrays: Mapping[str, torch.Tensor], keys: tuple[str, ...] | None,
                 splits: tuple[tuple[str, tuple[str, ...]], ...] | None, path: Path) -> Dataset | Splits:
    if splits is not None:
        return Splits({name: _select(arrays, ks, path) for name, ks in splits})
    return _select(arrays, keys, path)


def _keys(keys: Sequence[str] | str | None) -> tuple[str, ...] | None:
    return (keys,) if isinstance(keys, str) else (tuple(keys) if keys is not None else None)


def _splits(splits: Mapping[str, Sequence[str] | str] | None) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if splits is None:
        return None
    return tuple((name, _keys(ks)) for name, ks in splits.items())  # type: ignore[misc]


def _array_to_tensor(a: np.ndarray, name: str, path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(a))
    except TypeError:
        raise TypeError(f"{path}: array {name!r} has dtype {a.dtype}, which has no torch "
                        "equivalent; store numbers") from None


@dataclass(frozen=True)
class ReadNpz(Reader):
    name: ClassVar[str] = "read_npz"
    keys: tuple[str, ...] | None = None
    splits: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def __call__(self, path: Path) -> Dataset | Splits:
        try:
            z = np.load(path, allow_pickle=False)  # never unpickle downloaded data
        except ValueError as e:
            raise ValueError(f"{path}: refused to read ({e})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not an .npz archive (a single .npy array?); save it with np.savez")
        with z:
            arrays = {k: _array_to_tensor(z[k], k, path) for k in z.files}
        return _read_arrays(arrays, self.keys, self.splits, path)


def read_npz(keys: Sequence[str] | str | None = None,
             splits: Mapping[str, Sequence[str] | str] | None = None) -> ReadNpz:
    """Read a numpy ``.npz`` archive (pickles are refused).

    ``keys=("x", "y")`` yields samples ``(x[i], y[i])``; no keys yields dicts of
    every array; ``splits={"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}``
    yields named splits. Example: ``fd.download(url, sha256=..., read=fd.read_npz(("x", "y")))``.
    """
    return ReadNpz(_keys(keys), _splits(splits))


@dataclass(frozen=True)
class ReadSafetensors(Reader):
    name: ClassVar[str] = "read_safetensors"
    keys: tuple[str, ...] | None = None
    splits: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def __call__(self, path: Path) -> Dataset | Splits:
        from safetensors.torch import load_file

        return _read_arrays(load_file(str(path)), self.keys, self.splits, path)


def read_safetensors(keys: Sequence[str] | str | None = None,
                     splits: Mapping[str, Sequence[str] | str] | None = None) -> ReadSafetensors:
    """Read a ``.safetensors`` file; ``keys`` and ``splits`` as in :func:`read_npz`.

    Example: ``fd.download(url, sha256=..., read=fd.read_safetensors(("x", "y")))``.
    """
    return ReadSafetensors(_keys(keys), _splits(splits))
