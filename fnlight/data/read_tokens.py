"""``read_tokens``: a raw binary token file as a source, memory-mapped, never read whole.

The file is nanoGPT's ``train.bin`` layout: the token ids one after another,
in native byte order, with no header (``np.array(ids, dtype=np.uint16).tofile(path)``).
Sample ``i`` is token ``i`` as an int64 scalar; :func:`~fnlight.data.windows`
turns the tokens into language-model samples.

Example:
    >>> import numpy as np, fnlight.data as fd
    >>> np.arange(100, dtype=np.uint16).tofile("/tmp/tokens.bin")
    >>> dm = fd.DataModule(fd.read_tokens("/tmp/tokens.bin") >> fd.windows(8) >> fd.batch(2))
    >>> x, y = next(iter(dm.batches("train")))
    >>> x.shape, y[0, :3].tolist()
    (torch.Size([2, 8]), [1, 2, 3])
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .dataset import Dataset, Splits
from .sources import Source
from .stage import DEFAULT_SPLIT, Context

#: Token dtypes a file may hold (numpy names; nanoGPT writes uint16).
DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "int64")
#: The fingerprint hashes this many evenly spaced blocks of a file ...
SAMPLE_BLOCKS = 32
#: ... of this many bytes each (files up to 32 x 64 KiB = 2 MiB are hashed whole).
SAMPLE_BYTES = 1 << 16


def check_token_file(path: Path, dtype: np.dtype) -> int:
    """The number of tokens in ``path``, or a clear error about what is wrong with it."""
    if not path.exists():
        raise FileNotFoundError(
            f"read_tokens: no token file at {path} (resolved: {path.resolve()}); write one with "
            "np.array(token_ids, dtype=np.uint16).tofile(path), as nanoGPT's prepare.py does."
        )
    if not path.is_file():
        raise IsADirectoryError(f"read_tokens: {path} is not a file; give the path of a .bin token file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"read_tokens: {path} is empty (0 bytes); it holds no tokens.")
    if size % dtype.itemsize:
        raise ValueError(
            f"read_tokens: {path} has {size} bytes, which is not a multiple of {dtype.itemsize} "
            f"(the size of one {dtype.name} token): is dtype={dtype.name!r} the dtype it was written "
            "with (nanoGPT writes uint16; vocabularies over 65536 tokens need uint32), and is the file whole?"
        )
    return size // dtype.itemsize


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size and :data:`SAMPLE_BLOCKS` evenly spaced blocks (the whole
    file when it is small): a fingerprint that costs 2 MiB of reading whatever the size."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):  # the first and the last block included
                f.seek((size - SAMPLE_BYTES) * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


class TokenDataset(Dataset):
    """The tokens of a raw binary file, memory-mapped: sample ``i`` is token ``i`` (int64).

    The map is opened on first use in each process (a worker process reopens it
    rather than receiving a copy), and reads touch only the pages they need. It
    is advised as random access (``MADV_RANDOM``): shuffled windows gain nothing
    from the kernel's read-ahead, which would read (and map) ~32 pages around
    each 2-page window (measured: 6x slower and 10x the resident pages).
    """

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._n = check_token_file(self.path, self.dtype)
        self._map: np.ndarray | None = None

    def tokens(self) -> np.ndarray:
        """The file as a read-only numpy array over a memory map (opened once per process)."""
        if self._map is None:
            with open(self.path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                m.madvise(mmap.MADV_RANDOM)
            self._map = np.frombuffer(m, dtype=self.dtype, count=self._n)
        return self._map

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}  # pickling a memmap would copy the whole file

    def __len__(self) -> int:
        return self._n

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return self.take(idx)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The tokens at ``positions`` (an int64 tensor of any shape), as int64."""
        out = self.tokens()[positions.numpy()]
        return torch.from_numpy(out.astype(np.int64, copy=False))

    def item(self, i: int, epoch: int = 0) -> torch.Tensor:
        return torch.tensor(int(self.tokens()[i]), dtype=torch.int64)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, dtype={self.dtype.name}, len={self._n})"


@dataclass(frozen=True)
class ReadTokens(Source):
    name: ClassVar[str] = "read_tokens"
    files: tuple[tuple[str, str], ...]  # (split name, path)
    dtype: str = "uint16"

    @property
    def content_hashed(self) -> bool:  # type: ignore[override]
        # Only files small enough to be hashed whole are identified by their full content.
        return all(Path(p).stat().st_size <= SAMPLE_BLOCKS * SAMPLE_BYTES for _, p in self.files)

    def load(self, ctx: Context) -> Dataset | Splits:
        datasets = {name: TokenDataset(Path(p), self.dtype) for name, p in self.files}
        if len(datasets) == 1 and DEFAULT_SPLIT in datasets:
            return datasets[DEFAULT_SPLIT]
        return Splits(datasets)

    def describe(self) -> dict[str, Any]:
        files = {}
        for name, p in self.files:
            path = Path(p)
            check_token_file(path, np.dtype(self.dtype))
            # the name and the content, not where the file lies: the same data on another
            # machine (or in another directory) has the same fingerprint
            files[name] = {"file": path.name, "bytes": path.stat().st_size, "sampled_sha256": sampled_sha256(path)}
        return {"stage": self.name, "dtype": self.dtype, "files": files}


def read_tokens(path: str | os.PathLike[str] | None = None, dtype: str = "uint16",
                **splits: str | os.PathLike[str]) -> ReadTokens:
    """A source over a raw binary token file (nanoGPT's ``train.bin``), memory-mapped.

    ``read_tokens("train.bin")`` gives the split ``"train"`` whose sample ``i``
    is token ``i`` (an int64 scalar); ``read_tokens(train="train.bin",
    val="val.bin")`` gives one split per file. The file is never read whole: a
    batch reads only the pages its tokens lie on, so a corpus larger than memory
    works. Follow it with :func:`~fnlight.data.windows` to make ``(x, y)`` samples.

    ``dtype`` is the token type the file was written with (``"uint16"`` by
    default, as nanoGPT; one of ``uint8, uint16, int16, uint32, int32, int64``).

    The fingerprint describes each file by its name, its size and a sha256 of 32
    evenly spaced 64 KiB blocks (files up to 2 MiB are hashed whole), so it
    costs the same for 1 MB and 100 GB. It changes when a file is re-tokenized
    or resized; an edit that keeps the size and falls between the sampled blocks
    is not seen, so ``cache("disk")`` refuses large token files (cache nothing
    there: the file is already on disk).

    Raises a clear error for a missing file, an empty one, or one whose size is
    not a multiple of the dtype's size.

    Example:
        ```python
        p = read_tokens("data/shakespeare_char/train.bin") >> windows(256) >> shuffle() >> batch(64)
        p = read_tokens(train="train.bin", val="val.bin", dtype="uint32") >> windows(1024)
        ```
    """
    if path is not None and splits:
        raise TypeError("read_tokens takes one path or named split files (train=..., val=...), not both.")
    if path is None and not splits:
        raise TypeError("read_tokens needs a path, e.g. read_tokens('train.bin').")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"read_tokens: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    named = {DEFAULT_SPLIT: path} if path is not None else splits
    files = tuple((name, os.fspath(p)) for name, p in named.items())
    for _, p in files:
        check_token_file(Path(p), np.dtype(dtype))  # a clear error now, not at the first batch
    return ReadTokens(files, dtype)
