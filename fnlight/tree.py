"""Thin helpers over optree for trees of tensors.

Every function here uses optree's ``"fnlight"`` namespace, so a custom batch
or state type registered with :func:`register_node` is seen by fnlight
everywhere (device placement, hashing, equality, caching).

Example:
    >>> import torch
    >>> t = {"x": torch.ones(2), "y": (torch.zeros(1), 3)}
    >>> tree_map(lambda v: v * 2 if isinstance(v, torch.Tensor) else v, t)["x"]
    tensor([2., 2.])
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch

__all__ = [
    "NAMESPACE",
    "batch_size",
    "device_put",
    "named_leaves",
    "register_node",
    "tree_equal",
    "tree_first_difference",
    "tree_flatten",
    "tree_hash",
    "tree_leaves",
    "tree_map",
    "tree_structure",
    "tree_unflatten",
]

NAMESPACE = "fnlight"
T = TypeVar("T")


def register_node(cls: type, flatten: Callable, unflatten: Callable) -> type:
    """Register a container type so fnlight's tree functions look inside it.

    ``flatten(obj) -> (children, aux)`` and ``unflatten(aux, children) -> obj``
    follow optree's protocol.

    Example:
        >>> class Pair:
        ...     def __init__(self, a, b): self.a, self.b = a, b
        >>> _ = register_node(Pair, lambda p: ((p.a, p.b), None), lambda _, c: Pair(*c))
        >>> tree_leaves(Pair(1, 2))
        [1, 2]
    """
    return optree.register_pytree_node(cls, flatten, unflatten, namespace=NAMESPACE)


def tree_map(fn: Callable[..., Any], tree: T, *rest: Any, is_leaf: Callable | None = None) -> T:
    """``fn`` applied to every leaf (and the matching leaves of ``rest``).

    Example:
        >>> tree_map(lambda a, b: a + b, (1, 2), (10, 20))
        (11, 22)
    """
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in a fixed order. Example: ``tree_leaves({"b": 1, "a": 2}) == [2, 1]``."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def tree_flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves and structure. Example: ``leaves, spec = tree_flatten((1, [2]))``."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def tree_unflatten(spec: optree.PyTreeSpec, leaves: list[Any]) -> Any:
    """Inverse of :func:`tree_flatten`. Example: ``tree_unflatten(spec, leaves)``."""
    return optree.tree_unflatten(spec, leaves)


def tree_structure(tree: Any) -> optree.PyTreeSpec:
    """The structure of ``tree`` without its leaves."""
    return optree.tree_structure(tree, namespace=NAMESPACE)


def device_put(tree: T, device: torch.device | str | None, non_blocking: bool = False) -> T:
    """Move every tensor leaf of ``tree`` to ``device`` (other leaves are kept).

    With ``non_blocking=True`` and a CUDA target, host tensors are first copied
    to pinned memory so the transfer can overlap with compute.

    Example:
        >>> device_put({"x": torch.ones(1)}, "cpu")["x"].device
        device(type='cpu')
    """
    if device is None:
        return tree
    device = torch.device(device)
    pin = non_blocking and device.type == "cuda"

    def put(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.device == device:
            return v
        if pin and v.device.type == "cpu" and not v.is_pinned():
            v = v.pin_memory()
        return v.to(device, non_blocking=non_blocking)

    return tree_map(put, tree)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    # Compare bit patterns so that NaN == NaN (same payload) and 0.0 != -0.0.
    if a.dtype.is_floating_point or a.dtype.is_complex:
        a, b = _as_bytes(a), _as_bytes(b)
    return bool(torch.equal(a, b))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def named_leaves(tree: Any, root: str = "tree") -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    """Leaves of ``tree`` with readable access paths (``root[0].params['w']``), and its structure."""
    if hasattr(optree, "tree_flatten_with_accessor"):  # optree >= 0.12
        accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
        return [a.codify(root) for a in accessors], leaves, spec
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    return [root + "".join(f"[{e!r}]" for e in p) for p in paths], leaves, spec


def _kind(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" + ("" if t.device.type == "cpu" else f"@{t.device}")


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


def _tensor_difference(x: torch.Tensor, y: torch.Tensor) -> str | None:
    if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
        return f"{_kind(x)} vs {_kind(y)}"
    if _bits_equal(x, y):
        return None
    xf, yf = x.detach().reshape(-1).cpu(), y.detach().reshape(-1).cpu()
    size = xf.element_size()
    neq = (_as_bytes(xf).view(-1, size) != _as_bytes(yf).view(-1, size)).any(1)
    where = neq.nonzero().reshape(-1)
    i = int(where[0])
    out = f"{_kind(x)}, {len(where)} of {xf.numel()} elements differ"
    if xf.dtype != torch.bool:
        wide = torch.complex128 if xf.is_complex() else torch.float64
        d = (xf[where].to(wide) - yf[where].to(wide)).abs()
        finite = d[~d.isnan()]
        if len(finite):
            out += f", max abs difference {float(finite.max()):.3g}"
        if len(finite) < len(d):
            out += f", NaN on one side only at {len(d) - len(finite)} of them"
    return out + f" (first at flat index {i}: {_num(xf[i].item())} vs {_num(yf[i].item())})"


def _leaf_difference(x: Any, y: Any) -> str | None:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return _tensor_difference(x, y)
    if type(x) is not type(y):
        return f"{type(x).__name__} {x!r} vs {type(y).__name__} {y!r}"
    if isinstance(x, float):  # bitwise, as tensors: NaN == NaN, 0.0 != -0.0
        if struct.pack("<d", x) == struct.pack("<d", y):
            return None
        diff = abs(x - y)
        return f"{x!r} vs {y!r}" + ("" if math.isnan(diff) else f" (abs difference {diff:.3g})")
    try:
        same = bool(x == y)
    except Exception:  # an object without a usable ==: identity
        same = x is y
    return None if same else f"{x!r} vs {y!r}"


def tree_first_difference(a: Any, b: Any, root: str = "tree") -> str | None:
    """``"<path>: <how they differ>"`` for the first leaf where ``a`` and ``b`` differ bitwise, or None.

    Tensors are compared by their bits (NaN equals NaN with the same payload,
    ``0.0`` differs from ``-0.0``), as are Python floats; the description gives
    dtype and shape, how many elements differ, by how much at most, and the first.

    Example:
        >>> tree_first_difference({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1.0])})
        "tree['w']: float32[2], 1 of 2 elements differ, max abs difference 1 (first at flat index 1: 0 vs 1)"
    """
    na, la, sa = named_leaves(a, root)
    _, lb, sb = named_leaves(b, root)
    if sa != sb:
        text = f"{root}: the structures differ: {sa} vs {sb}"
        return text if len(text) < 600 else text[:600] + "..."
    for name, x, y in zip(na, la, lb, strict=True):
        d = _leaf_difference(x, y)
        if d is not None:
            return f"{name}: {d}"
    return None


def tree_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two trees: same structure, dtypes, shapes, devices and bits.

    Example:
        >>> tree_equal((torch.tensor(float("nan")),), (torch.tensor(float("nan")),))
        True
        >>> tree_equal(torch.tensor(0.0), torch.tensor(-0.0))
        False
    """
    return tree_first_difference(a, b) is None


def tree_hash(tree: Any) -> str:
    """A sha256 hex digest of a tree's structure, dtypes, shapes and bytes.

    Stable across processes and machines of the same endianness; independent of
    device and memory layout (tensors are hashed as contiguous CPU bytes).

    Example:
        >>> tree_hash({"a": torch.zeros(2)}) == tree_hash({"a": torch.zeros(2)})
        True
    """
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace=NAMESPACE)
    h = hashlib.sha256()
    h.update(repr(spec).encode())
    for path, leaf in zip(paths, leaves, strict=True):
        h.update(repr(path).encode())
        if isinstance(leaf, torch.Tensor):
            h.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            h.update(struct.pack("<Q", leaf.numel()))
            h.update(_as_bytes(leaf.cpu()).numpy())  # buffer protocol: no copy
        else:
            h.update(f"{type(leaf).__qualname__}:{leaf!r}".encode())
    return h.hexdigest()


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor leaf of ``batch`` that has one: how many samples it holds.

    Example:
        >>> batch_size({"x": torch.zeros(8, 3), "y": torch.zeros(8)})
        8
    """
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("cannot tell the batch size: the batch has no tensor with a leading dimension")
