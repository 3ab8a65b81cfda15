"""fnlight.optim: pure, optax-style optimizers that match ``torch.optim`` numerically.

Example:
    >>> import torch, fnlight.optim as fo
    >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(fo.warmup_cosine(1e-3, 100, 1000)))
    >>> params = {"w": torch.ones(2, 2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.full((2, 2), 0.1)}, state, params)
    >>> params = fo.apply_updates(params, updates)
"""

from ._base import GradientTransformation, apply_updates, chain, step, update_count
from ._schedules import Schedule, constant, cosine_decay, linear_warmup, step_decay, warmup_cosine
from ._transforms import (
    AdamState,
    CountState,
    EmptyState,
    SgdState,
    TraceState,
    adam,
    adamw,
    add_decayed_weights,
    clip_by_global_norm,
    default_decay_mask,
    global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    sgd,
    trace,
)

__all__ = [
    "AdamState",
    "CountState",
    "EmptyState",
    "GradientTransformation",
    "Schedule",
    "SgdState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "default_decay_mask",
    "global_norm",
    "linear_warmup",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "step",
    "step_decay",
    "trace",
    "update_count",
    "warmup_cosine",
]
assert sorted(__all__) == __all__
