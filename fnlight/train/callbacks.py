"""Callbacks: pure observers of ``(state, metrics)`` that may ask the loop to stop or save.

A callback never mutates the state or the trainer. The state it is shown is
valid during the call only: the loop reuses the memory of states it has passed
on (donation), so a callback that keeps one must clone it
(``fnlight.tree.tree_map(torch.clone, state)``). What it remembers (a
patience counter, the best value) is its own state, a small value that the
loop threads through its hooks (and that a checkpoint can save):

    cb_state = cb.init()
    cb_state, signal = cb.on_step(cb_state, state, metrics, ctx)    # after every train step
    cb_state, signal = cb.on_epoch(cb_state, state, metrics, ctx)   # after every epoch

Example:
    ```python
    trainer = Trainer(max_epochs=50, callbacks=(EarlyStopping("val/loss", patience=3),))
    ```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..optim import hyperparams, update_count
from .checkpoint import step_dir
from .ensemble import member_metrics, scalar_step


class Signal(NamedTuple):
    """What a callback asks of the loop: stop, save a checkpoint, log extra values, and replace
    the state's optimizer state with ``edit_opt_state(opt_state)`` (e.g. new hyperparameters with
    ``fnlight.optim.set_hyperparams``; the learning-rate callbacks do)."""

    stop: bool = False
    save: bool = False
    log: Mapping[str, float] = {}
    edit_opt_state: Callable[[Any], Any] | None = None


NOTHING = Signal()


@dataclass(frozen=True)
class FitContext:
    """What callbacks may read about the run (never change)."""

    trainer: Any
    train_step: Any
    datamodule: Any
    run_dir: Any
    epoch: int = 0
    #: the metric groups this fit produces at some epoch end ("train/", and "val/" with an eval step)
    groups: frozenset[str] = frozenset({"train/", "val/"})


class Callback:
    """Base class: every hook does nothing."""

    def init(self) -> Any:
        return None

    def on_step(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        return cb_state, NOTHING

    def on_epoch(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        return cb_state, NOTHING

    def keep(self, cb_state: Any) -> set[int]:
        """Steps whose checkpoints must survive the Trainer's ``keep_last`` pruning."""
        return set()


def _monitored(monitor: str, metrics: Mapping[str, Any], who: str, ctx: FitContext) -> float | None:
    """The monitored value, None when its group was not computed this epoch (no validation this epoch);
    an error when no epoch of this fit will ever have it."""
    if monitor not in metrics:
        prefix = monitor.split("/")[0] + "/" if "/" in monitor else None
        if prefix is not None and prefix in ctx.groups and not any(k.startswith(prefix) for k in metrics):
            return None  # e.g. no validation this epoch (val_every_n_epochs > 1)
        hint = " (val/ metrics need an eval_step given to fit)" if prefix == "val/" and prefix not in ctx.groups \
            else ""
        raise KeyError(f"{who} monitors {monitor!r}, which no step of this fit produces{hint}; the epoch "
                         f"metrics are {', '.join(sorted(k for k in metrics if k != 'time_s'))}")
    return float(metrics[monitor])


@dataclass(frozen=True)
class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs (epochs without validation are not counted), or when it is not finite.

    Example:
        >>> EarlyStopping("val/acc", mode="max", patience=5, min_delta=1e-3)
        EarlyStopping(monitor='val/acc', mode='max', patience=5, min_delta=0.001, check_finite=True)
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("EarlyStopping needs patience >= 0 and min_delta >= 0")

    def init(self) -> dict[str, float]:
        return {"best": math.inf if self.mode == "min" else -math.inf, "wait": 0, "stopped_epoch": -1}

    def on_epoch(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        value = _monitored(self.monitor, metrics, "EarlyStopping", ctx)
        if value is None:
            return cb_state, NOTHING
        if self.check_finite and not math.isfinite(value):
            return {**cb_state, "stopped_epoch": ctx.epoch}, Signal(stop=True)
        better = value < cb_state["best"] - self.min_delta if self.mode == "min" else \
            value > cb_state["best"] + self.min_delta
        if better:
            return {**cb_state, "best": value, "wait": 0}, NOTHING
        wait = cb_state["wait"] + 1
        if wait >= self.patience:
            return {**cb_state, "wait": wait, "stopped_epoch": ctx.epoch}, Signal(stop=True)
        return {**cb_state, "wait": wait}, NOTHING


@dataclass(frozen=True)
class ModelCheckpoint(Callback):
    """Keep the checkpoints of the ``save_top_k`` best epochs by ``monitor``, as
    Lightning's ``ModelCheckpoint`` does.

    After every ``every_n_epochs``-th epoch whose ``monitor`` value (finite) beats
    the worst of the best k so far, it asks the Trainer to save a checkpoint (a
    full one, resumable like any other) into ``Trainer(ckpt_dir=...)``, and it
    keeps those k from the Trainer's ``keep_last`` pruning; a checkpoint that
    drops out of the best k is deleted unless ``keep_last`` keeps it (with
    ``keep_last=None`` no checkpoint is ever deleted). Ties keep the earlier one.
    Its state, ``{"best_k": [[value, step], ...]}`` best first, is saved in every
    checkpoint, so a resumed run keeps ranking where it stopped.

    Example:
        ```python
        best = ModelCheckpoint("val/acc", mode="max", save_top_k=3)
        result = Trainer(max_epochs=20, ckpt_dir="runs/a/ckpt", keep_last=1, callbacks=(best,)).fit(...)
        state, meta = fnlight.load_checkpoint(best.best_path(result))
        ```
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    save_top_k: int = 1
    every_n_epochs: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint mode must be 'min' or 'max', got {self.mode!r}")
        if self.save_top_k < 1 or self.every_n_epochs < 1:
            raise ValueError("ModelCheckpoint needs save_top_k >= 1 and every_n_epochs >= 1")

    def init(self) -> dict[str, list[list[float]]]:
        return {"best_k": []}

    def on_epoch(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        if getattr(ctx.trainer, "ckpt_dir", None) is None:
            raise ValueError("ModelCheckpoint saves into the Trainer's checkpoint directory: "
                             "give Trainer(ckpt_dir=...)")
        if (ctx.epoch + 1) % self.every_n_epochs:
            return cb_state, NOTHING
        value = _monitored(self.monitor, metrics, "ModelCheckpoint", ctx)
        if value is None or not math.isfinite(value):
            return cb_state, NOTHING
        best = [list(e) for e in cb_state["best_k"]]
        sign = 1.0 if self.mode == "min" else -1.0
        if len(best) >= self.save_top_k and not sign * value < sign * best[-1][0]:
            return cb_state, NOTHING
        best.append([value, scalar_step(state)])
        best.sort(key=lambda e: sign * e[0])  # stable: among equal values the earlier stays ahead
        return {"best_k": best[:self.save_top_k]}, Signal(save=True)

    def keep(self, cb_state: Any) -> set[int]:
        return {int(step) for _, step in cb_state["best_k"]}

    def best_path(self, result: Any) -> Any:
        """The directory of the best checkpoint of a finished fit (a ``FitResult``)."""
        best = result.callback_state(self)["best_k"]
        if not best:
            raise ValueError(f"ModelCheckpoint({self.monitor!r}) saw no value of its metric: no best checkpoint")
        return step_dir(result.ckpt_dir, best[0][1])


@dataclass(frozen=True)
class LearningRateMonitor(Callback):
    """Log ``lr``, the learning rate of the update just applied, at the loop's logging
    steps, from ``schedule`` or else the train step's optimizer. It is read from the
    optimizer's own update count, which a skipped (non-finite) step does not advance.

    Example: ``LearningRateMonitor()``.
    """

    schedule: Callable[[Any], Any] | None = None

    def on_step(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        if self.schedule is None:
            injected = _injected_rate(state.opt_state)  # what the update used (set_hyperparams, ReduceLROnPlateau)
            if injected is not None:
                return cb_state, Signal(log=injected)
        schedule = self.schedule or getattr(getattr(ctx.train_step, "optimizer", None), "learning_rate", None)
        if schedule is None:
            raise ValueError("LearningRateMonitor needs a schedule: the train step's optimizer has none")
        count = update_count(state.opt_state)
        used = (count if count is not None else state.step) - 1
        return cb_state, Signal(log={"lr": float(schedule(torch.clamp(used, min=0)))})


def _injected_rate(opt_state: Any) -> dict[str, float] | None:
    """``{"lr": ...}`` from an optimizer state's injected ``learning_rate`` (``fo.inject_hyperparams``): one
    value, or per parameter group (``lr/<group>``), or per ensemble member (``lr/<i>`` and their mean)."""
    try:
        found = hyperparams(opt_state)
    except ValueError:
        return None
    groups = found if all(isinstance(v, Mapping) for v in found.values()) else {"": found}
    out: dict[str, float] = {}
    for group, values in groups.items():
        rate = values.get("learning_rate")
        if rate is None:
            continue
        name = f"lr/{group}" if group else "lr"
        out.update(member_metrics({name: rate}) if rate.dim() == 1 else {name: float(rate)})
    return out or None


def _as_signal(out: Any) -> Signal:
    if out is None:
        return NOTHING
    if isinstance(out, Signal):
        return out
    if isinstance(out, bool):
        return Signal(stop=out)
    raise TypeError(f"a LambdaCallback function must return None, a bool (stop) or a Signal, got {out!r}")


@dataclass(frozen=True)
class LambdaCallback(Callback):
    """Callbacks from plain functions ``fn(state, metrics)`` returning None, a bool
    (stop) or a :class:`Signal`.

    Example:
        >>> good_enough = LambdaCallback(on_epoch=lambda state, m: m["val/acc"] > 0.99)   # stops the run
    """

    step_fn: Callable[[Any, Mapping[str, Any]], Any] | None = field(default=None)
    epoch_fn: Callable[[Any, Mapping[str, Any]], Any] | None = field(default=None)

    def __init__(self, on_step: Callable[..., Any] | None = None, on_epoch: Callable[..., Any] | None = None):
        object.__setattr__(self, "step_fn", on_step)
        object.__setattr__(self, "epoch_fn", on_epoch)

    def on_step(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        return cb_state, _as_signal(self.step_fn(state, metrics)) if self.step_fn else NOTHING

    def on_epoch(self, cb_state: Any, state: Any, metrics: Mapping[str, Any], ctx: FitContext) -> tuple[Any, Signal]:
        return cb_state, _as_signal(self.epoch_fn(state, metrics)) if self.epoch_fn else NOTHING


def to_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
