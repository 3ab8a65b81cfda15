"""``fnlight fit``'s options and config files.

One table (:data:`OPTIONS`) describes every option of a run: its key in a config file, its command-line flag,
its type and its default (a value, or the experiment's own). The command line, a YAML or TOML file
(``--config``) and the experiment are read in that order of precedence and resolved into one
:class:`FitConfig`, which prints as YAML (``--print-config``), is saved in the run directory
(``config.yaml``) and in every checkpoint (``meta["config"]``), and reads back as the same run.

Example:
    $ fnlight fit --set hidden=64 --max-steps 100 --print-config > run.yaml
    $ fnlight fit --config run.yaml                  # the same run, bitwise
    $ fnlight fit --config run.yaml --set lr=3e-3    # the command line overrides the file
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from . import __version__
from ._cli_common import CliError, Target, check_device_available, configure, load_target, parse_device
from ._remote import Location, RemotePath
from .experiment import Experiment, accepts_any, hparams_of
from .train import (
    Callback,
    CSVLogger,
    EarlyStopping,
    JSONLLogger,
    LearningRateMonitor,
    Logger,
    MLflowLogger,
    ModelCheckpoint,
    TensorBoardLogger,
)

#: ``--logger`` names: the logger's class and the module it needs beyond fnlight's own (its extra is
#: ``fnlight[<name>]``). A new logger is one line here.
LOGGERS: dict[str, tuple[Callable[[], Logger], str | None]] = {
    "csv": (CSVLogger, None),
    "jsonl": (JSONLLogger, None),
    "tensorboard": (TensorBoardLogger, "tensorboard"),
    "mlflow": (MLflowLogger, "mlflow"),  # store and experiment: $MLFLOW_TRACKING_URI, $MLFLOW_EXPERIMENT_NAME
}


class _Experiment:
    """The default of an option the experiment sets (its field of the same name)."""

    def __repr__(self) -> str:
        return "the experiment's"


EXPERIMENT = _Experiment()


@dataclass(frozen=True)
class Option:
    """One option of a run: ``path`` is its key in a config file (``trainer.max_steps``), ``flag`` its
    command-line option (None: config file only), ``kind`` int, float, str, bool, list (of names) or a tuple
    of choices, ``default`` a value or :data:`EXPERIMENT`."""

    path: tuple[str, ...]
    kind: Any
    default: Any
    help: str = ""
    flag: str | None = None
    optional: bool = False  # may be None (null)
    minimum: float | None = None
    above: bool = False  # the value must be > minimum (not >=)
    metavar: str | None = None
    dest: str = ""  # the command's parameter name (default: the last part of the path)

    @property
    def name(self) -> str:
        return self.dest or self.path[-1]

    @property
    def key(self) -> str:
        return ".".join(self.path)

    def click_option(self) -> Callable[[Any], Any]:
        assert self.flag is not None
        shown = "" if self.default is None or self.default is EXPERIMENT else \
            f" (default: {','.join(self.default) if isinstance(self.default, list) else self.default})"
        help = self.help + shown
        if self.kind is bool:
            return click.option(self.flag, self.name, default=None, help=help)
        if isinstance(self.kind, tuple):
            kind: Any = click.Choice(self.kind)
        elif self.kind is int:
            kind = click.IntRange(min=None if self.minimum is None else int(self.minimum))
        elif self.kind is float:
            kind = click.FloatRange(min=self.minimum, min_open=self.above)
        else:
            kind = str
        return click.option(self.flag, self.name, type=kind, default=None, metavar=self.metavar, help=help)


T, ES, MC = ("trainer",), ("callbacks", "early_stopping"), ("callbacks", "model_checkpoint")

#: Every option of ``fnlight fit``, in the order of ``--help`` and of the printed config.
OPTIONS: tuple[Option, ...] = (
    Option((*T, "max_epochs"), int, EXPERIMENT, "Epochs (default: the experiment's).", "--max-epochs", minimum=1),
    Option((*T, "max_steps"), int, EXPERIMENT, "Stop after this many steps (default: the experiment's; none).",
           "--max-steps", optional=True, minimum=1),
    Option((*T, "seed"), int, EXPERIMENT, "Seed of the weights, shuffles and dropout (default: the experiment's).",
           "--seed"),
    Option((*T, "device"), str, None, "cpu, cuda, cuda:1, ... (default: CUDA if available).", "--device",
           optional=True),
    Option((*T, "devices"), int, 1, "Train in this many processes (data parallel; one GPU each with CUDA, gloo "
           "on CPU), started through torchrun's launcher. Under torchrun, leave it out.", "--devices", minimum=1),
    Option((*T, "timeout_s"), float, None, "With several processes: how long a collective waits for the other "
           "ranks before failing (default: $FNLIGHT_DIST_TIMEOUT or 300).", "--timeout-s", optional=True,
           minimum=0, above=True),
    Option((*T, "run_dir"), str, None, "Where logs and checkpoints (<run-dir>/checkpoints) go (default: "
           "runs/version_<n>); a URL (s3://bucket/runs/a, gs://...) keeps them in an object store (pip install "
           "'fnlight[remote]').", "--run-dir", optional=True),
    Option((*T, "compile"), bool, EXPERIMENT, "Run the step through torch.compile.", "--compile/--no-compile"),
    Option((*T, "precision"), ("32", "bf16-mixed"), EXPERIMENT, "Autocast to bfloat16 (weights stay float32).",
           "--precision"),
    Option((*T, "resume"), bool, True, "Continue from the newest checkpoint in <run-dir>/checkpoints, if any "
           "(--no-resume: move the previous run to <run-dir>/previous/<n> and start afresh).",
           "--resume/--no-resume"),
    Option((*T, "clip"), float, EXPERIMENT, "Clip the gradients to this global L2 norm.", "--clip",
           optional=True, minimum=0, above=True, metavar="NORM"),
    Option((*T, "accumulate"), int, EXPERIMENT, "Split each batch into this many micro-batches (gradient "
           "accumulation).", "--accumulate", minimum=1),
    Option((*T, "log_every_n_steps"), int, EXPERIMENT, "Log a step row every N steps.", "--log-every-n-steps",
           minimum=1, metavar="N"),
    Option((*T, "val_every_n_steps"), int, EXPERIMENT, "Also validate every N steps.", "--val-every-n-steps",
           optional=True, minimum=1, metavar="N"),
    Option((*T, "val_every_n_epochs"), int, 1, "Validate after every N-th epoch.", "--val-every-n-epochs",
           minimum=1, metavar="N"),
    Option((*T, "ckpt_every_n_steps"), int, EXPERIMENT, "Also save a checkpoint every N steps.",
           "--ckpt-every-n-steps", optional=True, minimum=1, metavar="N"),
    Option((*T, "ckpt_every_n_epochs"), int, 1, "Save a checkpoint after every N-th epoch.",
           "--ckpt-every-n-epochs", minimum=1, metavar="N"),
    Option((*T, "keep_last"), int, 3, "Keep the newest N checkpoints (null in a config: all).", "--keep-last",
           optional=True, minimum=1, metavar="N"),
    Option((*T, "loggers"), list, ["csv", "jsonl"], f"Comma-separated loggers of the run directory: "
           f"{', '.join(LOGGERS)}.", "--logger", metavar="NAME,...", dest="loggers"),
    Option((*T, "deterministic"), bool, False, "torch.use_deterministic_algorithms and cuDNN's deterministic "
           "mode.", "--deterministic/--no-deterministic"),
    Option((*T, "summary"), bool, True, "Print the model and data summary when training starts.",
           "--summary/--no-summary"),
    Option((*ES, "monitor"), str, None, "Stop when METRIC (e.g. val/loss) stops improving (patience, mode and "
           "min_delta in the config's callbacks.early_stopping).", "--early-stopping", optional=True,
           metavar="METRIC", dest="early_stopping"),
    Option((*ES, "mode"), ("min", "max"), "min", dest="early_stopping_mode"),
    Option((*ES, "patience"), int, 3, minimum=0),
    Option((*ES, "min_delta"), float, 0.0, minimum=0),
    Option((*ES, "check_finite"), bool, True),
    Option((*MC, "monitor"), str, None, "Keep the checkpoints of the best epochs by METRIC (save_top_k and "
           "mode in the config's callbacks.model_checkpoint).", "--save-best", optional=True, metavar="METRIC",
           dest="save_best"),
    Option((*MC, "mode"), ("min", "max"), "min", dest="save_best_mode"),
    Option((*MC, "save_top_k"), int, 1, minimum=1),
    Option(("callbacks", "lr_monitor"), bool, False, "Log the learning rate (lr) at the logging steps.",
           "--lr-monitor/--no-lr-monitor"),
    Option(("ensemble", "seeds"), str, None, "Train one member per seed (weights, dropout), all in one "
           "vectorized step; prints a table of the members and the best one.", "--seeds", optional=True,
           metavar="S1,S2,..."),
    Option(("ensemble", "sweep"), str, None, "Train one member per value of a hyperparameter that changes only "
           "the optimizer or the initial weights (e.g. --sweep lr=1e-3,3e-3,1e-2), all in one vectorized step.",
           "--sweep", optional=True, metavar="KEY=V1,V2,..."),
)
BY_NAME = {o.name: o for o in OPTIONS}
assert len(BY_NAME) == len(OPTIONS), "two options with one name"


def _schema() -> dict[str, Any]:
    """The config's keys as nested dicts, leaves the options (``target`` and ``hparams`` are checked apart)."""
    tree: dict[str, Any] = {"target": None, "hparams": None}
    for o in OPTIONS:
        node = tree
        for part in o.path[:-1]:
            node = node.setdefault(part, {})
        node[o.path[-1]] = o
    return tree


SCHEMA = _schema()


def fit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The click arguments and options of ``fit``: TARGET, the options of :data:`OPTIONS` that have a flag,
    ``--set``, ``--config`` and ``--print-config``."""
    f = click.option("--print-config", is_flag=True,
                     help="Print the complete resolved config as YAML (TARGET, every hyperparameter and option, "
                          "defaults filled in) and exit without training.")(f)
    f = click.option("--config", "config", default=None, metavar="FILE",
                     help="Read the TARGET, hyperparameters and options from a YAML or TOML file (as "
                          "--print-config writes it); options given on the command line override it.")(f)
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a hyperparameter (a keyword argument of the TARGET's factory), e.g. "
                          "--set lr=3e-3; repeatable.")(f)
    for o in reversed(OPTIONS):
        if o.flag is not None:
            f = o.click_option()(f)
    return click.argument("target", required=False, metavar="[TARGET]")(f)


# -- config files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigFile:
    """A config file's contents and the line of each key (for errors)."""

    path: str
    data: dict[str, Any]
    lines: dict[tuple[str, ...], int]

    def where(self, path: tuple[str, ...]) -> str:
        """``file:line`` of a key (or of its nearest enclosing key)."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.path}:{self.lines[path[:n]]}"
        return self.path

    def error(self, path: tuple[str, ...], message: str) -> CliError:
        return CliError(f"{self.where(path)}: {message}")


def _yaml_lines(node: Any, prefix: tuple[str, ...], path: str) -> dict[tuple[str, ...], int]:
    import yaml

    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*prefix, str(k.value))
            if key in out:
                raise CliError(f"{path}:{k.start_mark.line + 1}: the key {'.'.join(key)} is given twice (first on "
                               f"line {out[key]})")
            out[key] = k.start_mark.line + 1
            out |= _yaml_lines(v, key, path)
    return out


def _toml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each key of a TOML file is (tables and ``key =`` lines; tomllib keeps no positions)."""
    out: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()

    def parts(s: str) -> tuple[str, ...]:
        return tuple(p.strip().strip('"').strip("'") for p in s.split("."))

    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if m := re.match(r"^\[([^\[\]]+)\]", s):
            table = parts(m.group(1))
            for n in range(1, len(table) + 1):
                out.setdefault(table[:n], i)
        elif m := re.match(r"""^([A-Za-z0-9_\-."' ]+?)\s*=""", s):
            key = (*table, *parts(m.group(1)))
            for n in range(len(table) + 1, len(key) + 1):
                out.setdefault(key[:n], i)
    return out


def read_config(path: str) -> ConfigFile:
    """Read a YAML (``.yaml``, ``.yml``) or TOML (``.toml``) config file; a syntax error names its line.

    Example:
        ```python
        read_config("run.yaml").data["trainer"]["max_steps"]
        # 100
        ```
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CliError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if path.endswith(".toml"):
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            try:
                import tomli as tomllib
            except ImportError:
                raise CliError("--config with a TOML file needs tomli on Python 3.10: pip install "
                               "'fnlight[config]'") from None
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            raise CliError(f"{path}{':' + m.group(1) if m else ''}: not valid TOML: {e}") from None
        lines = _toml_lines(text)
    else:
        try:
            import yaml
        except ImportError:  # what --print-config writes without PyYAML (JSON, which is YAML too) is still read
            data, lines = _json_config(text)
            if data is None:
                raise CliError("--config with a YAML file needs PyYAML: pip install 'fnlight[config]'") from None
            return ConfigFile(path, data, lines) if isinstance(data, dict) else _not_a_mapping(path, data)
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise CliError(f"{path}{f':{mark.line + 1}' if mark is not None else ''}: not valid YAML: "
                           f"{problem}") from None
        lines = _yaml_lines(node, (), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _not_a_mapping(path, data)
    return ConfigFile(path, data, lines)


def _not_a_mapping(path: str, data: Any) -> Any:
    raise CliError(f"{path}:1: a config is a mapping of keys (target, hparams, trainer, callbacks, ensemble), "
                   f"got a {type(data).__name__}")


def _json_config(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    r"""A config file in JSON (``#`` comment lines allowed), as ``--print-config`` writes it without PyYAML:
    its data (None if it is not JSON) and the line of each key (indentation tells the nesting).

    Example:
        >>> _json_config('# a comment\n{\n  "trainer": {\n    "max_steps": 5\n  }\n}\n')
        ({'trainer': {'max_steps': 5}}, {('trainer',): 3, ('trainer', 'max_steps'): 4})
    """
    body = "\n".join("" if line.lstrip().startswith("#") else line for line in text.splitlines())
    try:
        data = json.loads(body)
    except ValueError:
        return None, {}
    lines: dict[tuple[str, ...], int] = {}
    stack: list[str] = []
    for i, line in enumerate(body.splitlines(), 1):
        m = re.match(r'^(\s*)"((?:[^"\\]|\\.)*)"\s*:', line)
        if m:
            depth = max(len(m.group(1)) // 2 - 1, 0)
            stack = stack[:depth] + [json.loads(f'"{m.group(2)}"')]
            lines.setdefault(tuple(stack), i)
    return data, lines


# -- type checks ---------------------------------------------------------------------------------------

def _expected(kind: Any, optional: bool = False) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of names", tuple: "a list", dict: "a mapping"}.get(kind) if not isinstance(kind, tuple) \
        else " or ".join(repr(c) for c in kind)
    return (name or getattr(kind, "__name__", str(kind))) + (" or null" if optional else "")


def check_value(kind: Any, value: Any, optional: bool = False, minimum: float | None = None,
                above: bool = False) -> Any:
    """``value`` as an option of ``kind`` wants it, or ValueError saying what was expected.

    Example:
        >>> check_value(float, 3), check_value(list, "csv,jsonl"), check_value(("32", "bf16-mixed"), 32)
        (3.0, ['csv', 'jsonl'], '32')
    """
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {_expected(kind)}, got null")
    ok: Any = dataclasses.MISSING
    if isinstance(kind, tuple):
        ok = str(value) if isinstance(value, str | int | float) and str(value) in kind else ok
    elif kind is bool:
        ok = value if isinstance(value, bool) else ok
    elif kind is int:
        ok = value if isinstance(value, int) and not isinstance(value, bool) else ok
    elif kind is float:
        ok = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else ok
    elif kind is str:
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            value = ",".join(str(v) for v in value)  # (--seeds 0,1,2 as a list)
        ok = value if isinstance(value, str) else ok
    elif kind is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        ok = list(items) if isinstance(items, list) and all(isinstance(v, str) for v in items) else ok
    elif kind in (tuple, dict):
        ok = kind(value) if isinstance(value, list if kind is tuple else dict) else ok
    else:  # another type: as given
        ok = value
    if ok is dataclasses.MISSING:
        raise ValueError(f"expected {_expected(kind, optional)}, got {value!r} ({type(value).__name__})")
    if minimum is not None and isinstance(ok, int | float) and (ok < minimum or above and ok == minimum):
        raise ValueError(f"expected a value {'>' if above else '>='} {minimum:g}, got {ok!r}")
    return ok


def _unknown(file: ConfigFile, path: tuple[str, ...], known: Any) -> CliError:
    close = difflib.get_close_matches(path[-1], list(known), n=1)
    where = ".".join(path[:-1]) or "the top level"
    return file.error(path, f"unknown key {'.'.join(path)}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; {where} takes: {', '.join(known)}")


def _options_of(file: ConfigFile, data: Mapping[str, Any], schema: Mapping[str, Any],
                prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options a config file sets (by name), checked: unknown keys and wrong types name the file's line."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = (*prefix, str(key))
        if key not in schema:
            raise _unknown(file, path, [k for k in schema])
        sub = schema[key]
        if sub is None:  # target, hparams: checked once the TARGET is known
            continue
        if isinstance(sub, dict):
            if not isinstance(value, dict):
                raise file.error(path, f"{'.'.join(path)}: expected a mapping of {', '.join(sub)}, got "
                                       f"{value!r} ({type(value).__name__})")
            out |= _options_of(file, value, sub, path)
            continue
        try:
            out[sub.name] = check_value(sub.kind, value, sub.optional, sub.minimum, sub.above)
        except ValueError as e:
            raise file.error(path, f"{'.'.join(path)}: {e}") from None
    return out


def _hparams_of_file(file: ConfigFile, target: Target) -> dict[str, Any]:
    """The file's ``hparams``, checked against the TARGET's factory (names and types) and typed as its defaults."""
    given = file.data.get("hparams") or {}
    if not isinstance(given, dict):
        raise file.error(("hparams",), f"hparams: expected a mapping of hyperparameters, got {given!r}")
    if isinstance(target.obj, Experiment):
        if given:
            raise file.error(("hparams",), f"hparams: {target.spec} is an Experiment object, which has no "
                                           "hyperparameters; name a function that returns it")
        return {}
    known = hparams_of(target.obj)
    try:
        hints = typing.get_type_hints(target.obj)
    except Exception:  # annotations that do not evaluate: go by the defaults
        hints = {}
    out = {}
    for key, value in given.items():
        path = ("hparams", str(key))
        if key not in known:
            if accepts_any(target.obj):
                out[key] = value
                continue
            raise _unknown(file, path, known)
        default = known[key]
        kind = type(default) if default is not None else _simple(hints.get(key))
        try:
            if kind in (list, tuple):  # a sequence of any values, as the default's type
                if not isinstance(value, list):
                    raise ValueError(f"expected a list, got {value!r} ({type(value).__name__})")
                out[key] = kind(value)
            elif kind in (bool, int, float, str, dict):
                out[key] = check_value(kind, value, optional=default is None)
            else:
                out[key] = value
        except ValueError as e:
            raise file.error(path, f"{'.'.join(path)}: {e} (the default is {default!r})") from None
    return out


def _simple(annotation: Any) -> Any:
    if isinstance(annotation, type):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and isinstance(args[0], type) else None


# -- resolving ----------------------------------------------------------------------------------------

def _plain(v: Any) -> bool:
    """Whether a value reads back from YAML (and JSON) as itself (a tuple as a list)."""
    if v is None or isinstance(v, bool | int | float | str):
        return True
    if isinstance(v, list | tuple):
        return all(_plain(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _plain(x) for k, x in v.items())


def _as_yaml(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_as_yaml(x) for x in v]
    return {k: _as_yaml(x) for k, x in v.items()} if isinstance(v, dict) else v


@dataclass(frozen=True)
class FitConfig:
    """The configuration of one ``fit``: the TARGET, the hyperparameters given to its factory (beyond its
    defaults; ``sets`` are the command line's ``--set``) and every option by name (:data:`EXPERIMENT` where
    the experiment decides, until :meth:`resolve`).

    Example:
        ```python
        cfg = read_fit({"target": None, "sets": ("hidden=64",), "max_steps": 100, "config": None})
        exp, hparams = cfg.build()
        print(cfg.resolve(exp, hparams).to_yaml())
        ```
    """

    target: Target
    hparams: dict[str, Any]
    options: dict[str, Any]
    sets: tuple[str, ...] = ()
    file: ConfigFile | None = None

    def __getitem__(self, name: str) -> Any:
        return self.options[name]

    def given(self, name: str) -> Any:
        """An option's value, or None where the experiment decides (before :meth:`resolve`)."""
        v = self.options[name]
        return None if v is EXPERIMENT else v

    def build(self, **changes: Any) -> tuple[Experiment, dict[str, Any]]:
        """The experiment and the hyperparameters given to its factory (the file's, then ``--set``, then
        ``--seed``/``--max-epochs``); ``changes`` replace options (``seed=...`` for an ensemble member)."""
        opts = {"seed": self.given("seed"), "max_epochs": self.given("max_epochs"), **changes}
        return configure(self.target, self.sets, seed=opts["seed"], max_epochs=opts["max_epochs"],
                         recorded=self.hparams)

    def resolve(self, exp: Experiment, hparams: Mapping[str, Any], run_dir: Path | None = None) -> FitConfig:
        """Every option with its value: the experiment's where it decides, the device resolved, and the
        hyperparameters those the factory was given."""
        opts = {k: getattr(exp, k) if v is EXPERIMENT else v for k, v in self.options.items()}
        opts["device"] = str(parse_device(opts["device"]))
        if run_dir is not None:
            opts["run_dir"] = str(run_dir)
        return dataclasses.replace(self, hparams=dict(hparams), options=opts, sets=())

    def as_dict(self) -> dict[str, Any]:
        """The config as a file holds it: ``target``, ``hparams`` (every one the factory takes, defaults
        filled in, but those whose value a file cannot hold), then the options by section. ``trainer.seed``
        and ``trainer.max_epochs`` are left out when the factory takes them (they are in ``hparams``)."""
        obj = self.target.obj
        takes = {} if isinstance(obj, Experiment) else hparams_of(obj)
        out: dict[str, Any] = {"target": self.target.spec,
                               "hparams": {k: _as_yaml(v) for k, v in {**takes, **self.hparams}.items() if _plain(v)}}
        for o in OPTIONS:
            if o.name in ("seed", "max_epochs") and o.name in takes:
                continue
            node = out
            for part in o.path[:-1]:
                node = node.setdefault(part, {})
            node[o.path[-1]] = _as_yaml(self.options[o.name])
        return out

    def to_yaml(self) -> str:
        """:meth:`as_dict` as YAML, with a comment saying how to use it. (Without PyYAML, as JSON, which is
        YAML too: ``--config`` reads it once PyYAML is installed.)"""
        try:
            import yaml

            body = yaml.safe_dump(self.as_dict(), sort_keys=False, allow_unicode=True)
        except ImportError:
            body = json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"
        return (f"# fnlight {__version__}: the resolved config of a fit (every option, defaults filled in);\n"
                "# fnlight fit --config <this file> trains the same run (options given there override it)\n"
                + body)

    def callbacks(self) -> tuple[Callback, ...]:
        """The callbacks the options ask for (``--early-stopping``, ``--save-best``, ``--lr-monitor``)."""
        o, out = self.options, []
        if o["early_stopping"] is not None:
            out.append(EarlyStopping(o["early_stopping"], mode=o["early_stopping_mode"], patience=o["patience"],
                                     min_delta=o["min_delta"], check_finite=o["check_finite"]))
        if o["save_best"] is not None:
            out.append(ModelCheckpoint(o["save_best"], mode=o["save_best_mode"], save_top_k=o["save_top_k"]))
        if o["lr_monitor"]:
            out.append(LearningRateMonitor())
        return tuple(out)

    def loggers(self) -> tuple[Logger, ...]:
        """The named loggers (``--logger``), checked by :func:`read_fit`."""
        return tuple(LOGGERS[name][0]() for name in self.options["loggers"])

    def trainer_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Experiment.trainer` these options set (after :meth:`resolve`)."""
        names = ("max_epochs", "max_steps", "device", "log_every_n_steps", "val_every_n_steps", "val_every_n_epochs",
                 "ckpt_every_n_steps", "ckpt_every_n_epochs", "keep_last", "deterministic")
        return {**{k: self.options[k] for k in names}, "callbacks": self.callbacks(), "loggers": self.loggers()}

    def step_options(self) -> dict[str, Any]:
        """The options of the train step (after :meth:`resolve`): precision, compile, clip, accumulate."""
        return {k: self.options[k] for k in ("precision", "compile", "clip", "accumulate")}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _check_loggers(names: list[str], file: ConfigFile | None, from_file: bool) -> None:
    for name in names:
        problem = None
        if name not in LOGGERS:
            close = difflib.get_close_matches(name, list(LOGGERS), n=1)
            problem = f"unknown logger {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
                f"; the loggers are {', '.join(LOGGERS)}"
        elif LOGGERS[name][1] is not None and not _importable(LOGGERS[name][1]):
            problem = f"the {name} logger needs the {LOGGERS[name][1]} package: pip install 'fnlight[{name}]'"
        if problem is not None:
            if from_file and file is not None:
                raise file.error(("trainer", "loggers"), f"trainer.loggers: {problem}")
            raise CliError(f"--logger {','.join(names)}: {problem}")


def read_fit(params: Mapping[str, Any]) -> FitConfig:
    """``fit``'s parameters (click's, by name) and its ``--config`` file as a :class:`FitConfig`: the command
    line wins over the file, the file over the defaults. Nothing is built yet; the TARGET is imported and the
    file checked (unknown keys, wrong types and bad values are errors naming the file's line).

    Example:
        ```python
        read_fit({"target": None, "sets": (), "config": "run.yaml", "max_steps": 10})["max_steps"]
        # 10
        ```
    """
    path = params.get("config")
    file = read_config(path) if path else None
    from_file = _options_of(file, file.data, SCHEMA) if file is not None else {}
    spec = params.get("target")
    if spec is None and file is not None and "target" in file.data:
        spec = file.data["target"]
        if not isinstance(spec, str):
            raise file.error(("target",), f"target: expected a string such as module:attr or file.py:attr, got "
                                          f"{spec!r}")
    target = load_target(spec)
    hparams = _hparams_of_file(file, target) if file is not None else {}
    if hparams and not isinstance(target.obj, Experiment):  # the record names what differs from the defaults
        defaults = hparams_of(target.obj)
        hparams = {k: v for k, v in hparams.items()
                   if k not in defaults or type(v) is not type(defaults[k]) or v != defaults[k]}
    options: dict[str, Any] = {}
    for o in OPTIONS:
        v = params.get(o.name)
        if v is not None:
            options[o.name] = check_value(o.kind, v, o.optional) if o.kind is list else v
        else:
            options[o.name] = from_file.get(o.name, o.default)
    sets = tuple(params.get("sets") or ())
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for name in ("seed", "max_epochs"):  # --set seed=... overrides a file's trainer.seed (as it would its hparams)
        if name in set_keys and params.get(name) is None and name in from_file:
            options[name] = EXPERIMENT
    _check_loggers(options["loggers"], file, params.get("loggers") is None)
    return FitConfig(target, hparams, options, sets, file)


def check_processes(cfg: FitConfig, seed_given: bool = False) -> tuple[torch.device, bool]:
    """Check ``--device``, ``--devices`` and ``--seeds``/``--sweep`` together, and against this machine and a
    torchrun launch: the device, and whether this process is one rank of a launch (``WORLD_SIZE`` is set)."""
    device, devices, members = cfg["device"], cfg["devices"], cfg["seeds"] is not None or cfg["sweep"] is not None
    dev = parse_device(device)
    launched = "WORLD_SIZE" in os.environ
    several = devices > 1 or (launched and os.environ["WORLD_SIZE"] != "1")
    if several and dev.type == "cuda" and dev.index is not None:
        raise CliError(f"--device {device}: with several processes each rank uses cuda:<its local rank>; "
                       "give --device cuda")
    if devices > 1 and launched:
        raise CliError(f"--devices: this process is already one of {os.environ['WORLD_SIZE']} ranks launched "
                       "by torchrun (WORLD_SIZE is set): leave out --devices, torchrun decides how many "
                       "processes run")
    if devices > 1 and dev.type == "cuda" and devices > torch.cuda.device_count():
        raise CliError(f"--devices {devices}: {devices} processes on CUDA need {devices} GPUs; this machine has "
                       f"{torch.cuda.device_count()} (use --device cpu for CPU processes)")
    check_device_available(dev)
    if members and (devices > 1 or launched):
        raise CliError("--seeds/--sweep train in one process (one vectorized step); leave out --devices")
    if seed_given and cfg["seeds"] is not None:
        raise CliError("--seed and --seeds together: give the seeds with --seeds only")
    return dev, launched


def write_config(run_dir: Location, cfg: FitConfig) -> Location:
    """``<run_dir>/config.yaml`` (atomically; in a remote run directory, one object written whole). A
    different one already there (of an earlier invocation of a resumed run) is kept as ``config.<n>.yaml``,
    the lowest free n."""
    out = run_dir / "config.yaml"
    text = cfg.to_yaml()
    remote = isinstance(run_dir, RemotePath)
    if not remote:
        run_dir.mkdir(parents=True, exist_ok=True)
    if out.is_file() and (old := out.read_text()).split("\n", 2)[-1] != text.split("\n", 2)[-1]:
        n = 0
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        if remote:
            (run_dir / f"config.{n}.yaml").write_text(old)
        else:
            os.replace(out, run_dir / f"config.{n}.yaml")
    if remote:
        out.write_text(text)
        return out
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
