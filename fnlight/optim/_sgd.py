"""SGD and its momentum (``trace``), with torch.optim.SGD's foreach arithmetic.

Parity notes: with ``dampening`` the momentum buffer starts with the first gradient undamped,
as torch's does; a constant learning rate ends with torch's ``add_(d, alpha=-lr)`` (bitwise
equal to ``SGD(foreach=True)``); a scheduled or injected one multiplies first (one more rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._base import (
    Direction,
    GradientTransformation,
    OptState,
    Params,
    Scalar,
    Spec,
    Term,
    Updates,
    axpy,
    count_up,
    counter,
    fe,
    first_leaf,
    flatten,
    foreach,
    is_zero,
    l2,
    negate,
    optimizer,
    tree_zeros_like,
)
from ._schedules import Schedule
from ._transforms import Mask, mask_indices


class TraceState(NamedTuple):
    count: torch.Tensor
    trace: dict[str, torch.Tensor]


class SgdState(NamedTuple):
    count: torch.Tensor
    momentum: dict[str, torch.Tensor] | None


def momentum_step(g: list[torch.Tensor], buf: list[torch.Tensor], count: torch.Tensor, momentum: Scalar,
                  nesterov: bool, dampening: Scalar, inplace: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torch.optim.SGD's momentum: the new direction and buffer (the direction may be the buffer)."""
    buf = foreach("mul", buf, momentum, inplace=inplace)
    if is_zero(dampening):  # the zero-initialized buffer makes the first step buf = g, as torch
        buf = foreach("add", buf, g, inplace=inplace)
    else:  # torch starts the buffer with the undamped gradient
        damped = axpy(buf, g, 1.0 - dampening, inplace=False)
        new = [torch.where(count == 0, gi, di) for gi, di in zip(g, damped, strict=True)]
        if inplace:
            fe("copy_", buf, new)
        else:
            buf = new
    if nesterov:
        return axpy(g, buf, momentum, inplace=inplace), buf
    return buf, buf


def _check_nesterov(momentum: Scalar, nesterov: bool, dampening: Scalar) -> None:
    if nesterov and ((not isinstance(momentum, torch.Tensor) and momentum <= 0)
                     or (not isinstance(dampening, torch.Tensor) and dampening != 0)):
        raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0 (as in torch.optim.SGD)")


def trace(momentum: Scalar, nesterov: bool = False, dampening: Scalar = 0.0) -> GradientTransformation:
    """Momentum, as torch's SGD: ``buf = momentum * buf + (1 - dampening) * g``
    (``buf = g`` on the first step), then ``g + momentum * buf`` if ``nesterov`` else ``buf``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.1))  # fo.sgd(0.1, momentum=0.9)
    """
    _check_nesterov(momentum, nesterov, dampening)

    def init(params: Params) -> TraceState:
        return TraceState(counter(first_leaf(params)), tree_zeros_like(params))

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        g, spec = flatten(updates)
        out, buf = momentum_step(g, spec.flatten_up_to(state.trace), state.count, momentum, nesterov, dampening,
                                 inplace)
        if out is buf:  # the direction must not alias the buffer: later ops may scale it in place
            out = foreach("copy", g, buf, inplace=True) if inplace else list(fe("mul", buf, 1.0))
        return spec.unflatten(out), TraceState(count_up(state.count, inplace), spec.unflatten(buf))

    return GradientTransformation(init, update, per_tensor=True)


def sgd(learning_rate: float | Schedule, momentum: Scalar = 0.0, nesterov: bool = False,
        weight_decay: Scalar = 0.0, dampening: Scalar = 0.0, mask: Mask | None = None,
        maximize: bool = False) -> GradientTransformation:
    """Stochastic gradient descent, with torch.optim.SGD's arithmetic (foreach version).

    ``weight_decay`` is L2 added to the gradient (limited to the parameters ``mask`` selects).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    """
    _check_nesterov(momentum, nesterov, dampening)
    has_momentum = not is_zero(momentum)

    def init(params: Params) -> SgdState:
        leaves, spec = flatten(params)
        if not is_zero(weight_decay):
            mask_indices(mask, params, spec, "weight-decay mask")
        return SgdState(counter(first_leaf(params)), tree_zeros_like(params) if has_momentum else None)

    def core(g: list[torch.Tensor], state: SgdState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, SgdState]:
        g = negate(g, maximize)
        inplace_g = inplace or maximize
        if not is_zero(weight_decay):
            g = l2(g, p, weight_decay, mask_indices(mask, spec.unflatten(p), spec, "weight-decay mask"),
                   inplace=inplace_g)
        buf = state.momentum
        if has_momentum:
            g, b = momentum_step(g, spec.flatten_up_to(state.momentum), state.count, momentum, nesterov,
                                 dampening, inplace)
            buf = spec.unflatten(b)
        return Direction([Term("axpy", g, None, -lr)]), SgdState(count_up(state.count, inplace), buf)

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=mask is None)
