"""``cache``: compute everything before it once, in memory or on disk.

On disk the data is stored as safetensors under
``<root>/cache/<fingerprint of the stages before it>/<split>.safetensors``,
written atomically (temp file, fsync, rename) under a file lock, so changing
any earlier hyperparameter gives a new cache instead of silently reusing an
old one. A pipeline whose fingerprint cannot be computed, or whose source's
content is not hashed (``from_torch``), cannot be cached on disk.

Each file records the sha256 of its tree and tensors (``fnlight_sha256`` in
its metadata) and is read into memory and verified: a truncated, damaged or
unverifiable file is rebuilt, with a warning naming it on the "fnlight"
logger; a file that is still damaged after being rebuilt is an error.

Example:
    >>> import torch, fnlight.data as fd
    >>> def slow(x): return x * 2
    >>> p = fd.from_tensors(torch.arange(8.0)) >> fd.transform(slow) >> fd.cache() >> fd.batch(4)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import struct
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
log = logging.getLogger("fnlight")


class CacheError(RuntimeError):
    """A disk cache file is damaged and rebuilding it did not help."""


class _Damaged(Exception):
    """A cache file that cannot be trusted (the reason is the message)."""


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


def _checksum(spec_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tree and of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(spec_json.encode())
    for name in sorted(tensors, key=int):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _write_atomic(path: Path, data: Any) -> None:
    from safetensors.torch import save_file

    leaves: list[torch.Tensor] = []
    spec = json.dumps(_encode(data, leaves))
    tensors = {str(i): t.contiguous() for i, t in enumerate(leaves)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"fnlight_tree": spec, "fnlight_sha256": _checksum(spec, tensors)})
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while writing the cache file {path}") from e
    except Exception as e:  # safetensors reports a full disk as its own error type: "... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        raise OSError(int(code[1]) if code else errno.EIO, f"cannot write the cache file {path}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read(path: Path) -> Any:
    """The verified tree in ``path`` (read into memory: independent of the file afterwards); _Damaged if not."""
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
        spec_json, recorded = meta["fnlight_tree"], meta["fnlight_sha256"]
        tensors = load(raw)
        if _checksum(spec_json, tensors) != recorded:
            raise _Damaged("its checksum does not match its content")
        return _decode(json.loads(spec_json), tensors)
    except _Damaged:
        raise
    except KeyError as e:
        raise _Damaged(f"it records no {e} (written by an older fnlight?)") from None
    except Exception as e:  # truncated, not safetensors, bad JSON, a tree naming a missing tensor...
        raise _Damaged(f"{type(e).__name__}: {e}") from None


def _load_or_build(path: Path, build: Any) -> Any:
    """The cached tree at ``path``, built (and written) when it is missing or damaged."""
    if path.exists():
        try:
            return _read(path)
        except _Damaged as e:
            log.warning("the cache file %s is damaged (%s): rebuilding it", path, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            return _read(path)  # another process may have built it while we waited for the lock
        except _Damaged:
            _write_atomic(path, build())
    try:
        return _read(path)
    except _Damaged as e:
        raise CacheError(f"the cache file {path} is damaged even after being rebuilt ({e}); check the disk, "
                         "or delete the file and run again") from None


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
            return plan.replace(dataset=TensorDataset(_load_or_build(path, lambda: materialize(plan.dataset))))

        return plans_for("cache", self.on, plans, update)


def cache(where: Literal["memory", "disk"] = "memory", on: str | tuple[str, ...] | None = None) -> Cache:
    """Materialize the stages before it once (see the module docstring).

    Example:
        ```python
        p = download_stage >> split({"train": 0.9, "val": 0.1}) >> transform(decode) >> cache("disk")
        ```
    """
    if where not in ("memory", "disk"):
        raise ValueError(f"cache(where=...) is 'memory' or 'disk', got {where!r}")
    return Cache(where, normalize_on(on))
