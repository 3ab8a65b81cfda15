"""The Adam family: ``adam``, ``adamw``, ``adamax``, ``nadam``, ``radam`` (torch.optim's foreach
arithmetic) and ``adabelief`` (optax's), on Adam's moments written once (:func:`moments`).

Parity notes:
- ``adam(weight_decay=w)`` is torch's Adam: L2 decay added to the gradient (coupled); ``adamw``
  decays the weights directly (decoupled, ``p *= 1 - lr * wd`` first), as torch's AdamW.
- Per-step scalars (bias corrections, step sizes, the decay factor) are computed in float64 from
  an int64 step counter, as torch does with Python floats, and rounded to each parameter's dtype
  where an op uses them.
- ``adam``/``adamw``'s ``step`` runs torch's fused kernel by default on CPU and CUDA outside
  ``torch.compile`` (bitwise ``Adam(fused=True)``), the foreach ops with ``fused=False`` or
  inside ``torch.compile`` (bitwise ``Adam(foreach=True)``); ``update`` follows the foreach ops.
- torch's Adam computes ``m / (sqrt(v) / sqrt(bc2) + eps) / bc1``; optax's ``m_hat / (sqrt(v_hat)
  + eps)`` is the same up to rounding (optax's ``eps_root`` is not in torch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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
    select,
    tree_zeros_like,
)
from ._schedules import Schedule
from ._transforms import Mask, mask_indices


class AdamState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any | None


class AdamaxState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any  # the exponentially weighted infinity norm


class NadamState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any
    mu_product: torch.Tensor  # torch keeps it in its scalar dtype (float32 unless the default is float64)


def moments(g: list[torch.Tensor], mu: list[torch.Tensor], nu: list[torch.Tensor], b1: Scalar, b2: Scalar,
            inplace: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adam's moments, as torch computes them: ``mu = lerp(mu, g, 1 - b1)``,
    ``nu = b2 * nu + (1 - b2) * g * g``."""
    mu = lerp(mu, g, 1.0 - b1, inplace=inplace)
    nu = foreach("mul", nu, b2, inplace=inplace)
    nu = addcmul(nu, g, g, 1.0 - b2, inplace=inplace)
    return mu, nu


def _decay_idx(weight_decay: Scalar, mask: Mask | None, p: list[torch.Tensor] | None, spec: Spec) -> list[int] | None:
    if is_zero(weight_decay):
        return []
    return mask_indices(mask, spec.unflatten(p), spec, "weight-decay mask")


def _all(n: int, idx: list[int] | None) -> list[int]:
    return list(range(n)) if idx is None else idx


def _validate(weight_decay: Scalar, mask: Mask | None) -> Any:
    def check(params: Params) -> None:
        if not is_zero(weight_decay) and mask is not None:
            leaves, spec = flatten(params)
            mask_indices(mask, params, spec, "weight-decay mask")
    return check


def _sqrt_denominator(nu: list[torch.Tensor], bc2_sqrt: Scalar, eps: Scalar) -> list[torch.Tensor]:
    denom = list(fe("sqrt", nu))
    fe("div_", denom, bc2_sqrt)
    fe("add_", denom, eps)
    return denom


def scale_by_adam(b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
                  amsgrad: bool = False) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)``, with the bias corrections
    folded in as torch does (``m / (sqrt(v) / sqrt(bc2) + eps) / bc1``).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(1e-3))  # fo.adam(1e-3)
    """

    def init(params: Params) -> AdamState:
        z = tree_zeros_like
        return AdamState(counter(first_leaf(params)), z(params), z(params), z(params) if amsgrad else None)

    def update(updates: Updates, state: OptState, params: Params | None = None, *,
               inplace: bool = False) -> tuple[Updates, OptState]:
        g, spec = flatten(updates)
        count = count_up(state.count, inplace)
        mu, nu = moments(g, spec.flatten_up_to(state.mu), spec.flatten_up_to(state.nu), b1, b2, inplace)
        nu_max = foreach("maximum", spec.flatten_up_to(state.nu_max), nu, inplace=inplace) if amsgrad else None
        t = f64(count)
        bc1, bc2_sqrt = per_step(1.0 - torch.pow(b1, t), torch.sqrt(1.0 - torch.pow(b2, t)))
        direction = foreach("div", mu, _sqrt_denominator(nu_max if amsgrad else nu, bc2_sqrt, eps), inplace=False)
        fe("div_", direction, bc1)
        new_state = AdamState(count, spec.unflatten(mu), spec.unflatten(nu),
                              spec.unflatten(nu_max) if amsgrad else None)
        return spec.unflatten(direction), new_state

    return GradientTransformation(init, update, per_tensor=True)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def can_fuse(tensors: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel may run: eager (inductor fuses the foreach version
    itself), CPU or CUDA, float dtypes, not under ``vmap`` (no batching rule)."""
    return (not torch.compiler.is_compiling()
            and all(t.device.type in ("cpu", "cuda") and t.dtype in _FUSED_DTYPES
                    and not torch._C._functorch.is_batchedtensor(t) for t in tensors))


def _adam(learning_rate: float | Schedule, b1: Scalar, b2: Scalar, eps: Scalar, weight_decay: Scalar,
          decoupled: bool, amsgrad: bool, mask: Mask | None, fused: bool | None,
          maximize: bool) -> GradientTransformation:
    numbers = not any(isinstance(h, torch.Tensor) for h in (b1, b2, eps, weight_decay))
    if fused and not numbers:
        raise ValueError("fused=True needs b1, b2, eps and weight_decay as numbers (the kernel takes floats)")
    check = _validate(weight_decay, mask)

    def init(params: Params) -> AdamState:
        check(params)
        z = tree_zeros_like
        return AdamState(counter(first_leaf(params)), z(params), z(params), z(params) if amsgrad else None)

    def core(g: list[torch.Tensor], state: AdamState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, AdamState]:
        """torch's foreach Adam/AdamW."""
        g = negate(g, maximize)
        count = count_up(state.count, inplace)
        decay = _decay_idx(weight_decay, mask, p, spec)
        if not decoupled:  # Adam's L2: added to the gradient
            g = l2(g, p, weight_decay, decay, inplace=inplace or maximize)
        mu, nu = moments(g, spec.flatten_up_to(state.mu), spec.flatten_up_to(state.nu), b1, b2, inplace)
        nu_max = foreach("maximum", spec.flatten_up_to(state.nu_max), nu, inplace=inplace) if amsgrad else None
        t = f64(count)
        lr64 = f64(lr, t)
        scalars = [-(lr64 / (1.0 - torch.pow(b1, t))), torch.sqrt(1.0 - torch.pow(b2, t))]
        if decoupled and decay != []:
            scalars.append(1.0 - lr64 * weight_decay)
        step_size, bc2_sqrt, *factor = per_step(*scalars)
        denom = _sqrt_denominator(nu_max if amsgrad else nu, bc2_sqrt, eps)
        new_state = AdamState(count, spec.unflatten(mu), spec.unflatten(nu),
                              spec.unflatten(nu_max) if amsgrad else None)
        direction = Direction([Term("addcdiv", mu, denom, step_size)], factor[0] if factor else None,
                              _all(len(g), decay) if factor else None)
        return direction, new_state

    base = optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=mask is None)

    def fused_step(grads: Updates, state: AdamState, params: Params, inplace: bool) -> tuple[Params, OptState]:
        """torch's fused Adam/AdamW kernel: one pass over each tensor (as Adam(fused=True)).

        The kernel reads and writes every tensor as one contiguous block, so a tensor that is not
        contiguous (a gradient from vmap, a transposed view) is given to it as a contiguous copy:
        otherwise it would pair the elements of differently laid-out tensors wrongly."""
        g, spec = flatten(grads)
        g = [t.contiguous() for t in g]
        p_in = spec.flatten_up_to(params)

        def own(xs: list[torch.Tensor]) -> list[torch.Tensor]:  # the kernel writes in place
            return [x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
                    for x in xs]

        p, mu, nu = own(p_in), own(spec.flatten_up_to(state.mu)), own(spec.flatten_up_to(state.nu))
        nu_max = own(spec.flatten_up_to(state.nu_max)) if amsgrad else None
        lr: Any = learning_rate
        if callable(learning_rate) or isinstance(learning_rate, torch.Tensor):
            rate = base.learning_rate(state.count)  # before counting up, which is in place when donating
            # torch passes a Python float: CPU reads the value at full precision; CUDA takes a float32 tensor
            # (inside a torch.func transform the value cannot be read: the kernel gets the tensor)
            lr = float(rate) if rate.device.type == "cpu" and not torch._C._are_functorch_transforms_active() \
                else rate.to(torch.float32 if rate.device.type == "cuda" else torch.float64)
        count = count_up(state.count, inplace)
        steps = count.to(torch.float32)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        decay = set(_all(len(g), _decay_idx(weight_decay, mask, p_in, spec)))
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(p_in):  # a kernel call takes one device, one dtype, one weight decay
            groups.setdefault((t.device, t.dtype, i in decay), []).append(i)
        for (_, _, decayed), ix in groups.items():
            kernel(select(p, ix), select(g, ix), select(mu, ix), select(nu, ix),
                   select(nu_max, ix) if nu_max is not None else [], [steps] * len(ix),
                   lr=lr, beta1=b1, beta2=b2, weight_decay=weight_decay if decayed else 0.0, eps=eps,
                   amsgrad=amsgrad, maximize=maximize)
        u = spec.unflatten
        return u(p), AdamState(count, u(mu), u(nu), u(nu_max) if amsgrad else None)

    def step(grads: Updates, state: OptState, params: Params, *, inplace: bool = False) -> tuple[Params, OptState]:
        use_fused = numbers and (fused if fused is not None else can_fuse(flatten(params)[0]))
        if use_fused:
            return fused_step(grads, state, params, inplace)
        return base.step(grads, state, params, inplace=inplace)

    return GradientTransformation(init, base.update, step, base.learning_rate, base.per_tensor)


def adam(learning_rate: float | Schedule = 1e-3, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
         weight_decay: Scalar = 0.0, amsgrad: bool = False, mask: Mask | None = None,
         fused: bool | None = None, maximize: bool = False) -> GradientTransformation:
    """Adam with torch.optim.Adam's arithmetic (``weight_decay`` is L2 added to the gradient).

    ``fused``: the ``step`` runs torch's fused kernel (bitwise ``Adam(fused=True)``, one pass
    per tensor) or, with ``fused=False``, the foreach ops (bitwise ``Adam(foreach=True)``). By
    default it is fused on CPU and CUDA, except inside ``torch.compile`` (which fuses the foreach
    version itself) and when a hyperparameter other than the learning rate is a tensor
    (:func:`inject_hyperparams`). ``update`` always follows the foreach arithmetic.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adam(fo.warmup_cosine(1e-3, 100, 10_000))
    """
    return _adam(learning_rate, b1, b2, eps, weight_decay, False, amsgrad, mask, fused, maximize)


def adamw(learning_rate: float | Schedule = 1e-3, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
          weight_decay: Scalar = 1e-2, amsgrad: bool = False, mask: Mask | None = None,
          fused: bool | None = None, maximize: bool = False) -> GradientTransformation:
    """AdamW (decoupled weight decay) with torch.optim.AdamW's arithmetic.

    ``mask`` limits the decay, e.g. ``mask=default_decay_mask`` spares biases, norms and
    embeddings. ``fused`` as in :func:`adam`. The ``update`` path decays by ``p * (1 - lr * wd)
    - p``, the same rounded factor torch multiplies the parameters by.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adamw(1e-3, weight_decay=0.05, mask=fo.default_decay_mask)
    """
    return _adam(learning_rate, b1, b2, eps, weight_decay, True, amsgrad, mask, fused, maximize)


def adamax(learning_rate: float | Schedule = 2e-3, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
           weight_decay: Scalar = 0.0, maximize: bool = False) -> GradientTransformation:
    """Adamax (Adam with the infinity norm), with torch.optim.Adamax's foreach arithmetic.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adamax(2e-3)
    """

    def init(params: Params) -> AdamaxState:
        return AdamaxState(counter(first_leaf(params)), tree_zeros_like(params), tree_zeros_like(params))

    def core(g: list[torch.Tensor], state: AdamaxState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, AdamaxState]:
        g = negate(g, maximize)
        owned = inplace or maximize
        count = count_up(state.count, inplace)
        if not is_zero(weight_decay):
            g = l2(g, p, weight_decay, None, inplace=owned)
            owned = True
        mu = lerp(spec.flatten_up_to(state.mu), g, 1.0 - b1, inplace=inplace)
        nu = foreach("mul", spec.flatten_up_to(state.nu), b2, inplace=inplace)
        a = foreach("abs", g, inplace=owned)
        fe("add_", a, eps)
        nu = foreach("maximum", nu, a, inplace=inplace)
        t = f64(count)
        (step_size,) = per_step(-(f64(lr, t) / (1.0 - torch.pow(b1, t))))
        return (Direction([Term("addcdiv", mu, nu, step_size)]),
                AdamaxState(count, spec.unflatten(mu), spec.unflatten(nu)))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def nadam(learning_rate: float | Schedule = 2e-3, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
          weight_decay: Scalar = 0.0, momentum_decay: Scalar = 4e-3, decoupled_weight_decay: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """NAdam (Adam with Nesterov momentum), with torch.optim.NAdam's foreach arithmetic
    (its momentum schedule ``b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``; the product of
    those kept in torch's scalar dtype, float32 unless the default dtype is float64).

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.nadam(2e-3, weight_decay=1e-2, decoupled_weight_decay=True)
    """

    def init(params: Params) -> NadamState:
        first = first_leaf(params)
        return NadamState(counter(first), tree_zeros_like(params), tree_zeros_like(params),
                          torch.ones((), dtype=_scalar_dtype(), device=first.device if first is not None else None))

    def core(g: list[torch.Tensor], state: NadamState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, NadamState]:
        g = negate(g, maximize)
        count = count_up(state.count, inplace)
        t = f64(count)
        lr64 = f64(lr, t)
        decay = None
        if not is_zero(weight_decay):
            if decoupled_weight_decay:
                decay = 1.0 - lr64 * weight_decay
            else:
                g = l2(g, p, weight_decay, None, inplace=inplace or maximize)
        mu, nu = moments(g, spec.flatten_up_to(state.mu), spec.flatten_up_to(state.nu), b1, b2, inplace)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t))
        mu_t = b1 * (1.0 - 0.5 * torch.pow(0.96, t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1) * momentum_decay))
        mu_product = state.mu_product * mu_t.to(state.mu_product.dtype)  # rounded, as torch's _foreach_mul_
        prod = mu_product.to(torch.float64)
        size_g = -(lr64 * (1.0 - mu_t) / (1.0 - prod))
        size_m = -(lr64 * mu_next / (1.0 - prod * mu_next))
        scalars = per_step(bc2_sqrt, size_g, size_m, *([decay] if decay is not None else []))
        denom = _sqrt_denominator(nu, scalars[0], eps)
        if inplace:
            state.mu_product.copy_(mu_product)
            mu_product = state.mu_product
        terms = [Term("addcdiv", g, denom, scalars[1]), Term("addcdiv", mu, denom, scalars[2])]
        return (Direction(terms, scalars[3] if decay is not None else None, list(range(len(g)))),
                NadamState(count, spec.unflatten(mu), spec.unflatten(nu), mu_product))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)


def radam(learning_rate: float | Schedule = 1e-3, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
          weight_decay: Scalar = 0.0, decoupled_weight_decay: bool = False,
          maximize: bool = False) -> GradientTransformation:
    """RAdam (rectified Adam), with torch.optim.RAdam's foreach arithmetic: plain momentum SGD
    steps while the variance estimate is not yet tractable (``rho_t <= 5``), then rectified Adam.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.radam(1e-3)
    """

    def init(params: Params) -> AdamState:
        return AdamState(counter(first_leaf(params)), tree_zeros_like(params), tree_zeros_like(params), None)

    def core(g: list[torch.Tensor], state: AdamState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, AdamState]:
        count = count_up(state.count, inplace)
        g = negate(g, maximize)
        t = f64(count)
        lr64 = f64(lr, t)
        rho_inf = 2 / (1 - f64(b2, t)) - 1
        b2t = torch.pow(b2, t)
        rho_t = rho_inf - 2 * t * b2t / (1 - b2t)
        decay = None
        if not is_zero(weight_decay):
            if decoupled_weight_decay:
                decay = 1.0 - lr64 * weight_decay
            else:
                g = l2(g, p, weight_decay, None, inplace=inplace or maximize)
        mu, nu = moments(g, spec.flatten_up_to(state.mu), spec.flatten_up_to(state.nu), b1, b2, inplace)
        rect = torch.where(rho_t > 5, torch.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                                                 / ((rho_inf - 4) * (rho_inf - 2) * rho_t)), 0.0)
        unrectified = torch.where(rect > 0, 0.0, 1.0).to(torch.float64)
        bc1 = 1 - torch.pow(b1, t)
        unrect_step = -(lr64 * unrectified / bc1)
        bc2 = -(torch.sqrt(1 - b2t) * (lr64 * rect / bc1))
        scalars = per_step(unrect_step, bc2, *([decay] if decay is not None else []))
        buffer = list(fe("sqrt", nu))
        fe("add_", buffer, eps)
        fe("div_", buffer, scalars[1])
        fe("reciprocal_", buffer)
        fe("add_", buffer, scalars[0])
        return (Direction([Term("addcmul", mu, buffer, 1.0)], scalars[2] if decay is not None else None,
                          list(range(len(g)))),
                AdamState(count, spec.unflatten(mu), spec.unflatten(nu), None))

    return optimizer(core, init, learning_rate, needs_params=not is_zero(weight_decay), per_tensor=True)


class BeliefState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any


def adabelief(learning_rate: float | Schedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-16,
              eps_root: Scalar = 1e-16, *, nesterov: bool = False) -> GradientTransformation:
    """AdaBelief, as optax's ``adabelief`` (same names and defaults): Adam whose second moment
    tracks the squared difference between the gradient and its running mean.

    Example:
        >>> import fnlight.optim as fo
        >>> opt = fo.adabelief(1e-3)
    """

    def init(params: Params) -> BeliefState:
        return BeliefState(counter(first_leaf(params)), tree_zeros_like(params), tree_zeros_like(params))

    def core(g: list[torch.Tensor], state: BeliefState, p: list[torch.Tensor] | None, spec: Spec, lr: Scalar,
             inplace: bool) -> tuple[Direction, BeliefState]:
        count = count_up(state.count, inplace)
        mu = lerp(spec.flatten_up_to(state.mu), g, 1.0 - b1, inplace=inplace)
        err = fe("sub", g, mu)
        nu = foreach("mul", spec.flatten_up_to(state.nu), b2, inplace=inplace)
        nu = addcmul(nu, err, err, 1.0 - b2, inplace=inplace)
        nu = foreach("add", nu, eps_root, inplace=inplace)
        t = f64(count)
        bc1, bc2 = 1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t)
        if nesterov:
            m_hat = fe("div", mu, 1.0 - torch.pow(b1, t + 1))
            fe("mul_", m_hat, b1)
            m_hat = fe("add", m_hat, fe("div", g, bc1), alpha=1.0 - b1) \
                if not isinstance(b1, torch.Tensor) else fe("add",
                    m_hat, fe("mul", fe("div", g, bc1), 1.0 - b1))
        else:
            m_hat = fe("div", mu, bc1)
        denom = fe("div", nu, bc2)
        fe("sqrt_", denom)
        fe("add_", denom, eps)
        direction = list(fe("div", m_hat, denom))
        return (Direction([Term("axpy", direction, None, -lr)]),
                BeliefState(count, spec.unflatten(mu), spec.unflatten(nu)))

    return optimizer(core, init, learning_rate, needs_params=False, per_tensor=True)

