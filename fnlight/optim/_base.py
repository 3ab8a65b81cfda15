"""The optimizer protocol, ``chain`` and ``apply_updates`` (optax's shape).

A :class:`GradientTransformation` is a pair of pure functions:
``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``.
Parameters, gradients and updates are dicts of tensors with the same keys.

``update(..., inplace=True)`` is the donating variant: it may overwrite the
incoming updates and its own state tensors instead of allocating new ones
(what ``make_train_step(donate=True)`` uses). Both variants compute the same
values with the same kernels, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
OptState = Any


class UpdateFn(Protocol):
    def __call__(self, updates: Updates, state: OptState, params: Params | None = None, *,
                 inplace: bool = False) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """``init`` and ``update`` of an optimizer or a piece of one.

    Optimizers (``sgd``, ``adam``, ``adamw``) also carry ``step(grads, state,
    params) -> (params, state)``, the update applied in one fused pass with
    torch.optim's own arithmetic (``make_train_step`` uses it), and their
    ``learning_rate`` schedule.

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


class StepFn(Protocol):
    def __call__(self, grads: Updates, state: OptState, params: Params, *,
                 inplace: bool = False) -> tuple[Params, OptState]: ...


def step(opt: GradientTransformation, grads: Updates, state: OptState, params: Params, *,
         inplace: bool = False) -> tuple[Params, OptState]:
    """New params and state from gradients: the optimizer's fused ``step`` if it has
    one, else ``update`` followed by ``apply_updates``.

    Example:
        >>> params, state = step(opt, grads, state, params)
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

    When the last one is an optimizer with a fused ``step``, the chain has one
    too (the others' updates, then that step).

    Example:
        >>> opt = chain(clip_by_global_norm(1.0), adam(1e-3))
    """

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: tuple[OptState, ...], params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, tuple[OptState, ...]]:
        return _run(transforms, updates, state, params, inplace)

    last = transforms[-1] if transforms else None
    # the chain's learning rate: the last element that has a schedule
    rate = next((t.learning_rate for t in reversed(transforms) if t.learning_rate is not None), None)
    if last is None or last.step is None:
        return GradientTransformation(init, update, None, rate)
    last_step = last.step

    def fused(grads: Updates, state: tuple[OptState, ...], params: Params, *,
              inplace: bool = False) -> tuple[Params, tuple[OptState, ...]]:
        grads, head = _run(transforms[:-1], grads, state[:-1], params, inplace)
        params, tail = last_step(grads, state[-1], params, inplace=inplace)
        return params, (*head, tail)

    return GradientTransformation(init, update, fused, rate)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False) -> Params:
    """``params + updates``, leaf by leaf (in place into ``params`` when ``inplace``).

    Example:
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    keys = list(params)
    p, u = [params[k] for k in keys], [updates[k] for k in keys]
    if inplace:
        torch._foreach_add_(p, u)
        return params
    return dict(zip(keys, torch._foreach_add(p, u), strict=True))


# -- helpers shared by the transforms ---------------------------------------

def values(tree: dict[str, torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
    return [tree[k] for k in keys]


def as_dict(keys: list[str], xs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    return dict(zip(keys, xs, strict=True))


def foreach(name: str, xs: list[torch.Tensor], *args: Any, inplace: bool, **kwargs: Any) -> list[torch.Tensor]:
    """``torch._foreach_<name>`` out of place, or ``_foreach_<name>_`` into ``xs``."""
    if inplace:
        getattr(torch, f"_foreach_{name}_")(xs, *args, **kwargs)
        return xs
    return list(getattr(torch, f"_foreach_{name}")(xs, *args, **kwargs))


def per_step(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-step float32 scalars an update multiplies every element by (learning
    rate, bias corrections), unchanged; under ``torch.compile``, stored in one buffer.

    Inductor inlines the computation of a 0-d value into every loop that reads
    it, so ``pow``/``cos`` of the step counter in float64 would be recomputed for
    each vector of each parameter: for Adam on 270k parameters that is half of
    the update's time on a CPU. A stack of two or more values is stored once,
    and the loops load it (a one-element stack is folded away, so one value is
    stacked with itself).

    Example:
        >>> step_size, bc2 = per_step(step_size, bc2)
    """
    if not torch.compiler.is_compiling():
        return scalars
    stacked = torch.stack(scalars if len(scalars) > 1 else scalars * 2)
    return tuple(stacked.unbind())[:len(scalars)]


def zeros_like(params: Params) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v, memory_format=torch.preserve_format) for k, v in params.items()}


def counter() -> torch.Tensor:
    # An int64 0-d tensor: torch.compile keeps in-place updates of it (it loses them
    # for 0-d float64 CPU inputs), and float32 counters drift.
    return torch.zeros((), dtype=torch.int64)


def update_count(state: OptState) -> torch.Tensor | None:
    """The number of updates an optimizer state has made (its first ``count`` field)."""
    if hasattr(state, "count") and isinstance(state.count, torch.Tensor):
        return state.count
    if isinstance(state, tuple):
        for s in state:
            c = update_count(s)
            if c is not None:
                return c
    return None
