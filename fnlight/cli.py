"""The ``fnlight`` command line (click). The only place that parses user input.

Example:
    $ fnlight fit                 # the bundled digits experiment
    $ fnlight fit --devices 2     # the same in 2 processes (torchrun's launcher, started for you)
    $ torchrun --nproc-per-node 2 -m fnlight.cli fit   # or started by torchrun itself
    $ fnlight data describe       # its pipeline, hyperparameters and fingerprint
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

import click
import torch

from . import __version__, distributed
from .experiment import digits, digits_datamodule
from .train import ConsoleLogger, CSVLogger, JSONLLogger, Trainer


def _tree(desc: dict[str, Any]) -> str:
    lines = []
    for i, st in enumerate(desc["stages"]):
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in st.items() if k != "stage")
        lines.append(f"  {i}. {st['stage']}({params})")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fnlight")
def main() -> None:
    """fnlight: pure-functional, reproducible training for PyTorch."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _forwarded(ctx: click.Context, leave_out: tuple[str, ...]) -> list[str]:
    """The options given on this command line (not their defaults), as argv again, minus ``leave_out``."""
    argv: list[str] = []
    for param in ctx.command.params:
        name, value = param.name, ctx.params.get(param.name)
        if (name in leave_out or not isinstance(param, click.Option) or value is None
                or ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT)):
            continue
        if param.is_flag:
            argv += [param.opts[0]] if value else []
        else:
            argv += [param.opts[0], str(value)]
    return argv


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

    argv = [f"--nproc-per-node={devices}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
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
        click.echo(f"fnlight fit: interrupted by {signal.Signals(e.sigval).name}; the ranks were stopped", err=True)
        return 128 + int(e.sigval)
    finally:
        if not had_omp:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


@main.command()
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the experiment's).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights, shuffles and dropout.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available).")
@click.option("--devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train in this many processes (data parallel; one GPU each with CUDA, gloo on CPU), "
                   "started through torchrun's launcher. Under torchrun, leave it out.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With several processes: how long a collective waits for the other ranks before failing "
                   "(default: $FNLIGHT_DIST_TIMEOUT or 300).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where logs go (default: runs/version_<n>).")
@click.option("--compile", "compile_", is_flag=True, help="Run the step through torch.compile.")
@click.option("--precision", type=click.Choice(["32", "bf16-mixed"]), default="32", show_default=True)
@click.pass_context
def fit(ctx: click.Context, max_epochs: int | None, max_steps: int | None, seed: int, device: str | None,
        devices: int, timeout_s: float | None, run_dir: str | None, compile_: bool, precision: str) -> None:
    """Train the bundled digits experiment and report its test metrics.

    With --devices N (N > 1) the command starts N processes of itself, as
    `torchrun --nproc-per-node N -m fnlight.cli fit ...` would; if one rank
    dies, the others are stopped and the command exits with that rank's exit
    code (128 + n for a signal n).
    Each rank reads its shard of the data; only rank 0 prints and writes logs.
    """
    try:
        dev = torch.device(device) if device is not None else None
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    dev = dev or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launched = "WORLD_SIZE" in os.environ  # this process is one rank of a torchrun launch
    several = devices > 1 or (launched and os.environ["WORLD_SIZE"] != "1")
    if several and dev.type == "cuda" and dev.index is not None:
        raise click.BadParameter(f"{device!r}: with several processes each rank uses cuda:<its local rank>; "
                                 "give --device cuda", param_hint="--device")
    if devices > 1:
        if launched:
            raise click.BadParameter(f"this process is already one of {os.environ['WORLD_SIZE']} ranks launched "
                                     "by torchrun (WORLD_SIZE is set): leave out --devices, torchrun decides how "
                                     "many processes run", param_hint="--devices")
        if dev.type == "cuda" and devices > torch.cuda.device_count():
            raise click.BadParameter(f"{devices} processes on CUDA need {devices} GPUs; this machine has "
                                     f"{torch.cuda.device_count()} (use --device cpu for CPU processes)",
                                     param_hint="--devices")
        ctx.exit(_launch(ctx, devices))
    if launched:
        distributed.init(backend="nccl" if dev.type == "cuda" else "gloo", timeout_s=timeout_s)
    echo = click.echo if distributed.rank() == 0 else (lambda *a, **k: None)
    world = distributed.world_size()
    # (after init: the data is sharded, and the learning-rate schedule counted, for this rank)
    exp = digits(seed=seed, **({"max_epochs": max_epochs} if max_epochs else {}))
    trainer = Trainer(max_epochs=exp.max_epochs, max_steps=max_steps, run_dir=run_dir, device=device,
                      loggers=(CSVLogger(), JSONLLogger(), ConsoleLogger()))
    ranks = f", {world} ranks" if world > 1 else ""
    echo(f"fit: digits MLP, {exp.init_state().num_params:,} parameters, "
         f"data fingerprint {exp.datamodule.fingerprint[:16]}, device {trainer.torch_device}{ranks}")
    t0 = time.perf_counter()
    result, test = exp.run(trainer, compile=compile_, precision=precision)
    wall = time.perf_counter() - t0
    echo(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    echo(f"{int(result.state.step)} steps in {wall:.1f} s; run directory: {result.run_dir}")
    if distributed.is_initialized():
        distributed.barrier()  # no rank tears the group down while another still needs it
        torch.distributed.destroy_process_group()


@main.group()
def data() -> None:
    """Inspect data pipelines."""


@data.command("describe")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def data_describe(as_json: bool) -> None:
    """Print the digits pipeline: every stage, hyperparameter, and the fingerprint."""
    dm = digits_datamodule()
    if as_json:
        click.echo(json.dumps({"description": dm.pipeline.describe(),
                               "fingerprint": dm.fingerprint}, indent=2))
        return
    click.echo(_tree(dm.pipeline.describe()))
    click.echo(f"seed: {dm.seed}\nfingerprint: {dm.fingerprint}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
