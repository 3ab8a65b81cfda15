"""Checks made when a step or a fit is set up, so that a wrong argument fails with a message naming it
instead of deep inside the first call; and the note that errors from the user's own code gain.

Example:
    >>> check_loss_fn(lambda model_fn, batch: 0.0)
    Traceback (most recent call last):
    TypeError: loss_fn <lambda>(model_fn, batch) cannot be called as loss_fn(model_fn, batch, key): it must take 3 ...
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import optree
import torch

from ..optim import GradientTransformation

#: torch.optim classes and the fnlight.optim function with the same arithmetic.
TORCH_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "RMSprop": "rmsprop", "Adagrad": "adagrad",
                    "Adamax": "adamax", "NAdam": "nadam", "RAdam": "radam", "Adadelta": "adadelta"}


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check_arity(fn: Any, role: str, form: str, n: int) -> None:
    if not callable(fn):
        raise TypeError(f"{role} must be a function {form}, got a {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension without a signature: the call will tell
        return
    try:
        sig.bind(*([None] * n))
    except TypeError:
        raise TypeError(f"{role} {_name(fn)}{sig} cannot be called as {form}: it must take {n} positional "
                        f"parameters, as in `def {form}: ...` (a parameter it does not use may be ignored)") from None


def check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` can be called as ``loss_fn(model_fn, batch, key)``, or a TypeError saying which form is expected."""
    _check_arity(loss_fn, "loss_fn", "loss_fn(model_fn, batch, key)", 3)


def check_metrics_fn(metrics_fn: Any) -> None:
    """``metrics_fn`` can be called as ``metrics_fn(model_fn, batch)``."""
    _check_arity(metrics_fn, "metrics_fn", "metrics_fn(model_fn, batch)", 2)


def check_optimizer(optimizer: Any) -> None:
    """A fnlight ``GradientTransformation``; a ``torch.optim`` optimizer gets an error naming the fnlight one."""
    if isinstance(optimizer, GradientTransformation):
        return
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(cls, torch.optim.Optimizer):
        name = TORCH_OPTIMIZERS.get(cls.__name__)
        lr = ""
        if isinstance(optimizer, torch.optim.Optimizer) and optimizer.param_groups:
            lr = f"learning_rate={optimizer.param_groups[0].get('lr')}"
        hint = (f"fnlight.optim.{name}({lr}) has the same arithmetic" if name
                else "use an optimizer from fnlight.optim")
        raise TypeError(f"the optimizer is torch.optim.{cls.__name__}, which updates parameters in place; fnlight "
                        f"steps need a pure fnlight.optim GradientTransformation: {hint} (hyperparameter names: "
                        "docs/migrating.md)")
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"the optimizer must be a fnlight.optim GradientTransformation (init, update), got "
                        f"{type(optimizer).__name__}: e.g. fnlight.optim.adamw(1e-3)")


def _node_names(tree: Any) -> list[str]:
    """The optimizer-state types in a tree (named tuples), in order: what tells optimizers apart."""
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            names.append(type(node).__name__)
        if isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, tuple | list):
            for v in node:
                visit(v)

    visit(tree)
    return names


def check_state_matches(state: Any, optimizer: Any) -> None:
    """``state.opt_state`` has the structure ``optimizer.init`` makes, or one error naming both optimizers' states.

    Computed on the meta device (no memory); an optimizer whose ``init`` cannot run there is not checked.

    Example:
        >>> state = fnlight.TrainState.create(torch.nn.Linear(2, 1), fo.sgd(0.1, momentum=0.9))
        >>> check_state_matches(state, fo.adam(1e-3))
        Traceback (most recent call last):
        ValueError: the state was created with another optimizer than the train step's: ...
    """
    if not hasattr(state, "opt_state") or not hasattr(optimizer, "init"):
        return
    try:
        like = {k: torch.empty_like(v, device="meta") for k, v in state.params.items()}
        expected = optimizer.init(like)
    except Exception:  # noqa: BLE001 (an optimizer init that needs real values: nothing to compare)
        return
    leaf = (lambda x: isinstance(x, torch.Tensor))  # noqa: E731
    if optree.tree_structure(expected, is_leaf=leaf, none_is_leaf=True) == \
            optree.tree_structure(state.opt_state, is_leaf=leaf, none_is_leaf=True):
        return
    have, want = _node_names(state.opt_state), _node_names(expected)
    raise ValueError("the state was created with another optimizer than the train step's: its optimizer state "
                     f"holds {', '.join(have) or type(state.opt_state).__name__}, the step's optimizer makes "
                     f"{', '.join(want) or type(expected).__name__}. Create the state with the optimizer given to "
                     "make_train_step: TrainState.create(model, optimizer)")


# -- where an error from the user's code happened ---------------------------------------------------

def add_note(err: BaseException, note: str) -> None:
    """PEP 678's ``err.add_note(note)`` (on Python 3.10, the ``__notes__`` list it would have made)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # pragma: no cover (Python 3.10)
        notes = getattr(err, "__notes__", None)
        err.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]


#: Set on an exception once it carries fnlight's note: an outer ``noted`` adds none of its own.
NOTED = "__fnlight_where__"


class noted:  # noqa: N801 (used as a function: ``with noted(...)``)
    """Re-raise any exception with a note ``where()`` (once: the innermost place wins). A class rather than a
    generator-based context manager: it is entered a few times per training step, and costs less so.

    Example:
        >>> with noted(lambda: "in loss_fn at step 3"):
        ...     1 / 0
        Traceback (most recent call last):
        ZeroDivisionError: division by zero
        in loss_fn at step 3
    """

    __slots__ = ("where",)

    def __init__(self, where: Callable[[], str]) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if isinstance(err, Exception) and not getattr(err, NOTED, False):
            add_note(err, self.where())
            with contextlib.suppress(AttributeError, TypeError):  # (an exception type with __slots__)
                setattr(err, NOTED, True)
        return False


def check_step_options(accumulate: int = 1, precision: str = "32", on_nonfinite: str = "raise",
                       clip: float | None = None) -> None:
    """The options every train step (ordinary, ensemble, DP) takes, checked in one place.

    Example:
        >>> check_step_options(accumulate=0)
        Traceback (most recent call last):
        ValueError: accumulate must be >= 1, got 0
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    if precision not in ("32", "bf16-mixed"):
        raise ValueError(f"precision must be '32' or 'bf16-mixed', got {precision!r}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")


def check_train_step_args(loss_fn: Any, optimizer: Any) -> None:
    """What ``make_train_step`` checks before building anything (see the functions above)."""
    check_loss_fn(loss_fn)
    check_optimizer(optimizer)
