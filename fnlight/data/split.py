"""``split``: partition a dataset into named parts, deterministically from a seed.

Example:
    >>> import torch, fnlight.data as fd
    >>> p = fd.from_tensors(torch.arange(10)) >> fd.split({"train": 0.8, "val": 0.2}, seed=0)
    >>> {k: len(v.dataset) for k, v in p.build(fd.Context()).items()}
    {'train': 8, 'val': 2}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import random as fr
from .dataset import Dataset, SubsetDataset
from .stage import Context, Plans, SplitPlan, Stage, Where


def _largest_remainder(fractions: list[float], n: int) -> list[int]:
    """Integer counts summing to ``n``, each the floor or ceiling of ``f * n``."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _stratified_counts(fractions: list[float], class_sizes: list[int], n: int) -> list[list[int]]:
    """Per class and part, the floor or ceiling of ``fraction * class_size``, with part
    totals equal to the unstratified split's whenever such a table exists.

    Each class hands its leftover samples (after the floors) to the parts that
    still miss the most, one per part: the greedy construction of Gale and Ryser,
    which finds a 0-1 table with given row and column sums when one exists.
    """
    totals = _largest_remainder(fractions, n)
    table = [[math.floor(f * size) for f in fractions] for size in class_sizes]
    deficit = [t - sum(row[p] for row in table) for p, t in enumerate(totals)]
    order = sorted(range(len(class_sizes)), key=lambda c: -(class_sizes[c] - sum(table[c])))
    for c in order:
        leftover = class_sizes[c] - sum(table[c])
        frac = [f * class_sizes[c] - table[c][p] for p, f in enumerate(fractions)]
        # only parts with a fractional share may round up (then |count - share| < 1 stays true)
        candidates = [p for p in range(len(fractions)) if frac[p] > 0]
        parts = sorted(candidates, key=lambda p: (-deficit[p], -frac[p], p))[:leftover]
        for p in parts:
            table[c][p] += 1
            deficit[p] -= 1
    return table


def _labels(ds: Dataset, by: Any) -> torch.Tensor:
    everything = ds.gather(torch.arange(len(ds)))
    labels = by(everything) if callable(by) else everything[by]
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != len(ds):
        raise ValueError(f"stratify_by must give one label per sample, got shape {tuple(labels.shape)}")
    return labels


@dataclass(frozen=True)
class Split(Stage):
    name: ClassVar[str] = "split"
    parts: tuple[tuple[str, float | int], ...]
    seed: int = 0
    stratify_by: int | str | Callable[[Any], Any] | None = None
    of: str | None = None

    @property
    def by_count(self) -> bool:
        return all(isinstance(v, int) for _, v in self.parts)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["parts"] = [[k, v] for k, v in self.parts]  # ordered: the order decides who gets which samples
        return out

    def assign(self, n: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
        """The sorted sample indices of each part."""
        names = [k for k, _ in self.parts]
        values = [v for _, v in self.parts]
        if self.by_count:
            if sum(values) != n:
                raise ValueError(
                    f"split counts {dict(self.parts)} sum to {sum(values)}, but the dataset has "
                    f"{n} samples; make them sum to {n} or use fractions."
                )
            fractions = [v / n for v in values] if n else [0.0] * len(values)
        else:
            fractions = [float(v) for v in values]
        perm = fr.permutation(fr.key(self.seed), n)
        chunks: list[list[torch.Tensor]] = [[] for _ in names]
        if labels is None:
            counts = values if self.by_count else _largest_remainder(fractions, n)
            for c, part in zip(chunks, perm.split(counts), strict=True):
                c.append(part)
        else:
            permuted = labels[perm]
            members = [perm[permuted == cls] for cls in torch.unique(permuted)]
            table = _stratified_counts(fractions, [m.numel() for m in members], n)
            for m, counts in zip(members, table, strict=True):
                for c, part in zip(chunks, m.split(counts), strict=True):
                    c.append(part)
        out = [torch.sort(torch.cat(c)).values for c in chunks]
        for name, idx in zip(names, out, strict=True):
            if idx.numel() == 0:
                raise ValueError(
                    f"split part {name!r} would be empty ({dict(self.parts)[name]} of {n} samples); "
                    "give it a larger share or use more data."
                )
        return out

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        of = self.of
        if of is None:
            if len(plans) != 1:
                raise ValueError(
                    f"split() needs of= to say which split to divide; the pipeline has {sorted(plans)}."
                )
            (of,) = plans
        if of not in plans:
            raise ValueError(f"split(of={of!r}) names an unknown split; the pipeline has {sorted(plans)}.")
        plan = plans[of]
        plan.check_before_order("split")
        if plan.random_stage is not None:
            raise ValueError(
                f"split() comes after the random stage {plan.random_stage}; put split() first so "
                "each sample's randomness is indexed within its own split."
            )
        clash = [k for k, _ in self.parts if k in plans and k != of]
        if clash:
            raise ValueError(f"split() would create {clash}, which already exist; choose other names.")
        labels = _labels(plan.dataset, self.stratify_by) if self.stratify_by is not None else None
        parts = self.assign(len(plan.dataset), labels)
        new: Plans = {}
        for k, p in plans.items():
            if k != of:
                new[k] = p
                continue
            for (name, _), idx in zip(self.parts, parts, strict=True):
                new[name] = SplitPlan(name, SubsetDataset(plan.dataset, idx))
        return new


def split(parts: Mapping[str, float | int], seed: int = 0, stratify_by: Any = None,
          of: str | None = None) -> Split:
    """Partition the data into named parts: disjoint, covering, deterministic given ``seed``.

    Args:
        parts: name -> fraction (floats summing to 1) or name -> count (ints
            summing to the dataset's length). Fractions are rounded so that
            every part gets the floor or ceiling of its share.
        seed: the split's own seed (independent of the DataModule's seed, so
            changing the training seed never moves samples between splits).
        stratify_by: keep class proportions (to within one sample per class per
            part): an index or key into each sample (``1`` for ``(x, y)``,
            ``"label"`` for dicts) or a function of a whole batch returning labels.
        of: which existing split to divide (default: the only one).

    Every part lists its indices in increasing order.

    Example:
        >>> s = split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
    """
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError("split() needs a non-empty mapping of part names to fractions or counts.")
    values = list(parts.values())
    for k, v in parts.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"split part {k!r} must be a fraction or a count, got {v!r}")
        if v < 0:
            raise ValueError(f"split part {k!r} is negative ({v}); fractions and counts must be >= 0.")
        if v == 0:
            raise ValueError(f"split part {k!r} would be empty (0); drop it or give it a share.")
    if not all(isinstance(v, int) for v in values):
        total = float(sum(values))
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions {dict(parts)} sum to {total:g}, not 1; make them sum to 1 "
                "(or give integer counts)."
            )
        if any(v > 1 for v in values):
            raise ValueError(f"split fractions must be <= 1, got {dict(parts)}")
    elif stratify_by is not None:
        raise ValueError("stratify_by works with fractions; give fractions instead of counts.")
    return Split(tuple((str(k), v) for k, v in parts.items()), seed, stratify_by, of)
