"""``cache``: compute everything before it once, in memory or on disk.

On disk the data is stored as safetensors under
``<root>/cache/<fingerprint of the stages before it>/<split>.safetensors``,
written atomically (temp file, fsync, rename) under a file lock, so changing
any earlier hyperparameter gives a new cache instead of silently reusing an
old one. A pipeline whose fingerprint cannot be computed, or whose source's
content is not hashed (``from_torch``), cannot be cached on disk.

Example:
    >>> import torch, fnlight.data as fd
    >>> def slow(x): return x * 2
    >>> p = fd.from_tensors(torch.arange(8.0)) >> fd.transform(slow) >> fd.cache() >> fd.batch(4)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from filelock import FileLock

from .._io import fsync
from ..tree import tree_map
from .dataset import Dataset, TensorDataset
from .stage import Context, Plans, SplitPlan, Stage, Where, normalize_on, plans_for

_CHUNK = 8192


def materialize(ds: Dataset) -> Any:
    """Every element of ``ds`` (epoch 0) as one stacked pytree, gathered in chunks."""
    n = len(ds)
    parts = [ds.gather(torch.arange(i, min(i + _CHUNK, n))) for i in range(0, n, _CHUNK)]
    if len(parts) == 1:
        return parts[0]
    return tree_map(lambda *xs: torch.cat(xs), *parts)


def _encode(tree: Any, leaves: list[torch.Tensor]) -> Any:
    """A JSON structure for dict/tuple/list trees, collecting tensor leaves in order."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return len(leaves) - 1
    if isinstance(tree, dict):
        return {"dict": {str(k): _encode(v, leaves) for k, v in tree.items()}}
    if isinstance(tree, (tuple, list)) and type(tree) in (tuple, list):
        return {type(tree).__name__: [_encode(v, leaves) for v in tree]}
    raise TypeError(
        f"cache('disk') stores trees of dicts, tuples and lists of tensors; found "
        f"{type(tree).__name__}. Use cache() in memory for other batch types."
    )


def _decode(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(spec, int):
        return tensors[str(spec)]
    (kind, body), = spec.items()
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in body.items()}
    items = [_decode(v, tensors) for v in body]
    return tuple(items) if kind == "tuple" else items


def _write_atomic(path: Path, data: Any) -> None:
    from safetensors.torch import save_file

    leaves: list[torch.Tensor] = []
    spec = _encode(data, leaves)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({str(i): t.contiguous() for i, t in enumerate(leaves)}, str(tmp),
                  metadata={"fnlight_tree": json.dumps(spec)})
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        spec = json.loads(f.metadata()["fnlight_tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return _decode(spec, tensors)


@dataclass(frozen=True)
class Cache(Stage):
    name: ClassVar[str] = "cache"
    where: Literal["memory", "disk"] = "memory"
    on: str | tuple[str, ...] | None = None

    @property
    def prepares_by_building(self) -> bool:  # type: ignore[override]
        return self.where == "disk"

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name}  # caching never changes the values

    def cache_dir(self, ctx: Context, where: Where) -> Path:
        src = where.prefix.stages[0]
        if not getattr(src, "content_hashed", True):
            raise ValueError(
                f"cache('disk') is keyed by the pipeline's fingerprint, but the source "
                f"{src.name}() does not hash its content, so a changed dataset could silently "
                "reuse a stale cache. Use cache() in memory, or a source that hashes its data."
            )
        return ctx.root / "cache" / where.prefix.fingerprint

    def build(self, plans: Plans, ctx: Context, where: Where) -> Plans:
        directory = self.cache_dir(ctx, where) if self.where == "disk" else None

        def update(plan: SplitPlan) -> SplitPlan:
            plan.check_before_order("cache")
            if plan.batch is not None or plan.host_post or plan.device_post:
                raise ValueError("cache() must come before batch().")
            if plan.random_stage is not None:
                raise ValueError(
                    f"cache() after the random stage {plan.random_stage} would freeze its "
                    "randomness at epoch 0; move cache() before the random transform."
                )
            if directory is None:
                return plan.replace(dataset=TensorDataset(materialize(plan.dataset)))
            path = directory / f"{plan.name}.safetensors"
            if not path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                with FileLock(str(path) + ".lock"):
                    if not path.exists():
                        _write_atomic(path, materialize(plan.dataset))
            return plan.replace(dataset=TensorDataset(_read(path)))

        return plans_for("cache", self.on, plans, update)


def cache(where: Literal["memory", "disk"] = "memory", on: str | tuple[str, ...] | None = None) -> Cache:
    """Materialize the stages before it once (see the module docstring).

    Example:
        >>> p = download_stage >> split({"train": 0.9, "val": 0.1}) >> transform(decode) >> cache("disk")
    """
    if where not in ("memory", "disk"):
        raise ValueError(f"cache(where=...) is 'memory' or 'disk', got {where!r}")
    return Cache(where, normalize_on(on))
