"""Many models in one step: stacked states, ensemble steps, per-sample gradients and DP-SGD.

A fnlight state is a pytree, so N states with the same structure can be stacked
leaf by leaf (:func:`stack_states`) and trained together by one step built with
``torch.func.vmap`` (``make_train_step(..., ensemble=True)``): a seed ensemble, or
a learning-rate grid whose values live in the optimizer state
(``fnlight.optim.inject_hyperparams``). The same machinery gives per-sample
gradients (:func:`per_sample_grads`) and DP-SGD (``make_train_step(..., dp=DPConfig(...))``).

Two things torch does not do under ``vmap`` are handled here:

- ``torch._foreach_*`` ops (fnlight's optimizers are written with them) have no
  batching rule; inside the vectorized parts they run as the same per-tensor ops,
  which is what the foreach kernels compute on the CPU.
- Dropout draws from torch's global generator, which under ``vmap`` would make a
  member's masks depend on the other members. Inside these steps ``F.dropout``
  (``nn.Dropout``) draws its mask from the member's (or sample's) own key with
  :func:`fnlight.random.bernoulli`, so a member's result depends only on its own
  state and key: reordering or repeating members changes nothing for the others.
  Any other random op raises a clear error (draw from the ``key`` given to
  ``loss_fn`` instead).

Example:
    >>> import torch, fnlight, fnlight.optim as fo
    >>> model = torch.nn.Linear(4, 2)
    >>> def loss_fn(model_fn, batch, key):
    ...     x, y = batch
    ...     return torch.nn.functional.cross_entropy(model_fn(x), y)
    >>> opt = fo.adam(1e-2)
    >>> state = fnlight.stack_states([fnlight.TrainState.create(model, opt, seed=s) for s in range(4)])
    >>> step = fnlight.make_train_step(model, loss_fn, opt, ensemble=True)
    >>> state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    >>> tuple(metrics["loss"].shape)
    (4,)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap
from torch.overrides import TorchFunctionMode

from .. import distributed
from .. import random as fr
from ..optim import GradientTransformation, global_norm
from ..optim import step as optim_step
from ..tree import (
    NAMESPACE,
    batch_size,
    named_leaves,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_structure,
    tree_unflatten,
)
from . import checks
from .state import TrainState
from .step import LossFn, Metrics, NonFiniteError, Precision, TorchFuncTrapError, autocast, split_loss

__all__ = [
    "DPConfig", "DPTrainStep", "EnsembleEvalStep", "EnsembleTrainStep", "PerSampleGrads", "clip_per_sample",
    "make_vectorized_train_step", "member_metrics", "member_norms", "num_members", "per_sample_grads",
    "scalar_step", "spread_members", "stack_states", "unstack_states",
]


# -- stacked states ---------------------------------------------------------------

def stack_states(states: Sequence[TrainState]) -> TrainState:
    """One state whose every leaf has a leading member axis: ``states[i]`` is member ``i``.

    The states must have the same structure, shapes and dtypes (made from the same model and
    optimizer); the error names the first leaf that differs. :func:`unstack_states` inverts it.

    Example:
        >>> import torch, fnlight, fnlight.optim as fo
        >>> states = [fnlight.TrainState.create(torch.nn.Linear(3, 1), fo.sgd(0.1), seed=s) for s in range(3)]
        >>> stacked = fnlight.stack_states(states)
        >>> tuple(stacked.params["weight"].shape), tuple(stacked.step.shape)
        ((3, 1, 3), (3,))
    """
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    if not all(isinstance(s, TrainState) for s in states):
        bad = next(type(s).__name__ for s in states if not isinstance(s, TrainState))
        raise TypeError(f"stack_states takes TrainStates, got a {bad}")
    spec = tree_structure(states[0])
    first = _named(states[0])
    for i, s in enumerate(states[1:], 1):
        if tree_structure(s) != spec:
            names = set(_named(s))
            odd = sorted(set(first) ^ names)
            raise ValueError(f"stack_states: state {i} has another structure than state 0 "
                             f"(leaves only in one of them: {odd[:5]}); make all states from the same model "
                             "and optimizer")
        for name, leaf in _named(s).items():
            ref = first[name]
            if not isinstance(leaf, torch.Tensor) or not isinstance(ref, torch.Tensor):
                if leaf != ref:
                    raise ValueError(f"stack_states: state {i} differs from state 0 at {name}: {leaf!r} != {ref!r}")
                continue
            if leaf.shape != ref.shape or leaf.dtype != ref.dtype or leaf.device != ref.device:
                raise ValueError(
                    f"stack_states: state {i} differs from state 0 at {name}: "
                    f"{tuple(leaf.shape)} {leaf.dtype} {leaf.device} vs {tuple(ref.shape)} {ref.dtype} {ref.device}")
    return tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *states)


def unstack_states(state: TrainState) -> list[TrainState]:
    """The members of a stacked state, as ordinary states (copies).

    Example:
        ```python
        [int(s.step) for s in fnlight.unstack_states(stacked)]
        # [0, 0, 0]
        ```
    """
    n = num_members(state)
    if n is None:
        raise ValueError("unstack_states needs a stacked state (made by stack_states); this one has a 0-d step")
    return [tree_map(lambda t, i=i: t[i].clone() if isinstance(t, torch.Tensor) else t, state) for i in range(n)]


def num_members(state: TrainState) -> int | None:
    """The number of members of a stacked state, or ``None`` for an ordinary state.

    Example:
        ```python
        fnlight.num_members(stacked), fnlight.num_members(states[0])
        # (3, None)
        ```
    """
    step = state.step
    return int(step.shape[0]) if isinstance(step, torch.Tensor) and step.dim() == 1 else None


def scalar_step(state: TrainState) -> int:
    """The step counter as an int, for an ordinary state or a stacked one (whose members train in
    lockstep, so they share one step; members at different steps are an error).

    Example:
        ```python
        fnlight.train.ensemble.scalar_step(stacked)
        # 0
        ```
    """
    step = state.step
    if step.dim() == 0:
        return int(step)
    values = set(step.tolist())
    if len(values) != 1:
        raise ValueError(f"the members of this stacked state are at different steps {step.tolist()}: the Trainer "
                         "and checkpoints need members that train together (stack states at the same step)")
    return values.pop()


def spread_members(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An ensemble's per-member metrics spread out, as tensors: a value of shape ``[members]`` named ``acc``
    gives ``acc`` (the members' mean) and ``acc/0``, ``acc/1``, ...; other values stay as they are.

    Example:
        >>> spread_members({"loss": torch.tensor([1.0, 3.0])})
        {'loss': tensor(2.), 'loss/0': tensor(1.), 'loss/1': tensor(3.)}
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            out[k] = v.mean()
            out.update({f"{k}/{i}": x for i, x in enumerate(v.unbind())})
        else:
            out[k] = v
    return out


def member_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as floats, with an ensemble's per-member values spread out: a value of shape ``[members]``
    named ``acc`` gives ``acc`` (the members' mean) and ``acc/0``, ``acc/1``, ...; scalars stay as they are.

    Example:
        >>> member_metrics({"loss": torch.tensor([1.0, 3.0]), "lr": 0.1})
        {'loss': 2.0, 'loss/0': 1.0, 'loss/1': 3.0, 'lr': 0.1}
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            values = v.detach().double().tolist()
            out[k] = math.fsum(values) / len(values)
            out.update({f"{k}/{i}": x for i, x in enumerate(values)})
        else:
            out[k] = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
    return out


def _named(state: Any) -> dict[str, Any]:
    names, leaves, _ = named_leaves(state, "state")
    return dict(zip(names, leaves, strict=True))


# -- what torch does not do under vmap ------------------------------------------------

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


class _Vectorizable(TorchFunctionMode):
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
def _explain_vmap_errors(what: str) -> Iterator[None]:
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


def _vmap_tree(fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
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




def member_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each member's global L2 norm over a stacked tree (``[members]``): the norm of the per-tensor
    norms, as :func:`fnlight.optim.global_norm` computes it for one model.

    Example:
        >>> member_norms({"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])})
        tensor([5., 1.])
    """
    leaves = list(grads.values())
    m = leaves[0].shape[0]
    per_tensor = torch.stack([g.reshape(m, -1).norm(dim=1) for g in leaves])
    return per_tensor.norm(dim=0)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


class _ModelFns:
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


# -- the ensemble train step ------------------------------------------------------------

def _clone(t: Any) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) else t


class _Members:
    """A stacked tree cut into its members' trees (views of the stacked tensors), flattened once:
    ``tree(i)`` is member ``i``'s tree, ``views(i)`` its leaves (non-tensor leaves as they are)."""

    def __init__(self, tree: Any, members: int):
        leaves, self.spec = tree_flatten(tree)
        rows = [t.unbind(0) if isinstance(t, torch.Tensor) else None for t in leaves]
        self._views = [[leaf if r is None else r[i] for leaf, r in zip(leaves, rows, strict=True)]
                       for i in range(members)]

    def views(self, i: int) -> list[Any]:
        return self._views[i]

    def tree(self, i: int) -> Any:
        return tree_unflatten(self.spec, self._views[i])


def _rows(tree: Any, a: int, b: int) -> Any:
    """Members ``a`` to ``b - 1`` of a stacked tree (views)."""
    return tree_map(lambda t: t[a:b] if isinstance(t, torch.Tensor) else t, tree)


def _cat(trees: list[Any]) -> Any:
    return tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *trees)


def _write_back(new: Any, views: Any) -> None:
    """Copy a member's new tensors into its views of the stacked tensors (a tree, or its leaves), where
    the update did not already write them in place (an optimizer may return fresh tensors even when
    asked for in place)."""
    for n, v in zip(tree_leaves(new), views if isinstance(views, list) else tree_leaves(views), strict=True):
        if isinstance(v, torch.Tensor):
            if n.data_ptr() != v.data_ptr() or n.shape != v.shape:
                v.copy_(n)
        elif n != v:
            raise TypeError(f"an optimizer state leaf that is not a tensor changed in an update ({v!r} -> {n!r}); "
                            "an ensemble's optimizer state must hold its values in tensors")


class _Key(NamedTuple):
    """A member's tensor in the merged tree of :class:`_Merged` (prints as the tensor's name)."""

    member: int
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Merged:
    """How to update all members in one optimizer call (for a ``per_tensor`` optimizer).

    The call's params are a flat dict of every member's tensors, ``{_Key(i, name): params[name][i]}``,
    and its state the state ``optimizer.init`` makes for them: per-tensor state (moments) is member
    ``i``'s row of the stacked leaf, and state shared by all tensors (the count, hyperparameters) is
    the members' common value. ``slots[j]`` says where leaf ``j`` of that state comes from: (index of
    the stacked state's leaf, member, or ``None`` for a shared leaf).
    """

    spec: Any
    slots: tuple[tuple[int, int | None], ...]

    @staticmethod
    def plan(opt: GradientTransformation, params: dict[str, torch.Tensor], opt_state: Any) -> _Merged | None:
        """The plan for these stacked params and state, or ``None`` where the state does not map."""
        members = next(iter(params.values())).shape[0]
        meta = {_Key(i, k): torch.empty(v.shape[1:], dtype=v.dtype, device="meta")
                for i in range(members) for k, v in params.items()}
        try:
            template = opt.init(meta)
        except Exception:  # an init that meta tensors cannot run: update member by member
            return None
        paths, leaves, spec = optree.tree_flatten_with_path(template, namespace=NAMESPACE)
        s_paths, s_leaves, _ = optree.tree_flatten_with_path(opt_state, namespace=NAMESPACE)
        where = {path: j for j, path in enumerate(s_paths)}
        slots = []
        for path, leaf in zip(paths, leaves, strict=True):
            keys = [e for e in path if isinstance(e, _Key)]
            j = where.get(tuple(e.name if isinstance(e, _Key) else e for e in path))
            if len(keys) > 1 or j is None:
                return None
            stacked = s_leaves[j]
            if isinstance(leaf, torch.Tensor) != isinstance(stacked, torch.Tensor) or (
                    isinstance(leaf, torch.Tensor) and tuple(stacked.shape) != (members, *leaf.shape)):
                return None
            slots.append((j, keys[0].member if keys else None))
        return _Merged(spec, tuple(slots))

    def apply(self, opt: GradientTransformation, grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
              opt_state: Any) -> bool:
        """Update the stacked ``params`` and ``opt_state`` in place with one call; False (nothing done)
        when the members' shared state differs (e.g. a learning-rate sweep): then update them one by one."""
        s_leaves = optree.tree_leaves(opt_state, namespace=NAMESPACE)
        rows: dict[int, tuple[torch.Tensor, ...]] = {}
        leaves: list[Any] = []
        for j, member in self.slots:
            t = s_leaves[j]
            if not isinstance(t, torch.Tensor):
                leaves.append(t)
            elif member is None:
                if not torch.equal(t, t[:1].expand_as(t)):
                    return False
                leaves.append(t[0].clone())  # (a copy: an in-place update must not reach the other members)
            else:
                leaves.append((rows[j] if j in rows else rows.setdefault(j, t.unbind(0)))[member])
        members = range(next(iter(params.values())).shape[0])
        g = {_Key(i, k): v[i] for k, v in grads.items() for i in members}
        p = {_Key(i, k): v[i] for k, v in params.items() for i in members}
        new_p, new_s = optim_step(opt, g, optree.tree_unflatten(self.spec, leaves), p, inplace=True)
        _write_back(list(new_p.values()), list(p.values()))
        new_leaves = optree.tree_leaves(new_s, namespace=NAMESPACE)
        for (j, member), new in zip(self.slots, new_leaves, strict=True):
            if member is None and isinstance(new, torch.Tensor):
                s_leaves[j].copy_(new.expand_as(s_leaves[j]))
        # (members' tensors written where not in place; a changed non-tensor leaf is refused)
        pairs = [(n, o) for n, o, (_, m) in zip(new_leaves, leaves, self.slots, strict=True)
                 if m is not None or not isinstance(o, torch.Tensor)]
        _write_back([n for n, _ in pairs], [o for _, o in pairs])
        return True


class PerMember(tuple):  # type: ignore[type-arg]
    """One optimizer per member of an ensemble step (a plain tuple of GradientTransformations)."""


@dataclass(frozen=True, eq=False)
class EnsembleTrainStep:
    """``train_step(stacked_state, batch) -> (stacked_state, metrics)``; see ``make_train_step(ensemble=True)``.

    Each member's gradients, clipping, non-finite check and optimizer update are its own. The
    forward and backward are ``vmap``-ed over the member axis; then each member's update runs on
    its slices of the stacked tensors with the ordinary step's arithmetic (fused kernels included),
    with ``donate=True`` in place, into the given state's tensors, as the ordinary step.

    ``optimizer`` may also be a tuple with one optimizer per member (what ``fnlight fit --sweep``
    uses when a hyperparameter is not held in the optimizer state, e.g. a schedule's peak).
    """

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: GradientTransformation | PerMember
    accumulate: int = 1
    clip: float | None = None
    precision: Precision = "32"
    compile: bool | Mapping[str, Any] = False
    donate: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"
    member_batches: bool = False
    member_chunk: int | None = None

    def __post_init__(self) -> None:
        checks.check_step_options(self.accumulate, self.precision, self.on_nonfinite, self.clip)
        if self.member_chunk is not None and (type(self.member_chunk) is not int or self.member_chunk < 1):
            raise ValueError(f"member_chunk must be a positive int (members per vectorized pass), got "
                             f"{self.member_chunk!r}")
        if type(self.optimizer) in (list, tuple):  # one per member (a GradientTransformation is a NamedTuple)
            object.__setattr__(self, "optimizer", PerMember(self.optimizer))
        fns = _ModelFns(self.model, self.precision)
        batch_axis = 0 if self.member_batches else None
        grads = _vmap_tree(self._member_grads, (0, 0, batch_axis, 0))
        if self.compile:
            # Only the forward and backward are compiled: Dynamo does not route the update's foreach ops
            # through the mode that vectorizes them, and the update is element-wise anyway.
            options = {"dynamic": False, **(dict(self.compile) if isinstance(self.compile, Mapping) else {})}
            grads = torch.compile(grads, **options)
        object.__setattr__(self, "_fns", fns)
        object.__setattr__(self, "_grads", grads)

    def donating(self) -> EnsembleTrainStep:
        """The same step with ``donate=True`` (what the Trainer drives internally)."""
        return self if self.donate else dataclasses.replace(self, donate=True)

    # one member, inside vmap -------------------------------------------------------
    def _member_loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any,
                     key: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, tuple[Metrics, Any]]:
        with _Vectorizable(key), autocast(self.precision, device):
            loss, metrics = split_loss(self.loss_fn(self._fns.run(params, buffers), batch, key))
        return loss.float(), ({k: torch.as_tensor(v).detach().float().reshape(()) for k, v in metrics.items()}, buffers)

    def _member_grads(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any,
                      key: torch.Tensor) -> tuple[Any, torch.Tensor, Metrics, dict[str, torch.Tensor]]:
        device = key.device
        fn = grad_and_value(self._member_loss, has_aux=True)
        if self.accumulate == 1:
            g, (loss, (metrics, buffers)) = fn(params, buffers, batch, key, device)
            return g, loss, metrics, buffers
        n = batch_size(batch)
        if n < self.accumulate:
            raise ValueError(f"accumulate={self.accumulate} needs batches of at least that many samples, got {n}")
        total: Any = None
        loss = torch.zeros((), device=device)
        metrics: Metrics = {}
        for i in range(self.accumulate):
            chunk = tree_map(lambda t, i=i: torch.tensor_split(t, self.accumulate)[i]
                             if isinstance(t, torch.Tensor) else t, batch)
            w = batch_size(chunk) / n
            g, (l_i, (m_i, buffers)) = fn(params, buffers, chunk, fr.fold_in(key, i), device)
            g = {k: v * w for k, v in g.items()}
            total = g if total is None else {k: total[k] + g[k] for k in g}
            loss = loss + l_i * w
            metrics = {k: metrics.get(k, 0) + v * w for k, v in m_i.items()}
        return total, loss, metrics, buffers

    def _apply(self, grads: dict[str, torch.Tensor], state: TrainState, inplace: bool) -> tuple[Any, Any]:
        """New params and optimizer state: each member's update is the ordinary step's
        (``fnlight.optim.step``, fused kernels included) on its slices of the stacked tensors.

        A ``per_tensor`` optimizer (element-wise ones such as SGD and Adam, and per-tensor ones such as
        lamb and adafactor) updates all members in one call, each member's slices as tensors of their
        own (:class:`_Merged`), when the members share their count and hyperparameters; otherwise (a
        sweep, one optimizer per member, global-norm clipping in the optimizer) one call per member.
        Either way each member's update is bitwise the one it would get alone: the kernels process
        each tensor on its own (on one stacked tensor instead, torch's vectorized kernels would round
        some elements differently where a member's tensor ends mid-vector). Vectorizing with vmap
        instead would run foreach ops one tensor at a time (no batching rule) and hold every member's
        temporaries at once. The slices are views, so the updates write into the stacked tensors;
        without ``inplace`` into a copy of the state (one copy, as the ordinary step's non-donating
        update makes).
        """
        params, opt_state = state.params, state.opt_state
        if not inplace:
            params, opt_state = tree_map(_clone, params), tree_map(_clone, opt_state)
        if self.clip is not None:  # the ordinary step's clip, on each member's gradients
            for g in zip(*(v.unbind(0) for v in grads.values()), strict=True):
                factor = torch.clamp(self.clip / (global_norm(list(g)) + 1e-6), max=1.0)
                for v in g:
                    v.mul_(factor)
        if not isinstance(self.optimizer, PerMember) and self.optimizer.per_tensor:
            merged = self._merged_plan(params, opt_state)
            if merged is not None and merged.apply(self.optimizer, grads, params, opt_state):
                return params, opt_state
        n = len(next(iter(params.values())))
        g_rows, p_rows, s_rows = _Members(grads, n), _Members(params, n), _Members(opt_state, n)
        opts = self.optimizer if isinstance(self.optimizer, PerMember) else (self.optimizer,) * n
        for i, opt in enumerate(opts):
            new_p, new_s = optim_step(opt, g_rows.tree(i), s_rows.tree(i), p_rows.tree(i), inplace=True)
            _write_back(new_p, p_rows.views(i))
            _write_back(new_s, s_rows.views(i))
        return params, opt_state

    def _merged_plan(self, params: dict[str, torch.Tensor], opt_state: Any) -> _Merged | None:
        """The cached :class:`_Merged` plan for this state's shapes and structure."""
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in params.items()), tree_structure(opt_state))
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans[key] = _Merged.plan(self.optimizer, params, opt_state)  # type: ignore[arg-type]
        return plans[key]

    # the step -------------------------------------------------------------------
    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        n = num_members(state)
        if n is None:
            raise ValueError("an ensemble step needs a stacked state: fnlight.stack_states([state, ...])")
        if isinstance(self.optimizer, PerMember) and len(self.optimizer) != n:
            raise ValueError(f"the step has {len(self.optimizer)} optimizers (one per member) and the state "
                             f"{n} members")
        if not state.params:
            raise ValueError("the state has no trainable parameters, so there is nothing to train")
        if self.member_batches:
            sizes = {int(t.shape[0]) for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0}
            if sizes != {n}:
                raise ValueError(f"member_batches=True needs every batch tensor to have a leading member axis of {n}, "
                                 f"got leading sizes {sorted(sizes)}")
        if self.model.training is False:
            self.model.train(True)
        size = self.member_chunk or n
        parts = [self._members(_rows(state, a, a + size), _rows(batch, a, a + size) if self.member_batches else batch,
                               a) for a in range(0, n, size)]
        if len(parts) == 1:
            params, opt_state, buffers, out = parts[0]
        elif self.donate:  # the chunks' results are (or are copied into) the donated state's rows
            for a, (p, o, b, _) in zip(range(0, n, size), parts, strict=True):
                _write_back(p, _rows(state.params, a, a + size))
                _write_back(o, _rows(state.opt_state, a, a + size))
                _write_back(b, _rows(state.buffers, a, a + size))
            params, opt_state, buffers = state.params, state.opt_state, state.buffers
            out = _cat([part[3] for part in parts])
        else:
            params, opt_state, buffers, out = (_cat(list(trees)) for trees in zip(*parts, strict=True))
        return state.replace(params=params, buffers=buffers, opt_state=opt_state, step=state.step + 1), out

    def _members(self, state: TrainState, batch: Any, first: int) -> tuple[Any, Any, Any, Metrics]:
        """One vectorized pass over the members of ``state`` (all of them, or a chunk whose first
        member is number ``first``): new params, optimizer state, buffers, and the metrics."""
        keys = fr.fold_in(state.key, state.step)  # per member: fold_in(key_i, step_i)
        buffers = {k: v.clone() for k, v in state.buffers.items()}
        with _explain_vmap_errors("ensemble train step"):
            grads, loss, metrics, buffers = self._grads(state.params, buffers, batch, keys)
        if distributed.world_size() > 1:
            grads = distributed.all_reduce_mean(grads)
        # One non-finite check per member, before any update (so a donated state can still skip one).
        finite = torch.isfinite(member_norms(grads)) & torch.isfinite(loss)
        if distributed.world_size() > 1:  # every rank must take the same decision
            finite = distributed.all_reduce_mean({"f": finite.double()})["f"] == 1
        if bool(finite.all()):
            params, opt_state = self._apply(grads, state, self.donate)
        else:
            bad = [first + i for i, f in enumerate(finite.tolist()) if not f]
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite loss or gradients in ensemble member(s) {bad} at step {state.step.tolist()} "
                    f"(loss={loss.tolist()}). Use on_nonfinite='skip' to skip those members' updates, or lower "
                    "the learning rate / clip the gradients.")
            params, opt_state = self._apply(grads, state, False)

            def keep(new: Any, old: Any) -> Any:
                return torch.where(_expand(finite, new), new, old) if isinstance(new, torch.Tensor) else new
            params = tree_map(keep, params, state.params)
            opt_state = tree_map(keep, opt_state, state.opt_state)
            buffers = tree_map(keep, buffers, state.buffers)
        out = {"loss": loss, **metrics}
        if self.on_nonfinite == "skip":
            out["skipped"] = (~finite).float()
        return params, opt_state, buffers, out


# -- the ensemble eval step ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class EnsembleEvalStep:
    """``eval_step(stacked_state, batch) -> metrics`` of shape ``[members]``; see ``make_eval_step(ensemble=True)``."""

    model: torch.nn.Module
    metrics_fn: Callable[[Callable[..., Any], Any], Mapping[str, Any]]
    precision: Precision = "32"
    member_batches: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fns", _ModelFns(self.model, self.precision))
        object.__setattr__(self, "_eval", _vmap_tree(self._member, (0, 0, 0 if self.member_batches else None)))

    def _member(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any) -> Metrics:
        with _Vectorizable(None), autocast(self.precision, params[next(iter(params))].device):
            out = self.metrics_fn(self._fns.run(params, buffers), batch)
        if not isinstance(out, Mapping):
            raise TypeError(f"metrics_fn must return a dict of scalar metrics, got {type(out).__name__}")
        return {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in out.items()}

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        if num_members(state) is None:
            raise ValueError("an ensemble eval step needs a stacked state: fnlight.stack_states([state, ...])")
        if self.model.training:
            self.model.train(False)
        with torch.no_grad(), _explain_vmap_errors("ensemble eval step"):
            return self._eval(state.params, state.buffers, batch)


# -- per-sample gradients and DP-SGD ---------------------------------------------------------

def _one_sample(batch: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, batch)


def _check_per_sample_model(model: torch.nn.Module) -> None:
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.SyncBatchNorm)
    bad = [n for n, m in model.named_modules() if isinstance(m, norms)]
    if bad:
        raise TypeError(f"per-sample gradients are not defined for BatchNorm (it mixes the samples of a batch): "
                        f"{bad[0]!r}. Use GroupNorm or LayerNorm (as Opacus requires).")


@dataclass(frozen=True, eq=False)
class PerSampleGrads:
    """``(state, batch) -> grads``; see :func:`per_sample_grads`."""

    model: torch.nn.Module
    loss_fn: LossFn
    precision: Precision = "32"

    def __post_init__(self) -> None:
        _check_per_sample_model(self.model)
        object.__setattr__(self, "_fns", _ModelFns(self.model, self.precision))
        object.__setattr__(self, "_vmapped", _vmap_tree(grad_and_value(self._sample_loss), (None, None, 0, 0)))

    def _sample_loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], sample: Any,
                     key: torch.Tensor) -> torch.Tensor:
        with _Vectorizable(key), autocast(self.precision, key.device):
            loss, _ = split_loss(self.loss_fn(self._fns.run(params, buffers), _one_sample(sample), key))
        return loss.float()

    def with_losses(self, state: TrainState, batch: Any,
                    key: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients and per-sample losses (``[batch]``)."""
        if self.model.training is False:
            self.model.train(True)
        n = batch_size(batch)
        base = fr.fold_in(state.key, state.step) if key is None else key
        keys = fr.fold_in(base.expand(n), torch.arange(n, device=base.device))
        with _explain_vmap_errors("per-sample gradients"):
            return self._vmapped(state.params, state.buffers, batch, keys)

    def __call__(self, state: TrainState, batch: Any, key: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample gradients of ``batch`` at ``state``; sample ``i`` draws from ``fold_in(key, i)``
        (``key`` defaults to this step's key, ``fold_in(state.key, state.step)``)."""
        return self.with_losses(state, batch, key)[0]


def per_sample_grads(model: torch.nn.Module, loss_fn: LossFn, *, precision: Precision = "32") -> PerSampleGrads:
    """``(state, batch) -> grads``: a tree like ``state.params`` whose leaves have a leading batch axis,
    ``grads[k][i]`` the gradient of the loss of sample ``i`` alone (``vmap(grad)``, as Opacus's
    per-sample gradients). ``loss_fn(model_fn, batch, key)`` is the ordinary step's: it sees one sample
    with a leading batch axis of size 1. Dropout draws per sample from ``fold_in(step_key, i)``.
    BatchNorm, which mixes the samples of a batch, is refused.

    Example:
        ```python
        psg = fnlight.per_sample_grads(model, loss_fn)
        g = psg(fnlight.TrainState.create(model, fo.sgd(0.1)), (torch.randn(5, 4), torch.randint(0, 2, (5,))))
        tuple(g["weight"].shape)
        # (5, 2, 4)
        ```
    """
    return PerSampleGrads(model, loss_fn, precision)


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD (Abadi et al., 2016) for ``make_train_step(..., dp=DPConfig(...))``.

    Each sample's gradient is clipped to ``clip_norm`` (its global L2 norm over all parameters, factor
    ``min(1, clip_norm / norm)``), the clipped gradients are summed, Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` is added (drawn from the state's key, so a run is reproducible and
    resumes exactly), and the sum is divided by the batch size: Opacus's ``DPOptimizer`` arithmetic,
    except that Opacus divides by ``norm + 1e-6``.

    Example:
        >>> dp = fnlight.DPConfig(clip_norm=1.0, noise_multiplier=1.1)
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: int | None = None
    """Divide by this instead of the batch's size (Opacus's ``expected_batch_size``): with Poisson
    sampling the actual size depends on the data, and dividing by it is not private."""

    def __post_init__(self) -> None:
        if self.expected_batch_size is not None and self.expected_batch_size < 1:
            raise ValueError(f"DPConfig.expected_batch_size must be >= 1, got {self.expected_batch_size}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"DPConfig.clip_norm must be a positive finite number, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"DPConfig.noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}")


_NOISE_SALT = 0x5EED  # the noise key: fold_in(step_key, _NOISE_SALT), apart from the samples' fold_in(key, i)


def clip_per_sample(per: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sum over samples of per-sample gradients clipped to ``clip_norm`` (global L2 norm over all
    parameters, factor ``min(1, clip_norm / norm)``), and the per-sample norms before clipping.

    Example:
        >>> summed, norms = clip_per_sample({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, 1.0)
        >>> summed["w"], norms
        (tensor([0.9000, 1.2000]), tensor([5.0000, 0.5000]))
    """
    names = list(per)
    n = per[names[0]].shape[0]
    norms = torch.stack([per[k].reshape(n, -1).double().pow(2).sum(1) for k in names]).sum(0).sqrt()
    factor = torch.clamp(clip_norm / norms, max=1.0)  # norm 0: inf, clamped to 1
    return {k: torch.einsum("n,n...->...", factor.to(per[k].dtype), per[k]) for k in names}, norms.to(torch.float32)


@dataclass(frozen=True, eq=False)
class DPTrainStep:
    """``train_step(state, batch) -> (state, metrics)`` with DP-SGD gradients; see ``make_train_step(dp=...)``.

    Metrics: ``loss`` (the batch's mean loss, before clipping), ``grad_norm`` (the mean per-sample
    gradient norm before clipping) and ``clipped`` (the fraction of samples that were clipped).
    """

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: GradientTransformation
    dp: DPConfig
    accumulate: int = 1
    precision: Precision = "32"
    donate: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        checks.check_step_options(self.accumulate, self.precision, self.on_nonfinite)
        object.__setattr__(self, "_psg", PerSampleGrads(self.model, self.loss_fn, self.precision))

    def donating(self) -> DPTrainStep:
        """The same step with ``donate=True``."""
        return self if self.donate else dataclasses.replace(self, donate=True)

    def gradients(self, state: TrainState, batch: Any) -> tuple[dict[str, torch.Tensor], Metrics]:
        """The noised, averaged DP gradient of ``batch`` at ``state``, and the step's metrics."""
        key = fr.fold_in(state.key, state.step)
        n = batch_size(batch)
        if n < self.accumulate:
            raise ValueError(f"accumulate={self.accumulate} needs batches of at least that many samples, got {n}")
        total: dict[str, torch.Tensor] = {}
        losses, norms = [], []
        offset = 0
        for chunk in _chunks(batch, self.accumulate):  # sample i keeps key fold_in(key, i) in any chunking
            m = batch_size(chunk)
            keys = fr.fold_in(key.expand(m), torch.arange(offset, offset + m, device=key.device))
            with _explain_vmap_errors("per-sample gradients"):
                per, loss_i = self._psg._vmapped(state.params, state.buffers, chunk, keys)
            summed, norm_i = clip_per_sample(per, self.dp.clip_norm)
            total = {k: total[k] + v for k, v in summed.items()} if total else summed
            losses.append(loss_i)
            norms.append(norm_i)
            offset += m
        noise_key = fr.fold_in(key, _NOISE_SALT)
        std = self.dp.noise_multiplier * self.dp.clip_norm
        divisor = self.dp.expected_batch_size or n
        grads = {}
        for j, (k, summed) in enumerate(total.items()):
            if std > 0:
                summed = summed + fr.normal(fr.fold_in(noise_key, j), tuple(summed.shape), dtype=summed.dtype) * std
            grads[k] = summed / divisor
        norm = torch.cat(norms)
        return grads, {"loss": torch.cat(losses).mean(), "grad_norm": norm.mean(),
                       "clipped": (norm > self.dp.clip_norm).float().mean()}

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if num_members(state) is not None:
            raise ValueError("dp= takes an ordinary state, not a stacked one (ensembles with DP are not supported)")
        if self.model.training is False:
            self.model.train(True)
        grads, metrics = self.gradients(state, batch)
        if distributed.world_size() > 1:
            grads = distributed.all_reduce_mean(grads)
        if not bool(torch.isfinite(global_norm(list(grads.values()))) & torch.isfinite(metrics["loss"])):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"non-finite loss or gradients at step {int(state.step)} "
                                     f"(loss={float(metrics['loss'])}). Use on_nonfinite='skip' to skip such steps, "
                                     "or lower the learning rate.")
            return state.replace(step=state.step + 1), {**metrics, "skipped": torch.ones(())}
        params, opt_state = optim_step(self.optimizer, grads, state.opt_state, state.params, inplace=self.donate)
        if self.on_nonfinite == "skip":
            metrics["skipped"] = torch.zeros(())
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def _chunks(batch: Any, k: int) -> list[Any]:
    if k == 1:
        return [batch]
    return [tree_map(lambda t, i=i: torch.tensor_split(t, k)[i] if isinstance(t, torch.Tensor) else t, batch)
            for i in range(k)]


def make_vectorized_train_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: GradientTransformation, *,
                               accumulate: int, clip: float | None, precision: Precision,
                               compile: bool | Mapping[str, Any], donate: bool, on_nonfinite: Literal["raise", "skip"],
                               sync_batchnorm: bool, ensemble: bool, member_batches: bool,
                               member_chunk: int | None, dp: DPConfig | None) -> EnsembleTrainStep | DPTrainStep:
    """``make_train_step(..., ensemble=True)`` or ``make_train_step(..., dp=...)`` (checks the combination)."""
    if sync_batchnorm:
        raise ValueError("sync_batchnorm is not supported with ensemble=True or dp=")
    if member_batches and not ensemble:
        raise ValueError("member_batches=True goes with ensemble=True")
    if member_chunk is not None and not ensemble:
        raise ValueError("member_chunk goes with ensemble=True")
    if dp is not None:
        if not isinstance(dp, DPConfig):
            raise TypeError(f"dp= takes a fnlight.DPConfig, got {type(dp).__name__}")
        if ensemble:
            raise ValueError("ensemble=True with dp= is not supported: train DP models one at a time")
        if clip is not None:
            raise ValueError("with dp=, gradients are clipped per sample to dp.clip_norm: leave clip=None")
        if compile:
            raise ValueError("compile=True is not supported with dp= (the per-sample step runs eagerly)")
        return DPTrainStep(model, loss_fn, optimizer, dp, accumulate, precision, donate, on_nonfinite)
    return EnsembleTrainStep(model, loss_fn, optimizer, accumulate, clip, precision, compile, donate, on_nonfinite,
                             member_batches, member_chunk)
