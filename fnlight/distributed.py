"""Rank, world size and barriers over ``torch.distributed``.

Every function works whether or not a process group exists: without one the
process is rank 0 of a world of 1 and ``barrier`` returns at once, so code
written for several ranks runs unchanged in a single process.

Example:
    >>> rank(), world_size()
    (0, 1)
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .tree import tree_flatten, tree_unflatten

T = TypeVar("T")

__all__ = ["all_reduce_mean", "all_true", "barrier", "init", "is_initialized", "local_rank", "rank", "world_size"]


def is_initialized() -> bool:
    """True when a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node, from torchrun's ``LOCAL_RANK`` (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait until every rank reaches this point (no-op without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def init(backend: str | None = None, timeout_s: float = 300.0) -> None:
    """Start the default process group from torchrun's environment variables.

    The backend is ``nccl`` when CUDA is available and ``gloo`` otherwise.
    Calling it again, or without torchrun's variables (a single process), is a no-op.

    Example:
        >>> init()          # in a script launched by `torchrun --nproc-per-node 2`
    """
    if is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce_mean(tree: T) -> T:
    """The mean of a tree of tensors across ranks, in one flat all-reduce per dtype.

    Without a process group (or with one rank) the tree is returned as it is.

    Example:
        >>> grads = all_reduce_mean(grads)   # inside a train step
    """
    if world_size() == 1:
        return tree
    leaves, spec = tree_flatten(tree)
    out: list[Any] = list(leaves)
    groups: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            groups.setdefault(leaf.dtype, []).append(i)
    n = world_size()
    for idx in groups.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
        flat /= n
        for i, part in zip(idx, flat.split([leaves[i].numel() for i in idx]), strict=True):
            out[i] = part.view_as(leaves[i])
    return tree_unflatten(spec, out)


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on every rank (``flag`` itself without a process group).

    Example:
        >>> all_true(True)
        True
    """
    if world_size() == 1:
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)
