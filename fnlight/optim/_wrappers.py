"""Wrappers and safety transforms with optax's semantics: ``apply_if_finite``, ``zero_nans``,
``clip``, ``adaptive_grad_clip``; and a weight EMA kept in the optimizer state (``with_ema``,
read with ``ema_params``).

Example:
    >>> import torch, fnlight.optim as fo
    >>> opt = fo.with_ema(fo.apply_if_finite(fo.adamw(1e-3), max_consecutive_errors=5), decay=0.999)
    >>> state = opt.init({"w": torch.zeros(2)})
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    Piece,
    Scalar,
    Updates,
    apply_updates,
    count_up,
    counter,
    fe,
    first_leaf,
    flatten,
    foreach,
    piece_index,
    pieces_of,
    sum_across,
    sums_across,
)
from ._base import step as opt_step


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def _all_finite(leaves: list[torch.Tensor]) -> torch.Tensor:
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in leaves]).all()


def _where(ok: torch.Tensor, new: Any, old: Any) -> Any:
    a, spec = flatten(new)
    b = spec.flatten_up_to(old)
    return spec.unflatten([torch.where(ok, x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(a, b,
                                                                                                       strict=True)])


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip updates whose gradients are not all finite (optax's ``apply_if_finite``): the
    update is zero and ``inner``'s state is kept, unless more than ``max_consecutive_errors``
    came in a row, when it is applied anyway. Counts in the state: ``notfinite_count``,
    ``last_finite``, ``total_notfinite``. No host sync: the choice is a ``torch.where``, so it
    compiles to one graph (``inner`` runs out of place).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.apply_if_finite(fo.adam(1e-3), max_consecutive_errors=3)
    """

    def init(params: Params) -> ApplyIfFiniteState:
        c = counter(first_leaf(params))
        return ApplyIfFiniteState(c, torch.ones((), dtype=torch.bool, device=c.device), c.clone(),
                                  inner.init(params))

    def decide(grads: Updates, state: ApplyIfFiniteState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        finite = _all_finite(flatten(grads)[0]).to(state.last_finite.device)
        count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        ok = finite | (count > max_consecutive_errors)
        return finite, count, ok

    def new_state(state: ApplyIfFiniteState, finite: torch.Tensor, count: torch.Tensor, ok: torch.Tensor,
                  inner_state: OptState) -> ApplyIfFiniteState:
        total = torch.where(finite, state.total_notfinite, state.total_notfinite + 1)
        return ApplyIfFiniteState(count, finite, total, _where(ok, inner_state, state.inner_state))

    def update(updates: Updates, state: ApplyIfFiniteState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, ApplyIfFiniteState]:
        finite, count, ok = decide(updates, state)
        u, inner_state = inner.update(updates, state.inner_state, params)
        leaves, spec = flatten(u)
        zero = spec.unflatten([torch.zeros_like(t) for t in leaves])
        return _where(ok, u, zero), new_state(state, finite, count, ok, inner_state)

    def step(grads: Updates, state: ApplyIfFiniteState, params: Params, *, inplace: bool = False
             ) -> tuple[Params, ApplyIfFiniteState]:
        finite, count, ok = decide(grads, state)
        p, inner_state = opt_step(inner, grads, state.inner_state, params)
        return _where(ok, p, params), new_state(state, finite, count, ok, inner_state)

    return GradientTransformation(init, update, step, inner.learning_rate)


class ZeroNansState(NamedTuple):
    found_nan: Any  # one bool per leaf: did this update have a NaN there?


def zero_nans() -> GradientTransformation:
    """Replace NaNs in the updates by zeros (optax's ``zero_nans``); the state records, per
    leaf, whether the last update had one.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.zero_nans(), fo.sgd(0.1))
    """

    def init(params: Params) -> ZeroNansState:
        leaves, spec = flatten(params)
        return ZeroNansState(spec.unflatten([torch.zeros((), dtype=torch.bool, device=t.device) for t in leaves]))

    def update(updates: Updates, state: ZeroNansState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, ZeroNansState]:
        u, spec = flatten(updates)
        found = [torch.isnan(t).any() for t in u]
        out = foreach("nan_to_num", u, nan=0.0, posinf=float("inf"), neginf=float("-inf"), inplace=inplace) \
            if hasattr(torch, "_foreach_nan_to_num") else \
            [torch.nan_to_num(t, nan=0.0, posinf=float("inf"), neginf=float("-inf")) for t in u]
        return spec.unflatten(out), ZeroNansState(spec.unflatten(found))

    return GradientTransformation(init, update)


def clip(max_delta: Scalar) -> GradientTransformation:
    """Clip every update element to ``[-max_delta, max_delta]`` (optax's ``clip``).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.clip(1.0), fo.sgd(0.1))
    """

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, EmptyState]:
        u, spec = flatten(updates)
        if isinstance(max_delta, torch.Tensor):
            return spec.unflatten([torch.clamp(t, -max_delta, max_delta) for t in u]), state
        out = foreach("clamp_min", u, -max_delta, inplace=inplace)
        return spec.unflatten(foreach("clamp_max", out, max_delta, inplace=True)), state

    return GradientTransformation(init, update)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-output-unit L2 norm, broadcast to ``x``'s shape: the whole tensor for scalars and
    vectors, else over every dim but the first (torch's ``(out, in, ...)`` layout)."""
    if x.squeeze().dim() <= 1:
        return torch.linalg.vector_norm(x).expand_as(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True).expand_as(x)


def _units(piece: Piece) -> int:
    """The output units :func:`_unitwise_norm` takes the norms of: rows, or the whole tensor as one."""
    return piece.shape[0] if piece.shape.numel() and sum(s != 1 for s in piece.shape) > 1 else 1


def _piece_unit_norms(g: list[torch.Tensor], p: list[torch.Tensor], pieces: list[Piece]
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_unitwise_norm` of the whole tensors whose pieces ``g`` and ``p`` are, for each element
    of the pieces (one all-reduce of the pieces' partial sums of squares per unit)."""

    def unit_of(x: torch.Tensor, piece: Piece) -> torch.Tensor | None:
        units = _units(piece)
        return piece_index(piece, x.numel(), x.device) // (piece.shape.numel() // units) if units > 1 else None

    sums = sums_across((x * x, unit_of(x, piece), _units(piece)) for xs in (g, p)
                       for x, piece in zip(xs, pieces, strict=True))
    out = []
    for j, (x, piece) in enumerate(zip(g, pieces, strict=True)):
        unit = unit_of(x, piece)
        g_norm, p_norm = (s.sqrt().to(x.dtype) for s in (sums[j], sums[len(g) + j]))
        out.append((g_norm[0], p_norm[0]) if unit is None else (g_norm[unit].view(x.shape), p_norm[unit].view(x.shape)))
    return out


def adaptive_grad_clip(clipping: Scalar, eps: Scalar = 1e-3) -> GradientTransformation:
    """Adaptive gradient clipping (NFNets; optax's ``adaptive_grad_clip``): each output unit's
    gradient is scaled down to at most ``clipping * max(|p_unit|, eps)``. Units are rows of a
    torch weight (``Linear``'s ``(out, in)``, ``Conv``'s ``(out, in, h, w)``); optax's are the
    last axis of JAX's ``(in, out)``/``HWIO`` layouts: the same units, transposed. With sharded
    optimizer state (ZeRO-1) the units' norms are summed from the ranks' pieces (one all-reduce).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.adaptive_grad_clip(0.01), fo.sgd(0.1, momentum=0.9))
    """

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: Updates, state: EmptyState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, EmptyState]:
        if params is None:
            raise ValueError("adaptive_grad_clip needs the params passed to update()")
        u, spec = flatten(updates)
        p = spec.flatten_up_to(params)
        # under ZeRO-1 sharding each leaf is a piece of its tensor: per-unit norms of partial sums across ranks
        norms = _piece_unit_norms(u, p, pieces_of(u, spec)) if sum_across() is not None else \
            [(_unitwise_norm(g), _unitwise_norm(w)) for g, w in zip(u, p, strict=True)]
        out = []
        for g, (g_norm, p_norm) in zip(u, norms, strict=True):
            max_norm = torch.clamp(p_norm, min=eps) * clipping
            clipped = g * (max_norm / torch.clamp(g_norm, min=1e-6))
            out.append(torch.where(g_norm < max_norm, g, clipped))
        return spec.unflatten(out), state

    return GradientTransformation(init, update)


class EmaState(NamedTuple):
    count: torch.Tensor
    ema: Any  # the averaged parameters
    inner_state: OptState


def with_ema(inner: GradientTransformation, decay: float = 0.999) -> GradientTransformation:
    """``inner`` that also keeps an exponential moving average of the parameters in its state:
    after each update ``ema = decay * ema + (1 - decay) * params`` (the first update copies the
    parameters), as ``torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=get_ema_multi_avg_fn(decay))`` updated after every optimizer step. Read it with
    :func:`ema_params`; checkpoints keep it with the rest of the optimizer state.

    Example:
        >>> import torch, fnlight, fnlight.optim as fo
        >>> opt = fo.with_ema(fo.adamw(1e-3), decay=0.999)
        >>> # ... train ...; evaluate the averaged weights:
        >>> # metrics = eval_step(state.replace(params=fo.ema_params(state.opt_state)), batch)
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")

    def init(params: Params) -> EmaState:
        leaves, spec = flatten(params)
        return EmaState(counter(first_leaf(params)), spec.unflatten([t.detach().clone() for t in leaves]),
                        inner.init(params))

    def average(state: EmaState, new_params: Params, inplace: bool) -> tuple[torch.Tensor, Any]:
        p, spec = flatten(new_params)
        ema = spec.flatten_up_to(state.ema)
        first = state.count == 0
        # AveragedModel: the first update copies, the next ones lerp by 1 - decay (torch._foreach_lerp_)
        lerped = foreach("lerp", ema, p, 1.0 - decay, inplace=False)
        new = [torch.where(first, x, y) for x, y in zip(p, lerped, strict=True)]
        if inplace:
            fe("copy_", ema, new)
            new = ema
        return count_up(state.count, inplace), spec.unflatten(new)

    def update(updates: Updates, state: EmaState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, EmaState]:
        if params is None:
            raise ValueError("with_ema needs the params passed to update()")
        u, inner_state = inner.update(updates, state.inner_state, params, inplace=inplace)
        count, ema = average(state, apply_updates(params, u), inplace)
        return u, EmaState(count, ema, inner_state)

    def step(grads: Updates, state: EmaState, params: Params, *, inplace: bool = False) -> tuple[Params, EmaState]:
        p, inner_state = opt_step(inner, grads, state.inner_state, params, inplace=inplace)
        count, ema = average(state, p, inplace)
        return p, EmaState(count, ema, inner_state)

    return GradientTransformation(init, update, step, inner.learning_rate)


def ema_params(opt_state: OptState) -> Params:
    """The averaged parameters a :func:`with_ema` optimizer keeps in its state (found anywhere in it).

    Example:
        >>> import torch, fnlight.optim as fo
        >>> opt = fo.with_ema(fo.sgd(0.1))
        >>> fo.ema_params(opt.init({"w": torch.ones(1)}))
        {'w': tensor([1.])}
    """
    if isinstance(opt_state, EmaState):
        return opt_state.ema
    children = opt_state.values() if isinstance(opt_state, dict) else opt_state if isinstance(opt_state, tuple) \
        else ()
    for s in children:
        try:
            return ema_params(s)
        except ValueError:
            continue
    raise ValueError("the optimizer state has no weight EMA: wrap the optimizer with fo.with_ema(opt, decay)")
