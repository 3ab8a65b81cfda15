"""Rank, world size and barriers over ``torch.distributed``.

Every function works whether or not a process group exists: without one the
process is rank 0 of a world of 1 and ``barrier`` returns at once, so code
written for several ranks runs unchanged in a single process.

Example:
    >>> rank(), world_size()
    (0, 1)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .tree import tree_flatten, tree_unflatten

T = TypeVar("T")

__all__ = ["all_gather_cat", "all_reduce_mean", "all_reduce_sum", "all_true", "any_true", "barrier", "broadcast",
           "broadcast_object", "free_port", "init", "is_initialized", "local_rank", "rank", "world_size"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on ``host``, for a rendezvous (``MASTER_PORT``).

    It is drawn below the kernel's ephemeral range: a port from that range can
    be handed to a client socket in the meantime, and a rank connecting to a
    rendezvous port that is not listening yet can then connect to itself (a
    TCP self-connection), which makes the rendezvous fail at random.

    Example:
        >>> os.environ["MASTER_PORT"] = str(free_port())
    """
    import random
    import socket

    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


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


def init(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Start the default process group from torchrun's environment variables.

    The backend is ``nccl`` when CUDA is available and ``gloo`` otherwise.
    Calling it again, or without torchrun's variables (a single process), is a no-op.
    ``timeout_s`` (default: ``$FNLIGHT_DIST_TIMEOUT`` or 300) bounds how long a
    collective waits for the other ranks: if one dies, the others fail with an
    error within about that time instead of hanging (with gloo, usually at once:
    the dead peer's connection closes).

    Example:
        >>> init()          # in a script launched by `torchrun --nproc-per-node 2`
    """
    if is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if timeout_s is None:
        timeout_s = float(os.environ.get("FNLIGHT_DIST_TIMEOUT", "300"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective ends the process
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


#: Largest all-reduce message (bytes): a big model's gradients go in a few buckets of
#: this size, launched together, rather than in one huge temporary copy.
BUCKET_BYTES = 64 << 20


def _buckets(leaves: list[Any], bucket_bytes: int) -> list[list[int]]:
    """Indices of the tensor leaves grouped by dtype and device, cut into buckets of at most ``bucket_bytes``."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            groups.setdefault((leaf.dtype, leaf.device), []).append(i)
    out = []
    for idx in groups.values():
        bucket, size = [], 0
        for i in idx:
            nbytes = leaves[i].numel() * leaves[i].element_size()
            if bucket and size + nbytes > bucket_bytes:
                out.append(bucket)
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
        out.append(bucket)
    return out


def _flat_collective(tree: T, run: Any, bucket_bytes: int, divide_by: int = 1) -> T:
    """Apply ``run(flat) -> work`` (an async collective, in place) to flat buckets of the tree's
    tensors, then divide each bucket by ``divide_by``."""
    leaves, spec = tree_flatten(tree)
    out: list[Any] = list(leaves)
    pending = []
    for idx in _buckets(leaves, bucket_bytes):
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
        pending.append((idx, flat, run(flat)))
    for idx, flat, work in pending:
        if work is not None:
            work.wait()
        if divide_by != 1:
            flat /= divide_by
        for i, part in zip(idx, flat.split([leaves[i].numel() for i in idx]), strict=True):
            out[i] = part.view_as(leaves[i])
    return tree_unflatten(spec, out)


def all_reduce_mean(tree: T, *, bucket_bytes: int = BUCKET_BYTES) -> T:
    """The mean of a tree of tensors across ranks: one flat all-reduce per dtype
    (per bucket of ``bucket_bytes`` for big trees, all buckets in flight at once).

    Returns new tensors; the input tree is not changed. Without a process group
    (or with one rank) the tree is returned as it is.

    Example:
        ```python
        grads = all_reduce_mean(grads)   # inside a train step
        ```
    """
    n = world_size()
    if n == 1:
        return tree
    leaves = tree_flatten(tree)[0]
    bad = sorted({str(t.dtype) for t in leaves if isinstance(t, torch.Tensor) and not t.is_floating_point()
                  and not t.is_complex()})
    if bad:
        raise TypeError(f"all_reduce_mean averages floating-point tensors; the tree holds {bad} ones: "
                        "leave them out (or convert them) before averaging")

    def run(flat: torch.Tensor) -> Any:
        return dist.all_reduce(flat, async_op=True)

    return _flat_collective(tree, run, bucket_bytes, divide_by=n)


def broadcast(tree: T, src: int = 0, *, bucket_bytes: int = BUCKET_BYTES) -> T:
    """Rank ``src``'s values of a tree of tensors, on every rank (flat, per dtype).

    Every rank must pass a tree of the same structure, shapes and dtypes. Used
    to start all ranks from the same state. Without a process group the tree
    is returned as it is.

    Example:
        ```python
        state = broadcast(state)      # every rank now holds rank 0's state
        ```
    """
    if world_size() == 1:
        return tree

    def run(flat: torch.Tensor) -> Any:
        return dist.broadcast(flat, src, async_op=True)

    return _flat_collective(tree, run, bucket_bytes)


def _collective_device() -> torch.device:
    """Where small host values go for a collective: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sums of a list of numbers across ranks, in one float64 all-reduce.

    Used for metrics: ranks all-reduce ``[sum_1 * n, ..., n]`` and divide, which gives
    means weighted by batch size (Lightning's ``sync_dist``). Every rank must pass
    a list of the same length.

    Example:
        ```python
        total_loss, total_count = all_reduce_sum([loss_sum, count])
        ```
    """
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool) -> bool:
    """True when ``flag`` is true on some rank: decisions (stop, skip) that every rank must share.

    Example:
        ```python
        stop = any_true(stop)
        ```
    """
    return flag if world_size() == 1 else not all_true(not flag, _collective_device())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s value of a small picklable object, on every rank (e.g. a run directory).

    Example:
        ```python
        run_dir = broadcast_object(make_run_dir() if rank() == 0 else None)
        ```
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=_collective_device())
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0, in rank order (sizes along dim 0 may differ).

    Example:
        >>> all_gather_cat(torch.tensor([rank()]))     # in one process; on 2 ranks: tensor([0, 1])
        tensor([0])
    """
    n = world_size()
    if n == 1:
        return t
    sizes = [round(v) for v in all_reduce_sum([float(t.shape[0]) if r == rank() else 0.0 for r in range(n)])]
    longest = max(sizes)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


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
