"""The optimizer protocol, ``chain``, ``step`` and ``apply_updates`` (optax's shape), and the
helpers every transformation shares: trees of parameters, per-step scalars, the final
parameter update (written once, see :class:`Direction`).

A :class:`GradientTransformation` is a pair of pure functions:
``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``.
Parameters, gradients and updates are pytrees of tensors with the same structure
(a flat dict of names, as in ``TrainState.params``, nested dicts, lists, tuples,
NamedTuples); flat dicts take a fast path that never flattens them.

``update(..., inplace=True)`` is the donating variant: it may overwrite the
incoming updates and its own state tensors instead of allocating new ones
(what ``make_train_step(donate=True)`` uses). Both variants compute the same
values with the same kernels, so they agree bit for bit.

Why a third function beside optax's two: ``step(grads, state, params) -> (params,
state)``. torch.optim ends each optimizer with one op into the parameters
(``p.add_(d, alpha=-lr)``, ``p.addcdiv_(m, v, value=-step)``, Adam's fused kernel)
whose rounding an update added afterwards cannot reproduce, and which reads and writes
each parameter once instead of twice. ``step`` is that path; every optimizer has one,
and :func:`step` falls back to ``update`` + ``apply_updates`` for transformations
without it, so the protocol a user implements stays optax's ``init``/``update``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import optree
import torch

Params = Any  # a pytree of tensors (usually a flat dict of names)
Updates = Any
OptState = Any
Scalar = float | torch.Tensor  # a hyperparameter: a Python number or a 0-d tensor (see inject_hyperparams)


class UpdateFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Params | None = None, *,
                 inplace: bool = False) -> tuple[Updates, OptState]: ...


class StepFn(Protocol):
    def __call__(self, grads: Updates, state: OptState, params: Params, *,
                 inplace: bool = False) -> tuple[Params, OptState]: ...


class GradientTransformation(NamedTuple):
    """``init`` and ``update`` of an optimizer or a piece of one.

    Optimizers also carry ``step(grads, state, params) -> (params, state)``, the
    update applied to the parameters with torch.optim's own last op (see the module
    docstring), and their ``learning_rate`` schedule.

    ``per_tensor`` is True when the update of each tensor depends only on that tensor's
    gradient, parameter and state, and on scalars shared by all tensors (the update count,
    the learning rate, hyperparameters): no reduction across tensors (global-norm clipping),
    no rule that picks tensors by name (masks). Then a call on several models' tensors at
    once updates each model as a call on its own tensors would, bit for bit, which is how an
    ensemble step updates all its members in one call (``make_train_step(ensemble=True)``).

    Example:
        >>> import torch, fnlight.optim as fo
        >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3))
        >>> params = {"w": torch.zeros(3)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.ones(3)}, state, params)
        >>> params = fo.apply_updates(params, updates)
    """

    init: Callable[[Params], OptState]
    update: UpdateFn
    step: StepFn | None = None
    learning_rate: Callable[[Any], torch.Tensor] | None = None
    per_tensor: bool = False


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def step(opt: GradientTransformation, grads: Updates, state: OptState, params: Params, *,
         inplace: bool = False) -> tuple[Params, OptState]:
    """New params and state from gradients: the optimizer's fused ``step`` if it has
    one, else ``update`` followed by ``apply_updates``.

    Example:
        >>> import torch, fnlight.optim as fo
        >>> opt, params = fo.sgd(0.1), {"w": torch.ones(2)}
        >>> params, state = fo.step(opt, {"w": torch.ones(2)}, opt.init(params), params)
        >>> params["w"]
        tensor([0.9000, 0.9000])
    """
    if opt.step is not None:
        return opt.step(grads, state, params, inplace=inplace)
    updates, state = opt.update(grads, state, params, inplace=inplace)
    return apply_updates(params, updates, inplace=inplace), state


def _run(transforms: tuple[GradientTransformation, ...], updates: Updates, states: tuple[OptState, ...],
         params: Params | None, inplace: bool) -> tuple[Updates, tuple[OptState, ...]]:
    new_states = []
    for t, s in zip(transforms, states, strict=True):
        updates, s = t.update(updates, s, params, inplace=inplace)
        new_states.append(s)
    return updates, tuple(new_states)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after the other; the state is the tuple of their states.

    When the last one has a fused ``step``, the chain has one too (the others'
    updates, then that step).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3))
    """

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: tuple[OptState, ...], params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, tuple[OptState, ...]]:
        return _run(transforms, updates, state, params, inplace)

    last = transforms[-1] if transforms else None
    # the chain's learning rate: the last element that has a schedule
    rate = next((t.learning_rate for t in reversed(transforms) if t.learning_rate is not None), None)
    per_tensor = all(t.per_tensor for t in transforms)
    if last is None or last.step is None:
        return GradientTransformation(init, update, None, rate, per_tensor)
    last_step = last.step

    def fused(grads: Updates, state: tuple[OptState, ...], params: Params, *,
              inplace: bool = False) -> tuple[Params, tuple[OptState, ...]]:
        grads, head = _run(transforms[:-1], grads, state[:-1], params, inplace)
        params, tail = last_step(grads, state[-1], params, inplace=inplace)
        return params, (*head, tail)

    return GradientTransformation(init, update, fused, rate, per_tensor)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False) -> Params:
    """``params + updates``, leaf by leaf (in place into ``params`` when ``inplace``).

    Example:
        >>> import torch
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
        >>> new = apply_updates([torch.ones(1), (torch.ones(1),)], [torch.ones(1), (torch.ones(1),)])
        >>> new[1]
        (tensor([2.]),)
    """
    p, spec = flatten(params)
    u = spec.flatten_up_to(updates)
    if not p:
        return params
    if inplace:
        torch._foreach_add_(p, u)
        return params
    return spec.unflatten(torch._foreach_add(p, u))


# -- sharded optimizer state (ZeRO-1) --------------------------------------------

class Piece(NamedTuple):
    """Where a rank's piece of a parameter lies in the whole tensor (under :func:`sharded`): the
    piece is the flat elements ``[start, start + numel)`` of a tensor of shape ``shape``.

    Example:
        >>> Piece(torch.Size([3, 4]), 5)      # elements 5.. of a 3x4 tensor: from row 1, column 1
        Piece(shape=torch.Size([3, 4]), start=5)
    """

    shape: torch.Size  # the whole tensor's
    start: int  # the flat index, in the whole tensor, of the piece's first element


#: Under :func:`sharded`: the function that sums a float tensor over the ranks (an all-reduce), and
#: where each parameter's piece lies (by name; None: every leaf is a whole tensor). Every leaf the
#: optimizer sees is this rank's piece of a parameter, so whole-tensor norms are the square roots of
#: partial sums of squares summed across ranks, and per-row statistics are partial row sums summed.
_SHARDED: contextvars.ContextVar[tuple[Callable[[torch.Tensor], torch.Tensor], Mapping[str, Piece] | None] | None] \
    = contextvars.ContextVar("fnlight_optim_sharded", default=None)


@contextlib.contextmanager
def sharded(sum_across: Callable[[torch.Tensor], torch.Tensor], pieces: Mapping[str, Piece] | None = None
            ) -> Iterator[None]:
    """Run optimizer updates on pieces of the parameters (each rank its slice, see
    :mod:`fnlight.train.zero`): norms of whole tensors (:func:`tensor_norms`, :func:`global_norm`,
    so ``clip_by_global_norm``, ``lamb``, ``lars``) sum their partial squares with ``sum_across``;
    ``adafactor`` and ``adaptive_grad_clip``, which need rows and columns of whole tensors, find
    where each piece lies in ``pieces`` (parameter name -> :class:`Piece`; None: the leaves are
    whole tensors) and sum partial row and column statistics with ``sum_across``.

    Example:
        >>> with sharded(lambda t: t):          # one rank: the pieces are the whole tensors
        ...     tensor_norms([torch.ones(4)])
        [tensor(2.)]
    """
    token = _SHARDED.set((sum_across, pieces))
    try:
        yield
    finally:
        _SHARDED.reset(token)


def sum_across() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reduction of :func:`sharded` in effect, or None (not sharded).

    Never inside ``torch.compile``: the sharded update runs eagerly, and Dynamo cannot trace a
    ``ContextVar`` (reading it would break the compiled ordinary step's graph).

    Example:
        >>> sum_across() is None
        True
    """
    if torch.compiler.is_compiling():
        return None
    got = _SHARDED.get()
    return None if got is None else got[0]


def pieces_of(leaves: list[torch.Tensor], spec: Spec) -> list[Piece]:
    """Under :func:`sharded`, where each leaf lies in its whole tensor (found by the leaf's
    parameter name); each leaf is a whole tensor when :func:`sharded` was given no ``pieces``.

    Example:
        >>> with sharded(lambda t: t, {"w": Piece(torch.Size([2, 3]), 4)}):
        ...     pieces_of([torch.zeros(1, 2)], DictSpec(["w"]))
        [Piece(shape=torch.Size([2, 3]), start=4)]
    """
    got = _SHARDED.get()
    where = None if got is None else got[1]
    if where is None:
        return [Piece(x.shape, 0) for x in leaves]
    out = []
    for name, x in zip(spec.names(), leaves, strict=True):
        piece = where.get(name)
        if piece is None:
            raise ValueError(f"under sharded optimizer state, the leaf {name!r} is not a parameter the step knows "
                             f"({sorted(where)[:5]}...): pass the optimizer the flat dict of parameter pieces (or "
                             "groups of it, as masked/multi_transform do), keyed by the parameters' names")
        if x.numel() > piece.shape.numel() - piece.start:
            raise ValueError(f"the piece of {name!r} has {x.numel()} elements, more than its tensor of shape "
                             f"{tuple(piece.shape)} holds after element {piece.start}")
        out.append(piece)
    return out


def piece_index(piece: Piece, n: int, device: torch.device | None = None) -> torch.Tensor:
    """The flat indices, in the whole tensor, of a piece's ``n`` elements (int32 when they fit: the
    indices take as much memory as a float32 piece).

    Example:
        >>> piece_index(Piece(torch.Size([2, 3]), 4), 2)
        tensor([4, 5], dtype=torch.int32)
    """
    dtype = torch.int32 if piece.shape.numel() < 2 ** 31 else torch.int64
    return torch.arange(piece.start, piece.start + n, dtype=dtype, device=device)


def without_dim(flat: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """The flat indices ``flat`` of a tensor of shape ``shape`` as flat indices of the tensor with
    ``dim`` reduced away (where ``t.sum(dim)`` puts each element).

    Example:
        >>> without_dim(torch.arange(6), torch.Size([2, 3]), 0)     # columns
        tensor([0, 1, 2, 0, 1, 2])
    """
    inner = shape[dim + 1:].numel()
    return flat // (inner * shape[dim]) * inner + flat % inner


def sums_across(parts: Iterable[tuple[torch.Tensor, torch.Tensor | None, int]]) -> list[torch.Tensor]:
    """Under :func:`sharded`: for each ``(values, index, size)``, the ``size`` sums of this rank's
    ``values`` by ``index`` (None: all into one), summed over the ranks in one all-reduce: the
    statistics of whole tensors (row and column sums, sums of squares) from their pieces. In the
    values' computation dtype (float32 for half and bfloat16); ``parts`` is read one at a time.

    Example:
        >>> with sharded(lambda t: t):
        ...     sums_across([(torch.ones(4), torch.tensor([0, 1, 1, 1]), 2), (torch.ones(3), None, 1)])
        [tensor([1., 3.]), tensor([3.])]
    """
    reduce = sum_across()
    if reduce is None:
        raise RuntimeError("sums_across is for sharded optimizer state (inside fnlight.optim.sharded)")
    bins = []
    for values, index, n in parts:
        values = values.detach().reshape(-1).to(opmath(values.dtype))
        if index is None:
            bins.append(values.sum().reshape(1))
        else:
            bins.append(values.new_zeros(n).index_add_(0, index, values))
    if not bins:
        return []
    dtype = functools.reduce(torch.promote_types, (b.dtype for b in bins))
    return list(reduce(torch.cat([b.to(dtype) for b in bins])).split([b.numel() for b in bins]))


def tensor_norms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor; under :func:`sharded`, of each whole tensor whose piece this rank
    holds (one small all-reduce of the partial sums of squares, whatever the number of tensors).

    Example:
        >>> tensor_norms([torch.ones(4), torch.zeros(2)])
        [tensor(2.), tensor(0.)]
    """
    reduce = sum_across()
    if reduce is None:
        return [torch.linalg.vector_norm(x) for x in xs]
    if not xs:
        return []
    squares = torch.stack([x.detach().to(opmath(x.dtype)).square().sum() for x in xs])
    return list(reduce(squares).sqrt().to(xs[0].dtype).unbind(0))


# -- trees ----------------------------------------------------------------------

class DictSpec:
    """optree's ``PyTreeSpec`` interface for a flat dict of tensors (the fast path: no flattening)."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys

    def flatten_up_to(self, tree: Any) -> list[Any]:
        try:
            return [tree[k] for k in self.keys]
        except (KeyError, TypeError) as e:
            raise ValueError(f"expected a dict with the parameters' names {self.keys}, got "
                             f"{list(tree) if isinstance(tree, dict) else type(tree).__name__}") from e

    def unflatten(self, leaves: Sequence[Any]) -> dict[Any, Any]:
        return dict(zip(self.keys, leaves, strict=True))

    def names(self) -> list[str]:
        return [str(k) for k in self.keys]


class TreeSpec:
    """An optree ``PyTreeSpec`` with dotted leaf names (``"layers.0.weight"``)."""

    __slots__ = ("spec", "paths")

    def __init__(self, spec: Any, paths: list[tuple[Any, ...]]) -> None:
        self.spec, self.paths = spec, paths

    def flatten_up_to(self, tree: Any) -> list[Any]:
        return self.spec.flatten_up_to(tree)

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return optree.tree_unflatten(self.spec, list(leaves))

    def names(self) -> list[str]:
        return [".".join(str(p) for p in path) for path in self.paths]


Spec = DictSpec | TreeSpec


def flatten(tree: Any) -> tuple[list[torch.Tensor], Spec]:
    """The leaves of a tree of tensors, and a spec to rebuild it (and flatten trees like it).

    Example:
        >>> import torch
        >>> leaves, spec = flatten({"a": [torch.ones(1), torch.zeros(1)]})
        >>> spec.names(), spec.unflatten(leaves)["a"][1]
        (['a.0', 'a.1'], tensor([0.]))
    """
    if type(tree) is dict and all(isinstance(v, torch.Tensor) for v in tree.values()):
        return list(tree.values()), DictSpec(list(tree))
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace="fnlight")
    return leaves, TreeSpec(spec, paths)


def tree_zeros_like(tree: Any) -> Any:
    """Zeros shaped like every leaf (memory format kept)."""
    leaves, spec = flatten(tree)
    return spec.unflatten([torch.zeros_like(t, memory_format=torch.preserve_format) for t in leaves])


# -- per-step scalars ---------------------------------------------------------------

def per_step(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-step scalars an update multiplies every element by (learning rate, bias
    corrections), unchanged; under ``torch.compile``, stored in one buffer.

    Inductor inlines the computation of a 0-d value into every loop that reads
    it, so ``pow``/``cos`` of the step counter in float64 would be recomputed for
    each vector of each parameter: for Adam on 270k parameters that is half of
    the update's time on a CPU. A stack of two or more values is stored once,
    and the loops load it (a one-element stack is folded away, so one value is
    stacked with itself).

    Example:
        >>> import torch
        >>> step_size, bc2 = per_step(torch.tensor(0.1), torch.tensor(0.2))
    """
    if not torch.compiler.is_compiling() or not scalars:
        return scalars
    stacked = torch.stack(torch.broadcast_tensors(*(scalars if len(scalars) > 1 else scalars * 2)))
    return tuple(stacked.unbind())[:len(scalars)]


def f64(x: Scalar | torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a float64 tensor (on ``like``'s device): per-step scalars are computed in float64
    and rounded to each parameter's dtype only where an op uses them (a float64 0-d tensor in
    an op with a float32 tensor is used as float32, exactly as torch rounds a Python float)."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.tensor(float(x), dtype=torch.float64, device=like.device if like is not None else None)


def is_zero(x: Scalar) -> bool:
    """True only for a Python number equal to 0: a tensor hyperparameter may change, so the
    arithmetic that uses it always runs."""
    return not isinstance(x, torch.Tensor) and x == 0


def counter(like: torch.Tensor | None = None) -> torch.Tensor:
    # An int64 0-d tensor: torch.compile keeps in-place updates of it (it loses them
    # for 0-d float64 CPU inputs), and float32 counters drift.
    return torch.zeros((), dtype=torch.int64, device=like.device if like is not None else None)


def count_up(count: torch.Tensor, inplace: bool) -> torch.Tensor:
    return count.add_(1) if inplace else count + 1


def first_leaf(tree: Any) -> torch.Tensor | None:
    leaves, _ = flatten(tree)
    return leaves[0] if leaves else None


def update_count(state: OptState) -> torch.Tensor | None:
    """The number of updates an optimizer state has made (its first ``count`` field).

    Example:
        >>> import torch, fnlight.optim as fo
        >>> int(update_count(fo.adam(1e-3).init({"w": torch.zeros(1)})))
        0
    """
    if hasattr(state, "count") and isinstance(state.count, torch.Tensor):
        return state.count
    if isinstance(state, dict):
        state = tuple(state.values())
    if isinstance(state, tuple):
        for s in state:
            c = update_count(s)
            if c is not None:
                return c
    return None


# -- foreach ops on lists, with hyperparameters that may be tensors -------------------------

def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes a ``dtype`` op's scalars in (float32 for half and bfloat16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_scalar(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() == 0 and a.is_floating_point()


def fe(name: str, xs: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """``torch._foreach_<name>(xs, *args)`` (``name`` ending in ``_``: in place, returns ``xs``),
    where a 0-d tensor scalar (a float64 per-step value, an injected hyperparameter) is used in
    each tensor's computation dtype, as torch uses a Python float: so it never promotes a 0-d
    parameter to float64, and a list of several dtypes is split by dtype."""
    if not xs:
        return xs
    if torch._C._are_functorch_transforms_active() and any(
            _batched(x) for v in (xs, *args, *kwargs.values()) for x in (v if isinstance(v, list | tuple) else [v])):
        return _one_by_one(name, xs, args, kwargs)
    op = getattr(torch, f"_foreach_{name}")
    if not any(_is_scalar(a) for a in (*args, *kwargs.values())):
        out = op(xs, *args, **kwargs)
        return xs if name.endswith("_") else list(out)
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1:
        d = opmath(xs[0].dtype)
        cast = [a.to(d) if _is_scalar(a) else a for a in args]
        out = op(xs, *cast, **{k: v.to(d) if _is_scalar(v) else v for k, v in kwargs.items()})
        return xs if name.endswith("_") else list(out)
    result: list[Any] = [None] * len(xs)
    for dtype in dtypes:
        ix = [i for i, x in enumerate(xs) if x.dtype == dtype]
        part = [[a[i] for i in ix] if isinstance(a, list | tuple) else a for a in args]
        got = fe(name, [xs[i] for i in ix], *part, **kwargs)
        for i, g in zip(ix, got, strict=True):
            result[i] = g
    return xs if name.endswith("_") else result


def _batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and torch._C._functorch.is_batchedtensor(x)


def _one_by_one(name: str, xs: list[torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> list[torch.Tensor]:
    """A foreach op as one op per tensor: under ``torch.func.vmap`` (an ensemble's members), which
    has no batching rules for the ``_foreach_*`` ops. An in-place op computes out of place and puts
    the results into the list ``xs`` (whose elements the callers read back), since vmap cannot
    write a batched value into an unbatched tensor."""
    inplace = name.endswith("_")
    base = name.rstrip("_")
    out = []
    for i, x in enumerate(xs):
        d = opmath(x.dtype)
        a = [v[i] if isinstance(v, list | tuple) else v.to(d) if _is_scalar(v) else v for v in args]
        kw = {k: v.to(d) if _is_scalar(v) else v for k, v in kwargs.items()}
        if base in ("addcmul", "addcdiv") and len(a) == 3:
            kw["value"] = a.pop()
        if base == "norm":
            out.append(torch.linalg.vector_norm(x, *a, **kw))
        elif base == "copy":
            out.append(a[0] + torch.zeros_like(x))
        elif base == "zero":
            out.append(torch.zeros_like(x))
        else:
            out.append(getattr(torch, base)(x, *a, **kw))
    if inplace:
        xs[:] = out
        return xs
    return out


def foreach(name: str, xs: list[torch.Tensor], *args: Any, inplace: bool, **kwargs: Any) -> list[torch.Tensor]:
    """``torch._foreach_<name>`` out of place, or ``_foreach_<name>_`` into ``xs`` (see :func:`fe`)."""
    return fe(f"{name}_" if inplace else name, xs, *args, **kwargs)


def axpy(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: Scalar, *, inplace: bool) -> list[torch.Tensor]:
    """``xs + alpha * ys``: torch's ``add(alpha=)`` (one rounding, as torch.optim) for a number;
    a multiply and an add for a tensor ``alpha``."""
    if not isinstance(alpha, torch.Tensor):
        return foreach("add", xs, ys, alpha=alpha, inplace=inplace)
    return foreach("add", xs, fe("mul", ys, alpha), inplace=inplace)


def addcmul(xs: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], value: Scalar, *,
            inplace: bool) -> list[torch.Tensor]:
    """``xs + value * a * b`` (torch's ``addcmul``; for a tensor ``value``, three ops)."""
    if not isinstance(value, torch.Tensor):
        return foreach("addcmul", xs, a, b, value, inplace=inplace)
    prod = fe("mul", a, value)
    fe("mul_", prod, b)
    return foreach("add", xs, prod, inplace=inplace)


def lerp(xs: list[torch.Tensor], ys: list[torch.Tensor], weight: Scalar, *, inplace: bool) -> list[torch.Tensor]:
    return foreach("lerp", xs, ys, weight, inplace=inplace)


def select(xs: list[Any], idx: list[int]) -> list[Any]:
    return [xs[i] for i in idx]


def scatter(xs: list[Any], idx: list[int], values: list[Any]) -> list[Any]:
    out = list(xs)
    for i, v in zip(idx, values, strict=True):
        out[i] = v
    return out


def l2(g: list[torch.Tensor], p: list[torch.Tensor], weight_decay: Scalar, idx: list[int] | None, *,
       inplace: bool) -> list[torch.Tensor]:
    """L2 weight decay added to the gradients (torch.optim's coupled ``weight_decay``):
    ``g + weight_decay * p`` for the leaves ``idx`` selects (all when None). Written once for
    every optimizer that has it."""
    if is_zero(weight_decay) or (idx is not None and not idx):
        return g
    if idx is None:
        return axpy(g, p, weight_decay, inplace=inplace)
    return scatter(g, idx, axpy(select(g, idx), select(p, idx), weight_decay, inplace=inplace))


def negate(g: list[torch.Tensor], maximize: bool) -> list[torch.Tensor]:
    """torch.optim's ``maximize``: the optimizers step along ``-grad`` (a new list, never in place)."""
    return list(fe("neg", g)) if maximize and g else g


# -- the last op: an update, or the step into the parameters --------------------------------

class Term(NamedTuple):
    """One op into the parameters: ``p + scale * a`` (``"axpy"``, torch's ``add_(a, alpha=)``),
    ``p + scale * a / b`` (``"addcdiv"``), ``p + scale * a * b`` (``"addcmul"``)."""

    kind: Literal["axpy", "addcdiv", "addcmul"]
    a: list[torch.Tensor]
    b: list[torch.Tensor] | None
    scale: Scalar


class Direction(NamedTuple):
    """How an optimizer's arithmetic ends, so that ``update`` and ``step`` are written once.

    ``terms`` are applied to the parameters one after the other (torch's NAdam adds two);
    ``decay``, if given, first multiplies the parameters ``decay_idx`` selects by it
    (decoupled weight decay, ``p *= 1 - lr * wd`` as torch's AdamW does). ``update`` returns
    ``p * decay - p + (the terms)``: the decay term uses the same rounded factor as torch.
    """

    terms: list[Term]
    decay: Scalar | None = None
    decay_idx: list[int] | None = None


def _value(t: Term) -> list[torch.Tensor]:
    """A term as its own tensors; ``(scale * a) / b`` is addcdiv's order."""
    out = list(fe("mul", t.a, t.scale))
    if t.kind == "addcdiv":
        fe("div_", out, t.b)
    elif t.kind == "addcmul":
        fe("mul_", out, t.b)
    return out


def finish_update(d: Direction, p: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The update (to add to ``p``) a :class:`Direction` describes."""
    u = _value(d.terms[0])
    for t in d.terms[1:]:
        fe("add_", u, _value(t))
    if d.decay is not None and d.decay_idx:
        idx = d.decay_idx
        ps = select(p, idx)
        decayed = fe("mul", ps, d.decay)
        fe("sub_", decayed, ps)  # p * f - p is exact (Sterbenz): the same decay as torch's
        u = scatter(u, idx, fe("add", decayed, select(u, idx)))
    return u


def finish_step(d: Direction, p: list[torch.Tensor], *, inplace: bool) -> list[torch.Tensor]:
    """The new parameters a :class:`Direction` describes, with torch.optim's ops into them."""
    p = list(p)
    owned = inplace
    if d.decay is not None and d.decay_idx:
        idx = d.decay_idx
        p = scatter(p, idx, foreach("mul", select(p, idx), d.decay, inplace=inplace))
    for t in d.terms:
        if isinstance(t.scale, torch.Tensor):
            p = foreach("add", p, _value(t), inplace=owned)
        elif t.kind == "axpy":
            p = foreach("add", p, t.a, alpha=t.scale, inplace=owned)
        else:
            p = foreach(t.kind, p, t.a, t.b, t.scale, inplace=owned)
        owned = True  # the first op made new tensors (or wrote the donated ones)
    return p


def optimizer(core: Callable[..., tuple[Direction, OptState]], init: Callable[[Params], OptState],
              learning_rate: Any, needs_params: bool, per_tensor: bool = False) -> GradientTransformation:
    """An optimizer from its arithmetic: ``core(g, state, p, spec, lr, inplace) -> (Direction,
    state)`` on the leaves. ``lr`` is the learning rate of this update: a Python float when
    ``learning_rate`` is a number (so the last op is torch's, bitwise), else a float64 tensor
    (a schedule evaluated at the update count, or an injected hyperparameter). ``per_tensor``:
    see :class:`GradientTransformation`."""
    from ._schedules import as_schedule

    constant = not callable(learning_rate)
    schedule = as_schedule(learning_rate)

    def rate(state: OptState) -> Scalar:
        if isinstance(learning_rate, torch.Tensor):
            return learning_rate
        return float(learning_rate) if constant else schedule(state.count)

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        g, spec = flatten(updates)
        if params is None and needs_params:
            raise ValueError("this optimizer (its weight decay) needs the params passed to update()")
        p = spec.flatten_up_to(params) if params is not None else None
        d, new_state = core(g, state, p, spec, rate(state), inplace)
        if p is None:
            return spec.unflatten(finish_update(d, p)), new_state
        # torch's ops into the parameters, then the difference: p + (p' - p) is p' exactly (Sterbenz)
        # unless an element crosses zero, so update + apply_updates agrees with step to the last bit
        return spec.unflatten(fe("sub", finish_step(d, p, inplace=False), p)), new_state

    def step(grads: Updates, state: OptState, params: Params, *, inplace: bool = False) -> tuple[Params, OptState]:
        g, spec = flatten(grads)
        p = spec.flatten_up_to(params)
        d, new_state = core(g, state, p, spec, rate(state), inplace)
        return spec.unflatten(finish_step(d, p, inplace=inplace)), new_state

    return GradientTransformation(init, update, step, schedule, per_tensor)
