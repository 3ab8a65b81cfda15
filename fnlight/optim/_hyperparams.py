"""Hyperparameters held in the optimizer state: ``inject_hyperparams``, ``hyperparams``,
``set_hyperparams`` (optax's ``inject_hyperparams``).

The values are float64 0-d tensors in the state, so a compiled step reads them as inputs
(changing one does not recompile), checkpoints save them, an ensemble can stack them with a
leading member axis, and a callback can replace them between steps.

Example:
    >>> import torch, fnlight.optim as fo
    >>> opt = fo.inject_hyperparams(fo.adamw)(learning_rate=1e-3, weight_decay=0.1)
    >>> state = opt.init({"w": torch.zeros(2)})
    >>> float(fo.hyperparams(state)["learning_rate"])
    0.001
    >>> state = fo.set_hyperparams(state, learning_rate=1e-4)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._base import GradientTransformation, OptState, Params, Updates, count_up, counter, first_leaf
from ._combinators import MultiTransformState

#: Arguments that are never hyperparameters in the state: they shape the optimizer (masks,
#: flags, sizes), so they stay Python values.
STATIC_ARGS = frozenset({
    "mask", "weight_decay_mask", "trust_ratio_mask", "labels", "fused", "amsgrad", "nesterov", "centered",
    "maximize", "decoupled_weight_decay", "factored", "multiply_by_parameter_scale", "min_dim_size_to_factor",
    "decay_offset", "initial_accumulator_value", "clipping_threshold", "momentum_dtype",
})


class InjectState(NamedTuple):
    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]  # the numbers (set_hyperparams replaces them)
    scheduled: dict[str, torch.Tensor]  # the schedules' values at the last update (at 0 after init)
    inner_state: OptState


def inject_hyperparams(factory: Callable[..., GradientTransformation],
                       static_args: tuple[str, ...] = ()) -> Callable[..., GradientTransformation]:
    """``inject_hyperparams(factory)(**hparams)``: the optimizer ``factory(**hparams)`` whose
    numeric hyperparameters live in its state. A number becomes a float64 0-d tensor in
    ``state.hyperparams``, replaceable with :func:`set_hyperparams`; a callable (other than the
    masks in :data:`STATIC_ARGS` and ``static_args``) is a schedule of the update count,
    evaluated before each update and stored there (as optax: the value the last update used).
    Booleans, None, masks and sizes are passed as they are.

    Each update calls ``factory`` with the tensors, so every fnlight optimizer works; Adam's
    fused kernel still runs when only the learning rate is injected (on CPU it reads the value).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.inject_hyperparams(fo.sgd)(learning_rate=fo.linear_warmup(0.1, 10), momentum=0.9)
    """
    sig = inspect.signature(factory)
    static_names = STATIC_ARGS | set(static_args)

    def make(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind_partial(*args, **kwargs).arguments
        schedules: dict[str, Callable[[Any], Any]] = {}
        numbers: dict[str, float] = {}
        static: dict[str, Any] = {}
        for name, value in bound.items():
            if name in static_names or value is None or isinstance(value, bool | str):
                static[name] = value
            elif callable(value):
                schedules[name] = value
            elif isinstance(value, int | float | torch.Tensor):
                numbers[name] = value
            else:
                static[name] = value

        def scheduled(count: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {}
            for name, sched in schedules.items():
                v = sched(count)
                out[name] = torch.as_tensor(v, device=count.device).to(torch.float64)
            return out

        def init(params: Params) -> InjectState:
            leaf = first_leaf(params)
            device = leaf.device if leaf is not None else None
            nums = {k: torch.as_tensor(v, dtype=torch.float64, device=device).clone() for k, v in numbers.items()}
            count = counter(leaf)
            sch = scheduled(count)
            return InjectState(count, nums, sch, factory(**static, **nums, **sch).init(params))

        def update(updates: Updates, state: InjectState, params: Params | None = None, *,
                   inplace: bool = False) -> tuple[Updates, InjectState]:
            sch = scheduled(state.count)
            opt = factory(**static, **state.hyperparams, **sch)
            u, inner = opt.update(updates, state.inner_state, params, inplace=inplace)
            return u, InjectState(count_up(state.count, inplace), state.hyperparams, sch, inner)

        def step(grads: Updates, state: InjectState, params: Params, *, inplace: bool = False
                 ) -> tuple[Params, InjectState]:
            from ._base import step as opt_step

            sch = scheduled(state.count)
            opt = factory(**static, **state.hyperparams, **sch)
            p, inner = opt_step(opt, grads, state.inner_state, params, inplace=inplace)
            return p, InjectState(count_up(state.count, inplace), state.hyperparams, sch, inner)

        lr = bound.get("learning_rate")
        rate = None
        if callable(lr):
            from ._schedules import as_schedule

            rate = as_schedule(lr)
        elif isinstance(lr, int | float):
            from ._schedules import constant

            rate = constant(float(lr))
        # per tensor as the optimizer it makes (its hyperparameters are scalars shared by all tensors)
        per_tensor = factory(**static, **numbers, **schedules).per_tensor
        return GradientTransformation(init, update, step, rate, per_tensor)

    make.__doc__ = f"{getattr(factory, '__name__', 'factory')} with its hyperparameters in the optimizer state."
    return make


def _find(state: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], InjectState]]:
    if isinstance(state, InjectState):
        return [(path, state)]
    if isinstance(state, MultiTransformState):
        return [f for k, s in state.inner_states.items() for f in _find(s, (*path, k))]
    if isinstance(state, dict):
        return [f for s in state.values() for f in _find(s, path)]
    if isinstance(state, tuple):
        return [f for s in state for f in _find(s, path)]
    return []


def _no_hparams() -> ValueError:
    return ValueError("the optimizer state holds no injected hyperparameters: build the optimizer with "
                      "fo.inject_hyperparams, e.g. fo.inject_hyperparams(fo.adamw)(learning_rate=1e-3)")


def hyperparams(opt_state: OptState) -> dict[str, Any]:
    """The injected hyperparameters of an optimizer state, name -> 0-d float64 tensor; with
    parameter groups (:func:`multi_transform`) of several injected optimizers, group -> that.

    Example:
        >>> import torch, fnlight.optim as fo
        >>> opt = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1)
        >>> fo.hyperparams(opt.init({"w": torch.zeros(1)}))
        {'learning_rate': tensor(0.1000, dtype=torch.float64)}
    """
    found = _find(opt_state)
    if not found:
        raise _no_hparams()
    if len(found) == 1:
        return {**found[0][1].hyperparams, **found[0][1].scheduled}
    return {".".join(path) or str(i): {**s.hyperparams, **s.scheduled} for i, (path, s) in enumerate(found)}


def set_hyperparams(opt_state: OptState, group: str | None = None, **values: float | torch.Tensor) -> OptState:
    """A new optimizer state with these hyperparameters replaced (the given state is unchanged),
    in every injected optimizer that has them, or only in parameter group ``group``. The new
    values keep the old tensors' dtype, shape and device, so a compiled step does not recompile.

    Example:
        >>> import torch, fnlight.optim as fo
        >>> opt = fo.inject_hyperparams(fo.adamw)(learning_rate=1e-3)
        >>> state = fo.set_hyperparams(opt.init({"w": torch.zeros(1)}), learning_rate=3e-4)
    """
    if not _find(opt_state):
        raise _no_hparams()
    touched: set[str] = set()

    def replace(s: InjectState) -> InjectState:
        hp = dict(s.hyperparams)
        for k, v in values.items():
            if k in hp:
                old = hp[k]
                new = torch.as_tensor(v, dtype=old.dtype, device=old.device)
                hp[k] = new.expand_as(old).clone() if new.shape != old.shape else new.clone()
                touched.add(k)
        return s._replace(hyperparams=hp)

    def walk(state: Any, path: tuple[str, ...]) -> Any:
        if isinstance(state, InjectState):
            return replace(state) if group is None or group in path else state
        if isinstance(state, MultiTransformState):
            return MultiTransformState({k: walk(s, (*path, k)) for k, s in state.inner_states.items()})
        if isinstance(state, dict):
            return {k: walk(s, path) for k, s in state.items()}
        if isinstance(state, tuple) and hasattr(state, "_fields"):
            return type(state)(*(walk(s, path) for s in state))
        if isinstance(state, tuple):
            return tuple(walk(s, path) for s in state)
        return state

    out = walk(opt_state, ())
    missing = sorted(set(values) - touched)
    if missing:
        found = _find(opt_state)
        known = sorted({k for _, s in found for k in s.hyperparams})
        sched = sorted({k for _, s in found for k in s.scheduled} & set(missing))
        where = f" in group {group!r}" if group is not None else ""
        if sched:
            raise ValueError(f"set_hyperparams: {sched} follow a schedule, recomputed at every update; inject a "
                             "number instead to set it between steps")
        raise ValueError(f"set_hyperparams: no injected hyperparameter {missing}{where}; the state has {known}")
    return out
