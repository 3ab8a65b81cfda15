"""What torch does not do under ``vmap``, for the vectorized steps (:mod:`fnlight.train.ensemble`,
:mod:`fnlight.train.dp`): a member's (or sample's) loss from explicit values, and two fixes.

- ``torch._foreach_*`` ops (fnlight's optimizers are written with them) have no
  batching rule; inside the vectorized parts they run as the same per-tensor ops,
  which is what the foreach kernels compute on the CPU.
- Dropout draws from torch's global generator, which under ``vmap`` would make a
  member's masks depend on the other members. Inside these steps ``F.dropout``
  (``nn.Dropout``) draws its mask from the member's (or sample's) own key with
  :func:`fnlight.random.bernoulli`, so a member's result depends only on its own
  state and key. Any other random op raises a clear error (draw from the ``key``
  given to ``loss_fn`` instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from .. import random as fr
from .step import Precision, TorchFuncTrapError

_VALUE_OPS = {"addcmul", "addcdiv"}
# in-place ops without a batching rule in torch 2.13 (vmap warns and runs them member by member)
_NO_INPLACE_BATCHING = {"lerp_", "addcmul_", "addcdiv_"}  # their scalar argument is keyword-only on the per-tensor op


def _foreach_as_loop(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch._foreach_<op>(xs, ...)`` as the per-tensor ops (what it computes on the CPU)."""
    xs = args[0]
    n = len(xs)

    def at(a: Any, i: int) -> Any:
        return a[i] if isinstance(a, list | tuple) and len(a) == n else a

    base = op.rstrip("_")
    if base == "norm":
        ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
        return [torch.linalg.vector_norm(x, ord_) for x in xs]
    if base == "copy":
        for x, src in zip(xs, args[1], strict=True):
            x.copy_(src)
        return None
    rest = list(args[1:])
    if base in _VALUE_OPS and len(rest) == 3:
        kwargs = {**kwargs, "value": rest.pop()}
    out = []
    for i, x in enumerate(xs):
        a = [at(r, i) for r in rest]
        k = {key: at(v, i) for key, v in kwargs.items()}
        if base in _VALUE_OPS and isinstance(k.get("value"), torch.Tensor):
            value = k.pop("value")  # a tensor scalar: the per-tensor op takes a number
            t1, t2 = a
            prod = t1 * t2 if base == "addcmul" else t1 / t2
            out.append(getattr(torch.Tensor, "add_" if op.endswith("_") else "add")(x, prod * value))
            continue
        if op in _NO_INPLACE_BATCHING:  # vmap would loop over the members: the out-of-place op, copied in
            out.append(x.copy_(getattr(torch.Tensor, base)(x, *a, **k)))
            continue
        out.append(getattr(torch.Tensor, op)(x, *a, **k))
    return None if op.endswith("_") else out


_FOREACH = {getattr(torch, name): name[len("_foreach_"):] for name in dir(torch) if name.startswith("_foreach_")}


class Vectorizable(TorchFunctionMode):
    """Inside an ensemble/per-sample step: foreach ops as loops, dropout from per-member keys."""

    def __init__(self, key: torch.Tensor | None):
        super().__init__()
        self.key, self.calls = key, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op = _FOREACH.get(func)
        if op is not None:
            return _foreach_as_loop(op, args, kwargs)
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        return func(*args, **kwargs)

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return input
        if p == 1.0:
            return input.mul_(0) if inplace else input * 0
        if self.key is None:
            raise TorchFuncTrapError("dropout needs a key here")
        k = fr.fold_in(self.key, self.calls)
        self.calls += 1
        keep = fr.bernoulli(k, 1.0 - p, tuple(input.shape))
        scale = 1.0 / (1.0 - p)
        return input.mul_(keep).mul_(scale) if inplace else input * keep * scale


_RANDOM_ADVICE = (
    "a random op ran inside a vectorized step ({what}). Each member (or sample) must draw from its own key: "
    "nn.Dropout / F.dropout are handled; draw other randomness from the `key` given to loss_fn with "
    "fnlight.random (e.g. fnlight.random.normal(key, shape)), and set attention dropout_p=0 or apply F.dropout "
    "to the attention weights.")


@contextlib.contextmanager
def explain_vmap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, OverflowError) as e:
        text = str(e)
        if "random operation while in randomness error mode" in text:
            raise TorchFuncTrapError(_RANDOM_ADVICE.format(what=what) + f"\n(torch said: {text.splitlines()[0]})") \
                from e
        if "too big to convert to int64_t" in text:
            raise TorchFuncTrapError(
                f"{what}: inductor cannot compile fnlight.random's int64 hash inside vmap (the keyed dropout masks): "
                "its index arithmetic overflows. Use compile={'backend': 'aot_eager'} (same results as eager), "
                f"compile=False, or a model without dropout.\n(torch said: {text.strip().splitlines()[-1]})") from e
        if "running_mean" in text or "were not batched" in text:
            raise TorchFuncTrapError(
                f"{what}: a buffer updated in place was not batched. Stack the states with fnlight.stack_states "
                f"so every member has its own buffers.\n(torch said: {text.splitlines()[0]})") from e
        raise


def _flatten(obj: Any) -> tuple[list[Any], Callable[[Iterator[Any]], Any]]:
    """Leaves and a rebuild function, for dicts, lists, tuples, NamedTuples and ``None``: plain Python,
    so that ``torch.compile`` traces it (optree's C++ structures are opaque to Dynamo). Anything else is a
    leaf; non-tensor leaves are carried as constants."""
    if obj is None:
        return [], lambda it: None
    if isinstance(obj, dict):
        keys = list(obj)
        parts = [_flatten(obj[k]) for k in keys]
        return [x for leaves, _ in parts for x in leaves], \
            lambda it: {k: build(it) for k, (_, build) in zip(keys, parts, strict=True)}
    if isinstance(obj, tuple | list):
        parts = [_flatten(v) for v in obj]
        leaves = [x for ls, _ in parts for x in ls]
        kind = type(obj)  # (the closures must not hold obj: its tensors would outlive the step)
        if hasattr(obj, "_fields"):  # NamedTuple
            return leaves, lambda it: kind(*(build(it) for _, build in parts))
        return leaves, lambda it: kind(build(it) for _, build in parts)
    return [obj], lambda it: next(it)


def vmap_tree(fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
    """``vmap`` over trees of dicts, lists, tuples and NamedTuples (``None`` and non-tensor leaves are
    constants): the tensors of argument ``j`` are mapped over their axis ``in_axes[j]`` (``None``: shared).
    torch's own ``vmap`` takes ``None`` leaves for tensors and refuses them."""

    def wrapped(*args: Any) -> Any:
        flat: list[torch.Tensor] = []
        dims: list[int | None] = []
        slots: list[list[Any]] = []
        builds = []
        for a, ax in zip(args, in_axes, strict=True):
            leaves, build = _flatten(a)
            builds.append(build)
            slots.append([None if isinstance(x, torch.Tensor) else x for x in leaves])
            for x in leaves:
                if isinstance(x, torch.Tensor):
                    flat.append(x)
                    dims.append(ax)
        box: dict[str, Any] = {}

        def inner(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            it = iter(tensors)
            rebuilt = [build(iter([next(it) if c is None else c for c in cs]))
                       for build, cs in zip(builds, slots, strict=True)]
            leaves, build = _flatten(fn(*rebuilt))
            box["build"], box["slots"] = build, [None if isinstance(x, torch.Tensor) else x for x in leaves]
            return tuple(x for x in leaves if isinstance(x, torch.Tensor))

        out = iter(vmap(inner, in_dims=tuple(dims), randomness="error")(*flat))
        return box["build"](iter([next(out) if c is None else c for c in box["slots"]]))

    return wrapped




class ModelFns:
    """``loss`` / ``metrics`` of one member (or sample) from explicit values, under the vectorizing mode."""

    def __init__(self, model: torch.nn.Module, precision: Precision):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            raise TypeError(f"got a {type(model).__name__}-wrapped module: pass the plain module (ddp.module)")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        self.model, self.precision = model, precision

    def run(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> Callable[..., Any]:
        def model_fn(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, (params, buffers), args, kwargs)
        return model_fn
