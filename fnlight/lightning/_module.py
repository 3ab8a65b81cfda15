"""Train a ``LightningModule`` with fnlight's functional step: its ``training_step`` is the loss.

The step runs ``module.training_step(batch, batch_idx)`` under
``torch.func.functional_call(module, (params, buffers), ...)``: while it runs,
the module's parameters are the state's, so ``self(x)`` and ``self.layer(x)``
inside ``training_step`` compute with them, and ``torch.func.grad`` differentiates
through them. ``self.log(...)`` values come back as the step's metrics.

Example:
    ```python
    import fnlight, fnlight.optim as fo, fnlight.lightning as fl
    step = fl.train_step_from_module(lit_model, fo.adam(1e-3))
    state = fnlight.TrainState.create(lit_model, fo.adam(1e-3), seed=0)
    result = fnlight.Trainer(max_epochs=5).fit(state, step, dm, eval_step=fl.eval_step_from_module(lit_model))
    result.state.write_to(lit_model)  # back into the LightningModule
    ```
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..optim import GradientTransformation
from ..train.step import EvalStep, LossFn, TrainStep, make_eval_step, make_train_step
from ..train.syncbn import has_batchnorm

Metrics = dict[str, torch.Tensor]


class UnsupportedModuleError(RuntimeError):
    """The LightningModule uses a feature that fnlight's functional step cannot provide."""


def _check_module(module: Any, method: str) -> None:
    if not isinstance(module, torch.nn.Module) or not callable(getattr(module, method, None)):
        raise TypeError(f"expected a LightningModule with a {method}() method, got {type(module).__name__}")
    if getattr(module, "automatic_optimization", True) is False:
        raise UnsupportedModuleError(
            f"{type(module).__name__} uses manual optimization (automatic_optimization=False): its training_step "
            "steps optimizers itself, which a loss function cannot. Write the loss as "
            "loss_fn(model_fn, batch, key) and use fnlight.make_train_step.")


def _passes_batch_idx(fn: Callable[..., Any]) -> bool:
    """Whether ``fn(batch, batch_idx)`` or ``fn(batch)``, as Lightning decides it."""
    params = list(inspect.signature(fn).parameters.values())
    return "batch_idx" in (p.name for p in params) or len(params) >= 2 or any(
        p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _scalar(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, numbers.Number):
        return torch.as_tensor(value)
    raise UnsupportedModuleError(f"self.log({name!r}, ...) got a {type(value).__name__}; fnlight captures logged "
                                 "scalars (tensors or numbers) as metrics: log a metric's computed value instead")


@contextlib.contextmanager
def _method_as_forward(module: torch.nn.Module, method: str, logged: dict[str, torch.Tensor]) -> Iterator[list[bool]]:
    """For the next call of ``module``: run ``module.<method>`` instead of ``forward``, with
    ``self.log`` / ``self.log_dict`` writing into ``logged`` and no trainer attached.

    Only the outermost call is redirected (the override removes itself), so the
    ``self(x)`` calls inside ``training_step`` reach the real ``forward``. The
    attributes are set on the instance and restored afterwards: not thread-safe.
    """
    entered = [False]
    attrs = module.__dict__

    def forward(*args: Any, **kwargs: Any) -> Any:
        entered[0] = True
        attrs.pop("forward", None)
        return getattr(module, method)(*args, **kwargs)

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged[name] = _scalar(name, value)

    def log_dict(values: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for k, v in values.items():
            logged[k] = _scalar(k, v)

    saved = {k: attrs[k] for k in ("forward", "log", "log_dict", "_trainer") if k in attrs}
    attrs.update(forward=forward, log=log, log_dict=log_dict)
    if "_trainer" in attrs:
        attrs["_trainer"] = None  # a trainer from an earlier Lightning run must not be used (or logged to)
    try:
        yield entered
    except RuntimeError as e:
        if "is not attached to a `Trainer`" in str(e):
            raise UnsupportedModuleError(
                f"{type(module).__name__}.{method} uses self.trainer (or something that needs it: "
                "self.optimizers(), self.lr_schedulers(), self.trainer.*), which fnlight's step does not have. "
                "Pass what it reads as module attributes, or write the loss as loss_fn(model_fn, batch, key).") from e
        raise
    finally:
        for k in ("forward", "log", "log_dict"):
            attrs.pop(k, None)
        attrs.update(saved)


def _call(module: torch.nn.Module, method: str, model_fn: Callable[..., Any], batch: Any,
          batch_idx: int) -> tuple[Any, Metrics]:
    logged: Metrics = {}
    args = (batch, batch_idx) if _passes_batch_idx(getattr(module, method)) else (batch,)
    with _method_as_forward(module, method, logged) as entered:
        try:
            out = model_fn(*args)
        except Exception as e:
            if entered[0]:
                raise
            raise _not_this_module(module, method) from e
    if not entered[0]:
        raise _not_this_module(module, method)
    return out, logged


def _not_this_module(module: torch.nn.Module, method: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"the step did not run {type(module).__name__}.{method}: a function from loss_from_module(lit) or "
        "metrics_from_module(lit) works only in a step built on that same module, make_train_step(lit, ...) / "
        "make_eval_step(lit, ...), without sync_batchnorm (which runs a copy of it)")


def loss_from_module(module: Any, *, batch_idx: int = 0) -> LossFn:
    """``loss_fn(model_fn, batch, key)`` that runs ``module.training_step`` (for ``make_train_step(module, ...)``).

    The loss is what ``training_step`` returns (a tensor, or a dict's ``"loss"``);
    the values it logs with ``self.log`` / ``self.log_dict`` are returned as metrics.
    ``batch_idx`` is passed as given (fnlight's step has no batch index).

    Example:
        ```python
        step = fnlight.make_train_step(lit_model, loss_from_module(lit_model), fo.adam(1e-3), clip=1.0)
        ```
    """
    _check_module(module, "training_step")

    def loss_fn(model_fn: Callable[..., Any], batch: Any, key: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        out, logged = _call(module, "training_step", model_fn, batch, batch_idx)
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise UnsupportedModuleError(f"training_step returned a dict without 'loss' (keys {sorted(out)})")
            out = out["loss"]
        if out is None:
            raise UnsupportedModuleError("training_step returned None (Lightning then skips the batch); fnlight's "
                                         "step needs a loss for every batch: filter such batches in the pipeline")
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModuleError(f"training_step must return the loss tensor, got {type(out).__name__}")
        return out, logged

    loss_fn.runs_module = module  # type: ignore[attr-defined]  # the step must run this instance, not a copy
    return loss_fn


def metrics_from_module(module: Any, method: str = "validation_step", *,
                        batch_idx: int = 0) -> Callable[[Callable[..., Any], Any], Metrics]:
    """``metrics_fn(model_fn, batch)`` that runs ``module.<method>`` (``validation_step``,
    ``test_step``) and returns what it logs, plus its returned scalar as ``"loss"``.

    Example:
        ```python
        eval_step = fnlight.make_eval_step(lit_model, metrics_from_module(lit_model, "test_step"))
        ```
    """
    _check_module(module, method)

    def metrics_fn(model_fn: Callable[..., Any], batch: Any) -> Metrics:
        out, metrics = _call(module, method, model_fn, batch, batch_idx)
        if isinstance(out, Mapping):
            metrics |= {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        elif isinstance(out, torch.Tensor) and out.numel() == 1:
            metrics.setdefault("loss", out)
        if not metrics:
            raise UnsupportedModuleError(f"{type(module).__name__}.{method} logged nothing and returned no scalar: "
                                         "there are no metrics to report")
        return metrics

    metrics_fn.runs_module = module  # type: ignore[attr-defined]  # (as loss_fn's)
    return metrics_fn


def train_step_from_module(module: Any, optimizer: GradientTransformation, *, batch_idx: int = 0,
                           **step_options: Any) -> TrainStep:
    """``make_train_step(module, loss_from_module(module), optimizer, **step_options)``, checked.

    ``configure_optimizers`` is not used: pass an optimizer from :mod:`fnlight.optim`
    (the one the state was created with); clipping, accumulation and precision are
    the step's options (``clip=``, ``accumulate=``, ``precision=``), not the module's
    hooks. ``compile=True`` is not supported (the call redirection is not traceable).

    Example:
        ```python
        step = train_step_from_module(lit_model, fo.adamw(1e-3), clip=1.0)
        state = fnlight.TrainState.create(lit_model, fo.adamw(1e-3), seed=0)
        ```
    """
    if isinstance(optimizer, torch.optim.Optimizer) or not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"train_step_from_module needs an optimizer from fnlight.optim (e.g. fo.adam(1e-3)), got "
                        f"{type(optimizer).__name__}; the module's configure_optimizers is not used")
    if step_options.get("compile"):
        raise UnsupportedModuleError("train_step_from_module does not support compile=True")
    if step_options.get("sync_batchnorm") and has_batchnorm(module):
        raise UnsupportedModuleError("train_step_from_module does not support sync_batchnorm=True (the step would "
                                     "run a converted copy of the module, not its training_step)")
    return make_train_step(module, loss_from_module(module, batch_idx=batch_idx), optimizer, **step_options)


def eval_step_from_module(module: Any, method: str = "validation_step", **step_options: Any) -> EvalStep:
    """``make_eval_step(module, metrics_from_module(module, method))``.

    Example:
        ```python
        trainer.test(state, eval_step_from_module(lit_model, "test_step"), dm)
        # {'test_acc': 0.97}
        ```
    """
    return make_eval_step(module, metrics_from_module(module, method), **step_options)
