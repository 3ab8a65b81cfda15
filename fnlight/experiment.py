"""An experiment bundles what a run needs: data, model, loss, optimizer, metrics.

The ``fnlight`` command trains, evaluates, verifies and exports experiments. Its
TARGET names an :class:`Experiment`, or (better) an *experiment factory*: a
function whose parameters all have defaults and that returns an Experiment. The
factory's keyword parameters are the experiment's hyperparameters, which
``--set key=value`` overrides (``fnlight fit my_exp.py:mlp --set lr=3e-3``).
With no TARGET the command trains :func:`digits`.

Example:
    ```python
    def mlp(hidden: int = 128, lr: float = 1e-3, seed: int = 0) -> Experiment:
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        return Experiment(digits_datamodule(seed), model, loss_fn, fo.adam(lr), metrics_fn, max_epochs=5,
                          seed=seed, name="my MLP")
    hparams_of(mlp)
    # {'hidden': 128, 'lr': 0.001, 'seed': 0}
    exp = build_experiment(mlp, {"hidden": 64})
    result, test_metrics = exp.run(fnlight.Trainer(max_epochs=exp.max_epochs, run_dir="runs/mlp"))
    ```
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import data as fd
from . import optim as fo
from .data.datamodule import DataModule
from .train import FitResult, Trainer, TrainState, make_eval_step, make_train_step
from .train.callbacks import Callback
from .train.loggers import Logger
from .train.step import EvalStep, Precision, TrainStep


def first_input(batch: Any) -> tuple[Any, ...]:
    """The model's positional inputs in a batch: ``(x,)`` of an ``(x, y, ...)`` tuple, else ``(batch,)``."""
    return (batch[0],) if isinstance(batch, tuple | list) else (batch,)


@dataclass(frozen=True, eq=False)
class Experiment:
    """A model, its data and how to train and evaluate it.

    Args:
        datamodule: the data (its ``fit``/``validate``/``test`` splits are used when present).
        model: the module (a stateless template: the weights live in :meth:`init_state`).
        loss_fn: ``loss_fn(model_fn, batch, key) -> loss | (loss, metrics)``, as for ``make_train_step``.
        optimizer: from :mod:`fnlight.optim`.
        metrics_fn: ``metrics_fn(model_fn, batch) -> dict``, as for ``make_eval_step``.
        max_epochs: how long ``fnlight fit`` trains by default.
        seed: the seed of the state's key (dropout and other per-step randomness).
        name: what the command line calls it.
        inputs: the model's positional inputs in a batch (for ``predict`` and ``export``).
        callbacks: :class:`~fnlight.train.callbacks.Callback` objects every run of it has (``fnlight fit``
            adds those its options ask for, such as ``--early-stopping``).
        loggers: :class:`~fnlight.train.loggers.Logger` objects every run of it has, besides the named
            ones (``--logger csv,jsonl``).
        max_steps: stop after this many steps (None: only ``max_epochs``).
        log_every_n_steps, val_every_n_steps, ckpt_every_n_steps: as for :class:`~fnlight.Trainer`.
        precision, compile, clip, accumulate: as for :func:`~fnlight.make_train_step`.

    The fields after ``inputs`` are the run's defaults: ``fnlight fit``'s options (and config file) override
    them, and :meth:`trainer` builds a Trainer from them.
    """

    datamodule: DataModule
    model: torch.nn.Module
    loss_fn: Callable[..., Any]
    optimizer: fo.GradientTransformation
    metrics_fn: Callable[..., Mapping[str, Any]]
    max_epochs: int = 10
    seed: int = 0
    name: str = "experiment"
    inputs: Callable[[Any], tuple[Any, ...]] = first_input
    callbacks: tuple[Callback, ...] = ()
    loggers: tuple[Logger, ...] = ()
    max_steps: int | None = None
    log_every_n_steps: int = 50
    val_every_n_steps: int | None = None
    ckpt_every_n_steps: int | None = None
    precision: Precision = "32"
    compile: bool = False
    clip: float | None = None
    accumulate: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "callbacks", tuple(self.callbacks))
        object.__setattr__(self, "loggers", tuple(self.loggers))

    def trainer(self, **options: Any) -> Trainer:
        """A :class:`~fnlight.Trainer` with this experiment's run options, ``options`` overriding them;
        ``callbacks`` and ``loggers`` given there are added to the experiment's own.

        Example:
            >>> trainer = digits(max_epochs=5).trainer(run_dir="runs/digits", max_steps=100)
            >>> trainer.max_epochs, trainer.max_steps
            (5, 100)
        """
        callbacks = (*self.callbacks, *options.pop("callbacks", ()))
        given_loggers = options.pop("loggers", None)
        loggers = None if given_loggers is None and not self.loggers else (*self.loggers, *(given_loggers or ()))
        return Trainer(**{"max_epochs": self.max_epochs, "max_steps": self.max_steps,
                          "log_every_n_steps": self.log_every_n_steps, "val_every_n_steps": self.val_every_n_steps,
                          "ckpt_every_n_steps": self.ckpt_every_n_steps, "callbacks": callbacks,
                          "loggers": loggers, **options})

    def step_options(self) -> dict[str, Any]:
        """The options of :meth:`train_step` this experiment sets: ``precision``, ``compile``, ``clip``,
        ``accumulate``."""
        return {"precision": self.precision, "compile": self.compile, "clip": self.clip,
                "accumulate": self.accumulate}

    def init_state(self) -> TrainState:
        return TrainState.create(self.model, self.optimizer, seed=self.seed)

    def train_step(self, **options: Any) -> TrainStep:
        """``make_train_step`` of this experiment with its :meth:`step_options`; ``options`` as there
        (``compile``, ``precision``...) override them."""
        return make_train_step(self.model, self.loss_fn, self.optimizer, **{**self.step_options(), **options})

    def eval_step(self, precision: Precision | None = None) -> EvalStep:
        """``make_eval_step`` of this experiment, in its precision unless ``precision`` is given."""
        return make_eval_step(self.model, self.metrics_fn, precision=precision or self.precision)

    def has_stage(self, stage: str) -> bool:
        """Whether the datamodule has the split that ``stage`` (fit, validate, test, predict) reads."""
        dm = self.datamodule
        return stage in dm.stages and dm.split_for(stage) in dm.split_names

    def forward(self, state: TrainState, batch: Any) -> Any:
        """The model's eval-mode output on a batch, with the state's weights (no gradients).

        Example:
            ```python
            logits = exp.forward(state, next(iter(exp.datamodule.batches("test"))))
            ```
        """
        if self.model.training:
            self.model.eval()  # (as the eval step does: the template's mode is not part of any result)
        with torch.no_grad():
            return functional_call(self.model, (state.params, state.buffers), self.inputs(batch))

    def module(self, state: TrainState) -> torch.nn.Module:
        """A plain ``nn.Module`` (a copy of the template) holding the state's weights, in eval mode."""
        return state.write_to(copy.deepcopy(self.model).to(state.step.device)).eval()

    def run(self, trainer: Trainer, *, hparams: Mapping[str, Any] | None = None,
            on_checkpoint: Callable[[Any], Any] | None = None, config: Mapping[str, Any] | None = None,
            **step_options: Any,
            ) -> tuple[FitResult, dict[str, float]]:
        """Fit (validating when there is a validate split), then test: ``(fit result, test metrics)``.

        ``hparams``, ``on_checkpoint`` and ``config`` go to :meth:`Trainer.fit`, ``step_options`` to
        :meth:`train_step`. The test metrics are ``{}`` when the datamodule has no test split.
        """
        eval_step = self.eval_step(step_options.get("precision"))
        result = trainer.fit(self.init_state(), self.train_step(**step_options), self.datamodule,
                             eval_step=eval_step if self.has_stage("validate") else None, hparams=hparams,
                             on_checkpoint=on_checkpoint, config=config)
        test = trainer.test(result.state, eval_step, self.datamodule) if self.has_stage("test") else {}
        return result, test


#: A function whose parameters all have defaults (the hyperparameters) and that returns an Experiment.
ExperimentFactory = Callable[..., Experiment]


def hparams_of(factory: ExperimentFactory) -> dict[str, Any]:
    """A factory's hyperparameters: its keyword parameters and their defaults.

    Raises TypeError for a parameter without a default (the command line calls
    factories with keyword arguments only).

    Example:
        >>> hparams_of(digits)["hidden"]
        256
    """
    out = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty or p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"{getattr(factory, '__qualname__', factory)}: parameter {p.name!r} has no default; an "
                            "experiment factory must be callable with no arguments (its parameters are the "
                            "hyperparameters, each with a default)")
        out[p.name] = p.default
    return out


def accepts_any(factory: ExperimentFactory) -> bool:
    """Whether the factory takes ``**kwargs`` (then any hyperparameter name is accepted)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())


def build_experiment(target: Experiment | ExperimentFactory, hparams: Mapping[str, Any] | None = None) -> Experiment:
    """The experiment ``target`` is, or the one its factory returns for ``hparams``.

    Raises ValueError for hyperparameters the factory does not take (naming the
    ones it does), or any for an Experiment object; TypeError if the factory
    does not return an Experiment.

    Example:
        >>> build_experiment(digits, {"hidden": 64, "lr": 3e-3}).max_epochs
        40
    """
    hparams = dict(hparams or {})
    if isinstance(target, Experiment):
        if hparams:
            raise ValueError(f"{target.name!r} is an Experiment object, which has no hyperparameters to set "
                             f"({', '.join(hparams)}); name a factory function returning one instead")
        return target
    if not callable(target):
        raise TypeError(f"expected an Experiment or a factory returning one, got {type(target).__name__}")
    known = hparams_of(target)
    unknown = sorted(set(hparams) - set(known))
    if unknown and not accepts_any(target):
        raise ValueError(f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"{getattr(target, '__name__', 'the factory')} takes: {', '.join(sorted(known)) or 'none'}")
    exp = target(**hparams)
    if not isinstance(exp, Experiment):
        raise TypeError(f"{getattr(target, '__qualname__', target)} returned a value of type {type(exp).__name__}, "
                        "not a fnlight.experiment.Experiment")
    return exp


# -- the bundled digits experiment ---------------------------------------------------------

def _scale(sample: Any) -> Any:
    """Digits pixels are 0..16: scale them to [0, 1]."""
    x, y = sample
    return x / 16.0, y


def digits_datamodule(seed: int = 0, batch_size: int = 64) -> DataModule:
    """The bundled digits data: a stratified 80/10/10 split (fixed), scaled, shuffled by ``seed``,
    then sharded: in a run of several ranks each one reads its part of every split (one rank reads it all).

    Example:
        >>> digits_datamodule(seed=0).num_batches("train")
        23
    """
    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(_scale)
                >> fd.shuffle(on="train")
                >> fd.shard()  # this rank's part (the rank is not in the fingerprint: all ranks share it)
                >> fd.batch(batch_size))
    return DataModule(pipeline, seed=seed)


def _loss(model_fn: Callable[..., torch.Tensor], batch: Any, key: torch.Tensor) -> Any:
    x, y = batch
    logits = model_fn(x)
    return F.cross_entropy(logits, y, label_smoothing=0.1), {"acc": (logits.argmax(-1) == y).float().mean()}


def _metrics(model_fn: Callable[..., torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model_fn(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def digits(seed: int = 0, max_epochs: int = 40, hidden: int = 256, lr: float = 2e-3, batch_size: int = 64,
           dropout: float = 0.2, weight_decay: float = 1e-2) -> Experiment:
    """An MLP on the bundled digits data (about 0.97 test accuracy in a few seconds on 2 cores).

    Its parameters are its hyperparameters: ``fnlight fit --set hidden=128 --set lr=3e-3``.

    Example:
        >>> exp = digits(seed=1, max_epochs=20)
    """
    dm = digits_datamodule(seed, batch_size)
    with torch.random.fork_rng(devices=[]):  # the initial weights come from the seed, not global state
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, 10),
        )
    steps = max_epochs * dm.num_batches("train")
    optimizer = fo.adamw(fo.warmup_cosine(lr, max(1, steps // 10), max(2, steps)), weight_decay=weight_decay,
                         mask=fo.default_decay_mask)
    return Experiment(dm, model, _loss, optimizer, _metrics, max_epochs, seed, name="digits MLP")
