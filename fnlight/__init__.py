"""fnlight: pure-functional, JAX-style training for PyTorch.

Everything a run depends on is an explicit value: the data pipeline is an
immutable descriptor (:mod:`fnlight.data`), the weights, buffers, optimizer
state, step and key live in one :class:`TrainState`, and a step is a pure
function ``(state, batch) -> (state, metrics)`` built with ``torch.func``.

Example:
    >>> import torch, fnlight, fnlight.data as fd, fnlight.optim as fo
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> def loss_fn(model_fn, batch, key):
    ...     x, y = batch
    ...     return torch.nn.functional.cross_entropy(model_fn(x / 16), y)
    >>> dm = fnlight.DataModule(fd.digits() >> fd.split({"train": 0.9, "val": 0.1}) >> fd.shuffle() >> fd.batch(64))
    >>> state = fnlight.TrainState.create(model, fo.adam(1e-3), seed=0)
    >>> result = fnlight.Trainer(max_epochs=3).fit(state, fnlight.make_train_step(model, loss_fn, fo.adam(1e-3)), dm)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import distributed, optim, random, tree
    from .data.datamodule import DataModule
    from .train import (
        Callback,
        DPConfig,
        EarlyStopping,
        FitResult,
        LambdaCallback,
        LearningRateMonitor,
        ModelCheckpoint,
        Trainer,
        TrainState,
        load_checkpoint,
        make_eval_step,
        make_train_step,
        num_members,
        per_sample_grads,
        save_checkpoint,
        stack_states,
        unstack_states,
    )
    from .tree import device_put

# Names are imported on first use: `import fnlight` (and the pytest plugin that
# fnlight installs, which every pytest run in the environment loads) does not
# import torch until something of fnlight is used.
_MODULES = {"distributed", "optim", "random", "tree"}
_EXPORTS = {
    "DataModule": ".data.datamodule", "device_put": ".tree",
    **{name: ".train" for name in ("Callback", "DPConfig", "EarlyStopping", "FitResult", "LambdaCallback",
                                   "LearningRateMonitor", "ModelCheckpoint", "Trainer", "TrainState", "load_checkpoint",
                                   "make_eval_step", "make_train_step", "num_members", "per_sample_grads",
                                   "save_checkpoint", "stack_states", "unstack_states")},
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return list(__all__)


__version__ = "0.1.0"

__all__ = [
    "Callback",
    "DPConfig",
    "DataModule",
    "EarlyStopping",
    "FitResult",
    "LambdaCallback",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "TrainState",
    "Trainer",
    "__version__",
    "device_put",
    "distributed",
    "load_checkpoint",
    "make_eval_step",
    "make_train_step",
    "num_members",
    "optim",
    "per_sample_grads",
    "random",
    "save_checkpoint",
    "stack_states",
    "tree",
    "unstack_states",
]
assert sorted(__all__) == __all__ and set(__all__) == _MODULES | set(_EXPORTS) | {"__version__"}
