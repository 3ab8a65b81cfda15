"""What the ``fnlight`` commands share: the one-line error, TARGET loading, ``--set`` parsing, devices and
checkpoint paths. Only the command line uses this module (it parses user input).

Example:
    ```python
    target = load_target("examples/my_exp.py:mlp")
    exp, hparams = configure(target, ("hidden=64", "lr=3e-3"))
    ```
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from ._remote import Location, RemotePath, location
from .experiment import Experiment, ExperimentFactory, accepts_any, build_experiment, hparams_of
from .train.checkpoint import META, list_checkpoints
from .train.checkpoint_remote import MANIFEST

DEFAULT_TARGET = "fnlight.experiment:digits"
RECORD = "experiment.json"  # in a run directory: the target and hyperparameters it was trained with


class CliError(click.ClickException):
    """A user error: printed as one line ``error: ...`` on stderr, exit code 2 (the traceback only with --debug).

    Example:
        ```python
        raise CliError("no checkpoint at runs/x")
        ```
    """

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


# -- TARGET ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A loaded TARGET: its spec (a file path made absolute) and the object it names."""

    spec: str
    obj: Experiment | ExperimentFactory

    @property
    def label(self) -> str:
        return self.obj.name if isinstance(self.obj, Experiment) else self.spec


def _is_factory(v: Any, module: types.ModuleType) -> bool:
    """A function defined in ``module``, callable without arguments, not annotated to return a non-Experiment."""
    if not isinstance(v, types.FunctionType) or v.__module__ != module.__name__:
        return False
    try:
        hparams_of(v)
    except (TypeError, ValueError):
        return False
    ret = inspect.signature(v).return_annotation
    return ret is inspect.Signature.empty or ret is Experiment or str(ret).endswith("Experiment")


def _candidates(module: types.ModuleType) -> list[str]:
    """Names in ``module`` that could be a TARGET's attribute: experiments and factories defined there."""
    return sorted(k for k, v in vars(module).items()
                  if not k.startswith("_") and (isinstance(v, Experiment) or _is_factory(v, module)))


def _import_file(path: Path) -> types.ModuleType:
    """Import a Python file as a module named after it (a stable name: functions in it are fingerprinted by it),
    with its directory on sys.path (as ``python file.py`` has), so that it can import its neighbours."""
    name = path.stem if path.stem.isidentifier() else "fnlight_target"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    if loaded is not None:  # another module has that name: never shadow it
        name = f"fnlight_target_{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_target(spec: str | None) -> Target:
    """The experiment or factory that ``module:attr`` or ``path/to/file.py:attr`` names (default: digits).

    Example:
        >>> load_target("fnlight.experiment:digits").obj.__name__
        'digits'
    """
    spec = spec or DEFAULT_TARGET
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise CliError(f"bad TARGET {spec!r}: expected module:attr or path/to/file.py:attr "
                       f"(e.g. {DEFAULT_TARGET})")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    try:
        if is_file:
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise CliError(f"bad TARGET {spec!r}: no file {where}")
            module, spec = _import_file(path), f"{path}:{attr}"
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does: the project's modules
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except CliError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (where == e.name or where.startswith(e.name + ".")):
            raise CliError(f"bad TARGET {spec!r}: no module named {e.name!r}") from e
        raise CliError(f"bad TARGET {spec!r}: importing it failed: {type(e).__name__}: {e} "
                       "(--debug for the traceback)") from e
    except Exception as e:  # the user's module raised while being imported
        raise CliError(f"bad TARGET {spec!r}: importing it failed: {type(e).__name__}: {e} "
                       "(--debug for the traceback)") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = _candidates(module)
            hint = f"; it defines: {', '.join(names)}" if names else ""
            raise CliError(f"bad TARGET {spec!r}: {where} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not isinstance(obj, Experiment) and not callable(obj):
        raise CliError(f"bad TARGET {spec!r}: {attr} is a {type(obj).__name__}, not an Experiment or a function "
                       "returning one")
    return Target(spec, obj)


# -- --set key=value -----------------------------------------------------------------------------

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def coerce(key: str, text: str, default: Any, annotation: Any = None) -> Any:
    """``text`` as a value of the default's type (or the annotation's, for a None default).

    Example:
        >>> coerce("lr", "3e-3", 2e-3), coerce("hidden", "128", 256), coerce("bn", "off", True)
        (0.003, 128, False)
    """
    kind = type(default) if default is not None else _simple_type(annotation)
    if text.lower() in ("none", "null") and (default is None or type(None) in typing.get_args(annotation)):
        return None
    try:
        if kind is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind in (tuple, list):
            items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
            if not isinstance(items, list):
                raise ValueError
            like = default[0] if default else None
            return kind(coerce(key, str(v), like) if like is not None and isinstance(v, str | int | float) else v
                        for v in items)
    except (ValueError, json.JSONDecodeError):
        raise CliError(f"bad --set {key}={text}: expected {_type_name(kind)} (the default is {default!r})") from None
    return _json_or_str(text)  # a value of another type: JSON if it parses, else the string


def _simple_type(annotation: Any) -> type | None:
    if isinstance(annotation, type):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]  # Optional[X], X | None
    return args[0] if len(args) == 1 and isinstance(args[0], type) else None


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an int", float: "a number", tuple: "a comma-separated list",
            list: "a comma-separated list"}.get(kind, getattr(kind, "__name__", str(kind)))


def parse_sets(sets: Sequence[str], factory: ExperimentFactory) -> dict[str, Any]:
    """``("lr=3e-3", "hidden=128")`` as typed keyword arguments of ``factory`` (the last of a key wins).

    Example:
        ```python
        parse_sets(["hidden=64", "lr=1e-3"], digits)
        # {'hidden': 64, 'lr': 0.001}
        ```
    """
    known = hparams_of(factory)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations that do not evaluate: go by the defaults
        hints = {}
    out: dict[str, Any] = {}
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise CliError(f"bad --set {item!r}: expected key=value (e.g. --set lr=3e-3)")
        if key not in known:
            if accepts_any(factory):
                out[key] = _json_or_str(text)
                continue
            close = difflib.get_close_matches(key, known, n=1)
            raise CliError(f"bad --set {item!r}: unknown hyperparameter {key!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; {getattr(factory, '__name__', 'the factory')} takes: {', '.join(sorted(known))}")
        out[key] = coerce(key, text, known[key], hints.get(key))
    return out


def configure(target: Target, sets: Sequence[str] = (), *, seed: int | None = None, max_epochs: int | None = None,
              recorded: Mapping[str, Any] | None = None) -> tuple[Experiment, dict[str, Any]]:
    """Build the experiment: ``recorded`` hyperparameters (of a run), then ``--set``, ``--seed`` and
    ``--max-epochs``. Returns it and the hyperparameters given to its factory.

    ``--seed`` and ``--max-epochs`` go to the factory when it takes ``seed`` / ``max_epochs`` (a schedule may
    depend on them); otherwise they replace the experiment's fields (the seed: its key's and its data's).
    """
    obj = target.obj
    if isinstance(obj, Experiment):
        if sets:
            raise CliError(f"--set needs a factory: {target.spec} is an Experiment object, which has no "
                           "hyperparameters; name a function that returns it and takes them as keyword arguments")
        exp, hparams = obj, {}
    else:
        try:
            known = hparams_of(obj)
        except TypeError as e:
            raise CliError(f"bad TARGET {target.spec!r}: {e}") from None
        hparams = {k: v for k, v in (recorded or {}).items() if k in known or accepts_any(obj)}
        hparams |= parse_sets(sets, obj)
        for name, value in (("seed", seed), ("max_epochs", max_epochs)):
            if value is not None and name in known:
                hparams[name] = value
        try:
            exp = build_experiment(obj, hparams)
        except Exception as e:  # the factory's own code failed (or returned something else)
            raise CliError(f"bad TARGET {target.spec!r}: building the experiment failed: {type(e).__name__}: {e} "
                           "(--debug for the traceback)") from e
    changes: dict[str, Any] = {}
    if max_epochs is not None and exp.max_epochs != max_epochs:
        changes["max_epochs"] = max_epochs
    if seed is not None and exp.seed != seed:  # (a factory that took the seed has used it already)
        changes |= {"seed": seed, "datamodule": exp.datamodule.replace(seed=seed)}
    return (dataclasses.replace(exp, **changes) if changes else exp), hparams


# -- devices and checkpoints ----------------------------------------------------------------------

def parse_device(device: str | None) -> torch.device:
    """``--device`` as a torch.device (default: CUDA if available), checked to exist on this machine."""
    try:
        dev = torch.device(device) if device is not None else None
    except RuntimeError as e:
        raise CliError(f"unknown device {device!r} (--device): {str(e).splitlines()[0]}") from None
    return dev or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device_available(dev: torch.device) -> None:
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CliError(f"--device {dev}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= n:
            raise CliError(f"--device {dev}: this machine has {n} GPU(s) (cuda:0 .. cuda:{n - 1})")


def resolve_checkpoint(path: str | os.PathLike) -> Location:
    """A checkpoint directory, or the newest checkpoint in a checkpoints directory or a run directory
    (local, or a URL such as ``s3://bucket/runs/a``: there, only committed checkpoints count).

    Example:
        ```python
        resolve_checkpoint("runs/version_0")      # runs/version_0/checkpoints/step_000000920
        ```
    """
    p = location(path)
    if isinstance(p, RemotePath):
        if (p / MANIFEST).is_file():
            return p
        for where in (p, p / "checkpoints"):
            if found := list_checkpoints(where):
                return found[-1]
        raise CliError(f"no checkpoint at {p}: neither a committed checkpoint (with its {MANIFEST}) nor a "
                       "directory of committed step_<n> checkpoints (nor a run directory with checkpoints/)")
    if (p / META).is_file():
        return p
    for where in (p, p / "checkpoints"):
        if where.is_dir() and list_checkpoints(where):
            return list_checkpoints(where)[-1]
    if not p.exists():
        raise CliError(f"no checkpoint at {p}: no such file or directory")
    raise CliError(f"no checkpoint at {p}: neither a checkpoint directory (with {META}) nor a directory of "
                   "step_<n> checkpoints (nor a run directory with checkpoints/)")


def run_dir_of(ckpt: Location) -> Location | None:
    """The run directory a Trainer checkpoint belongs to (``<run>/checkpoints/step_<n>``), if it has a record."""
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / RECORD).is_file() else None


def read_record(run_dir: Location) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def recorded_hparams(ckpt: Location, target: Target) -> tuple[dict[str, Any], Location | None]:
    """The hyperparameters that produced the checkpoint, and where they were read: the checkpoint's own
    (``fit`` records them in each one), else its run's ``experiment.json``. Used when the run trained this
    same TARGET (or, for a checkpoint outside a run, always: the factory takes only the names it knows)."""
    run = run_dir_of(ckpt)
    record = read_record(run) if run is not None else {}
    if record and record.get("target") != target.spec:
        return {}, None  # another experiment's run: its hyperparameters mean something else
    try:
        own = json.loads((ckpt / META).read_text()).get("meta", {}).get("hparams")
    except (OSError, json.JSONDecodeError, AttributeError):
        own = None
    if isinstance(own, dict) and own:
        return own, ckpt
    if run is not None and isinstance(record.get("overrides"), dict):
        return record["overrides"], run / RECORD
    return {}, None


def all_hparams(target: Target, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument the TARGET's factory was called with (defaults included), as JSON reads them back
    (a value JSON cannot hold as its ``repr``): what ``fit`` records in each checkpoint.

    Example:
        >>> all_hparams(load_target(None), {"hidden": 64})["hidden"], all_hparams(load_target(None), {})["lr"]
        (64, 0.002)
    """
    values = {} if isinstance(target.obj, Experiment) else {**hparams_of(target.obj), **overrides}
    return json.loads(json.dumps(values, default=repr))


def write_record(run_dir: Location, target: Target, exp: Experiment, overrides: Mapping[str, Any]) -> None:
    """``<run_dir>/experiment.json``: the target, the hyperparameters given, and all of them (defaults included).
    Written atomically (a temp file renamed into place)."""
    doc = {"target": target.spec, "name": exp.name, "overrides": dict(overrides),
           "hparams": all_hparams(target, overrides), "seed": exp.seed, "max_epochs": exp.max_epochs}
    if isinstance(run_dir, RemotePath):  # one object, written whole
        (run_dir / RECORD).write_text(json.dumps(doc, indent=1, default=repr) + "\n")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1, default=repr) + "\n")
    os.replace(tmp, run_dir / RECORD)


def format_hparams(hparams: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in hparams.items())


# -- errors from the experiment's own code ----------------------------------------------------------

#: fnlight, torch, click and the standard library: not where the user's line is
_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (click, torch) if m.__file__) + \
    (str(Path(__file__).resolve().parent), str(Path(json.__file__).resolve().parent.parent))


def user_error_lines(err: BaseException) -> list[str]:
    """An error raised in the user's code, in a few lines: ``error: Type: message``, the user's file:line
    (the innermost frame outside fnlight, torch and the standard library), fnlight's note on where it
    happened, and how to see the whole traceback.

    Example:
        ```python
        user_error_lines(err)
        # ['error: ZeroDivisionError: my bug', '  at my_exp.py:12 in loss', "  in the train step ... step 3", ...]
        ```
    """
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if not Path(f.filename).resolve().is_relative_to(Path(sys.prefix).resolve())
            and not any(str(Path(f.filename).resolve()).startswith(d) for d in _LIBRARY_DIRS)]
    frame = (mine or frames or [None])[-1]
    lines = [f"error: {type(err).__name__}: {err}" if str(err) else f"error: {type(err).__name__}"]
    if frame is not None:
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}")
    lines += [f"  {note}" for note in getattr(err, "__notes__", [])]
    lines.append("  (fnlight --debug ... prints the whole traceback)")
    return lines
