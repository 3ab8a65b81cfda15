"""``windows``: language-model samples ``(x, y)`` cut from a sequence of tokens.

Sample ``i`` is the ``block_size + 1`` tokens from token ``i * stride`` on:
``x`` is the first ``block_size`` of them and ``y`` the last ``block_size`` (``x``
shifted by one), both int64, what ``nn.Embedding`` and ``cross_entropy`` take. A
sample is a function of its index alone, so shuffling and resuming stay exact.

Example:
    >>> import torch, fnlight.data as fd
    >>> p = fd.from_tensors(torch.arange(10)) >> fd.windows(3) >> fd.batch(8)
    >>> x, y = next(iter(fd.DataModule(p).batches("train")))
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .dataset import Dataset
from .read_tokens import TokenDataset
from .stage import Context, Plans, SplitPlan, Stage, Where


def num_windows(n: int, block_size: int, stride: int) -> int:
    """Whole windows of ``block_size + 1`` tokens, ``stride`` apart, in ``n`` tokens."""
    return (n - block_size - 1) // stride + 1 if n >= block_size + 1 else 0


class WindowDataset(Dataset):
    """Windows of ``tokens`` (a dataset whose samples are integer scalars)."""

    def __init__(self, tokens: Dataset, block_size: int, stride: int):
        self.tokens, self.block_size, self.stride = tokens, block_size, stride
        self._n = num_windows(len(tokens), block_size, stride)
        self._offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return self._n

    def gather(self, idx: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (idx * self.stride)[:, None] + self._offsets
        if isinstance(self.tokens, TokenDataset):  # straight from the memory map, one read per batch
            w = self.tokens.take(positions)
        else:
            w = self.tokens.gather(positions.flatten(), epoch).to(torch.int64).view(positions.shape)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def item(self, i: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.gather(torch.tensor([i]), epoch)
        return x[0], y[0]


def _check_tokens(ds: Dataset, split: str) -> None:
    """The samples must be integer scalars (token ids)."""
    if isinstance(ds, TokenDataset) or len(ds) == 0:
        return
    first = ds.gather(torch.tensor([0]))
    if not isinstance(first, torch.Tensor) or first.dim() != 1:
        shape = tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ValueError(
            f"windows() cuts windows from a sequence of tokens, but the samples of split {split!r} are "
            f"{shape}, not single token ids. Start from read_tokens(path) or from_tensors(tokens) with "
            "a 1-D tensor of token ids."
        )
    if first.dtype.is_floating_point or first.dtype.is_complex or first.dtype == torch.bool:
        raise ValueError(f"windows() needs integer token ids, but split {split!r} holds {first.dtype} values.")


@dataclass(frozen=True)
class Windows(Stage):
    name: ClassVar[str] = "windows"
    block_size: int
    stride: int  # resolved by windows(): windows(8) and windows(8, stride=8) share a fingerprint

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        if any(s.name == "split" for s in where.prefix.stages):
            raise ValueError(
                "windows() comes after split(), which scatters single tokens at random among the "
                "splits: windows would join tokens that are not neighbours. Put windows() before "
                "split() (whole windows are then split: read_tokens(path) >> windows(256) >> "
                "split({'train': 0.9, 'val': 0.1})), or give each split its own file "
                "(read_tokens(train='train.bin', val='val.bin') >> windows(256))."
            )
        def update(plan: SplitPlan) -> SplitPlan:
            plan.check_before_order("windows")
            if plan.batch is not None or plan.host_post or plan.device_post:
                raise ValueError("windows() must come before batch().")
            n = len(plan.dataset)
            if n < self.block_size + 1:
                raise ValueError(
                    f"windows(block_size={self.block_size}) needs at least {self.block_size + 1} tokens "
                    f"(x and, shifted by one, y), but split {plan.name!r} has {n}; use a smaller "
                    "block_size or more data."
                )
            _check_tokens(plan.dataset, plan.name)
            return plan.replace(dataset=WindowDataset(plan.dataset, self.block_size, self.stride))

        return {k: update(p) for k, p in plans.items()}


def windows(block_size: int, stride: int | None = None) -> Windows:
    """Language-model samples ``(x, y)``: ``block_size`` tokens and the same shifted by one.

    Sample ``i`` starts at token ``i * stride`` (``stride`` defaults to
    ``block_size``: windows that do not overlap, nanoGPT's tokens apart from the
    one ``y`` shares with the next ``x``); ``x`` and ``y`` are int64 of shape
    ``(block_size,)``. A sequence of ``n`` tokens gives
    ``(n - block_size - 1) // stride + 1`` whole windows; the tokens after the
    last whole window are not used.

    It applies to every split and goes right after the source (or after
    token-wise transforms). Before ``split()`` the windows are split;
    ``split()`` before it is an error (it scatters single tokens), so give each
    split its own file instead. With ``stride < block_size`` windows overlap, so
    a ``split()`` after them shares tokens between its parts.

    Example:
        ```python
        p = read_tokens("train.bin") >> windows(256) >> shuffle() >> batch(64)
        p = read_tokens("train.bin") >> windows(256, stride=1)     # every start position
        ```
    """
    for what, v in (("block_size", block_size), ("stride", stride)):
        if v is None and what == "stride":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"windows() needs a positive int {what}, got {v!r}.")
    return Windows(block_size, block_size if stride is None else stride)
