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
from .loggers import ConsoleLogger, CSVLogger, JSONLLogger, Logger, TensorBoardLogger
from .loop import FitResult, Interrupted, Trainer
from .state import TrainState
from .step import EvalStep, NonFiniteError, TorchFuncTrapError, TrainStep, make_eval_step, make_train_step

__all__ = [
    "AsyncCheckpointer",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "ConsoleLogger",
    "CorruptCheckpointError",
    "EarlyStopping",
    "EvalStep",
    "FitContext",
    "FitResult",
    "Interrupted",
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
    "save_checkpoint",
]
assert sorted(__all__) == __all__
