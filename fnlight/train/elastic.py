"""Elastic resume: a mid-epoch data position that means the same on any number of ranks.

``shard()`` deals out one sequence S per epoch, identical on every rank: the epoch's samples (in
their shuffled order), or its batches when ``shard()`` comes after ``batch()``. Rank ``r`` of N
reads ``S[skip + r], S[skip + r + N], ...`` (``skip`` is 0 for an epoch read from its start),
in batches. When every rank has read ``p`` batches, the elements read are exactly the prefix
``S[: skip + N k]``, where ``k`` is the number of elements of a rank's share in its first ``p``
batches (``p B`` for ``shard() >> batch(B)``, ``p`` for ``batch() >> shard()``).

A checkpoint records, beside the position ``p``, ``{"world_size": N, "skip": skip, "consumed":
skip + N k}`` (``meta["data"]``). **The rule** on resuming on M ranks:

* M = N: the same ``skip``, from batch ``p``: the batches the uninterrupted run would have read.
* M != N: ``skip = consumed``, from batch 0: rank ``r`` reads ``S[consumed + r], S[consumed + r + M],
  ...``, which is what a fresh M-rank run whose epoch started at element ``consumed`` reads. No
  element of ``S[: consumed]`` is read again and every element of ``S[consumed:]`` is read, once
  (plus, as ``shard()`` always does, up to M - 1 padding repeats at the end of the epoch, or minus
  up to M - 1 with ``drop_remainder=True``). The next epoch is an ordinary M-rank epoch.

Samples per step change with M (each rank keeps its batch size), so the number of steps left in
the epoch changes too. The translation needs the rank's batches to be a prefix of its share:
``shard()`` must be the last stage that reorders (a ``shuffle()`` after it is refused with a clear
error when the number of ranks changes mid-epoch). A split without ``shard()`` (every rank reads
the whole epoch) keeps its position. ``limit_train_batches`` counts the batches of the remainder.

Example:
    ```python
    where = record(dm, "train", epoch=0, skip=0, done=3, world=2)   # in the checkpoint's meta
    skip, start = resume(where, position=3, dm=dm, split="train", world=3)
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..data import DataModule

__all__ = ["record", "resume"]


def _share_read(dm: DataModule, split: str, epoch: int, skip: int, done: int) -> int | None:
    """Elements of this rank's share read in its first ``done`` batches (None: no ``shard()``)."""
    plan = dm.plan(split)
    dealt = plan.dealt
    if dealt is None:
        return None
    before_batch, reorders = dealt
    if reorders:
        raise ValueError(
            f"split {split!r} reorders the samples after shard() (e.g. a shuffle() after it), so a mid-epoch position "
            "cannot be translated to another number of ranks: put shard() after every shuffle(), or resume on the "
            "number of ranks that wrote the checkpoint, or from an end-of-epoch checkpoint")
    if not before_batch:
        return done
    batches = plan.index_plan(epoch, skip)
    return min(done * batches.size, len(batches.samples))


def record(dm: DataModule, split: str, epoch: int, skip: int, done: int, world: int) -> dict[str, int]:
    """The data position to keep in a checkpoint after every rank read ``done`` batches of ``epoch``
    (whose first ``skip`` dealt elements were left out).

    Example:
        ```python
        meta["data"] = record(dm, "train", epoch, skip, done, fnlight.distributed.world_size())
        ```
    """
    try:
        k = _share_read(dm, split, epoch, skip, done) if done else 0
    except ValueError:
        k = None  # not translatable: only a resume on ``world`` ranks can use it (``resume`` says so)
    out = {"world_size": world, "skip": skip}
    if k is not None:
        out["consumed"] = skip + world * k
    return out


def resume(data: Mapping[str, Any] | None, position: int, dm: DataModule, split: str,
           world: int) -> tuple[int, int]:
    """``(skip, start)`` for ``dm.batches(split, epoch, start=start, skip=skip)`` on ``world`` ranks,
    from a checkpoint's ``meta["data"]`` and ``meta["position"]`` (see the module docstring for the rule).

    Example:
        ```python
        skip, start = resume(meta.get("data"), meta["position"], dm, "train", world_size())
        ```
    """
    if data is None or not position:  # a checkpoint of an epoch's end, or from before elastic resume
        return (int(data.get("skip", 0)) if data and position else 0), position
    written, skip = int(data["world_size"]), int(data.get("skip", 0))
    if written == world or dm.plan(split).dealt is None:
        return skip, position
    if "consumed" not in data:
        _share_read(dm, split, 0, 0, 1)  # raises the reason
        raise ValueError("this checkpoint's data position cannot be translated to another number of ranks")
    return int(data["consumed"]), 0
