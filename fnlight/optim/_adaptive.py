"""Per-element adaptive step sizes without Adam's first moment: ``rmsprop``, ``adagrad``,
``adadelta``, with torch.optim's foreach arithmetic (bitwise ``foreach=True`` for a constant
learning rate).

Parity notes: RMSprop's ``eps`` is added outside the square root (as torch; optax's
``rmsprop`` too, but it has no ``centered`` variance correction in the same place and names
``alpha`` ``decay``); Adagrad's accumulator starts at ``initial_accumulator_value``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._base import (
    Direction,
    GradientTransformation,
    Params,
    Scalar,
    Spec,
    Term,
    addcmul,
    count_up,
    counter,
    f64,
    fe,
    first_leaf,
    flatten,
    foreach,
    is_zero,
    l2,
    lerp,
    negate,
    optimizer,
    per_step,
    tree_zeros_like,
)
from ._schedules import Schedule


class RmspropState(NamedTuple):
    count: torch.Tensor
    nu: Any  # square_avg
    mu: Any | None  # grad_avg (centered)
    momentum: Any | None


class AdagradState(NamedTuple):
    count: torch.Tensor
    sum: Any


class AdadeltaState(NamedTuple):
    count: torch.Tensor
    nu: Any  # square_avg
    delta: Any  # acc_delta


def rmsprop(learning_rate: float | Schedule = 1e-2, alpha: Scalar = 0.99, eps: Scalar = 1e-8,
            weight_decay: Scalar = 0.0, momentum: Scalar = 0.0, centered: bool = False,
            maximize: bool = False) -> GradientTransformation:
    """RMSprop with torch.optim.RMSprop's arithmetic: ``v = alpha * v + (1 - alpha) * g**2``,
    step ``lr * g / (sqrt(v - mean(g)**2 if centered else v) + eps)``, through a momentum buffer
    when ``momentum > 0``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.rmsprop(1e-2, momentum=0.9, centered=True)
    """
    has_momentum = not is_zero(momentum)

    def init(params: Params) -> RmspropState:
        z = tree_zeros_like
        return RmspropState(counter(first_leaf(params)), z(params), z(params) if centered else None,
                            z(params) if has_momentum else None)

    def core(g: list[torch.Tensor], state: RmspropState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, RmspropState]:
        g = negate(g, maximize)
        count = count_up(state.count, inplace)
        g = l2(g, p, weight_decay, None, inplace=inplace or maximize)
        nu = foreach("mul", spec.flatten_up_to(state.nu), alpha, inplace=inplace)
        nu = addcmul(nu, g, g, 1.0 - alpha, inplace=inplace)
        mu = None
        if centered:
            mu = lerp(spec.flatten_up_to(state.mu), g, 1.0 - alpha, inplace=inplace)
            avg = addcmul(nu, mu, mu, -1.0, inplace=False)
            fe("sqrt_", avg)
        else:
            avg = list(fe("sqrt", nu))
        fe("add_", avg, eps)
        new = RmspropState(count, spec.unflatten(nu), spec.unflatten(mu) if centered else None, None)
        if has_momentum:
            buf = foreach("mul", spec.flatten_up_to(state.momentum), momentum, inplace=inplace)
            buf = foreach("addcdiv", buf, g, avg, inplace=inplace)
            return Direction([Term("axpy", buf, None, -lr)]), new._replace(momentum=spec.unflatten(buf))
        return Direction([Term("addcdiv", g, avg, -lr)]), new

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)


def adagrad(learning_rate: float | Schedule = 1e-2, lr_decay: Scalar = 0.0, weight_decay: Scalar = 0.0,
            initial_accumulator_value: float = 0.0, eps: Scalar = 1e-10,
            maximize: bool = False) -> GradientTransformation:
    """Adagrad with torch.optim.Adagrad's arithmetic: ``sum += g**2``, step
    ``lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adagrad(1e-2, lr_decay=1e-3, initial_accumulator_value=0.1)
    """
    if initial_accumulator_value < 0:
        raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")

    def init(params: Params) -> AdagradState:
        leaves, spec = flatten(params)
        return AdagradState(counter(first_leaf(params)),
                            spec.unflatten([torch.full_like(t, initial_accumulator_value,
                                                            memory_format=torch.preserve_format) for t in leaves]))

    def core(g: list[torch.Tensor], state: AdagradState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, AdagradState]:
        g = negate(g, maximize)
        owned = inplace or maximize
        count = count_up(state.count, inplace)
        if not is_zero(weight_decay):
            g = l2(g, p, weight_decay, None, inplace=owned)
            owned = True
        t = f64(count)
        (minus_clr,) = per_step(-(f64(lr, t) / (1 + (t - 1) * lr_decay)))
        acc = foreach("addcmul", spec.flatten_up_to(state.sum), g, g, value=1, inplace=inplace)
        std = list(fe("sqrt", acc))
        fe("add_", std, eps)
        numerator = foreach("mul", g, minus_clr, inplace=owned)
        return Direction([Term("addcdiv", numerator, std, 1.0)]), AdagradState(count, spec.unflatten(acc))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)


def adadelta(learning_rate: float | Schedule = 1.0, rho: Scalar = 0.9, eps: Scalar = 1e-6,
             weight_decay: Scalar = 0.0, maximize: bool = False) -> GradientTransformation:
    """Adadelta with torch.optim.Adadelta's arithmetic: ``v = rho * v + (1 - rho) * g**2``,
    ``d = sqrt(u + eps) / sqrt(v + eps) * g``, ``u = rho * u + (1 - rho) * d**2``, step ``lr * d``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adadelta(1.0, rho=0.95)
    """

    def init(params: Params) -> AdadeltaState:
        return AdadeltaState(counter(first_leaf(params)), tree_zeros_like(params), tree_zeros_like(params))

    def core(g: list[torch.Tensor], state: AdadeltaState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, AdadeltaState]:
        count = count_up(state.count, inplace)
        g = negate(g, maximize)
        g = l2(g, p, weight_decay, None, inplace=inplace or maximize)
        nu = foreach("mul", spec.flatten_up_to(state.nu), rho, inplace=inplace)
        nu = addcmul(nu, g, g, 1.0 - rho, inplace=inplace)
        std = list(fe("add", nu, eps))
        fe("sqrt_", std)
        acc = spec.flatten_up_to(state.delta)
        deltas = list(fe("add", acc, eps))
        fe("sqrt_", deltas)
        fe("div_", deltas, std)
        fe("mul_", deltas, g)
        acc = foreach("mul", acc, rho, inplace=inplace)
        acc = addcmul(acc, deltas, deltas, 1.0 - rho, inplace=inplace)
        return (Direction([Term("axpy", deltas, None, -lr)]),
                AdadeltaState(count, spec.unflatten(nu), spec.unflatten(acc)))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)
