"""fnlight.optim: pure, optax-style optimizers that match ``torch.optim`` numerically.

One family per file, as optax separates them: the protocol, ``chain`` and the shared
arithmetic (``_base``), small transformations and masks (``_transforms``), SGD (``_sgd``), the
Adam family (``_adam``), RMSprop/Adagrad/Adadelta (``_adaptive``), optax-only optimizers
(``_optax_only``), parameter groups (``_combinators``), hyperparameters in the state
(``_hyperparams``), wrappers and the weight EMA (``_wrappers``), schedules (``_schedules``).

Example:
    >>> import torch, fnlight.optim as fo
    >>> opt = fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(fo.warmup_cosine(1e-3, 100, 1000)))
    >>> params = {"w": torch.ones(2, 2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.full((2, 2), 0.1)}, state, params)
    >>> params = fo.apply_updates(params, updates)
"""

from ._adam import (
    AdamaxState,
    AdamState,
    BeliefState,
    NadamState,
    adabelief,
    adam,
    adamax,
    adamw,
    nadam,
    radam,
    scale_by_adam,
)
from ._adaptive import AdadeltaState, AdagradState, RmspropState, adadelta, adagrad, rmsprop
from ._base import (
    EmptyState,
    GradientTransformation,
    Piece,
    apply_updates,
    chain,
    sharded,
    step,
    tensor_norms,
    update_count,
)
from ._combinators import MaskedState, MultiTransformState, freeze, label_by_name, masked, multi_transform, set_to_zero
from ._hyperparams import InjectState, hyperparams, inject_hyperparams, set_hyperparams
from ._optax_only import FactoredState, LarsState, LionState, adafactor, lamb, lars, lion
from ._schedules import (
    Schedule,
    constant,
    cosine_decay,
    cosine_warm_restarts,
    exponential_decay,
    join_schedules,
    linear_warmup,
    multistep,
    one_cycle,
    polynomial,
    step_decay,
    warmup_cosine,
)
from ._sgd import SgdState, TraceState, sgd, trace
from ._transforms import (
    CountState,
    add_decayed_weights,
    clip_by_global_norm,
    default_decay_mask,
    global_norm,
    scale,
    scale_by_learning_rate,
)
from ._wrappers import (
    ApplyIfFiniteState,
    EmaState,
    ZeroNansState,
    adaptive_grad_clip,
    apply_if_finite,
    clip,
    ema_params,
    with_ema,
    zero_nans,
)

#: Every NamedTuple an fnlight optimizer state may hold (checkpoints look them up by name).
STATE_TYPES: tuple[type, ...] = (
    AdadeltaState, AdagradState, AdamState, AdamaxState, ApplyIfFiniteState, BeliefState, CountState, EmaState,
    EmptyState, FactoredState, InjectState, LarsState, LionState, MaskedState, MultiTransformState, NadamState,
    RmspropState, SgdState, TraceState, ZeroNansState,
)

__all__ = [
    "AdadeltaState",
    "AdagradState",
    "AdamState",
    "AdamaxState",
    "ApplyIfFiniteState",
    "BeliefState",
    "CountState",
    "EmaState",
    "EmptyState",
    "FactoredState",
    "GradientTransformation",
    "InjectState",
    "LarsState",
    "LionState",
    "MaskedState",
    "MultiTransformState",
    "NadamState",
    "Piece",
    "RmspropState",
    "STATE_TYPES",
    "Schedule",
    "SgdState",
    "TraceState",
    "ZeroNansState",
    "adabelief",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adaptive_grad_clip",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "cosine_warm_restarts",
    "default_decay_mask",
    "ema_params",
    "exponential_decay",
    "freeze",
    "global_norm",
    "hyperparams",
    "inject_hyperparams",
    "join_schedules",
    "label_by_name",
    "lamb",
    "lars",
    "linear_warmup",
    "lion",
    "masked",
    "multi_transform",
    "multistep",
    "nadam",
    "one_cycle",
    "polynomial",
    "radam",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "set_hyperparams",
    "set_to_zero",
    "sgd",
    "sharded",
    "step",
    "step_decay",
    "tensor_norms",
    "trace",
    "update_count",
    "warmup_cosine",
    "with_ema",
    "zero_nans",
]
assert sorted(__all__) == __all__
