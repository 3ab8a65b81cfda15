"""Many models in one step: stacked states and ensemble steps.

A fnlight state is a pytree, so N states with the same structure can be stacked
leaf by leaf (:func:`stack_states`) and trained together by one step built with
``torch.func.vmap`` (``make_train_step(..., ensemble=True)``): a seed ensemble, or
a learning-rate grid whose values live in the optimizer state
(``fnlight.optim.inject_hyperparams``). Each member draws its dropout from its own
key (:mod:`fnlight.train._vmap`), so reordering or repeating members changes nothing
for the others. The same machinery gives per-sample gradients and DP-SGD
(:mod:`fnlight.train.dp`).

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

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import optree
import torch
from torch.func import grad_and_value

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
from ._vmap import ModelFns, Vectorizable, explain_vmap_errors, vmap_tree
from .state import TrainState
from .step import LossFn, Metrics, NonFiniteError, Precision, autocast, split_loss

if TYPE_CHECKING:
    from .dp import DPConfig, DPTrainStep

__all__ = [
    "EnsembleEvalStep", "EnsembleTrainStep", "PerMember", "make_vectorized_train_step", "member_metrics",
    "member_norms", "num_members", "scalar_step", "spread_members", "stack_states", "unstack_states",
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

    def shared_equal(self, s_leaves: list[Any], device: torch.device) -> torch.Tensor:
        """Whether the members' shared state (count, hyperparameters) is equal, as a bool tensor on ``device``
        (read by the caller together with the non-finite check: one host sync for both). Where it is not
        (e.g. a learning-rate sweep), the members are updated one by one instead of with :meth:`apply`."""
        same = [(t == t[:1]).all().to(device) for (j, member) in self.slots if member is None
                for t in (s_leaves[j],) if isinstance(t, torch.Tensor)]
        return torch.stack(same).all() if same else torch.ones((), dtype=torch.bool, device=device)

    def apply(self, opt: GradientTransformation, grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
              s_leaves: list[Any]) -> None:
        """Update the stacked ``params`` and optimizer state (its leaves ``s_leaves``) in place with one call;
        the members' shared state must be equal (:meth:`shared_equal`)."""
        rows: dict[int, tuple[torch.Tensor, ...]] = {}
        leaves: list[Any] = []
        for j, member in self.slots:
            t = s_leaves[j]
            if not isinstance(t, torch.Tensor):
                leaves.append(t)
            elif member is None:
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
        fns = ModelFns(self.model, self.precision)
        batch_axis = 0 if self.member_batches else None
        grads = vmap_tree(self._member_grads, (0, 0, batch_axis, 0))
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
        with Vectorizable(key), autocast(self.precision, device):
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

    def _apply(self, grads: dict[str, torch.Tensor], state: TrainState, inplace: bool,
               merged: tuple[_Merged, list[Any]] | None) -> tuple[Any, Any]:
        """New params and optimizer state: each member's update is the ordinary step's
        (``fnlight.optim.step``, fused kernels included) on its slices of the stacked tensors.

        A ``per_tensor`` optimizer (element-wise ones such as SGD and Adam, and per-tensor ones such as
        lamb and adafactor) updates all members in one call, each member's slices as tensors of their
        own (:class:`_Merged`), when the members share their count and hyperparameters; otherwise (a
        sweep, one optimizer per member, global-norm clipping in the optimizer) one call per member.
        ``merged`` is the one-call plan and the state's leaves (from :meth:`_merged_plan`), or ``None``.
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
        if merged is not None:
            plan, s_leaves = merged
            plan.apply(self.optimizer, grads, params, s_leaves if inplace else tree_leaves(opt_state))  # type: ignore[arg-type]
            return params, opt_state
        n = len(next(iter(params.values())))
        g_rows, p_rows, s_rows = _Members(grads, n), _Members(params, n), _Members(opt_state, n)
        opts = self.optimizer if isinstance(self.optimizer, PerMember) else (self.optimizer,) * n
        for i, opt in enumerate(opts):
            new_p, new_s = optim_step(opt, g_rows.tree(i), s_rows.tree(i), p_rows.tree(i), inplace=True)
            _write_back(new_p, p_rows.views(i))
            _write_back(new_s, s_rows.views(i))
        return params, opt_state

    def _merged_plan(self, state: TrainState) -> tuple[_Merged, list[Any]] | None:
        """The cached :class:`_Merged` plan for this state's shapes and structure, and the state's optimizer
        state leaves; ``None`` where the optimizer is not ``per_tensor`` or its state does not map."""
        if isinstance(self.optimizer, PerMember) or not self.optimizer.per_tensor:
            return None
        s_leaves, spec = tree_flatten(state.opt_state)
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in state.params.items()), spec)
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans[key] = _Merged.plan(self.optimizer, state.params, state.opt_state)
        return None if plans[key] is None else (plans[key], s_leaves)

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
        with explain_vmap_errors("ensemble train step"):
            grads, loss, metrics, buffers = self._grads(state.params, buffers, batch, keys)
        if distributed.world_size() > 1:
            grads = distributed.all_reduce_mean(grads)
        # One non-finite check per member, before any update (so a donated state can still skip one).
        finite = torch.isfinite(member_norms(grads)) & torch.isfinite(loss)
        if distributed.world_size() > 1:  # every rank must take the same decision
            finite = distributed.all_reduce_mean({"f": finite.double()})["f"] == 1
        merged = self._merged_plan(state)
        checks = [finite.all()] + ([merged[0].shared_equal(merged[1], finite.device)] if merged else [])
        all_finite, *shared_equal = torch.stack(checks).tolist()  # one host sync for both decisions
        if shared_equal != [True]:
            merged = None
        if all_finite:
            params, opt_state = self._apply(grads, state, self.donate, merged)
        else:
            bad = [first + i for i, f in enumerate(finite.tolist()) if not f]
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite loss or gradients in ensemble member(s) {bad} at step {state.step.tolist()} "
                    f"(loss={loss.tolist()}). Use on_nonfinite='skip' to skip those members' updates, or lower "
                    "the learning rate / clip the gradients.")
            params, opt_state = self._apply(grads, state, False, merged)

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
        object.__setattr__(self, "_fns", ModelFns(self.model, self.precision))
        object.__setattr__(self, "_eval", vmap_tree(self._member, (0, 0, 0 if self.member_batches else None)))

    def _member(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any) -> Metrics:
        with Vectorizable(None), autocast(self.precision, params[next(iter(params))].device):
            out = self.metrics_fn(self._fns.run(params, buffers), batch)
        if not isinstance(out, Mapping):
            raise TypeError(f"metrics_fn must return a dict of scalar metrics, got {type(out).__name__}")
        return {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in out.items()}

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        if num_members(state) is None:
            raise ValueError("an ensemble eval step needs a stacked state: fnlight.stack_states([state, ...])")
        if self.model.training:
            self.model.train(False)
        with torch.no_grad(), explain_vmap_errors("ensemble eval step"):
            return self._eval(state.params, state.buffers, batch)


def make_vectorized_train_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: GradientTransformation, *,
                               accumulate: int, clip: float | None, precision: Precision,
                               compile: bool | Mapping[str, Any], donate: bool, on_nonfinite: Literal["raise", "skip"],
                               sync_batchnorm: bool, ensemble: bool, member_batches: bool,
                               member_chunk: int | None, dp: DPConfig | None) -> EnsembleTrainStep | DPTrainStep:
    """``make_train_step(..., ensemble=True)`` or ``make_train_step(..., dp=...)`` (checks the combination)."""
    from .dp import DPConfig, DPTrainStep  # (dp imports this module)

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


def __getattr__(name: str) -> Any:
    """Per-sample gradients and DP-SGD moved to :mod:`fnlight.train.dp`; their old names here still resolve."""
    if name in ("DPConfig", "DPTrainStep", "PerSampleGrads", "clip_per_sample", "per_sample_grads"):
        from . import dp

        return getattr(dp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
