"""Checkpoint encoding: a state tree <-> tensor names and a JSON structure.

``encode(state)`` returns the state's tensors by name and a JSON-able
structure that rebuilds the tree around them (node types, keys, field names;
nothing is pickled); ``decode(structure, tensors)`` is its inverse and treats
the structure as hostile input: anything malformed is a
:class:`CorruptCheckpointError`, never a ``KeyError`` or ``RecursionError``.

Names are the tree path joined with ``/`` (``params/0.weight``,
``opt_state/1/mu/0.weight``) and are injective: in a key, ``%`` and ``/`` are
written ``%25`` and ``%2F``, an int key of a dict is written ``%i<n>`` (so
``{1: x}`` and ``{"1": y}`` get different names), and a whole name
``__metadata__`` (reserved by safetensors) is written ``%5F_metadata__``.
Dict keys keep their type (str or int) and their order in the structure.
Supported nodes: tensors, ``dict`` and ``OrderedDict`` with str/int keys,
``list``, ``tuple``, registered named tuples, :class:`TrainState`, and leaves
``None``, bool, int, float and str. Anything else is refused before a byte is
written.

Example:
    >>> tensors, structure = encode({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}})
    >>> sorted(tensors)
    ['a%2Fb', 'a/b']
    >>> decode(structure, tensors)["a/b"]
    tensor([0.])
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

from .. import optim as _optim
from .state import FIELDS, TrainState
from .zero import ShardedOptState

#: Named tuples a checkpoint may contain (optimizer states); looked up by name, never imported from the file.
NAMED_TUPLES: dict[str, type] = {
    cls.__name__: cls
    for cls in (*_optim.STATE_TYPES, ShardedOptState)
}
MAX_DEPTH = 200  # deeper trees (or crafted structures) are refused instead of overflowing the stack


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, cannot be written, or does not match what it should."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's files are missing, unreadable, malformed or fail their checksum.

    The Trainer skips such a checkpoint and resumes from the one before it.
    """


def register_named_tuple(cls: type) -> type:
    """Allow a custom optimizer-state NamedTuple in checkpoints. Example: ``register_named_tuple(MyState)``."""
    NAMED_TUPLES[cls.__name__] = cls
    return cls


def _component(key: str | int, in_dict: bool) -> str:
    if isinstance(key, int):
        return f"%i{key}" if in_dict else str(key)
    return key.replace("%", "%25").replace("/", "%2F")


def _join(path: tuple[str, ...]) -> str:
    name = "/".join(path)
    return "%5F" + name[1:] if name == "__metadata__" else name


def _shown(path: tuple[str, ...]) -> str:
    return _join(path) or "<root>"


def encode(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of ``state`` by (injective) name, in tree order, and the JSON structure that rebuilds it.

    Raises CheckpointError for anything that cannot round-trip exactly.

    Example:
        ```python
        tensors, structure = encode(state)   # tensors["params/0.weight"] is state.params["0.weight"]
        ```
    """
    tensors: dict[str, torch.Tensor] = {}

    def go(node: Any, path: tuple[str, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise CheckpointError(f"cannot save a tree deeper than {MAX_DEPTH} levels (at {_shown(path[:5])}/...)")
        if isinstance(node, torch.Tensor):
            tensors[_join(path)] = node
            return {"tensor": _join(path)}
        if type(node) is TrainState:
            return {"TrainState": {f: go(getattr(node, f), (*path, f)) for f in FIELDS}}
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            name = type(node).__name__
            if NAMED_TUPLES.get(name) is not type(node):
                raise CheckpointError(f"cannot save a {name} at {_shown(path)}: register it with "
                                      "fnlight.train.checkpoint.register_named_tuple")
            return {"namedtuple": name, "fields": {f: go(getattr(node, f), (*path, f)) for f in node._fields}}
        if type(node) in (dict, collections.OrderedDict):
            bad = [k for k in node if type(k) not in (str, int)]
            if bad:
                raise CheckpointError(f"cannot save the dict at {_shown(path)}: its keys must be str or int, "
                                      f"found {type(bad[0]).__name__} {bad[0]!r}")
            items = [(k, go(v, (*path, _component(k, True)))) for k, v in node.items()]
            if type(node) is collections.OrderedDict:
                return {"OrderedDict": [[k, v] for k, v in items]}
            if all(isinstance(k, str) for k in node):  # the form older releases read
                return {"dict": dict(items)}
            return {"items": [[k, v] for k, v in items]}
        if type(node) in (tuple, list):
            return {type(node).__name__: [go(v, (*path, _component(i, False))) for i, v in enumerate(node)]}
        if node is None or type(node) in (bool, int, float, str):
            return {"value": node}
        raise CheckpointError(f"cannot save a {type(node).__name__} at {_shown(path)}: a state holds tensors, "
                              "dicts (str or int keys), lists, tuples, registered named tuples, and plain "
                              "numbers or strings")

    try:
        structure = go(state, ())
    except RecursionError:
        raise CheckpointError(f"cannot save a tree deeper than Python's recursion limit ({MAX_DEPTH} "
                              "levels at most)") from None
    return tensors, structure


def tensor_names(state: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` under the names a checkpoint file gives them, in tree order.

    Example:
        ```python
        list(tensor_names(state))[:2]
        # ['params/0.weight', 'params/0.bias']
        ```
    """
    return encode(state)[0]


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the tree that ``structure`` describes around ``tensors`` (each used at most once).

    Raises CorruptCheckpointError (without the file's name: the caller adds it) for a malformed
    structure, and CheckpointError for an unregistered named tuple.
    """
    used: set[str] = set()

    def bad(path: tuple[str, ...], what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"the structure at {_shown(path)} {what}")

    def pairs(body: Any, path: tuple[str, ...]) -> list[tuple[str | int, Any]]:
        if not isinstance(body, list) or not all(
                isinstance(p, list) and len(p) == 2 and type(p[0]) in (str, int) for p in body):
            raise bad(path, "is not a list of [key, value] pairs")
        if len({(type(k), k) for k, _ in body}) != len(body):
            raise bad(path, "repeats a key")
        return [(k, v) for k, v in body]

    def go(spec: Any, path: tuple[str, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise bad(path[:5], f"nests deeper than {MAX_DEPTH} levels")
        if not isinstance(spec, dict):
            raise bad(path, f"is a {type(spec).__name__}, not a node")
        if "namedtuple" in spec:
            name, fields = spec["namedtuple"], spec.get("fields")
            if set(spec) != {"namedtuple", "fields"} or not isinstance(name, str) or not isinstance(fields, dict):
                raise bad(path, "is a malformed named tuple")
            cls = NAMED_TUPLES.get(name)
            if cls is None:
                raise CheckpointError(f"the checkpoint holds an unknown {name} at {_shown(path)}; register it "
                                      "with fnlight.train.checkpoint.register_named_tuple")
            if list(fields) != list(cls._fields):
                raise bad(path, f"gives {name} the fields {list(fields)}, not {list(cls._fields)}")
            return cls(**{f: go(v, (*path, f)) for f, v in fields.items()})
        if len(spec) != 1:
            raise bad(path, f"has {len(spec)} kinds ({sorted(spec)[:4]}), not one")
        (kind, body), = spec.items()
        if kind == "tensor":
            if not isinstance(body, str) or body not in tensors:
                raise bad(path, f"names the tensor {body!r}, which no tensor file holds")
            if body in used:
                raise bad(path, f"names the tensor {body!r} a second time")
            used.add(body)
            return tensors[body]
        if kind == "value":
            if body is not None and type(body) not in (bool, int, float, str):
                raise bad(path, f"holds a {type(body).__name__} value")
            return body
        if kind == "TrainState":
            if not isinstance(body, dict) or list(body) != list(FIELDS):
                raise bad(path, f"is a TrainState without exactly the fields {list(FIELDS)}")
            return TrainState(**{f: go(v, (*path, f)) for f, v in body.items()})
        if kind == "dict":
            if not isinstance(body, dict):
                raise bad(path, "is a dict that is not a JSON object")
            return {k: go(v, (*path, _component(k, True))) for k, v in body.items()}
        if kind in ("items", "OrderedDict"):
            out = {k: go(v, (*path, _component(k, True))) for k, v in pairs(body, path)}
            return collections.OrderedDict(out) if kind == "OrderedDict" else out
        if kind in ("tuple", "list"):
            if not isinstance(body, list):
                raise bad(path, f"is a {kind} that is not a JSON list")
            items = [go(v, (*path, str(i))) for i, v in enumerate(body)]
            return tuple(items) if kind == "tuple" else items
        raise bad(path, f"is an unknown kind of node {kind!r}")

    try:
        out = go(structure, ())
    except RecursionError:
        raise CorruptCheckpointError("the structure nests too deeply") from None
    if unused := sorted(tensors.keys() - used):
        raise CorruptCheckpointError(f"the tensor files hold tensors the structure never uses: {unused[:3]}")
    return out


def differences(got: Any, like: Any, path: str = "") -> list[str]:
    """Every structural, shape and dtype difference between two trees (empty when they match).

    Example:
        >>> differences({"w": torch.zeros(2)}, {"w": torch.zeros(3)})
        ['w/: shape (2,) in the checkpoint, (3,) expected']
    """
    out: list[str] = []
    if isinstance(like, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path or '<root>'}: expected a tensor, found {type(got).__name__}"]
        if got.shape != like.shape:
            out.append(f"{path}: shape {tuple(got.shape)} in the checkpoint, {tuple(like.shape)} expected")
        if got.dtype != like.dtype:
            out.append(f"{path}: dtype {got.dtype} in the checkpoint, {like.dtype} expected")
        return out
    if type(got) is not type(like):
        return [f"{path or '<root>'}: {type(got).__name__} in the checkpoint, {type(like).__name__} expected"]
    if dataclasses.is_dataclass(like) and isinstance(like, TrainState):
        for f in FIELDS:
            out += differences(getattr(got, f), getattr(like, f), f"{path}{f}/")
    elif isinstance(like, dict):
        missing, extra = sorted(set(like) - set(got), key=repr), sorted(set(got) - set(like), key=repr)
        if missing:
            out.append(f"{path or '<root>'}: missing {missing}")
        if extra:
            out.append(f"{path or '<root>'}: unexpected {extra}")
        for k in like:
            if k in got:
                out += differences(got[k], like[k], f"{path}{k}/")
    elif isinstance(like, (tuple, list)):
        if len(got) != len(like):
            out.append(f"{path or '<root>'}: {len(got)} items in the checkpoint, {len(like)} expected")
        for i, (a, b) in enumerate(zip(got, like, strict=False)):
            out += differences(a, b, f"{path}{i}/")
    return out
