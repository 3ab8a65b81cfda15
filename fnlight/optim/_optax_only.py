"""Optimizers torch.optim does not have, as optax defines them (same names, defaults and
arithmetic, checked against optax itself in float64): ``lion``, ``lamb``, ``lars``, ``adafactor``.

Each ends like every fnlight optimizer, so it has the fused ``step`` too; its arithmetic is
optax's chain written out (``lamb`` is ``scale_by_adam``, decoupled decay, trust ratio, learning
rate), on the moments of :mod:`fnlight.optim._adam`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from ._adam import moments
from ._base import (
    Direction,
    GradientTransformation,
    Params,
    Piece,
    Scalar,
    Spec,
    Term,
    axpy,
    count_up,
    counter,
    f64,
    fe,
    first_leaf,
    flatten,
    is_zero,
    l2,
    lerp,
    optimizer,
    piece_index,
    pieces_of,
    sum_across,
    sums_across,
    tensor_norms,
    tree_zeros_like,
    without_dim,
)
from ._schedules import Schedule
from ._transforms import Mask, mask_indices


class LionState(NamedTuple):
    count: torch.Tensor
    mu: Any


class LarsState(NamedTuple):
    count: torch.Tensor
    trace: Any


class FactoredState(NamedTuple):
    count: torch.Tensor
    v_row: Any
    v_col: Any
    v: Any
    ema: Any | None  # adafactor's momentum (optax's ema without debiasing)

    @staticmethod
    def sharding_keeps_whole(field: str, leaf: torch.Tensor, shape: torch.Size) -> bool:
        """Under ZeRO-1 sharding (:mod:`fnlight.train.zero`) every rank keeps the factored moments
        (``v_row``, ``v_col``: one row and one column statistic per matrix, small) and ``v``'s
        placeholders of factored matrices whole, updated identically from statistics summed across
        ranks; the unfactored second moments and the momentum are cut like the parameters."""
        return field in ("v_row", "v_col") or field == "v" and len(shape) >= 2 and leaf.dim() == 1


def _mask_idx(mask: Mask | None, p: list[torch.Tensor], spec: Spec) -> list[int] | None:
    return mask_indices(mask, spec.unflatten(p), spec, "mask") if mask is not None else None


def _trust_ratio(u: list[torch.Tensor], p: list[torch.Tensor], idx: list[int] | None, trust_coefficient: Scalar,
                 eps: Scalar) -> list[torch.Tensor]:
    """optax's ``scale_by_trust_ratio``: ``u * trust_coefficient * |p| / (|u| + eps)`` per tensor
    (1 when either norm is 0), for the leaves ``idx`` selects."""
    sel = list(range(len(u)) if idx is None else idx)
    out = list(u)
    norms = tensor_norms([p[i] for i in sel] + [u[i] for i in sel])  # (one all-reduce when sharded)
    for j, i in enumerate(sel):
        pn, un = norms[j], norms[len(sel) + j]
        ratio = trust_coefficient * pn / (un + eps)
        ratio = torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio)
        out[i] = u[i] * ratio
    return out


def lion(learning_rate: float | Schedule, b1: Scalar = 0.9, b2: Scalar = 0.99, weight_decay: Scalar = 1e-3,
         mask: Mask | None = None) -> GradientTransformation:
    """Lion (evolved sign momentum), as optax's ``lion``: ``sign((1 - b1) g + b1 m)`` plus
    decoupled ``weight_decay * p`` (for the parameters ``mask`` selects), times ``-lr``; then
    ``m = (1 - b2) g + b2 m``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.lion(1e-4, weight_decay=1e-2)
    """

    def init(params: Params) -> LionState:
        return LionState(counter(first_leaf(params)), tree_zeros_like(params))

    def core(g: list[torch.Tensor], state: LionState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, LionState]:
        mu = spec.flatten_up_to(state.mu)
        u = list(fe("lerp", mu, g, 1.0 - b1))
        fe("sign_", u)
        u = l2(u, p, weight_decay, _mask_idx(mask, p, spec), inplace=True)
        mu = lerp(mu, g, 1.0 - b2, inplace=inplace)
        return (Direction([Term("axpy", u, None, -lr)]),
                LionState(count_up(state.count, inplace), spec.unflatten(mu)))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay),
                     per_tensor=mask is None)


def lamb(learning_rate: float | Schedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-6,
         eps_root: Scalar = 0.0, weight_decay: Scalar = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """LAMB (layer-wise adaptive large-batch Adam), as optax's ``lamb``: Adam's direction
    ``m_hat / (sqrt(v_hat + eps_root) + eps)`` plus decoupled ``weight_decay * p``, scaled per
    tensor by ``|p| / |update|``, times ``-lr``.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.lamb(1e-3, weight_decay=1e-2)
    """

    def init(params: Params) -> Any:
        from ._adam import AdamState

        return AdamState(counter(first_leaf(params)), tree_zeros_like(params), tree_zeros_like(params), None)

    def core(g: list[torch.Tensor], state: Any, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, Any]:
        count = count_up(state.count, inplace)
        mu, nu = moments(g, spec.flatten_up_to(state.mu), spec.flatten_up_to(state.nu), b1, b2, inplace)
        t = f64(count)
        m_hat = fe("div", mu, 1.0 - torch.pow(b1, t))
        denom = fe("div", nu, 1.0 - torch.pow(b2, t))
        if not is_zero(eps_root):
            fe("add_", denom, eps_root)
        fe("sqrt_", denom)
        fe("add_", denom, eps)
        u = list(fe("div", m_hat, denom))
        u = l2(u, p, weight_decay, _mask_idx(mask, p, spec), inplace=True)
        u = _trust_ratio(u, p, None, 1.0, 0.0)
        return Direction([Term("axpy", u, None, -lr)]), state._replace(count=count, mu=spec.unflatten(mu),
                                                                        nu=spec.unflatten(nu))

    return optimizer(core, init, learning_rate, needs_params=True, per_tensor=mask is None)


def lars(learning_rate: float | Schedule, weight_decay: Scalar = 0.0, weight_decay_mask: Mask | bool = True,
         trust_coefficient: Scalar = 0.001, eps: Scalar = 0.0, trust_ratio_mask: Mask | bool = True,
         momentum: Scalar = 0.9, nesterov: bool = False) -> GradientTransformation:
    """LARS (layer-wise adaptive rate scaling), as optax's ``lars``: ``g + weight_decay * p``,
    scaled per tensor by ``trust_coefficient * |p| / (|.| + eps)``, times ``lr``, through
    optax's momentum ``t = u + momentum * t`` (the learning rate inside the buffer).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.lars(0.1, weight_decay=1e-4)
    """

    def init(params: Params) -> LarsState:
        return LarsState(counter(first_leaf(params)), tree_zeros_like(params))

    def core(g: list[torch.Tensor], state: LarsState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, LarsState]:
        wd_idx = None if weight_decay_mask is True else _mask_idx(weight_decay_mask, p, spec) \
            if weight_decay_mask is not False else []
        u = l2(g, p, weight_decay, wd_idx, inplace=inplace)
        tr_idx = None if trust_ratio_mask is True else _mask_idx(trust_ratio_mask, p, spec) \
            if trust_ratio_mask is not False else []
        u = _trust_ratio(u, p, tr_idx, trust_coefficient, eps)
        u = list(fe("mul", u, lr))
        trace = axpy(u, spec.flatten_up_to(state.trace), momentum, inplace=False)
        d = axpy(u, trace, momentum, inplace=False) if nesterov else trace
        if inplace:
            fe("copy_", spec.flatten_up_to(state.trace), trace)
            trace = spec.flatten_up_to(state.trace)
        return (Direction([Term("axpy", d, None, -1.0)]),
                LarsState(count_up(state.count, inplace), spec.unflatten(trace)))

    return optimizer(core, init, learning_rate, needs_params=True,
                     per_tensor=isinstance(weight_decay_mask, bool) and isinstance(trust_ratio_mask, bool))


def _factored_dims(shape: torch.Size, factored: bool, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))  # numpy's stable argsort
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return order[-2], order[-1]


def _rows_cols(piece: Piece, n: int, dims: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The flat indices, in the whole row and column moments, of a piece's ``n`` elements (made when
    needed, one tensor at a time: they take as much memory as the piece)."""
    flat = piece_index(piece, n, device)
    return without_dim(flat, piece.shape, dims[1]), without_dim(flat, piece.shape, dims[0])


def _piece_means(g: list[torch.Tensor], pieces: list[Piece], dims: list[tuple[int, int] | None], eps: float
                 ) -> list[Any]:
    """Sharded adafactor: the row and column means of each factored tensor's ``g * g + eps``, whole
    and the same on every rank (one all-reduce of the pieces' partial sums by row and column)."""
    factored = [i for i, d in enumerate(dims) if d is not None]

    def parts() -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
        for i in factored:
            (d1, d0), piece, gi = dims[i], pieces[i], g[i]
            rows, cols = _rows_cols(piece, gi.numel(), (d1, d0), gi.device)
            sq, n = gi * gi + eps, piece.shape.numel()
            yield sq, rows, n // piece.shape[d0]
            yield sq, cols, n // piece.shape[d1]

    sums = iter(sums_across(parts()))
    means: list[Any] = [None] * len(g)
    for i in factored:
        (d1, d0), shape, dtype = dims[i], pieces[i].shape, g[i].dtype
        row, col = next(sums), next(sums)
        means[i] = ((row / shape[d0]).to(dtype).view(_without(shape, d0)),
                    (col / shape[d1]).to(dtype).view(_without(shape, d1)))
    return means


def _without(shape: torch.Size, dim: int) -> list[int]:
    return [s for j, s in enumerate(shape) if j != dim]


def _rms(xs: list[torch.Tensor], pieces: list[Piece] | None) -> list[torch.Tensor]:
    """The root mean square of each tensor; of each whole tensor for pieces of them (one all-reduce)."""
    if pieces is None:
        return [torch.sqrt(torch.mean(x * x)) for x in xs]
    sums = sums_across((x * x, None, 1) for x in xs)
    return [torch.sqrt(s[0] / piece.shape.numel()).to(x.dtype) for s, piece, x in zip(sums, pieces, xs, strict=True)]


def adafactor(learning_rate: float | Schedule | None = None, min_dim_size_to_factor: int = 128,
              decay_rate: float = 0.8, decay_offset: int = 0, multiply_by_parameter_scale: bool = True,
              clipping_threshold: float | None = 1.0, momentum: float | None = None,
              weight_decay_rate: Scalar | None = None, eps: float = 1e-30, factored: bool = True,
              weight_decay_mask: Mask | None = None) -> GradientTransformation:
    """Adafactor, as optax's ``adafactor``: a second moment factored into row and column means
    for matrices with both sides >= ``min_dim_size_to_factor``, its decay ``1 - (t + 1) ** -0.8``
    (computed in float32, as optax does), updates clipped to RMS ``clipping_threshold``, scaled
    by the learning rate and by each parameter's RMS (at least 1e-3), optional momentum and
    decoupled weight decay. The momentum buffer has the parameters' dtype (optax keeps it in
    float32 by default). With sharded optimizer state (ZeRO-1) the row and column means and the
    RMS of whole tensors are summed from the ranks' pieces, and every rank keeps the factored
    moments whole (see :class:`FactoredState`): equal to the replicated update to float rounding.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adafactor(1e-2)
    """

    def init(params: Params) -> FactoredState:
        leaves, spec = flatten(params)
        rows, cols, vs = [], [], []
        for t in leaves:
            dims = _factored_dims(t.shape, factored, min_dim_size_to_factor)
            dummy = torch.zeros((1,), dtype=t.dtype, device=t.device)
            if dims is not None:
                d1, d0 = dims
                rows.append(torch.zeros_like(t.sum(d0)))
                cols.append(torch.zeros_like(t.sum(d1)))
                vs.append(dummy)
            else:
                rows.append(dummy)
                cols.append(dummy.clone())
                vs.append(torch.zeros_like(t))
        u = spec.unflatten
        return FactoredState(counter(first_leaf(params)), u(rows), u(cols), u(vs),
                             tree_zeros_like(params) if momentum is not None else None)

    def core(g: list[torch.Tensor], state: FactoredState, p: list[torch.Tensor] | None, spec: Spec, lr: Any,
             inplace: bool) -> tuple[Direction, FactoredState]:
        t = (state.count - decay_offset + 1).to(torch.float32)
        # float32, as optax. torch's scalar float32 pow differs from its vectorized one (and from XLA's) in
        # the last bit for some steps (t = 4); a 64-element tensor takes the vectorized kernel
        rate32 = 1.0 - (t.expand(64).contiguous() ** (-decay_rate))[0]
        rate, keep = rate32.to(torch.float64), (1.0 - rate32).to(torch.float64)  # optax: both in float32
        rows, cols, vs = (spec.flatten_up_to(x) for x in (state.v_row, state.v_col, state.v))
        # under ZeRO-1 sharding each leaf is a piece of its tensor: the row and column means, the
        # update's RMS and the parameter's are sums over whole tensors, of partial sums across ranks
        pieces = pieces_of(g, spec) if sum_across() is not None else None
        dims = [_factored_dims(x.shape, factored, min_dim_size_to_factor) for x in (g if pieces is None else pieces)]
        means = _piece_means(g, pieces, dims, eps) if pieces is not None else None
        new_rows, new_cols, new_vs, u = [], [], [], []
        for i, (gi, r, c, v) in enumerate(zip(g, rows, cols, vs, strict=True)):
            sq = gi * gi + eps if means is None or dims[i] is None else None
            if dims[i] is not None:
                d1, d0 = dims[i]
                mean_row, mean_col = (sq.mean(d0), sq.mean(d1)) if sq is not None else means[i]
                nr = (rate * r + keep * mean_row).to(gi.dtype)
                nc = (rate * c + keep * mean_col).to(gi.dtype)
                reduced = d1 - 1 if d1 > d0 else d1
                row_factor = (nr / nr.mean(reduced, keepdim=True)) ** -0.5
                col_factor = nc ** -0.5
                if pieces is None:
                    u.append(gi * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1))
                else:  # each element's row and column factors, by its row and column index
                    ri, ci = _rows_cols(pieces[i], gi.numel(), (d1, d0), gi.device)
                    u.append(gi * row_factor.reshape(-1)[ri].view(gi.shape) * col_factor.reshape(-1)[ci].view(gi.shape))
                new_rows.append(nr)
                new_cols.append(nc)
                new_vs.append(v)
            else:
                nv = (rate * v + keep * sq).to(gi.dtype)
                u.append(gi * nv ** -0.5)
                new_rows.append(r)
                new_cols.append(c)
                new_vs.append(nv)
        if clipping_threshold is not None:
            u = [x / torch.clamp(rms / clipping_threshold, min=1.0) for x, rms in zip(u, _rms(u, pieces), strict=True)]
        if learning_rate is not None:
            u = list(fe("mul", u, lr))
        if multiply_by_parameter_scale:
            u = [x * torch.clamp(rms, min=1e-3) for x, rms in zip(u, _rms(p, pieces), strict=True)]
        ema = None
        if momentum is not None:
            ema = list(fe("lerp", spec.flatten_up_to(state.ema), u, 1.0 - momentum))
            u = list(ema)
        if weight_decay_rate is not None:
            u = l2(u, p, weight_decay_rate, _mask_idx(weight_decay_mask, p, spec), inplace=momentum is None)
        s = spec.unflatten
        new = FactoredState(count_up(state.count, inplace), s(new_rows), s(new_cols), s(new_vs),
                            s(ema) if ema is not None else None)
        return Direction([Term("axpy", u, None, -1.0)]), new

    return optimizer(core, init, learning_rate if learning_rate is not None else 1.0, needs_params=True,
                     per_tensor=weight_decay_mask is None)

