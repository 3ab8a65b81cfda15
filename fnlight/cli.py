"""The ``fnlight`` command line (click). The only place that parses user input.

A TARGET is ``module:attr`` or ``path/to/file.py:attr`` naming an
:class:`~fnlight.experiment.Experiment` or a factory returning one (whose
keyword parameters are the hyperparameters that ``--set`` overrides); without
one, commands use the bundled digits experiment. See docs/cli.md.

Example:
    $ fnlight fit                                   # the bundled digits experiment
    $ fnlight fit my_exp.py:mlp --set lr=3e-3 --run-dir runs/mlp
    $ fnlight fit --early-stopping val/loss --logger csv,tensorboard
    $ fnlight fit --max-steps 500 --print-config > run.yaml && fnlight fit --config run.yaml   # the same run
    $ fnlight fit --devices 2                       # the same in 2 processes (torchrun's launcher, started for you)
    $ torchrun --nproc-per-node 2 -m fnlight.cli fit   # or started by torchrun itself
    $ fnlight test my_exp.py:mlp --ckpt runs/mlp    # the newest checkpoint of that run
    $ fnlight verify my_exp.py:mlp --steps 20       # bitwise reproducible and resumable?
    $ fnlight summary my_exp.py:mlp                 # modules, output shapes, state size, data
    $ fnlight inspect runs/mlp/checkpoints/step_000000460
    $ fnlight export my_exp.py:mlp --ckpt runs/mlp --format torchscript -o mlp.pt
    $ fnlight plot runs/mlp runs/mlp2 -o curves.png   # several runs in one figure
    $ fnlight data describe                         # the pipeline, hyperparameters and fingerprint
    $ fnlight data bench

Exit codes: 0 success; 1 a failed check (``verify``, ``export``), an error in
the experiment's own code, or the machine's (a full disk, a read-only or forbidden path; one line
``error: ...``); 2 a usage error (bad option, bad TARGET or ``--set``,
missing or corrupted checkpoint, unknown device, a bad config file), printed as one line
``error: ...`` (``fnlight --debug ...`` adds the traceback).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import torch

from . import __version__, distributed
from ._cli_common import (
    CliError,
    Target,
    all_hparams,
    check_device_available,
    configure,
    format_hparams,
    load_target,
    parse_device,
    parse_sets,
    read_record,
    recorded_hparams,
    resolve_checkpoint,
    user_error_lines,
    write_record,
)
from ._cli_config import FitConfig, check_processes, fit_options, read_fit, write_config
from ._cli_ensemble import Members, build_members, member_labels, pick_members, recorded_members
from ._cli_ensemble import summary as members_summary
from ._remote import location
from ._summary import pipeline_tree, summary_lines
from .data import DownloadError, FingerprintError
from .experiment import Experiment, digits_datamodule  # noqa: F401  (digits_datamodule: tests import it from here)
from .train import (
    CheckpointError,
    ConsoleLogger,
    Interrupted,
    Trainer,
    TrainState,
    load_checkpoint,
)
from .train.checkpoint import list_checkpoints
from .train.checkpoint_tree import differences
from .train.checks import NOTED
from .train.ensemble import num_members, scalar_step
from .train.rundir import RunDirInUse, claim, next_version, set_aside
from .tree import batch_size, device_put

#: Errors that are the user's input, not a bug: one line and exit code 2 (the traceback with --debug).
USER_ERRORS = (CheckpointError, FingerprintError, DownloadError, RunDirInUse)

#: OSErrors that are the machine's state, not a bug (a full disk or quota, a read-only or forbidden path,
#: too many open files): one line and exit code 1 (the traceback with --debug).
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE,
                            errno.ENFILE})


class _Main(click.Group):
    """The group: turns user errors into one line (``error: ...``, exit code 2), with the traceback under --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError:
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise
        except USER_ERRORS as e:
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise CliError(str(e)) from e
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS and not getattr(e, NOTED, False):
                click.echo(f"error: {e}\n  (the machine's state, not a bug: fix it (free space, permissions) or give "
                           "another --run-dir, and run the same command again: fit resumes from its newest checkpoint. "
                           "fnlight --debug ... prints the traceback)", err=True)
                ctx.exit(1)
            if not getattr(e, NOTED, False):
                raise  # fnlight's own bug: the whole traceback
            # an error in the experiment's own code (its loss_fn, metrics_fn, a transform, a callback...)
            click.echo("\n".join(user_error_lines(e)), err=True)
            ctx.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fnlight")
@click.option("--debug", is_flag=True, help="On an error, print the traceback too.")
def main(debug: bool) -> None:
    """fnlight: pure-functional, reproducible training for PyTorch.

    TARGET is module:attr or path/to/file.py:attr, naming an Experiment or a
    function returning one (default: the bundled digits experiment).
    """


# -- options shared by commands -------------------------------------------------------------------

def _target_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("target", required=False, metavar="[TARGET]")(f)


def _set_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Override a hyperparameter (a keyword argument of the TARGET's factory), e.g. "
                             "--set lr=3e-3; repeatable.")(f)


def _ckpt_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--ckpt", required=True, metavar="PATH",
                        help="A checkpoint directory, or a run (or checkpoints) directory: its newest "
                             "checkpoint.")(f)


def _device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available).")(f)


def _echo_rank0(*args: Any, **kwargs: Any) -> None:
    if distributed.rank() == 0:
        click.echo(*args, **kwargs)


# -- fit ----------------------------------------------------------------------------------------------

def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _forwarded(ctx: click.Context, leave_out: tuple[str, ...]) -> list[str]:
    """The arguments and options given on this command line (not their defaults), as argv again, minus
    ``leave_out``."""
    args: list[str] = []
    argv: list[str] = []
    for param in ctx.command.params:
        name, value = param.name, ctx.params.get(param.name)
        if (name in leave_out or value is None
                or ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT)):
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif isinstance(param, click.Option) and param.is_flag:
            argv += [param.opts[0]] if value else param.secondary_opts[:1]
        elif isinstance(param, click.Option) and param.multiple:
            argv += [x for v in value for x in (param.opts[0], str(v))]
        elif isinstance(param, click.Option):
            argv += [param.opts[0], str(value)]
    return args + argv


def _exit_code(code: int) -> int:
    """A process's exit code as a shell reports it: 128 + n when killed by signal n."""
    return 128 - code if code < 0 else code


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _launch(ctx: click.Context, devices: int) -> int:
    """Run this ``fit`` in ``devices`` local processes; 0 when all succeed, else the failed rank's exit code.

    This is ``torchrun --nproc-per-node N --master-addr 127.0.0.1 --master-port <free> -m fnlight.cli fit ...``
    (without ``--devices``), run through ``torch.distributed.run``'s own ``parse_args`` and ``run`` rather than a
    ``torchrun`` subprocess: the same parser, defaults and elastic agent as the command (so the two launches behave
    the same, and the agent stops the surviving ranks when one dies), no second Python interpreter to start, and
    the agent's ``ChildFailedError`` names every failed rank with its exit code, where the ``torchrun`` command
    exits 1 whatever happened. The rendezvous is static on 127.0.0.1 (``--standalone`` would advertise the host
    name, which does not resolve on every machine).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = [f"--nproc-per-node={devices}", "--master-addr=127.0.0.1", f"--master-port={distributed.free_port()}",
            "--max-restarts=0", "-m", "fnlight.cli", "fit", *_forwarded(ctx, leave_out=("devices",))]
    had_omp = "OMP_NUM_THREADS" in os.environ
    if not had_omp:  # the ranks share the cores (torchrun alone would give each one thread, with a banner)
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // devices))
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        # The first rank to fail is the cause; the agent then stops the others (SIGTERM), or they fail on
        # their own in a collective whose peer is gone (within --timeout-s). Its exit code is the command's.
        first, cause = e.get_first_failure()
        others = [f"rank {r} " + ("was stopped (SIGTERM)" if f.exitcode == -signal.SIGTERM
                                  else _describe_exit(f.exitcode)) for r, f in sorted(e.failures.items()) if r != first]
        click.echo(f"fnlight fit: rank {first} of {devices} {_describe_exit(cause.exitcode)}"
                   + (f"; then {', '.join(others)}" if others else "")
                   + ("" if len(e.failures) == devices else "; the other ranks were stopped"), err=True)
        return _exit_code(cause.exitcode) or 1
    except SignalException as e:  # the launcher itself was interrupted (the agent has stopped the ranks)
        click.echo(f"fnlight fit: interrupted by {signal.Signals(e.sigval).name}, which was passed on to the ranks "
                   "(they stop at the same step and rank 0 saves it: run the same command to resume)", err=True)
        return 128 + int(e.sigval)
    finally:
        if not had_omp:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def _check_sets_early(cfg: FitConfig) -> None:
    """Bad ``--set`` values fail here, before any process or data is started."""
    if cfg.sets and not isinstance(cfg.target.obj, Experiment):
        parse_sets(cfg.sets, cfg.target.obj)
    elif cfg.sets:
        configure(cfg.target, cfg.sets)  # raises: an Experiment object has no hyperparameters


def _metrics_line(metrics: dict[str, float], prefix: str = "") -> str:
    """``accuracy 0.9722  loss 0.2078``: by name (``acc`` spelled out)."""
    named = sorted((("accuracy" if k == "acc" else k), v) for k, v in metrics.items())
    return "  ".join(f"{prefix}{k} {v:.4f}" for k, v in named)


@main.command()
@fit_options
@click.pass_context
def fit(ctx: click.Context, **params: Any) -> None:
    """Train TARGET, then test it; print a summary.

    TARGET defaults to the bundled digits experiment. Logs go to the run
    directory (metrics.csv, metrics.jsonl, experiment.json, config.yaml),
    checkpoints to <run-dir>/checkpoints (every epoch and where training stops;
    the newest 3 are kept). Run it again with the same --run-dir and it resumes;
    --no-resume moves the previous run to <run-dir>/previous/<n> and starts afresh.

    --config FILE reads the TARGET, hyperparameters and options from a YAML or
    TOML file; options on the command line override it. --print-config prints
    the complete resolved config (what --config reads back as the same run).

    With --devices N (N > 1) the command starts N processes of itself, as
    `torchrun --nproc-per-node N -m fnlight.cli fit ...` would; if one rank
    dies, the others are stopped and the command exits with that rank's exit
    code (128 + n for a signal n).
    Each rank reads its shard of the data; only rank 0 prints and writes logs.

    \b
    Example:
        fnlight fit --max-epochs 5 --run-dir runs/digits
        fnlight fit my_exp.py:mlp --set hidden=128 --set lr=3e-3 --early-stopping val/loss
        fnlight fit --max-steps 200 --print-config > run.yaml && fnlight fit --config run.yaml
    """
    cfg = read_fit(params)
    devices, seeds, sweep = cfg["devices"], cfg["seeds"], cfg["sweep"]
    _check_sets_early(cfg)
    if params["print_config"]:
        exp, hparams = cfg.build()
        click.echo(cfg.resolve(exp, hparams).to_yaml(), nl=False)
        return
    dev, launched = check_processes(cfg, seed_given=params["seed"] is not None)
    if devices > 1:
        ctx.exit(_launch(ctx, devices))
    if launched:
        distributed.init(backend="nccl" if dev.type == "cuda" else "gloo", timeout_s=cfg["timeout_s"])
    lead, world = distributed.rank() == 0, distributed.world_size()
    # (after init: the data is sharded, and the learning-rate schedule counted, for this rank)
    tgt, members = cfg.target, None
    if seeds is not None or sweep is not None:
        members = build_members(tgt, cfg.sets, seeds=seeds, sweep=sweep, max_epochs=cfg.given("max_epochs"),
                                recorded=cfg.hparams)
        exp, hparams = members.first, members.hparams[0]
    else:
        exp, hparams = cfg.build()
    run = location(cfg["run_dir"]) if cfg["run_dir"] is not None else \
        distributed.broadcast_object(next_version("runs") if lead else None)
    cfg = cfg.resolve(exp, hparams, run_dir=run)
    ckpt_dir = run / "checkpoints"
    ctx.with_resource(claim(run))  # until the command ends: nobody else sets this run aside or trains in it
    if lead and not cfg["resume"]:
        aside = set_aside(run)  # kept, not deleted: a new run that fails at step 0 loses nothing
        if aside is not None:
            click.echo(f"--no-resume: the previous run is kept in {aside} (delete it when no longer needed)",
                       err=True)
    if lead and cfg["resume"] and list_checkpoints(ckpt_dir):
        before = read_record(run).get("overrides")
        if before is not None and before != json.loads(json.dumps(hparams, default=repr)):
            click.echo(f"note: resuming {run}, trained with {format_hparams(before) or 'the defaults'}, with "
                       f"{format_hparams(hparams) or 'the defaults'} now", err=True)
    options = cfg.trainer_options()
    trainer = exp.trainer(**{**options, "loggers": (*options["loggers"], ConsoleLogger())}, run_dir=run,
                          ckpt_dir=ckpt_dir, resume=cfg["resume"], async_save=True)
    ranks = f", {world} ranks" if world > 1 else ""
    state0 = exp.init_state()
    _echo_rank0(f"fit: {exp.name}, {state0.num_params:,} parameters, "
                f"data fingerprint {exp.datamodule.fingerprint[:16]}, device {trainer.torch_device}{ranks}")
    if cfg["summary"]:
        exp.datamodule.prepare()  # (every rank: a download waits at a barrier)
        if lead:
            click.echo("\n".join(summary_lines(exp, state0)))
    if members is not None:
        _echo_rank0(f"{len(members.labels)} members in one vectorized step ({members.what}): "
                    + ", ".join(members.labels))
    elif hparams:
        _echo_rank0(f"hyperparameters: {format_hparams(hparams)}")
    recorded = []

    def record(_: object) -> None:  # experiment.json and config.yaml: once this run has a checkpoint, never before
        if not recorded:
            write_record(run, tgt, exp, hparams)
            write_config(run, cfg)
            recorded.append(True)

    t0 = time.perf_counter()
    try:
        with _lines_to_console(lead):
            if members is None:
                result, test = exp.run(trainer, hparams=all_hparams(tgt, hparams), on_checkpoint=record,
                                       config=cfg.as_dict(), **cfg.step_options())
            else:
                result, test = _fit_members(trainer, tgt, members, record, cfg)
    except CheckpointError as e:
        raise CliError(f"cannot resume from {ckpt_dir} (--no-resume starts afresh, keeping this run aside; or "
                       f"give another --run-dir): {e}") from e
    except Interrupted as e:
        _echo_rank0(f"interrupted by {e.signal.name} at step {e.step}, epoch {e.epoch}; "
                    + (f"checkpoint {e.checkpoint}; run the same command to resume" if e.checkpoint is not None
                       else "nothing saved"), err=True)
        _close_group()
        ctx.exit(e.exit_code)
    wall = time.perf_counter() - t0
    last = {k: v for k, v in (result.history[-1] if result.history else {}).items()
            if k not in ("epoch", "step", "time_s")}
    if last and not result.already_finished:
        _echo_rank0(f"final epoch {result.history[-1]['epoch']}: {_metrics_line(last)}")
    if test:
        _echo_rank0(_metrics_line({k: v for k, v in test.items() if members is None or not k[-1].isdigit()},
                                  "test "))
    if members is not None:
        for line in members_summary(members, result.history, test):
            _echo_rank0(line)
    steps = scalar_step(result.state)
    resumed_at = int(result.resumed_from.name[5:]) if result.resumed_from is not None else None
    if result.already_finished:
        _echo_rank0(f"already finished at step {steps} ({_reason(result.finished)}; {result.resumed_from}): nothing "
                    f"trained (raise --max-epochs or --max-steps to continue); run directory: {result.run_dir}")
    elif result.finished and result.finished.startswith("stopped by"):
        _echo_rank0(f"{steps} steps in {wall:.1f} s, {result.finished}; run directory: {result.run_dir}")
    else:
        _echo_rank0(f"{steps} steps in {wall:.1f} s" + (f" (resumed at step {resumed_at})" if resumed_at is not None
                                                        else "") + f"; run directory: {result.run_dir}")
    _close_group()


def _fit_members(trainer: Trainer, tgt: Target, members: Members, record: Callable[[Path], None],
                 cfg: FitConfig) -> tuple[Any, dict[str, float]]:
    """``Experiment.run`` for an ensemble run: fit the stacked members, then test them."""
    exp = members.first
    eval_step = members.eval_step(cfg["precision"])
    hparams = {"members": [all_hparams(tgt, hp) for hp in members.hparams], "labels": members.labels}
    result = trainer.fit(members.state, members.train_step(**cfg.step_options()), exp.datamodule,
                         eval_step=eval_step if exp.has_stage("validate") else None, hparams=hparams,
                         on_checkpoint=record, config=cfg.as_dict())
    test = trainer.test(result.state, eval_step, exp.datamodule) if exp.has_stage("test") else {}
    return result, test


def _reason(finished: str | None) -> str:
    return {"max_epochs": "max_epochs reached", "max_steps": "max_steps reached"}.get(finished or "", finished or "")


def _close_group() -> None:
    if distributed.is_initialized():
        distributed.barrier()  # no rank tears the group down while another still needs it
        torch.distributed.destroy_process_group()


class _ConsoleLines(logging.Handler):
    """fnlight's log lines on the console while a command runs: notes (resume...) on stdout, warnings on
    stderr; the per-epoch progress lines are left out (the console logger prints the epochs)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "fnlight.progress" or record.getMessage().startswith(("interrupted by", "already finished")):
            return  # (the console logger prints the epochs; the command its own interrupt and finished lines)
        click.echo(("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage(),
                   err=record.levelno >= logging.WARNING)


@contextlib.contextmanager
def _lines_to_console(on: bool) -> Iterator[None]:
    handler = _ConsoleLines()
    logger = logging.getLogger("fnlight")
    if on:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# -- validate / test / predict ---------------------------------------------------------------------

def _load(target: str | None, ckpt: str, sets: tuple[str, ...], device: str | None, command: str,
          member: int | None = None) -> tuple[Target, Experiment, list[tuple[str, TrainState]], Path]:
    """Build the experiment and load the checkpoint: its state, or an ensemble's members (``fit --seeds``),
    each checked against the experiment's state.

    The hyperparameters that the checkpoint's run recorded (``<run>/experiment.json``, when it trained
    the same TARGET) are used first, so ``--set`` given to ``fit`` need not be repeated. An ensemble's
    members share the model, so the first member's build the experiment.
    """
    tgt = load_target(target)
    path = resolve_checkpoint(ckpt)
    dev = parse_device(device)
    check_device_available(dev)
    recorded, record = recorded_hparams(path, tgt)
    members = recorded_members(recorded)
    exp, hparams = configure(tgt, sets, recorded=members[0] if members else recorded)
    if record is not None and recorded and not members:
        click.echo(f"hyperparameters of the run ({record}): {format_hparams(hparams)}", err=True)
    state, meta = load_checkpoint(path)
    like = exp.init_state()
    states = pick_members(state, member_labels(recorded, num_members(state) or 0), member, command)
    for label, one in states:
        # an ensemble member's optimizer state may be another optimizer's (a sweep's): compare its model only
        got, want = (one, like) if not label else ((one.params, one.buffers), (like.params, like.buffers))
        problems = differences(got, want)
        if problems:
            raise CliError(f"the checkpoint at {path}{f' (member {label})' if label else ''} does not match the "
                           "expected state:\n  " + "\n  ".join(problems))
    saved = (meta.get("pipeline") or {}).get("fingerprint") if isinstance(meta.get("pipeline"), dict) else None
    if saved and saved != exp.datamodule.fingerprint:
        click.echo(f"note: the checkpoint was trained on data pipeline {saved[:16]}, this experiment's is "
                   f"{exp.datamodule.fingerprint[:16]} (other data or hyperparameters)", err=True)
    return tgt, exp, [(label, device_put(one, dev)) for label, one in states], path


def _evaluate(stage: str, target: str | None, ckpt: str, sets: tuple[str, ...], device: str | None,
              as_json: bool, member: int | None) -> None:
    _, exp, states, path = _load(target, ckpt, sets, device, stage, member)
    if not exp.has_stage(stage):
        raise CliError(f"{exp.name} has no {exp.datamodule.split_for(stage)!r} split for {stage} (its splits: "
                       f"{', '.join(exp.datamodule.split_names)})")
    trainer = Trainer(device=device, loggers=())
    results = [(label, getattr(trainer, stage)(state, exp.eval_step(), exp.datamodule), int(state.step))
               for label, state in states]
    if len(results) == 1:
        label, metrics, step = results[0]
        if as_json:
            click.echo(json.dumps({"stage": stage, "metrics": metrics, "checkpoint": str(path), "step": step}))
        else:
            click.echo(f"{stage}: {_metrics_line(metrics)}  (checkpoint {path}, step {step}"
                       f"{f', member {label}' if label else ''})")
        return
    mean = {k: sum(m[k] for _, m, _ in results) / len(results) for k in results[0][1]}
    if as_json:
        click.echo(json.dumps({"stage": stage, "metrics": mean, "checkpoint": str(path), "step": results[0][2],
                               "members": [{"label": label, "metrics": m} for label, m, _ in results]}))
        return
    for i, (label, metrics, _) in enumerate(results):
        click.echo(f"{stage} member {i} ({label}): {_metrics_line(metrics)}")
    click.echo(f"{stage} mean of {len(results)} members: {_metrics_line(mean)}  (checkpoint {path}, "
               f"step {results[0][2]})")


def _member_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--member", type=int, default=None, metavar="I",
                        help="With an ensemble's checkpoint (fit --seeds/--sweep): member I only.")(f)


def _evaluate_command(stage: str, doc: str) -> click.Command:
    @_target_argument
    @_ckpt_option
    @_member_option
    @_set_option
    @_device_option
    @click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
    def command(target: str | None, ckpt: str, member: int | None, sets: tuple[str, ...], device: str | None,
                as_json: bool) -> None:
        _evaluate(stage, target, ckpt, sets, device, as_json, member)

    command.__doc__ = doc
    return main.command(stage)(command)


validate_command = _evaluate_command("validate", """Metrics of a checkpoint on TARGET's validation split.

    \b
    Example:
        fnlight validate --ckpt runs/version_0
    """)
test_command = _evaluate_command("test", """Metrics of a checkpoint on TARGET's test split.

    \b
    Example:
        fnlight test my_exp.py:mlp --ckpt runs/mlp/checkpoints/step_000000460 --json
    """)


def _default_split(exp: Experiment, split: str | None) -> str:
    names = exp.datamodule.split_names
    if split is None:
        for stage in ("predict", "test", "validate"):
            if exp.has_stage(stage):
                return exp.datamodule.split_for(stage)
        return names[0]
    if split not in names:
        raise CliError(f"--split {split}: {exp.name} has the splits {', '.join(names)}")
    return split


def _named_tensors(tree: Any, name: str) -> dict[str, torch.Tensor]:
    """A tree of tensors as flat ``name.key.0`` names (for a safetensors file)."""
    if isinstance(tree, torch.Tensor):
        return {name: tree.detach().cpu().contiguous()}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, tuple | list) else None
    if items is None:
        raise CliError(f"predictions must be tensors (or tuples, lists, dicts of them), got {type(tree).__name__}")
    return {k: v for key, sub in items for k, v in _named_tensors(sub, f"{name}.{key}").items()}


@main.command(short_help="Write a checkpoint's predictions on a split to a file.")
@_target_argument
@_ckpt_option
@click.option("-o", "--output", default="predictions.safetensors", show_default=True, type=click.Path(dir_okay=False),
              help="Where the predictions go (safetensors).")
@click.option("--split", default=None, help="The split to predict (default: the predict split, else test).")
@_member_option
@_set_option
@_device_option
def predict(target: str | None, ckpt: str, output: str, split: str | None, member: int | None,
            sets: tuple[str, ...], device: str | None) -> None:
    """Write a checkpoint's predictions on a split to a safetensors file.

    The file holds `predictions` (or `predictions.<key>` for several outputs)
    and `indices`: the samples' indices in the split, in the same order.

    \b
    Example:
        fnlight predict --ckpt runs/version_0 -o preds.safetensors
    """
    from safetensors.torch import save_file

    tgt, exp, [(_, state)], path = _load(target, ckpt, sets, device, "predict", member)
    split = _default_split(exp, split)
    dm = exp.datamodule.replace(stages={**exp.datamodule.stages, "predict": split})
    outputs = Trainer(device=device, loggers=()).predict(state, exp.forward, dm)
    tensors = _named_tensors(outputs, "predictions")
    n = len(next(iter(tensors.values()))) if tensors else 0
    tensors["indices"] = torch.cat(dm.index_batches(split, 0)) if n else torch.zeros(0, dtype=torch.int64)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, output, metadata={"target": tgt.spec, "checkpoint": str(path), "split": split,
                                         "step": str(int(state.step))})
    shapes = ", ".join(f"{k} {str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for k, t in tensors.items())
    click.echo(f"predict: {n} samples of {split!r} -> {output} ({shapes})")


# -- verify -------------------------------------------------------------------------------------------

@main.command(short_help="Check that TARGET trains reproducibly and resumes exactly.")
@_target_argument
@click.option("--steps", type=click.IntRange(min=2), default=30, show_default=True,
              help="Train this many steps (fewer if the experiment's max_epochs end sooner).")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="Interrupt the third run after this step (default: half of the steps).")
@click.option("--seed", type=int, default=None, help="As for fit.")
@_device_option
@click.option("--compile", "compile_", is_flag=True, help="Run the step through torch.compile (default: as the "
                                                          "experiment says).")
@click.option("--precision", type=click.Choice(["32", "bf16-mixed"]), default=None,
              help="Autocast to bfloat16 (default: the experiment's precision).")
@_set_option
@click.pass_context
def verify(ctx: click.Context, target: str | None, steps: int, stop_at: int | None, seed: int | None,
           device: str | None, compile_: bool, precision: str | None, sets: tuple[str, ...]) -> None:
    """Check that TARGET trains bitwise reproducibly and resumes exactly.

    Trains it twice from scratch, and once interrupted after --stop-at steps
    and resumed from its checkpoint (each run builds the experiment afresh).
    Exits 0 when all final states (and metrics) are bitwise identical;
    otherwise 1, naming the first step after which two runs differ and the
    first differing leaf.

    \b
    Example:
        fnlight verify my_exp.py:mlp --steps 20
    """
    from ._cli_verify import verify as run_verify

    dev = parse_device(device)
    check_device_available(dev)
    tgt = load_target(target)
    exp, hparams = configure(tgt, sets, seed=seed)  # checks --set now, and names the experiment

    def build() -> Experiment:
        return configure(tgt, sets, seed=seed)[0]

    click.echo(f"verify: {exp.name}" + (f" ({format_hparams(hparams)})" if hparams else "")
               + f", device {dev}: 3 runs of up to {steps} steps ...", err=True)
    report = run_verify(build, steps, stop_at, device=device, name=exp.name,
                        step_options={k: v for k, v in (("compile", compile_ or None), ("precision", precision))
                                      if v is not None})
    click.echo("\n".join(report.lines()))
    ctx.exit(0 if report.ok else 1)


# -- inspect, export, plot --------------------------------------------------------------------------

@main.command(short_help="Show a checkpoint's metadata, tensors and checksum.")
@click.argument("ckpt", metavar="CKPT")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect(ckpt: str, as_json: bool) -> None:
    """Show a checkpoint: metadata, tensors (name, shape, dtype, bytes), checksum.

    CKPT is a checkpoint directory, or a run (or checkpoints) directory: its
    newest checkpoint. A corrupted checkpoint is an error (exit code 2).

    \b
    Example:
        fnlight inspect runs/version_0/checkpoints/step_000000920
    """
    from ._cli_files import checkpoint_info, format_info

    info = checkpoint_info(resolve_checkpoint(ckpt))
    click.echo(json.dumps(info, indent=1) if as_json else "\n".join(format_info(info)))


@main.command(short_help="Export a checkpoint's model, checked on a batch.")
@_target_argument
@_ckpt_option
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "safetensors"]), required=True,
              help="onnx needs pip install 'fnlight[onnx]'.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where it goes (default: model.onnx, model.pt or model.safetensors).")
@click.option("--split", default=None, help="The split of the batch the export is checked on (default: the "
                                            "predict split, else test).")
@_member_option
@_set_option
@_device_option
@click.pass_context
def export(ctx: click.Context, target: str | None, ckpt: str, fmt: str, output: str | None, split: str | None,
           member: int | None, sets: tuple[str, ...], device: str | None) -> None:
    """Export a checkpoint's model (onnx, torchscript, safetensors), checked on a batch.

    The exported file is loaded back and run on the first batch of --split;
    its outputs must match the functional model's (allclose, rtol 1e-4, atol
    1e-5), else the command exits 1. The max difference is printed.

    \b
    Example:
        fnlight export --ckpt runs/version_0 --format torchscript -o digits.pt
    """
    from ._cli_export import SUFFIX
    from ._cli_export import export as run_export

    tgt, exp, [(_, state)], path = _load(target, ckpt, sets, device, "export", member)
    split = _default_split(exp, split)
    out = Path(output or f"model{SUFFIX[fmt]}")
    with exp.datamodule.replace(device=str(state.step.device)).batches(split, 0) as batches:
        batch = device_put(next(iter(batches)), state.step.device)
    diff, ok = run_export(exp, state, batch, fmt, out, metadata={"target": tgt.spec, "checkpoint": str(path),
                                                                  "step": str(int(state.step))})
    verdict = "matches" if ok else "DOES NOT match"
    click.echo(f"export: {fmt} -> {out} ({out.stat().st_size:,} bytes); on a batch of {batch_size(batch)} from "
               f"{split!r} it {verdict} the functional model (max abs difference {diff:.3g})")
    ctx.exit(0 if ok else 1)


@main.command(short_help="Plot runs' loss and metric curves in one PNG.")
@click.argument("run_dirs", metavar="RUN [RUN ...]", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="The PNG (default: <RUN>/curves.png for one run, curves.png for several).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Only this metric's panels (loss, acc, 'loss per step'...); repeat for more. Default: all.")
def plot(run_dirs: tuple[str, ...], output: str | None, metrics: tuple[str, ...]) -> None:
    """Plot runs' loss and metric curves (from their metrics.jsonl or .csv) to a PNG.

    Several runs share one figure: a colour per run and a legend. Epoch ticks
    are whole numbers; a dotted line marks where a run was resumed.
    Needs matplotlib: pip install 'fnlight[plot]'.

    \b
    Example:
        fnlight plot runs/version_0 -o curves.png
        fnlight plot runs/a runs/b --metric loss --metric acc -o ab.png
    """
    from ._cli_files import plot_runs

    runs = [Path(r) for r in run_dirs]
    default = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    out = plot_runs(runs, Path(output) if output else default, metrics)
    click.echo(f"plot: {out}")


@main.command(short_help="Show TARGET's modules, parameters, state size and data.")
@_target_argument
@_set_option
@click.option("--config", default=None, metavar="FILE", help="Read the TARGET and hyperparameters from a config "
                                                             "file (as fit --print-config writes it).")
@click.option("--depth", type=click.IntRange(min=1), default=1, show_default=True,
              help="Show modules down to this depth (1: the model's children).")
def summary(target: str | None, sets: tuple[str, ...], config: str | None, depth: int) -> None:
    """Show TARGET's summary: its modules (type, parameters, trainable or
    frozen, output shape on one batch), totals, the training state's size in
    bytes (optimizer state included), and its data (splits, samples, batches
    per epoch, the pipeline). `fit` prints the same when it starts.

    \b
    Example:
        fnlight summary --set hidden=64 --depth 2
    """
    cfg = read_fit({"target": target, "sets": sets, "config": config})
    exp, hparams = cfg.build()
    click.echo(f"{exp.name} ({cfg.target.spec})" + (f"; {format_hparams(hparams)}" if hparams else ""))
    exp.datamodule.prepare()
    click.echo("\n".join(summary_lines(exp, depth=depth)))


# -- data ---------------------------------------------------------------------------------------------

@main.group()
def data() -> None:
    """Inspect and time data pipelines."""


@data.command("describe")
@_target_argument
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def data_describe(target: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Print TARGET's data pipeline: stages, hyperparameters, seed, fingerprint.

    \b
    Example:
        fnlight data describe --set batch_size=32
    """
    tgt = load_target(target)
    exp, hparams = configure(tgt, sets)
    dm = exp.datamodule
    if as_json:
        click.echo(json.dumps({"target": tgt.spec, "hparams": hparams, "description": dm.pipeline.describe(),
                               "seed": dm.seed, "stages": dict(dm.stages), "fingerprint": dm.fingerprint},
                              indent=2, default=repr))
        return
    click.echo(f"{exp.name} ({tgt.spec})" + (f"; {format_hparams(hparams)}" if hparams else ""))
    click.echo("pipeline")
    click.echo("\n".join(pipeline_tree(dm.pipeline.describe())))
    click.echo(f"seed: {dm.seed}\nstages: {', '.join(f'{k} -> {v}' for k, v in dm.stages.items())}")
    click.echo(f"fingerprint: {dm.fingerprint}")


@data.command("bench")
@_target_argument
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Epochs of each split.")
@click.option("--split", "splits", multiple=True, help="Only this split (repeatable; default: all).")
@_set_option
def data_bench(target: str | None, epochs: int, splits: tuple[str, ...], sets: tuple[str, ...]) -> None:
    """Time TARGET's data pipeline: batches/s and samples/s of each split.

    The pipeline is prepared (downloads) and built first, untimed; then every
    batch of each split is produced for --epochs epochs.

    \b
    Example:
        fnlight data bench --epochs 3
    """
    tgt = load_target(target)
    exp, _ = configure(tgt, sets)
    dm = exp.datamodule
    t0 = time.perf_counter()
    dm.prepare()
    names = dm.split_names
    unknown = [s for s in splits if s not in names]
    if unknown:
        raise CliError(f"--split {unknown[0]}: {exp.name} has the splits {', '.join(names)}")
    click.echo(f"data bench: {exp.name}, fingerprint {dm.fingerprint[:16]}; prepared and built in "
               f"{time.perf_counter() - t0:.2f} s; {epochs} epoch(s) per split")
    click.echo(f"{'split':<10} {'batches':>8} {'samples':>9} {'seconds':>8} {'batches/s':>10} {'samples/s':>11}")
    for split in splits or names:
        n_batches = n_samples = 0
        t = time.perf_counter()
        for epoch in range(epochs):
            with dm.batches(split, epoch) as batches:
                for b in batches:
                    n_batches += 1
                    n_samples += batch_size(b)
        s = max(time.perf_counter() - t, 1e-9)
        click.echo(f"{split:<10} {n_batches:>8} {n_samples:>9} {s:>8.3f} {n_batches / s:>10.1f} "
                   f"{n_samples / s:>11.1f}")
    dm.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
