"""fnlight.train: TrainState, pure steps, the Trainer, callbacks and loggers."""

from .callbacks import (
    Callback,
    EarlyStopping,
    FitContext,
    LambdaCallback,
    LearningRateMonitor,
    ModelCheckpoint,
    Signal,
)
from .checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CorruptCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from .ensemble import DPConfig, num_members, per_sample_grads, stack_states, unstack_states
from .loggers import ConsoleLogger, CSVLogger, JSONLLogger, Logger, TensorBoardLogger
from .loop import FitResult, Trainer
from .state import TrainState
from .step import EvalStep, NonFiniteError, TorchFuncTrapError, TrainStep, make_eval_step, make_train_step

__all__ = [
    "AsyncCheckpointer",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "ConsoleLogger",
    "CorruptCheckpointError",
    "DPConfig",
    "EarlyStopping",
    "EvalStep",
    "FitContext",
    "FitResult",
    "JSONLLogger",
    "LambdaCallback",
    "LearningRateMonitor",
    "Logger",
    "ModelCheckpoint",
    "NonFiniteError",
    "Signal",
    "TensorBoardLogger",
    "TorchFuncTrapError",
    "TrainState",
    "TrainStep",
    "Trainer",
    "load_checkpoint",
    "make_eval_step",
    "make_train_step",
    "num_members",
    "per_sample_grads",
    "save_checkpoint",
    "stack_states",
    "unstack_states",
]
assert sorted(__all__) == __all__
