"""Learning-rate schedules: plain functions of the step (an int or an integer tensor).

They are written with torch ops on the step tensor, so inside a compiled step
a changing learning rate is a value flowing through the graph, not a
constant baked into it: no recompilation when it changes. Each returns a
float64 0-d tensor; the step is the number of updates made so far (0 for the
first update), as in optax and torch's LR schedulers.

Example:
    >>> import fnlight.optim as fo
    >>> sched = fo.warmup_cosine(peak=1e-3, warmup_steps=100, decay_steps=1000)
    >>> float(sched(0)), float(sched(100))
    (0.0, 0.001)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Schedule = Callable[[int | torch.Tensor], torch.Tensor]


def _step(step: int | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(step).to(torch.float64)


def _int_step(step: int | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(step).to(torch.int64)


def constant(value: float) -> Schedule:
    """Always ``value``. Example: ``constant(1e-3)(10)`` is ``tensor(0.001)``."""

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        return torch.full_like(_step(step), value)

    return schedule


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    """From ``init`` to ``peak`` linearly over ``warmup_steps``, then ``peak``.

    Example: ``linear_warmup(1.0, 10)(5)`` is ``tensor(0.5)``.
    """
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be > 0, got {warmup_steps}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(_step(step) / warmup_steps, max=1.0)
        return init + (peak - init) * frac

    return schedule


def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine from ``init`` down to ``alpha * init`` over ``decay_steps``, then flat.

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps,
    eta_min=alpha * init)`` for steps up to ``decay_steps``.
    Example: ``cosine_decay(1.0, 10)(10)`` is ``tensor(0.)``.
    """
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be > 0, got {decay_steps}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(_step(step) / decay_steps, max=1.0)
        cos = 0.5 * (1.0 + torch.cos(math.pi * frac))
        return init * ((1.0 - alpha) * cos + alpha)

    return schedule


def warmup_cosine(peak: float, warmup_steps: int, decay_steps: int, init: float = 0.0,
                  end: float = 0.0) -> Schedule:
    """Linear warmup from ``init`` to ``peak``, then cosine down to ``end``.

    ``decay_steps`` counts the whole schedule, warmup included (as optax's
    ``warmup_cosine_decay_schedule``).
    Example: ``warmup_cosine(1.0, 10, 110)(60)`` is ``tensor(0.5)``.
    """
    if not 0 < warmup_steps < decay_steps:
        raise ValueError(f"need 0 < warmup_steps < decay_steps, got {warmup_steps} and {decay_steps}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = _step(step)
        warm = init + (peak - init) * torch.clamp(s / warmup_steps, max=1.0)
        frac = torch.clamp((s - warmup_steps) / (decay_steps - warmup_steps), min=0.0, max=1.0)
        cos = end + (peak - end) * 0.5 * (1.0 + torch.cos(math.pi * frac))
        return torch.where(s < warmup_steps, warm, cos)

    return schedule


def step_decay(init: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init * gamma ** (step // step_size)``, as torch's ``StepLR``.

    Example: ``step_decay(1.0, 10, 0.5)(25)`` is ``tensor(0.25)``.
    """
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        return init * gamma ** torch.floor(_step(step) / step_size)

    return schedule


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float, transition_begin: int = 0,
                      staircase: bool = False, end_value: float | None = None) -> Schedule:
    """``init_value * decay_rate ** ((step - transition_begin) / transition_steps)`` (optax's
    ``exponential_decay``; ``init_value`` before ``transition_begin``), the exponent floored when
    ``staircase``, bounded by ``end_value``. With ``transition_steps=1`` it is torch's
    ``ExponentialLR(gamma=decay_rate)``; with ``staircase=True`` torch's ``StepLR``.

    Example: ``exponential_decay(1.0, 1, 0.5)(3)`` is ``tensor(0.125)``.
    """
    if transition_steps <= 0:
        raise ValueError(f"transition_steps must be > 0, got {transition_steps}")
    if decay_rate <= 0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = _step(step) - transition_begin
        p = s / transition_steps
        if staircase:
            p = torch.floor(p)
        value = torch.where(s <= 0, torch.full_like(s, init_value), init_value * torch.pow(decay_rate, p))
        if end_value is not None:
            value = torch.clamp(value, min=end_value) if decay_rate < 1 else torch.clamp(value, max=end_value)
        return value

    return schedule


def multistep(base_lr: float, milestones: list[int], gamma: float = 0.1) -> Schedule:
    """``base_lr * gamma ** (number of milestones <= step)``, as torch's ``MultiStepLR``.

    Example: ``multistep(1.0, [2, 4], 0.5)(4)`` is ``tensor(0.25)``.
    """
    marks = sorted(int(m) for m in milestones)
    if any(m < 0 for m in marks):
        raise ValueError(f"milestones must be >= 0, got {milestones}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = _int_step(step)
        passed = torch.bucketize(s, torch.tensor(marks, dtype=torch.int64, device=s.device), right=True)
        return base_lr * torch.pow(torch.tensor(gamma, dtype=torch.float64, device=s.device), passed)

    return schedule


def polynomial(base_lr: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """``base_lr * (1 - min(step, total_iters) / total_iters) ** power``, as torch's ``PolynomialLR``.

    Example: ``polynomial(1.0, total_iters=4, power=2.0)(2)`` is ``tensor(0.25)``.
    """
    if total_iters <= 0:
        raise ValueError(f"total_iters must be > 0, got {total_iters}")

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = torch.clamp(_step(step), max=float(total_iters))
        return base_lr * (1.0 - s / total_iters) ** power

    return schedule


def cosine_warm_restarts(base_lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> Schedule:  # noqa: N803
    """Cosine from ``base_lr`` to ``eta_min`` over ``T_0`` steps, restarting; each period ``T_mult``
    times the last, as torch's ``CosineAnnealingWarmRestarts`` stepped once per update.

    Example: ``cosine_warm_restarts(1.0, T_0=10)(10)`` is ``tensor(1.)`` (a restart).
    """
    if T_0 <= 0 or not isinstance(T_0, int):
        raise ValueError(f"T_0 must be a positive int, got {T_0!r}")
    if T_mult < 1 or not isinstance(T_mult, int):
        raise ValueError(f"T_mult must be an int >= 1, got {T_mult!r}")
    starts = [0]  # the steps at which a period starts (beyond 2**62 nobody trains)
    period = T_0
    while T_mult > 1 and starts[-1] + period < 2**62:
        starts.append(starts[-1] + period)
        period *= T_mult

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = _int_step(step)
        if T_mult == 1:
            t_cur, t_i = torch.remainder(s, T_0).to(torch.float64), float(T_0)
        else:
            table = torch.tensor(starts, dtype=torch.int64, device=s.device)
            n = torch.bucketize(s, table, right=True) - 1
            t_cur = (s - table[n]).to(torch.float64)
            t_i = T_0 * torch.pow(torch.tensor(float(T_mult), dtype=torch.float64, device=s.device), n)
        return eta_min + (base_lr - eta_min) * (1 + torch.cos(math.pi * t_cur / t_i)) / 2

    return schedule


def one_cycle(max_lr: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False) -> Schedule:
    """The 1cycle policy, as torch's ``OneCycleLR`` (its learning rate; fnlight does not cycle
    momentum): from ``max_lr / div_factor`` up to ``max_lr`` over ``pct_start`` of the steps,
    then down to ``max_lr / div_factor / final_div_factor`` (with ``three_phase``, back to the
    start first). Steps past ``total_steps - 1`` keep the last value (torch raises).

    Example: ``one_cycle(1.0, 100)(29)`` is ``tensor(1.)``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    initial = max_lr / div_factor
    final = initial / final_div_factor
    if three_phase:
        phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
                  (float(2 * pct_start * total_steps) - 2, max_lr, initial),
                  (total_steps - 1.0, initial, final)]
    else:
        phases = [(float(pct_start * total_steps) - 1, initial, max_lr), (total_steps - 1.0, max_lr, final)]

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = torch.clamp(_step(step), max=total_steps - 1.0)
        out = torch.zeros_like(s)
        begin, done = 0.0, torch.zeros_like(s, dtype=torch.bool)
        for i, (end_step, start, end) in enumerate(phases):
            last = i == len(phases) - 1
            here = ~done & (s <= end_step) if not last else ~done
            span = end_step - begin
            value = anneal(start, end, (s - begin) / span) if span != 0 else torch.full_like(s, end)
            out = torch.where(here, value, out)
            done = done | here
            begin = end_step
        return out

    return schedule


def join_schedules(schedules: list[Schedule], boundaries: list[int]) -> Schedule:
    """``schedules[i]`` from ``boundaries[i-1]`` on, called with the steps since that boundary
    (optax's ``join_schedules``).

    Example:
        >>> import fnlight.optim as fo
        >>> s = fo.join_schedules([fo.linear_warmup(1.0, 10), fo.cosine_decay(1.0, 90)], [10])
        >>> float(s(10)), float(s(100))
        (1.0, 0.0)
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"join_schedules needs one more schedule than boundaries, got {len(schedules)} schedules "
                         f"and {len(boundaries)} boundaries")
    parts = [as_schedule(s) for s in schedules]

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        s = _int_step(step)
        out = parts[0](s)
        for boundary, part in zip(boundaries, parts[1:], strict=True):
            out = torch.where(s < boundary, out, part(s - boundary))
        return out

    return schedule


def as_schedule(lr: float | torch.Tensor | Callable[[int | torch.Tensor], float | torch.Tensor]) -> Schedule:
    """A number becomes a constant schedule; a callable of the step returning a float or a
    tensor (LambdaLR-style) becomes a schedule returning a float64 tensor.

    Example: ``as_schedule(lambda s: 0.1 * 0.5 ** (s // 10))(20)`` is ``tensor(0.0250, dtype=torch.float64)``.
    """
    if isinstance(lr, torch.Tensor):  # an injected hyperparameter: used as it is (no .item())
        return lambda step: lr.to(torch.float64)
    if not callable(lr):
        return constant(float(lr))
    if getattr(lr, "__module__", None) == __name__:  # one of ours: float64 already
        return lr

    def schedule(step: int | torch.Tensor) -> torch.Tensor:
        value = lr(step)
        device = step.device if isinstance(step, torch.Tensor) else None
        return torch.as_tensor(value, dtype=torch.float64, device=device) if not isinstance(value, torch.Tensor) \
            else value.to(torch.float64)

    return schedule
