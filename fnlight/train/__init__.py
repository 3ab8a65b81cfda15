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
    Resumable,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from .dp import DPConfig, per_sample_grads
from .ensemble import num_members, stack_states, unstack_states
from .loggers import ConsoleLogger, CSVLogger, JSONLLogger, Logger, TensorBoardLogger
from .loop import FitResult, Interrupted, Trainer
from .lr_callbacks import LRFinder, ReduceLROnPlateau
from .mlflow_logger import MLflowLogger
from .state import TrainState
from .step import (
    EvalStep,
    GraphBreakError,
    GraphBreakWarning,
    NonFiniteError,
    TorchFuncTrapError,
    TrainStep,
    make_eval_step,
    make_train_step,
)

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
    "GraphBreakError",
    "GraphBreakWarning",
    "Interrupted",
    "JSONLLogger",
    "LRFinder",
    "LambdaCallback",
    "LearningRateMonitor",
    "Logger",
    "MLflowLogger",
    "ModelCheckpoint",
    "NonFiniteError",
    "ReduceLROnPlateau",
    "Resumable",
    "Signal",
    "TensorBoardLogger",
    "TorchFuncTrapError",
    "TrainState",
    "TrainStep",
    "Trainer",
    "find_resumable",
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
