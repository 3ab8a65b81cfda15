"""Turn stage hyperparameters into a stable, JSON-able description.

The description is what a pipeline's fingerprint hashes, so it must be the
same in every process and Python run, and must change when a hyperparameter
changes. Functions are described by qualified name and a hash of their source
(plus the values they close over); what cannot be described stably is marked
``{"unstable": reason}`` and makes the fingerprint an error, never a random value.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import sys
import textwrap
import types
from collections.abc import Mapping
from typing import Any

import torch

from ..tree import tree_hash

UNSTABLE = "unstable"


class FingerprintError(ValueError):
    """A pipeline holds something whose description would not be stable."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _source_hash(obj: Any) -> str | None:
    try:
        return sha256_text(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError):
        return None


def _module_name(obj: Any) -> str | None:
    """The module's import name, also when it runs as ``python -m package.module``
    (where ``__module__`` is ``"__main__"``), so both runs share a fingerprint."""
    module = getattr(obj, "__module__", None)
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
    return module


def _code_sha256(code: types.CodeType) -> str:
    """A hash of compiled code (Python-version specific): tells apart lambdas on one line."""
    parts = [code.co_code, repr(code.co_names), repr(code.co_varnames)]
    parts += [_code_sha256(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return sha256_text("|".join(p.hex() if isinstance(p, bytes) else p for p in parts))


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _describe_global(v: Any, home: str | None, seen: frozenset[int]) -> Any:
    if isinstance(v, types.ModuleType):
        return {"module": v.__name__}
    if inspect.isfunction(v):
        # Helpers of the same module are part of the user's code: describe them fully.
        # Library functions are identified by name (their version is the library's).
        if v.__module__ == home:
            return describe_function(v, seen)
        return {"function": f"{_module_name(v)}.{v.__qualname__}"}
    if isinstance(v, type):
        out: dict[str, Any] = {"class": f"{_module_name(v)}.{v.__qualname__}"}
        if v.__module__ == home:
            out["source_sha256"] = _source_hash(v) or "unavailable"
        return out
    if callable(v) and not dataclasses.is_dataclass(v) and not hasattr(v, "describe"):
        return {"function": f"{_module_name(v)}.{getattr(v, '__qualname__', type(v).__qualname__)}"}
    return describe_value(v)


def describe_function(fn: Any, _seen: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Describe a callable by name, the hash of its source, the values it closes
    over, and the module globals it reads (constants, and helper functions of the
    same module, recursively): changing any of them changes the description."""
    if isinstance(fn, functools.partial):
        return {
            "partial": describe_function(fn.func, _seen),
            "args": [describe_value(a) for a in fn.args],
            "keywords": {k: describe_value(v) for k, v in sorted(fn.keywords.items())},
        }
    if dataclasses.is_dataclass(fn) and not isinstance(fn, type):
        return describe_value(fn)
    name = f"{_module_name(fn)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if inspect.ismethod(fn):
        return {"method": name, "self": describe_value(fn.__self__), "function": describe_function(fn.__func__)}
    if not inspect.isfunction(fn):
        # Builtins and C functions (torch.flatten, math.sqrt): the name is the identity.
        if inspect.isbuiltin(fn) or isinstance(fn, (torch._C._VariableFunctionsClass, type(len))):
            return {"function": name}
        if callable(fn) and not isinstance(fn, type):
            return {"function": name, UNSTABLE: f"callable object of type {type(fn).__qualname__} "
                    "has no stable description; use a function or a frozen dataclass with __call__"}
        return {"function": name}
    out: dict[str, Any] = {"function": name}
    if id(fn) in _seen:  # recursion: the outer description already covers it
        return out
    seen = _seen | {id(fn)}
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        out[UNSTABLE] = (f"the source of {fn.__qualname__} is not available (defined in an "
                         "interactive session or exec?); define it in a module file")
        return out
    out["source_sha256"] = sha256_text(source)
    if fn.__name__ == "<lambda>" and source.count("lambda") > 1:
        out["code_sha256"] = _code_sha256(fn.__code__)  # getsource gives whole lines
    if fn.__closure__:
        cells = {}
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = None
            cells[var] = describe_function(value, seen) if inspect.isfunction(value) else describe_value(value)
        out["closure"] = cells
    if fn.__defaults__:
        out["defaults"] = [describe_value(v) for v in fn.__defaults__]
    if fn.__kwdefaults__:
        out["kwdefaults"] = {k: describe_value(v) for k, v in sorted(fn.__kwdefaults__.items())}
    names = sorted(n for n in _global_names(fn.__code__) if n in fn.__globals__)
    if names:
        home = fn.__module__
        out["globals"] = {n: _describe_global(fn.__globals__[n], home, seen) for n in names}
    return out


def describe_value(v: Any) -> Any:
    """A JSON-able, process-independent description of a hyperparameter value."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, torch.Tensor):
        return {"tensor": {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": tree_hash(v)}}
    if isinstance(v, (list, tuple)):
        return [describe_value(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): describe_value(x) for k, x in v.items()}
    describe = getattr(v, "describe", None)
    if callable(describe) and not isinstance(v, type):
        return describe()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: describe_value(getattr(v, f.name)) for f in dataclasses.fields(v)}
        cls = type(v)
        out = {"object": f"{_module_name(cls)}.{cls.__qualname__}", "fields": fields}
        if callable(v):
            src = _source_hash(cls)
            if src is None:
                out[UNSTABLE] = f"the source of class {cls.__qualname__} is not available"
            else:
                out["source_sha256"] = src
        return out
    if callable(v):
        return describe_function(v)
    return {"value": repr(v), UNSTABLE: f"{type(v).__qualname__} has no stable description"}


def unstable_paths(desc: Any, path: str = "") -> list[str]:
    """Where a description contains an ``unstable`` marker, with its reason."""
    found: list[str] = []
    if isinstance(desc, dict):
        if UNSTABLE in desc:
            found.append(f"{path or '<root>'}: {desc[UNSTABLE]}")
        for k, v in desc.items():
            if k != UNSTABLE:
                found += unstable_paths(v, f"{path}.{k}" if path else str(k))
    elif isinstance(desc, list):
        for i, v in enumerate(desc):
            found += unstable_paths(v, f"{path}[{i}]")
    return found


def fingerprint_of(desc: Any, what: str = "pipeline") -> str:
    """sha256 of a description's canonical JSON; an error if any part is unstable."""
    bad = unstable_paths(desc)
    if bad:
        raise FingerprintError(
            f"cannot fingerprint this {what}: parts of it have no stable description:\n  "
            + "\n  ".join(bad)
        )
    return sha256_text(json.dumps(desc, sort_keys=True, separators=(",", ":")))
