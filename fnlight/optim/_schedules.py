"""Learning-rate schedules: plain functions of the step (an int or an int64 tensor).

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


def as_schedule(lr: float | Schedule) -> Schedule:
    """A float becomes a constant schedule; a callable is used as it is."""
    return lr if callable(lr) else constant(float(lr))
