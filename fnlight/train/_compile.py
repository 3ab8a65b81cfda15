"""What ``make_train_step(compile=...)`` adds around ``torch.compile``: graph breaks found on the
first call (reported with the user's line and the known fixes), a code object per step, and
inductor's ``_foreach_norm`` warning kept quiet.

Example:
    ```python
    with DynamoWatch() as watch:
        compiled_step(state, batch)
    watch.reasons  # Dynamo's reasons for the graph breaks and skipped frames of the call, if any
    ```
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sysconfig
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch


class GraphBreakWarning(UserWarning):
    """``compile=True`` could not compile the whole step into one graph, so part of it runs eagerly
    (often slower than ``compile=False``). Issued once per step, on its first call."""


class GraphBreakError(RuntimeError):
    """``compile={"fullgraph": True}`` and the step cannot be compiled into one graph."""


def own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (bound) with a code object of its own.

    Dynamo keeps its compiled graphs, its recompile count and its "run this frame eagerly from now
    on" marks per code object. Without a copy, every step of the process shares ``_whole``'s code:
    a step whose graph broke inside ``torch.func.grad`` (which makes Dynamo give the frame up) would
    make every later compiled step of the process run eagerly too.
    """
    f = method.__func__  # type: ignore[attr-defined]
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(copy, method.__self__)  # type: ignore[attr-defined]


#: Dynamo's ``graph_breaks`` artifact logs (off unless TORCH_LOGS=graph_breaks): where a break happened
_GRAPH_BREAK_LOGS = tuple(f"torch._dynamo.{m}.__graph_breaks" for m in ("symbolic_convert", "convert_frame", "exc"))
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_LIBRARY_FILES = tuple(dict.fromkeys(sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "purelib", "platlib")))
_OWN_FILES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)


class DynamoWatch(logging.Handler):
    """During one call: the graph breaks and unsupported frames Dynamo counts (its ``counters``), and
    the user code they happened in (its ``graph_breaks`` log, enabled for the call and kept quiet)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []
        self.locations: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        where = _where(_FRAME.findall(record.getMessage()))
        if where and where not in self.locations:
            self.locations.append(where)

    def __enter__(self) -> DynamoWatch:
        from torch._dynamo.utils import counters

        self._counters = counters
        self._before = {c: dict(counters[c]) for c in ("graph_break", "unimplemented")}
        self._logs = [(log, log.level, log.handlers, log.propagate)
                      for log in map(logging.getLogger, _GRAPH_BREAK_LOGS)]
        for log, _, handlers, _ in self._logs:
            # printed only where the user asked for them (TORCH_LOGS=graph_breaks), as without fnlight
            shown = log.isEnabledFor(logging.DEBUG)
            log.handlers = [*handlers, self] if shown else [self]
            log.propagate = log.propagate and shown
            log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for log, level, handlers, propagate in self._logs:
            log.handlers, log.propagate = handlers, propagate
            log.setLevel(level)
        for c, before in self._before.items():
            for key, n in self._counters[c].items():
                reason = str(key).strip().splitlines()[0]
                if n > before.get(key, 0) and reason not in self.reasons:
                    self.reasons.append(reason)


#: (what a reason or location mentions, the known fix)
_FIXES = (
    ("transformers", 'a Hugging Face model: set its loss type before making the step, e.g. '
                     'model.loss_type = "ForCausalLM" (without it, transformers logs a warning inside the loss, '
                     'which breaks the graph); with it a GPT-2 step compiles to one graph'),
    ("logging", "a logging call inside the step: remove it, or add the function to "
                "torch._dynamo.config.ignore_logging_functions"),
    ("print", "a print() inside the step: remove it, or return the value as a metric"),
    ("item", "a tensor read on the host (tensor.item(), .tolist(), an `if` on a tensor's value): keep values "
             "as tensors (torch.where instead of `if`), or set torch._dynamo.config.capture_scalar_outputs = True"),
    ("data-dependent", "data-dependent control flow: use torch.where / torch.cond instead of Python branches"),
)


def graph_break_message(reasons: list[str], locations: list[str], fullgraph: bool = False) -> str:
    if fullgraph:
        head = "compile={'fullgraph': True}: torch.compile cannot compile this step into one graph"
    else:
        head = ("compile=True could not compile this step into one graph: torch.compile runs part of it eagerly, "
                "which is often slower than compile=False")
    lines = [f"{head}. Dynamo's reason(s):", *(f"  - {r}" for r in reasons[:6])]
    if locations:
        lines += ["in:", *(f"  - {w}" for w in locations[:4])]
    text = " ".join(reasons + locations).lower()
    fixes = [fix for needle, fix in _FIXES if needle in text]
    lines += ["Known fixes:", *(f"  - {f}" for f in fixes)] if fixes else []
    if not fullgraph:
        lines.append("This step runs eagerly from now on (as with compile=False). compile={'fullgraph': True} makes "
                     "this an error; TORCH_LOGS=graph_breaks prints the tracebacks.")
    return "\n".join(lines)


def _where(frames: list[tuple[str, Any, str]]) -> str | None:
    """Where in the user's code a graph break happened, from Dynamo's user stack (file, line, function;
    outermost first): the innermost frame, the innermost one in the user's own files (not the standard
    library or installed packages), and the outermost one inside the step (the loss_fn)."""
    # Dynamo's user stack may start above the step (the caller's frames): keep what runs inside it
    inside = next((i for i, (file, _, _) in enumerate(frames) if file.startswith(_OWN_FILES[1])), -1)
    user = [f for f in frames[inside + 1:] if not f[0].startswith(_OWN_FILES)]
    if not user:
        return None
    mine = [f for f in user if not f[0].startswith(_LIBRARY_FILES)]
    picks = dict.fromkeys([user[-1], *mine[-1:], user[0]])
    return " <- ".join(f"{file}:{line} ({fn})" for file, line, fn in picks)


def exc_locations(e: BaseException) -> list[str]:
    where = _where([(f.filename, f.lineno, f.name) for f in getattr(e, "real_stack", None) or []])
    return [where] if where else []


class _ForeachNormShim(logging.Filter):
    """Drops inductor's "aten._foreach_norm.Scalar is missing a c-shim implementation" warning,
    which every CPU compile of clipping (``clip_by_global_norm``'s ``_foreach_norm``) prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("_foreach_norm" in msg and "c-shim" in msg)


_INDUCTOR_IR_LOG = logging.getLogger("torch._inductor.ir")


@contextlib.contextmanager
def quiet_foreach_norm() -> Iterator[None]:
    shim = _ForeachNormShim()
    _INDUCTOR_IR_LOG.addFilter(shim)
    try:
        yield
    finally:
        _INDUCTOR_IR_LOG.removeFilter(shim)
