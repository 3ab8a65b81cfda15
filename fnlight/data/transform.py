"""``transform``: a pure function applied to every sample, lazily.

A per-sample function ``fn(sample)``, or ``fn(sample, key)`` for a random one,
runs vectorized on whole batches with ``torch.func.vmap`` when it can (and in
a loop when vmap cannot trace it); ``batched=True`` functions take whole
batches (and a batch of keys) themselves. The randomness of sample ``i`` in
epoch ``e`` is ``fold_in(fold_in(stage_key, e), i)`` whatever the batch, so
batched and per-sample application draw the same numbers; for elementwise
functions the results are bitwise equal (matmuls and reductions may differ in
the last bits between batched and per-sample kernels: see ``vectorize``).

Placed before ``batch()``, a transform maps the dataset; placed after it, it
maps each collated batch (and after ``to_device()`` it runs on the device).

Example:
    >>> import torch, fnlight.data as fd, fnlight.random as fr
    >>> def flip(x, key):
    ...     return torch.where(fr.bernoulli(key, 0.5), x.flip(-1), x)
    >>> p = fd.from_tensors(torch.rand(8, 4)) >> fd.transform(flip) >> fd.batch(4)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import random as fr
from ..tree import tree_leaves, tree_map
from .dataset import MapDataset, index_of, stack_samples
from .stage import Context, Plans, SplitPlan, Stage, Where, normalize_on, plans_for


class TransformError(ValueError):
    """A transform function cannot be applied as written."""


def _takes_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` requires a second positional argument (the key).

    Parameters with defaults do not count: ``normalize(x, mean=0.5)`` is not random.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def _is_global_rng_error(e: Exception) -> bool:
    return isinstance(e, RuntimeError) and "randomness" in str(e) and "vmap" in str(e)


#: Above this many samples, per-sample keys are hashed per batch instead of
#: tabulated once per epoch (the table costs 8 bytes a sample).
KEY_TABLE_MAX = 1 << 22


def _on_device_of(keys: torch.Tensor, batch: Any) -> torch.Tensor:
    """Keys where the batch is (after to_device); the hashing gives the same values anywhere."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return keys.to(leaf.device, non_blocking=True)
    return keys


class _Mapper:
    """Applies one transform to batches and to single samples, identically."""

    def __init__(self, fn: Callable[..., Any], random: bool, batched: bool, vectorize: bool,
                 key: torch.Tensor | None, n: int, label: str):
        self.fn, self.random, self.batched, self.key, self.n, self.label = fn, random, batched, key, n, label
        self._vfn = torch.func.vmap(fn, randomness="error")
        self._vmap_ok: bool | None = None if vectorize else False  # else decided on the first batch
        # (epoch, epoch key, keys of every sample or None); replaced whole, so threads may share it
        self._epoch: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    def keys(self, idx: torch.Tensor | int, epoch: int) -> torch.Tensor:
        """``fold_in(fold_in(stage_key, epoch), idx)``, from a per-epoch table when it is small."""
        cached = self._epoch
        if cached is None or cached[0] != epoch:
            epoch_key = fr.fold_in(self.key, epoch)
            table = fr.fold_in(epoch_key, torch.arange(self.n)) if self.n <= KEY_TABLE_MAX else None
            cached = self._epoch = (epoch, epoch_key, table)
        if isinstance(idx, torch.Tensor) and cached[2] is not None:
            return cached[2][idx]
        return fr.fold_in(cached[1], idx)

    def on_batch(self, batch: Any, idx: torch.Tensor, epoch: int) -> Any:
        args = (batch, _on_device_of(self.keys(idx, epoch), batch)) if self.random else (batch,)
        if self.batched:
            return self._check_batched(self.fn(*args), len(idx))
        if self._vmap_ok is not False:
            try:
                out = self._vfn(*args)
            except Exception as e:
                if _is_global_rng_error(e):
                    raise TransformError(
                        f"{self.label} draws from torch's global random generator (torch.rand, "
                        "torch.randn, dropout, ...), which is neither reproducible nor per-sample. "
                        "Take a key, fn(sample, key), and draw with fnlight.random "
                        "(uniform(key, shape), bernoulli(key, p), ...)."
                    ) from e
                if self._vmap_ok:
                    raise
                self._vmap_ok = False  # vmap cannot trace it: fall back to a loop
            else:
                self._vmap_ok = True
                return out
        outs = [self.fn(*(index_of(a, j) for a in args)) for j in range(len(idx))]
        return stack_samples(outs, self.label)

    def on_item(self, sample: Any, i: int, epoch: int) -> Any:
        if self.batched:
            one = tree_map(lambda t: t.unsqueeze(0), sample)
            return index_of(self.on_batch(one, torch.tensor([i]), epoch), 0)
        return self.fn(sample, self.keys(i, epoch)) if self.random else self.fn(sample)

    def _check_batched(self, out: Any, n: int) -> Any:
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != n:
                got = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise TransformError(
                    f"{self.label} (batched=True) must return a batch with leading dimension {n}, "
                    f"got a leaf of shape {got}."
                )
        return out


@dataclass(frozen=True)
class Transform(Stage):
    name: ClassVar[str] = "transform"
    fn: Callable[..., Any]
    on: str | tuple[str, ...] | None = None
    batched: bool = False
    random: bool = False
    vectorize: bool = True

    @property
    def key_name(self) -> str:
        # Only random transforms count for keys: inserting a deterministic transform
        # must not change the randomness of the others.
        return "random_transform" if self.random else "transform"

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        label = f"transform({getattr(self.fn, '__qualname__', repr(self.fn))})"

        def update(plan: SplitPlan) -> SplitPlan:
            key = ctx.stage_key(where, plan.name) if self.random else None
            m = _Mapper(self.fn, self.random, self.batched, self.vectorize, key, len(plan.dataset), label)
            if plan.batch is not None:
                return plan.add_post(m.on_batch)
            rnd = plan.random_stage or (label if self.random else None)
            return plan.replace(dataset=MapDataset(plan.dataset, m.on_batch, m.on_item), random_stage=rnd)

        return plans_for("transform", self.on, plans, update)


def transform(fn: Callable[..., Any], on: str | tuple[str, ...] | None = None, batched: bool = False,
              random: bool | None = None, vectorize: bool = True) -> Transform:
    """Apply ``fn`` to every sample (or batch) of the named splits.

    Args:
        fn: ``fn(sample) -> sample``, or ``fn(sample, key) -> sample`` for random
            transforms (draw with ``fnlight.random``, never torch's global RNG).
        on: a split name or tuple of names (default: every split).
        batched: ``fn`` takes whole batches (and a 1-D tensor of keys).
        random: whether ``fn`` takes a key; by default, whether it requires two
            positional arguments.
        vectorize: run a per-sample ``fn`` with ``torch.func.vmap`` on whole
            batches (default). Elementwise functions give bitwise the same values
            either way; functions with matmuls or reductions may differ in the last
            bits between batched and per-sample kernels. ``vectorize=False`` always
            applies ``fn`` sample by sample, so values never depend on the batch.

    Example:
        >>> def normalize(x): return (x - 0.5) / 0.25
        >>> t = transform(normalize) >> transform(normalize, on="train")
    """
    if not callable(fn):
        raise TypeError(f"transform() needs a function, got {type(fn).__name__}.")
    return Transform(fn, normalize_on(on), batched, _takes_key(fn) if random is None else random, vectorize)
